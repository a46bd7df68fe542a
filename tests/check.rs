//! `consumer check` and `producer check`, the preflight, against the real
//! test broker: a healthy one (everything ok, exit 0, and nothing changed
//! on the broker or the disk), an unreachable one, a wrong password, a
//! missing topic and a locked state folder, each with the right line and
//! exit code, as text and as JSON.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn consumer_check(bootstrap: &str, topic: &str, files: &Path, args: &[&str]) -> Output {
    bin("consumer")
        .args(["check", "--bootstrap-servers", bootstrap, "--topic", topic])
        .arg("--files")
        .arg(files)
        .args(args)
        .output()
        .unwrap()
}

fn producer_check(bootstrap: &str, topic: &str, args: &[&str]) -> Output {
    bin("producer")
        .args(["check", "--bootstrap-servers", bootstrap, "--topic", topic])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The line of check `name`: its status word, the name padded, two
/// spaces and the detail.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|line| {
            line.split_once(' ').is_some_and(|(_, rest)| {
                rest.trim_start()
                    .strip_prefix(name)
                    .is_some_and(|after| after.starts_with("  "))
            })
        })
        .unwrap_or_else(|| panic!("no line for {name}:\n{text}"))
}

#[test]
fn a_healthy_setup_passes_and_nothing_is_changed() {
    let broker = Broker::start();
    let topic = unique_topic("check");
    produce(&broker, &topic, 50, 5);
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let out = consumer_check(&broker.bootstrap, &topic, &files, &["0", "1", "2", "3"]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, expected) in [
        ("settings", "bootstrap servers"),
        ("connection", "answered"),
        ("tls and sasl", "PLAINTEXT: accepted"),
        ("topic", "has 4 partitions"),
        ("topic access", "read (Read)"),
        ("group access", "(Describe)"),
        ("snapshot topic", "does not exist: the consumer creates it"),
        ("state folder", "not held by another process"),
        ("files folder", "writable"),
    ] {
        let found = line(&text, name);
        assert!(found.starts_with("ok "), "{found}");
        assert!(found.contains(expected), "{found}");
    }
    assert!(line(&text, "web config").starts_with("skipped"), "{text}");
    assert!(
        text.trim_end()
            .ends_with("consumer check: passed (9 ok, 0 failed, 1 skipped)"),
        "{text}"
    );
    // Nothing made: no folder, no snapshot topic, no group offsets.
    assert!(!files.exists(), "the check made {}", files.display());
    let admin = weatherstream::kafka::TopicAdmin::connect(
        &weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
    )
    .unwrap();
    assert_eq!(
        admin
            .partition_count(&format!("{topic}-snapshots"))
            .unwrap(),
        None
    );
    assert!(group_offsets(&broker.bootstrap, &[], "weatherstream", &topic).is_empty());

    // JSON: one object, the same checks.
    let out = consumer_check(&broker.bootstrap, &topic, &files, &["--json", "0", "2"]);
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["command"], "consumer");
    assert_eq!(report["passed"], true);
    assert_eq!(report["failed"], 0);
    assert!(report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["check"] == "topic access" && c["status"] == "ok"));

    // The producer's check: the topic is there and would be re-created.
    let out = producer_check(&broker.bootstrap, &topic, &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        line(&text, "topic").contains("deletes and creates it"),
        "{text}"
    );
    // A partition count --keep-topic cannot resume.
    let out = producer_check(
        &broker.bootstrap,
        &topic,
        &["--keep-topic", "--partitions", "3"],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line(&text, "topic").starts_with("FAILED"), "{text}");
}

