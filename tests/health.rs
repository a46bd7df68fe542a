//! `/healthz` and `/readyz` against real runs on tansu: readiness from the
//! start (503 while the topic is missing and the partitions restore, 200
//! when they run), through a broker outage (503, while liveness stays 200)
//! and a stop (503 before the process exits); liveness failing for a
//! wedged thread (the test hook); and the dashboard's two paths.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// GET `path`: the status and the parsed JSON body (Null when it is none).
fn probe(address: &str, path: &str) -> (u16, Value) {
    let (status, _, body) = http(address, "GET", path, None);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn reasons(body: &Value) -> String {
    body["reasons"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[test]
fn readiness_follows_the_start_an_outage_and_the_stop() {
    let mut broker = Broker::start();
    let topic = unique_topic("ready");
    let files = tempfile::tempdir().unwrap();
    // The topic does not exist yet: the partitions wait.
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
        .arg(files.path())
        .args(["0", "1", "2", "3"]);
    let mut consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    let (status, body) = probe(&address, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["partitions"]["2"]["state"], "waiting", "{body}");
    assert!(reasons(&body).contains("partition 2"), "{body}");
    let (status, body) = probe(&address, "/healthz");
    assert_eq!(status, 200, "waiting for a topic is not wedged: {body}");

    let records = produce_and_read(&broker, &topic, 300, 7);
    let mut ready = Value::Null;
    wait_until("ready once running", Duration::from_secs(60), || {
        let (status, body) = probe(&address, "/readyz");
        ready = body;
        status == 200
    });
    assert_eq!(ready["status"], "ok");
    for p in ["0", "1", "2", "3"] {
        assert_eq!(ready["partitions"][p]["state"], "running", "{ready}");
    }
    wait_for_records(files.path(), &records, Duration::from_secs(60));
    // Liveness names what it watches: every thread that does the work.
    let (status, alive) = probe(&address, "/healthz");
    assert_eq!(status, 200, "{alive}");
    let mut watched = vec!["supervisor", "exporter", "snapshots"];
    let per_partition: Vec<String> = ["0", "1", "2", "3"]
        .iter()
        .flat_map(|p| [format!("partition-{p}"), format!("recheck-{p}")])
        .collect();
    watched.extend(per_partition.iter().map(String::as_str));
    for thread in watched {
        let state = alive["threads"][thread].as_str().unwrap_or("absent");
        assert!(["busy", "waiting"].contains(&state), "{thread}: {alive}");
    }

    // A broker outage: not ready, and still alive all along.
    broker.kill_keeping_data();
    let started = Instant::now();
    let mut outage = Value::Null;
    wait_until("not ready in the outage", Duration::from_secs(60), || {
        let (status, body) = probe(&address, "/readyz");
        outage = body;
        status == 503
    });
    assert!(
        reasons(&outage).contains("no broker is reachable"),
        "{outage} after {:?}",
        started.elapsed()
    );
    let alive_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < alive_until {
        let (status, body) = probe(&address, "/healthz");
        assert_eq!(status, 200, "an outage is not a liveness failure: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    broker.restart();
    wait_until("ready after the outage", Duration::from_secs(60), || {
        probe(&address, "/readyz").0 == 200
    });

    // The stop: a frozen broker holds the last hand-offs, and readiness is
    // 503 from the signal on, while the process still runs.
    broker.freeze();
    consumer.signal(libc::SIGTERM);
    let mut stopping = Value::Null;
    let seen = wait_until_or_timeout(Duration::from_secs(20), || {
        let Ok((status, body)) =
            std::panic::catch_unwind(|| probe(&address, "/readyz")).map_err(|_| ())
        else {
            return true; // gone: fails below
        };
        stopping = body;
        status == 503 && reasons(&stopping).contains("stopping")
    });
    let running = consumer.child.try_wait().unwrap().is_none();
    broker.resume();
    assert!(seen && running, "not 503 before the exit: {stopping}");
    let status = consumer.child.wait().unwrap();
    assert!(status.success(), "{status}: {}", consumer.stderr_text());
}

#[test]
fn liveness_fails_for_a_wedged_thread_and_the_stop_still_ends() {
    let broker = Broker::start();
    let topic = unique_topic("wedged");
    let files = tempfile::tempdir().unwrap();
    produce(&broker, &topic, 100, 3);
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0"])
        .args(["--wedged-after-secs", "2", "--files"])
        .arg(files.path())
        .args(["0", "1"])
        .env("WEATHERSTREAM_TEST_WEDGE_PARTITION", "1");
    let mut consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    let (status, body) = probe(&address, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    let mut wedged = Value::Null;
    wait_until("liveness to fail", Duration::from_secs(30), || {
        let (status, body) = probe(&address, "/healthz");
        wedged = body;
        status == 503
    });
    assert_eq!(wedged["status"], "wedged");
    let why = reasons(&wedged);
    assert!(why.contains("thread partition-1"), "{wedged}");
    assert!(!why.contains("partition-0"), "{wedged}");
    let status = consumer.terminate();
    assert!(status.success(), "{status}: {}", consumer.stderr_text());
}

#[test]
fn the_dashboard_answers_both_probes() {
    let files = tempfile::tempdir().unwrap();
    let mut dashboard = Running::spawn({
        let mut cmd = bin("dashboard");
        cmd.args(["--listen", "127.0.0.1:0", "--files"])
            .arg(files.path());
        cmd
    });
    let address = dashboard.listening_address();
    for path in ["/healthz", "/readyz"] {
        let (status, body) = probe(&address, path);
        assert_eq!(
            (status, &body["status"]),
            (200, &Value::from("ok")),
            "{path}"
        );
    }
    assert!(dashboard.terminate().success());
}
