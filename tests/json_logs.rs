//! `--log-format json`: every line the binaries print to stderr in a real
//! run is one JSON object with time, level and message, and carries the
//! partition (and offset) its message names.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Parses every line; fails naming the first that is not a log object.
/// Checks that a message about a partition ("partition N: ...") carries
/// it. Returns the objects.
fn parsed(program: &str, stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| {
            let object: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{program}: not JSON ({e}): {line}"));
            for field in ["time", "level", "message"] {
                assert!(object[field].is_string(), "{program}: no {field}: {line}");
            }
            let message = object["message"].as_str().unwrap();
            if let Some(rest) = message.strip_prefix("partition ") {
                let named: i64 = rest
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap();
                assert_eq!(object["partition"], named, "{program}: {line}");
            }
            object
        })
        .collect()
}

#[test]
fn every_binary_logs_one_json_object_a_line_with_the_partition_and_offset() {
    let broker = Broker::start();
    let topic = unique_topic("jsonlogs");
    let json = ["--log-format", "json"];

    let out = bin("producer")
        .args(json)
        .args(["--bootstrap-servers", &broker.bootstrap, "--topic", &topic])
        .args(["--delay", "0", "--days", "400", "--seed", "3"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines = parsed("producer", &String::from_utf8_lossy(&out.stderr));
    assert!(lines
        .iter()
        .any(|l| l["message"].as_str().unwrap().starts_with("created topic")));

    let records = read_topic(
        &broker.bootstrap,
        &topic,
        4,
        reports_for(400, 3),
        Duration::from_secs(60),
    );
    let host = tempfile::tempdir().unwrap();
    let files = host.path().join("files");
    let consumer = || {
        let mut cmd = broker.consumer_cmd(&topic);
        cmd.args(json)
            .args(["--snapshot-interval", "0.5", "--files"])
            .arg(&files)
            .args(["0", "1", "2", "3"]);
        Running::spawn(cmd)
    };
    let mut first = consumer();
    wait_for_records(&files, &records, Duration::from_secs(60));
    assert!(first.terminate().success());
    parsed("consumer", &first.stderr_text());

    // A host that lost its disk: every partition restores, a line each
    // with the partition and the offset it restored.
    std::fs::remove_dir_all(&files).unwrap();
    let mut again = consumer();
    wait_for_records(&files, &records, Duration::from_secs(60));
    assert!(again.terminate().success());
    let ends = end_offsets(&records);
    let restored: Vec<Value> = parsed("consumer", &again.stderr_text())
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .contains("restored from the snapshot topic")
        })
        .collect();
    assert_eq!(restored.len(), 4, "{restored:?}");
    for line in &restored {
        let partition = line["partition"].as_i64().unwrap() as i32;
        assert_eq!(line["offset"], ends[&partition], "{line}");
    }

    let out = bin("plot")
        .args(json)
        .arg("--files")
        .arg(&files)
        .output()
        .unwrap();
    assert!(out.status.success());
    parsed("plot", &String::from_utf8_lossy(&out.stderr));

    let mut debug = Running::spawn({
        let mut cmd = bin("debug");
        cmd.args(json)
            .args(["--bootstrap-servers", &broker.bootstrap, "--topic", &topic])
            .arg("--from-beginning");
        cmd
    });
    wait_until("debug to print the stream", Duration::from_secs(30), || {
        debug.stdout_text().lines().count() >= 10
    });
    assert!(debug.terminate().success());
    parsed("debug", &debug.stderr_text());

    let mut dashboard = Running::spawn({
        let mut cmd = bin("dashboard");
        cmd.args(json)
            .args(["--listen", "127.0.0.1:0", "--files"])
            .arg(&files);
        cmd
    });
    dashboard.listening_address();
    assert!(dashboard.terminate().success());
    parsed("dashboard", &dashboard.stderr_text());

    // The demo's whole pipeline in one process, to the end of its days.
    let demo_files = host.path().join("demo");
    let out = bin("demo")
        .args(json)
        .arg("--files")
        .arg(&demo_files)
        .args(["--days", "120"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let demo = parsed("demo", &String::from_utf8_lossy(&out.stderr));
    assert!(
        demo.iter().any(
            |line| line["message"].as_str().unwrap().contains("120 delivered")
                || line["message"].as_str().unwrap().contains("delivered")
        ),
        "{demo:?}"
    );

    // The last line of a failure is one object too.
    let out = bin("consumer")
        .arg("inspect-state")
        .args(json)
        .arg("--files")
        .arg(host.path().join("nowhere"))
        .arg("2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines = parsed(
        "consumer inspect-state",
        &String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(lines.last().unwrap()["level"], "ERROR");
    assert_eq!(lines.last().unwrap()["partition"], 2);
}