#[test]
fn an_unreachable_broker_fails_the_connection_and_skips_what_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = consumer_check(&nowhere, "temperatures", dir.path(), &["--json", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))
            .clone()
    };
    assert_eq!(check("connection")["status"], "failed", "{report}");
    assert!(
        check("connection")["detail"]
            .as_str()
            .unwrap()
            .contains("cannot reach a Kafka broker at"),
        "{report}"
    );
    for name in ["tls and sasl", "topic", "topic access"] {
        assert_eq!(check(name)["status"], "skipped", "{name}: {report}");
    }
    assert_eq!(check("state folder")["status"], "ok", "{report}");

    let out = producer_check(&nowhere, "temperatures", &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line(&text, "connection").starts_with("FAILED"), "{text}");
}

#[test]
fn a_wrong_password_fails_tls_and_sasl_in_one_line() {
    let mut broker = Broker::start();
    if !broker.is_ours() {
        eprintln!("skipped: needs a test broker of its own");
        return;
    }
    let topic = unique_topic("checkauth");
    produce(&broker, &topic, 10, 5);
    broker.create_scram_user("app", "right-horse-33");
    let address = broker.bootstrap.clone();
    broker.restart_as(&address, true);
    let dir = tempfile::tempdir().unwrap();
    let sasl = |password: &str| {
        consumer_check(
            &broker.bootstrap,
            &topic,
            dir.path(),
            &[
                "-X",
                "security.protocol=SASL_PLAINTEXT",
                "-X",
                "sasl.mechanism=SCRAM-SHA-512",
                "-X",
                "sasl.username=app",
                "-X",
                &format!("sasl.password={password}"),
                "0",
            ],
        )
    };
    let out = sasl("wrong-staple-17");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let refused = line(&text, "tls and sasl");
    assert!(refused.starts_with("FAILED"), "{text}");
    assert!(refused.contains("SCRAM-SHA-512 as \"app\""), "{refused}");
    assert!(refused.contains("authentication refused"), "{refused}");
    assert!(
        !text.contains("wrong-staple-17"),
        "the password is shown: {text}"
    );
    assert!(line(&text, "connection").starts_with("ok"), "{text}");

    let out = sasl("right-horse-33");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(line(&text, "tls and sasl").contains("accepted"), "{text}");
}

#[test]
fn a_missing_topic_and_a_missing_partition_fail_the_topic() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = unique_topic("nosuch");
    let out = consumer_check(&broker.bootstrap, &missing, dir.path(), &["0"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let topic = line(&text, "topic");
    assert!(topic.starts_with("FAILED"), "{text}");
    assert!(topic.contains("does not exist"), "{topic}");
    assert!(line(&text, "topic access").starts_with("skipped"), "{text}");

    let present = unique_topic("check");
    produce(&broker, &present, 10, 5);
    let out = consumer_check(&broker.bootstrap, &present, dir.path(), &["1", "7"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line(&text, "topic").contains("no partition 7"), "{text}");

    // The producer makes a missing topic: fine.
    let out = producer_check(&broker.bootstrap, &missing, &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(line(&text, "topic").contains("creates it"), "{text}");
}

#[test]
fn a_state_folder_held_by_a_running_consumer_fails() {
    let broker = Broker::start();
    let topic = unique_topic("checklock");
    let records = produce_and_read(&broker, &topic, 40, 5);
    let files = tempfile::tempdir().unwrap();
    let mut running = start_consumer(&broker, &topic, files.path(), &[0, 1, 2, 3]);
    wait_for_records(files.path(), &records, Duration::from_secs(60));
    let out = consumer_check(&broker.bootstrap, &topic, files.path(), &["2", "3"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let held = line(&text, "state folder");
    assert!(held.starts_with("FAILED"), "{text}");
    let pid = running.child.id();
    assert!(
        held.contains(&format!(
            "partition 2 is held by another consumer process (pid {pid} "
        )),
        "{held}"
    );
    assert!(held.contains("partition 3"), "{held}");
    // The check took nothing from it: it runs on and stops cleanly.
    assert!(running.child.try_wait().unwrap().is_none());
    assert!(running.terminate().success(), "{}", running.stderr_text());
    let out = consumer_check(&broker.bootstrap, &topic, files.path(), &["2", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}
