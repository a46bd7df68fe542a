//! The runtime image (`docker build --target runtime`): there is no
//! container engine here, so what can be checked without one is: the
//! stage ships every binary, on distroless's glibc base, as its non-root
//! user, with `/files` a volume that user owns; and the binaries run in a
//! chroot that holds nothing but them and the shared libraries that base
//! ships (glibc and libgcc), as that user: `--version` of each (librdkafka
//! and OpenSSL inside), the demo's whole pipeline writing the volume and
//! `inspect-state` reading it back, and the dashboard serving `/healthz`. A chroot without libgcc shows the check
//! is real. Needs root (chroot); skipped, saying so, otherwise.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const BINARIES: [&str; 6] = ["producer", "consumer", "debug", "plot", "demo", "dashboard"];
/// The shared libraries of gcr.io/distroless/cc-debian12 that a Rust
/// program can link: glibc's (libc6) and libgcc-s1, libstdc++6, libgomp1.
const BASE_LIBRARIES: [&str; 10] = [
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libgomp.so.1",
];
const NONROOT: &str = "65532";

/// The runtime stage of the Dockerfile, from its FROM to the next.
fn runtime_stage() -> String {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let start = dockerfile
        .find("FROM gcr.io/distroless/cc-debian12:nonroot AS runtime")
        .expect("a runtime stage on distroless cc-debian12, non-root");
    let rest = &dockerfile[start..];
    let end = rest[4..].find("\nFROM ").map_or(rest.len(), |i| i + 4);
    rest[..end].to_string()
}

#[test]
fn the_runtime_stage_ships_every_binary_as_a_non_root_user_with_a_files_volume() {
    let stage = runtime_stage();
    for binary in BINARIES {
        assert!(
            stage.contains(&format!("/src/target/release/{binary} ")),
            "{binary} missing from the runtime stage:\n{stage}"
        );
    }
    for line in [
        "COPY --from=build --chown=65532:65532 /empty /files",
        "ENV FILES_DIR=/files \\",
        "CONSUMER_METRICS_ADDR=0.0.0.0:8797",
        "VOLUME /files",
        "USER 65532:65532",
    ] {
        assert!(stage.lines().any(|l| l.trim() == line), "{line}:\n{stage}");
    }
    assert!(
        !stage.contains("apt-get"),
        "nothing installed on distroless"
    );
}

/// The shared libraries `binary` needs, as `ldd` resolves them: soname to
/// the file.
fn needed_libraries(binary: &Path) -> Vec<(String, PathBuf)> {
    let out = Command::new("ldd").arg(binary).output().unwrap();
    assert!(out.status.success(), "ldd {}", binary.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with("linux-vdso") {
                return None;
            }
            let (name, path) = match line.split_once(" => ") {
                Some((name, rest)) => (name.to_string(), rest.split(" (").next()?.to_string()),
                None => {
                    let path = line.split(" (").next()?.to_string();
                    let name = Path::new(&path).file_name()?.to_string_lossy().into_owned();
                    (name, path)
                }
            };
            Some((name, PathBuf::from(path)))
        })
        .collect()
}

fn binary_path(name: &str) -> PathBuf {
    PathBuf::from(bin(name).get_program())
}

/// A root folder with the binaries, `libraries` (at the paths the loader
/// looks in), an /etc/passwd of the non-root user, and /files owned by it.
fn chroot_with(root: &Path, libraries: &[(String, PathBuf)]) {
    let bin_dir = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    for binary in BINARIES {
        std::fs::copy(binary_path(binary), bin_dir.join(binary)).unwrap();
    }
    for (_, path) in libraries {
        let inside = root.join(path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        // The file itself, not a symbolic link to the host's.
        std::fs::copy(std::fs::canonicalize(path).unwrap(), &inside).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("files")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    let owned = Command::new("chown")
        .arg(format!("{NONROOT}:{NONROOT}"))
        .arg(root.join("files"))
        .status()
        .unwrap();
    assert!(owned.success());
}

/// `binary args` in the chroot at `root`, as the non-root user.
fn in_chroot(root: &Path, binary: &str, args: &[&str]) -> Command {
    // Found on this PATH: the child's environment is cleared.
    let chroot = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("chroot"))
        .find(|path| path.exists())
        .expect("chroot (coreutils) on the PATH");
    let mut cmd = Command::new(chroot);
    cmd.arg(format!("--userspec={NONROOT}:{NONROOT}"))
        .arg(root)
        .arg(format!("/usr/local/bin/{binary}"))
        .args(args)
        .env_clear()
        .env("FILES_DIR", "/files")
        .env("PATH", "/usr/local/bin");
    cmd
}

#[test]
fn the_binaries_run_with_only_the_libraries_of_the_base_image() {
    // SAFETY: geteuid only reads the process's user id.
    #[allow(unsafe_code)]
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: chroot needs root");
        return;
    }
    let mut libraries: Vec<(String, PathBuf)> = Vec::new();
    let mut names = BTreeSet::new();
    for binary in BINARIES {
        for (name, path) in needed_libraries(&binary_path(binary)) {
            assert!(
                BASE_LIBRARIES.contains(&name.as_str()),
                "{binary} needs {name}, which the distroless cc base does not ship"
            );
            if names.insert(name.clone()) {
                libraries.push((name, path));
            }
        }
    }
    eprintln!("libraries the binaries need: {names:?}");

    let root = tempfile::tempdir().unwrap();
    chroot_with(root.path(), &libraries);
    for binary in BINARIES {
        let out = in_chroot(root.path(), binary, &["--version"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("librdkafka") && text.contains("ssl"),
            "{binary} --version in the chroot: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The whole pipeline (the demo's embedded broker) into the volume, as
    // the non-root user; then its state read back.
    let out = in_chroot(root.path(), "demo", &["--days", "60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the demo in the chroot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.path().join("files/partition-0.json").exists());
    assert!(root.path().join("files/month.svg").exists());
    let out = in_chroot(root.path(), "consumer", &["inspect-state"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("partition 0"),
        "inspect-state in the chroot: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dashboard = Running::spawn(in_chroot(
        root.path(),
        "dashboard",
        &["--listen", "127.0.0.1:0"],
    ));
    let address = dashboard.listening_address();
    let (status, _, _) = http(&address, "GET", "/healthz", None);
    assert_eq!(status, 200, "{}", dashboard.stderr_text());
    assert!(dashboard.terminate().success());

    // Without libgcc the same binaries do not start: the chroot is real.
    let bare = tempfile::tempdir().unwrap();
    let without: Vec<_> = libraries
        .iter()
        .filter(|(name, _)| name != "libgcc_s.so.1")
        .cloned()
        .collect();
    assert!(without.len() < libraries.len(), "{names:?}");
    chroot_with(bare.path(), &without);
    let out = in_chroot(bare.path(), "consumer", &["--version"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "ran without libgcc_s");
}
