//! TLS for the tests: a private CA and its certificates made with the
//! `openssl` command, and stunnel terminating TLS in front of tansu (tansu
//! 0.6 serves plain TCP only, even with `--cert`/`--key`). Both come from
//! scripts/install-tls-tools.sh.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private CA with a server certificate for `localhost`/127.0.0.1 and a
/// client certificate, and a second CA with a server certificate of its
/// own ("impostor", for a server the clients do not trust).
pub struct Pki {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl (scripts/install-tls-tools.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=weatherstream test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            );
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, cn, ca, ext) in [
            ("server", "localhost", "ca", "server"),
            ("client", "weatherstream-client", "ca", "client"),
            ("impostor", "localhost", "other-ca", "server"),
        ] {
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{ext}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A `--web-config-file` serving TLS with the server certificate, plus
    /// `more` (YAML, e.g. `basic_auth_users`); its path.
    pub fn web_config(&self, more: &str) -> PathBuf {
        let path = self.dir.join("web.yml");
        std::fs::write(
            &path,
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n{more}",
                self.path("server.pem"),
                self.path("server.key")
            ),
        )
        .unwrap();
        path
    }
}

/// stunnel accepting TLS on a loopback port and forwarding plain TCP to
/// tansu; with `require_client_cert`, only clients with a certificate of
/// the CA get through (stunnel `verify = 2`).
pub struct Stunnel {
    pub port: u16,
    cert: String,
    child: Child,
}

impl Stunnel {
    pub fn start(pki: &Pki, backend_port: u16, require_client_cert: bool) -> Stunnel {
        Self::start_at(
            super::free_port(),
            pki,
            "server",
            backend_port,
            require_client_cert,
        )
    }

    /// On `port`, presenting certificate `cert` of `pki` ("server", or
    /// "impostor" of the other CA).
    pub fn start_at(
        port: u16,
        pki: &Pki,
        cert: &str,
        backend_port: u16,
        require_client_cert: bool,
    ) -> Stunnel {
        let config = pki.dir.join(format!("stunnel-{port}-{cert}.conf"));
        let verify = if require_client_cert {
            format!("CAfile = {}\nverify = 2\n", pki.path("ca.pem"))
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\ndebug = 4\noutput = {log}\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend_port}\ncert = {cert}\nkey = {key}\n{verify}",
                log = pki.path(&format!("stunnel-{port}-{cert}.log")),
                cert = pki.path(&format!("{cert}.pem")),
                key = pki.path(&format!("{cert}.key")),
            ),
        )
        .unwrap();
        let child = Command::new("stunnel")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting stunnel (scripts/install-tls-tools.sh installs it)");
        let mut stunnel = Stunnel {
            port,
            cert: cert.to_string(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = stunnel.child.try_wait() {
                panic!("stunnel exited ({status}); see {}", config.display());
            }
            assert!(Instant::now() < deadline, "stunnel did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        stunnel
    }

    /// What stunnel logged.
    pub fn log(&self, pki: &Pki) -> String {
        std::fs::read_to_string(pki.path(&format!("stunnel-{}-{}.log", self.port, self.cert)))
            .unwrap_or_default()
    }

    /// The address clients use: the certificate's name, and the port.
    pub fn address(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

impl Stunnel {
    /// Stops it (its port is free once this returns).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        self.stop();
    }
}
