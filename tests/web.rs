//! The HTTP endpoints (the dashboard and `consumer --metrics-addr`, one
//! server: src/web.rs) against clients that try to take them down or get
//! in: slowloris connections dripping a request head, a flood of held
//! request lines under a running pipeline (probes answered within 1 s
//! throughout), and TLS with basic auth from `--web-config-file` through
//! curl, a real client.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::tls::Pki;
use common::*;
use weatherstream::web::{HEAD_DEADLINE, MAX_CONNECTIONS};

const PASSWORD: &str = "glass-otter-51";

fn files_with_a_partition() -> tempfile::TempDir {
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("partition-0.json"),
        "{\"partition\": 0, \"offset\": 0}",
    )
    .unwrap();
    files
}

/// One GET over a fresh connection, answered within `within`: the status,
/// or why not.
fn timed_get(address: &str, path: &str, within: Duration) -> Result<u16, String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&address.parse().unwrap(), within)
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(within)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("read after {:?}: {e}", started.elapsed()))?;
    if started.elapsed() > within {
        return Err(format!("answered after {:?}", started.elapsed()));
    }
    String::from_utf8_lossy(&head[9..12])
        .parse()
        .map_err(|_| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&head)))
}

/// `count` connections, each sending one byte of a request head a second
/// and never its end. Returns, per connection, how long after it was opened
/// the server closed it (None: still open when `give_up` passed). `opened`
/// is told once all are connected.
fn slowloris(
    address: &str,
    count: usize,
    give_up: Duration,
    opened: mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<Option<Duration>>> {
    let address = address.to_string();
    std::thread::spawn(move || {
        let head = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nX-Slow: ");
        let mut connections: Vec<(TcpStream, Instant, Option<Duration>)> = (0..count)
            .map(|_| {
                let stream = TcpStream::connect(&address).unwrap();
                stream.set_nonblocking(true).unwrap();
                (stream, Instant::now(), None)
            })
            .collect();
        opened.send(()).unwrap();
        let started = Instant::now();
        let mut sent = 0usize;
        let mut next_byte = Instant::now();
        while started.elapsed() < give_up && connections.iter().any(|c| c.2.is_none()) {
            let drip = Instant::now() >= next_byte;
            if drip {
                next_byte += Duration::from_secs(1);
            }
            let byte = head.as_bytes()[sent.min(head.len() - 1)];
            for (stream, opened_at, closed) in connections.iter_mut().filter(|c| c.2.is_none()) {
                let mut buf = [0u8; 64];
                let gone = match stream.read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false, // an answer (408): the close follows
                    Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                    Err(_) => true,
                } || (drip && stream.write_all(&[byte]).is_err());
                if gone {
                    *closed = Some(opened_at.elapsed());
                }
            }
            if drip {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        connections.into_iter().map(|c| c.2).collect()
    })
}

/// 64 dripping connections against `address`: normal requests are answered
/// within 1 s meanwhile, and the server closes every slow one within the
/// head deadline.
fn assert_slowloris_cannot_hold(address: &str, path: &str) {
    let (opened, all_open) = mpsc::channel();
    let slow = slowloris(address, 64, Duration::from_secs(20), opened);
    all_open.recv().unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            timed_get(address, path, Duration::from_secs(1)),
            Ok(200),
            "a normal request while 64 connections drip"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let closed = slow.join().unwrap();
    let slowest = closed.iter().max().copied().flatten();
    assert!(
        closed.iter().all(|c| c.is_some_and(|after| after <= HEAD_DEADLINE + Duration::from_secs(2))),
        "every slow connection closed within the head deadline; slowest: {slowest:?} ({} still open)",
        closed.iter().filter(|c| c.is_none()).count()
    );
    eprintln!("64 slow connections, all closed by the server; the last after {slowest:?}");
}

#[test]
fn slowloris_cannot_hold_the_dashboard() {
    let files = files_with_a_partition();
    let (_dashboard, address) = start_dashboard(files.path(), None);
    assert_slowloris_cannot_hold(&address, "/api/state");
}

/// Everything the client sent, then what the server answered until it
/// closed the connection, and how long that took from the last write.
fn exchange(address: &str, request: &[u8]) -> (String, Duration) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The server may close before reading it all (a head too long).
    let _ = stream.write_all(request);
    let sent = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    (
        String::from_utf8_lossy(&answer).into_owned(),
        sent.elapsed(),
    )
}

#[test]
fn the_dashboard_bounds_keep_alive_heads_and_bodies() {
    let files = files_with_a_partition();
    let (_dashboard, address) = start_dashboard(files.path(), None);
    // Keep-alive: two requests on one connection, then silence; the server
    // closes it (the head deadline also covers the wait for a next request).
    let get = format!("GET /partition-0.json HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let (answer, quiet) = exchange(&address, format!("{get}{get}").as_bytes());
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    assert!(
        quiet <= HEAD_DEADLINE + Duration::from_secs(2),
        "an idle keep-alive connection stayed open {quiet:?}"
    );
    eprintln!("an idle keep-alive connection was closed after {quiet:?}");
    // A head over 8 KiB is refused, not buffered.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: {address}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (answer, _) = exchange(&address, huge.as_bytes());
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    // No bodies: not read, refused, and the connection closed.
    let post =
        format!("POST /api/state HTTP/1.1\r\nHost: {address}\r\nContent-Length: 5\r\n\r\nhello");
    let (answer, _) = exchange(&address, post.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let get_with_body =
        format!("GET /api/state HTTP/1.1\r\nHost: {address}\r\nContent-Length: 5\r\n\r\nhello");
    let (answer, _) = exchange(&address, get_with_body.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // HEAD: the GET's headers, no body.
    let head =
        format!("HEAD /partition-0.json HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let (answer, _) = exchange(&address, head.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("content-type: application/json"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\n"), "a body after HEAD: {answer}");
}

/// Threads and resident memory (KiB) of a process, from /proc.
fn threads_and_rss(pid: u32) -> (usize, u64) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (threads, rss)
}

/// 5,000 connections (fewer if the open-file limit says so), each sending
/// one request line and then holding, opened by a thread while this one
/// probes: every probe (liveness, then a scrape) is answered within 1 s,
/// during the flood and while its connections hold, because at capacity
/// the server closes the connection that has waited longest for a request
/// head, not the newcomer. `pace`: all at once (None), or 100 connections
/// every this long, so that probes also meet connections still arriving.
/// The most threads and RSS (KiB) seen meanwhile.
fn flood(address: &str, pid: u32, pace: Option<Duration>) -> (usize, u64) {
    let wanted = 5000usize;
    let flood = wanted.min(raise_open_files().saturating_sub(500) as usize);
    assert!(
        flood >= 2000,
        "open-file limit too low for the flood: {flood}"
    );
    let (opened, all_opened) = mpsc::channel();
    let mut flooder = Some({
        let address = address.to_string();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut held = Vec::with_capacity(flood);
            let mut refused = 0;
            for i in 0..flood {
                if let Some(pace) = pace.filter(|_| i % 100 == 99) {
                    std::thread::sleep(pace);
                }
                match TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(5))
                {
                    Ok(mut stream) => {
                        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\n");
                        held.push(stream);
                    }
                    Err(_) => refused += 1,
                }
            }
            eprintln!(
                "flood: {} connections opened ({refused} not) in {:?}",
                held.len(),
                started.elapsed()
            );
            let _ = opened.send(());
            held
        })
    });
    let (mut max_threads, mut max_rss) = threads_and_rss(pid);
    let mut probes = 0;
    let mut held = Vec::new();
    let mut hold_until: Option<Instant> = None;
    while hold_until.is_none_or(|until| Instant::now() < until) {
        let (threads, rss) = threads_and_rss(pid);
        max_threads = max_threads.max(threads);
        max_rss = max_rss.max(rss);
        for path in ["/healthz", "/metrics"] {
            assert_eq!(
                timed_get(address, path, Duration::from_secs(1)),
                Ok(200),
                "{path} during the flood ({probes} probes answered before)"
            );
            probes += 1;
        }
        if hold_until.is_none() && all_opened.try_recv().is_ok() {
            held = flooder.take().unwrap().join().unwrap();
            // At most MAX_CONNECTIONS of them are held by the server: the
            // rest were closed as newer ones came.
            let mut still_open = 0;
            let within_limit = wait_until_or_timeout(Duration::from_secs(2), || {
                still_open = open_count(&held);
                still_open <= MAX_CONNECTIONS
            });
            eprintln!("flood: {still_open} of its connections still open");
            assert!(
                within_limit,
                "{still_open} connections held open, over the limit of {MAX_CONNECTIONS}"
            );
            // Probes go on while they hold, until the head deadline.
            hold_until = Some(Instant::now() + HEAD_DEADLINE);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("flood: {probes} probes answered within 1 s each");
    drop(held);
    wait_until(
        "the flood's connections to be gone",
        Duration::from_secs(10),
        || timed_get(address, "/metrics", Duration::from_secs(1)) == Ok(200),
    );
    (max_threads, max_rss)
}

/// How many of `streams` the server has not closed.
fn open_count(streams: &[TcpStream]) -> usize {
    streams
        .iter()
        .filter(|stream| {
            stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            matches!(stream.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
        })
        .count()
}

/// Raises this process's open-file limit to its hard limit; returns it.
fn raise_open_files() -> u64 {
    // SAFETY: getrlimit and setrlimit read and write only `limit`.
    #[allow(unsafe_code)]
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur
    }
}

#[test]
fn the_metrics_endpoint_stands_slowloris_and_a_flood_of_held_requests() {
    let broker = Broker::start();
    let topic = unique_topic("webflood");
    let files = tempfile::tempdir().unwrap();
    let (days, seed) = (600, 61);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.02");
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
        .arg(files.path())
        .args(["0", "1", "2", "3"]);
    let consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    let pid = consumer.child.id();
    wait_until("a first scrape", Duration::from_secs(30), || {
        timed_get(&address, "/metrics", Duration::from_secs(1)) == Ok(200)
    });

    assert_slowloris_cannot_hold(&address, "/metrics");

    let (threads_before, rss_before) = threads_and_rss(pid);
    let first = flood(&address, pid, None);
    let second = flood(&address, pid, Some(Duration::from_millis(60)));
    let (threads_after, rss_after) = threads_and_rss(pid);
    eprintln!(
        "threads {threads_before} before, at most {} and {} during two floods, {threads_after} after; \
         RSS {rss_before} KiB before, at most {} and {} during, {rss_after} after",
        first.0, second.0, first.1, second.1
    );
    // librdkafka may start or end a broker thread of its own meanwhile.
    for threads in [first.0, second.0, threads_after] {
        assert!(
            threads <= threads_before + 3,
            "thread count grew: {threads_before} -> {threads}"
        );
    }
    assert!(
        first.1 <= rss_before + 8 * 1024,
        "RSS grew by more than 8 MiB: {rss_before} -> {} KiB",
        first.1
    );
    // What the first flood took is reused by the second, not added to
    // (measured: +1.6 MiB, the allocator's spread over the two floods).
    assert!(
        second.1 <= first.1 + 4 * 1024,
        "RSS grew again in a second flood: {} -> {} KiB",
        first.1,
        second.1
    );

    let records = finish_and_read(&broker, &topic, &mut producer, files.path(), days, seed);
    assert_files_match(files.path(), &recompute(&records), 4);
    drop(consumer);
}

/// A web config with TLS (the test CA's server certificate) and one user.
fn web_config(pki: &Pki) -> std::path::PathBuf {
    let hash = bcrypt::hash(PASSWORD, 6).unwrap();
    pki.web_config(&format!("basic_auth_users:\n  prometheus: '{hash}'\n"))
}

/// curl's status code for `url` with the test CA, and with `user` if given.
fn curl(pki: &Pki, url: &str, user: Option<&str>) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-D", "-", "-o", "/dev/null"])
        .args(["--cacert", &pki.path("ca.pem")]);
    if let Some(user) = user {
        cmd.args(["-u", user]);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("running curl (scripts/install-tls-tools.sh installs it)");
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("none")
        .to_string();
    (status, head + &String::from_utf8_lossy(&out.stderr))
}

fn assert_tls_and_basic_auth(pki: &Pki, url: &str) {
    let (status, head) = curl(pki, url, None);
    assert_eq!(status, "401", "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"weatherstream\""),
        "{head}"
    );
    assert_eq!(curl(pki, url, Some("prometheus:wrong")).0, "401");
    assert_eq!(curl(pki, url, Some(&format!("nobody:{PASSWORD}"))).0, "401");
    let (status, head) = curl(pki, url, Some(&format!("prometheus:{PASSWORD}")));
    assert_eq!(status, "200", "{head}");
    // Plain HTTP to the TLS port gets no page.
    let plain = url.replace("https://", "http://");
    let (status, _) = curl(pki, &plain, Some(&format!("prometheus:{PASSWORD}")));
    assert_ne!(status, "200", "plain HTTP answered on the TLS port");
}

