//! `dashboard`: the live web page the files were made for. It owns a small
//! read-only HTTP server over the files folder: `/` (the page: HTML, CSS and
//! JS embedded in the binary, no framework, no external requests),
//! `/api/state` (every partition file merged, with file times and parse
//! errors, built from whole files: they are replaced atomically),
//! `/month.svg` and `/partition-N.json` as they are. Nothing else is served:
//! any other path, `/../` and its encodings included, is 404, and the server
//! never writes.
//!
//! The server is a fixed pool of threads accepting on one listener, each
//! connection with read and write timeouts and a bounded request head, so a
//! slow or hostile client holds at most one thread for a few seconds.
//! (tiny_http, used for `/metrics`, spawns a thread per connection without
//! timeouts, which is why the dashboard does not use it.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use crate::chart::{partition_files, CHART_FILE};
use crate::published::parse_partition_json;
use crate::shutdown::Shutdown;

/// The page, embedded: it works offline and from a container.
const PAGE: &str = include_str!("dashboard/index.html");
/// Threads answering requests: enough for a few browsers polling twice a
/// second; a client beyond them waits in the listen queue.
const POOL_THREADS: usize = 8;
/// Longest a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head accepted (request line and headers).
const MAX_HEAD_BYTES: u64 = 8 * 1024;

/// What `dashboard` is asked to do.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    pub files_dir: PathBuf,
    pub listen: String,
}

/// Serves until shutdown.
pub fn run(config: &DashboardConfig, shutdown: &Shutdown) -> anyhow::Result<()> {
    let server = DashboardServer::start(&config.files_dir, &config.listen)?;
    println!(
        "dashboard: http://{}/ (files in {}); Ctrl-C stops it",
        server.address(),
        config.files_dir.display()
    );
    while !shutdown.wait(Duration::from_secs(1)) {}
    Ok(())
}

/// The running server; dropping it stops and joins its threads.
pub struct DashboardServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DashboardServer {
    /// Binds `listen` (an error names the address) and starts the pool.
    pub fn start(files_dir: &Path, listen: &str) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for n in 0..POOL_THREADS {
            let (listener, stop, files_dir) =
                (listener.clone(), stop.clone(), files_dir.to_path_buf());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("dashboard-{n}"))
                    .spawn(move || {
                        for stream in listener.incoming() {
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            if let Ok(stream) = stream {
                                if let Err(error) = serve(stream, &files_dir) {
                                    log::debug!("dashboard: {error}");
                                }
                            }
                        }
                    })
                    .context("starting a dashboard thread")?,
            );
        }
        Ok(DashboardServer {
            address,
            stop,
            threads,
        })
    }

    /// The address bound (the port the OS chose, for `:0`).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for DashboardServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Each blocked accept takes one connection to wake.
        for _ in &self.threads {
            let _ = TcpStream::connect(self.address);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A response: status, content type, body.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    fn not_found() -> Self {
        Response {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: b"not found\n".to_vec(),
        }
    }
}

fn serve(stream: TcpStream, files_dir: &Path) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new((&stream).take(MAX_HEAD_BYTES));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head: only a body's length matters, so that the body
    // is read before the connection closes (unread data makes the kernel
    // reset the connection, losing the response).
    let mut body_length = 0u64;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                body_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    // Through the reader: it may hold the start of the body already.
    std::io::copy(
        &mut (&mut reader).take(body_length.min(MAX_HEAD_BYTES)),
        &mut std::io::sink(),
    )?;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let response = if method == "GET" || method == "HEAD" {
        route(target, files_dir)
    } else {
        Response {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            body: b"only GET\n".to_vec(),
        }
    };
    let reason = match response.status {
        200 => "OK",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = &stream;
    write!(
        out,
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    )?;
    if method != "HEAD" {
        out.write_all(&response.body)?;
    }
    out.flush()
}

/// Maps a request target to a response. Only these exact paths exist, so
/// nothing outside the files folder (and nothing but these files in it)
/// can be named, however a path is encoded.
fn route(target: &str, files_dir: &Path) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" | "/index.html" => Response::ok("text/html; charset=utf-8", PAGE),
        "/api/state" => Response::ok(
            "application/json",
            serde_json::to_vec(&state_json(files_dir)).unwrap_or_default(),
        ),
        "/month.svg" => file(files_dir.join(CHART_FILE), "image/svg+xml"),
        _ => match partition_number(path) {
            Some(n) => file(
                files_dir.join(format!("partition-{n}.json")),
                "application/json",
            ),
            None => Response::not_found(),
        },
    }
}

/// `N` of `/partition-N.json`, digits only.
fn partition_number(path: &str) -> Option<u32> {
    let digits = path.strip_prefix("/partition-")?.strip_suffix(".json")?;
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn file(path: PathBuf, content_type: &'static str) -> Response {
    match std::fs::read(&path) {
        Ok(body) => Response::ok(content_type, body),
        Err(_) => Response::not_found(),
    }
}

fn modified_unix_ms(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every partition file, merged: for each, its number, file time, offset
/// and months as the file has them, or the reason it does not parse.
pub(crate) fn state_json(files_dir: &Path) -> Value {
    let mut partitions = Vec::new();
    for (partition, path) in partition_files(files_dir).unwrap_or_default() {
        let modified = modified_unix_ms(&path);
        let entry = match std::fs::read_to_string(&path) {
            Err(_) => continue, // replaced or removed between listing and reading
            Ok(text) => match (
                parse_partition_json(&text),
                serde_json::from_str::<Value>(&text),
            ) {
                (Ok(parsed), Ok(Value::Object(top))) => {
                    // Filtered, not removed: removal would reorder the
                    // months (serde_json's preserve_order swaps on remove).
                    let months: Map<String, Value> = top
                        .into_iter()
                        .filter(|(key, _)| key != "partition" && key != "offset")
                        .collect();
                    json!({
                        "partition": partition,
                        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                        "modified_unix_ms": modified,
                        "offset": parsed.offset,
                        "months": Value::Object(months),
                    })
                }
                (Err(error), _) => json!({
                    "partition": partition,
                    "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "modified_unix_ms": modified,
                    "error": error.to_string(),
                }),
                (Ok(_), _) => continue,
            },
        };
        partitions.push(entry);
    }
    let mut top = Map::new();
    top.insert("now_unix_ms".into(), now_unix_ms().into());
    top.insert("partitions".into(), Value::Array(partitions));
    top.insert(
        "chart_modified_unix_ms".into(),
        modified_unix_ms(&files_dir.join(CHART_FILE)).map_or(Value::Null, Value::from),
    );
    Value::Object(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_known_paths_are_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("partition-2.json"), "{}").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "no").unwrap();
        assert_eq!(route("/partition-2.json", dir.path()).status, 200);
        assert_eq!(route("/partition-2.json?x=1", dir.path()).status, 200);
        for target in [
            "/secret.txt",
            "/partition-3.json",
            "/../secret.txt",
            "/partition-../secret.json",
            "/partition-2.json/../../etc/passwd",
            "/%2e%2e/secret.txt",
            "/partition-%32.json",
            "/partition-+2.json",
            "/state/partition-0/db",
            "",
        ] {
            assert_eq!(route(target, dir.path()).status, 404, "{target}");
        }
        assert_eq!(
            route("/", dir.path()).content_type,
            "text/html; charset=utf-8"
        );
    }
}