#[test]
fn tls_and_basic_auth_guard_the_dashboard_and_a_wrong_web_config_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let config = web_config(&pki);
    let files = files_with_a_partition();
    let (dashboard, address) = start_dashboard(files.path(), Some(&config));
    assert!(
        dashboard.stdout_text().contains("https://"),
        "{}",
        dashboard.stdout_text()
    );
    let port = address.rsplit(':').next().unwrap();
    for path in ["/", "/api/state", "/partition-0.json"] {
        assert_tls_and_basic_auth(&pki, &format!("https://localhost:{port}{path}"));
    }
    drop(dashboard);

    let broken = [
        ("basic_auth_users:\n  prometheus: not-a-hash\n", "not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: nowhere.pem\n  key_file: nowhere.key\n", "nowhere.pem"),
        ("tls_server_config:\n  cert_file: x\n  key_file: y\n  client_auth_type: RequireAndVerifyClientCert\n", "client_auth_type"),
        ("basic_auth_users: [\n", "web.yml"),
    ];
    for (text, expected) in broken {
        std::fs::write(&config, text).unwrap();
        for program in ["dashboard", "consumer"] {
            let out = bin(program)
                .arg("--web-config-file")
                .arg(&config)
                .arg("--files")
                .arg(files.path())
                .args(if program == "consumer" {
                    &["0"][..]
                } else {
                    &[]
                })
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{program}: {stderr}");
            assert!(stderr.contains(expected), "{program}: {stderr}");
            assert_eq!(
                stderr.lines().filter(|l| l.starts_with("error")).count(),
                1,
                "{program}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{program}: {stderr}");
        }
    }
}

#[test]
fn tls_and_basic_auth_guard_the_metrics() {
    let broker = Broker::start();
    let topic = unique_topic("webtls");
    let records = produce_and_read(&broker, &topic, 200, 62);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let config = web_config(&pki);
    let files = tempfile::tempdir().unwrap();
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
        .arg(files.path())
        .arg("--web-config-file")
        .arg(&config)
        .args(["0", "1", "2", "3"]);
    let consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    assert!(consumer.stderr_text().contains("https://"));
    wait_for_records(files.path(), &records, Duration::from_secs(60));
    let port = address.rsplit(':').next().unwrap();
    assert_tls_and_basic_auth(&pki, &format!("https://localhost:{port}/metrics"));
    drop(consumer);
}
