//! `producer --keep-topic`: a stream stopped and resumed ends as one
//! uninterrupted run does; a producer killed with SIGKILL again and again
//! and restarted neither skips nor double-counts a day, with consumers
//! running throughout and never resetting; a topic that does not fit is
//! refused, and foreign records are passed over.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn producer(broker: &Broker, topic: &str, args: &[&str]) -> Output {
    bin("producer")
        .args(["--bootstrap-servers", &broker.bootstrap, "--topic", topic])
        .args(["--delay", "0"])
        .args(args)
        .output()
        .unwrap()
}

fn succeeded(out: Output) -> String {
    let printed = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "producer failed: {printed}");
    printed
}

#[test]
fn a_stream_stopped_and_resumed_with_keep_topic_ends_as_one_uninterrupted_run() {
    let broker = Broker::start();
    let whole = unique_topic("whole");
    let resumed = unique_topic("resumed");
    succeeded(producer(&broker, &whole, &["--seed", "7", "--days", "800"]));
    succeeded(producer(
        &broker,
        &resumed,
        &["--seed", "7", "--days", "400"],
    ));
    let log = succeeded(producer(
        &broker,
        &resumed,
        &["--keep-topic", "--seed", "7", "--days", "800"],
    ));
    assert!(
        log.contains("the first missing day is 1991-02-05 (day 400); 0 days after it"),
        "{log}"
    );

    let expected = all_records(&broker, &whole);
    let got = all_records(&broker, &resumed);
    assert_eq!(expected.len(), reports_for(800, 7));
    // The same records at the same offsets: the same stream.
    let shape = |records: &[Record]| {
        let mut v: Vec<_> = records
            .iter()
            .map(|r| (r.partition, r.offset, r.key.clone(), r.value.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shape(&got), shape(&expected));
    // Our placement of months is librdkafka's murmur2_random.
    for r in &expected {
        let key = r.key.as_deref().unwrap();
        assert_eq!(weatherstream::producer::partition_for(key, 4), r.partition);
    }

    let dir = tempfile::tempdir().unwrap();
    let (files_whole, files_resumed) = (dir.path().join("whole"), dir.path().join("resumed"));
    let mut a = start_consumer(&broker, &whole, &files_whole, &[0, 1, 2, 3]);
    let mut b = start_consumer(&broker, &resumed, &files_resumed, &[0, 1, 2, 3]);
    wait_for_records(&files_whole, &expected, Duration::from_secs(60));
    wait_for_records(&files_resumed, &got, Duration::from_secs(60));
    assert_files_match(&files_resumed, &recompute(&expected), 4);
    for p in 0..4 {
        assert_eq!(
            read_partition_file(&files_resumed, p).unwrap().aggregates,
            read_partition_file(&files_whole, p).unwrap().aggregates,
            "partition {p}"
        );
    }
    assert!(a.terminate().success());
    assert!(b.terminate().success());

    // A topic that holds the stream already: nothing to send.
    let log = succeeded(producer(
        &broker,
        &resumed,
        &["--keep-topic", "--seed", "7", "--days", "800"],
    ));
    assert!(
        log.contains("all of the 800 days of --days: nothing to send"),
        "{log}"
    );
    let log = succeeded(producer(
        &broker,
        &resumed,
        &["--keep-topic", "--seed", "7", "--days", "300"],
    ));
    assert!(log.contains("beyond the 300 days of --days"), "{log}");
    assert_eq!(
        high_watermarks(&broker, &resumed).iter().sum::<i64>(),
        got.len() as i64,
        "nothing was sent"
    );
}

/// `consumer inspect-state --json` of `files`: (reports counted,
/// duplicates dropped) summed over the partitions.
fn counted_and_dropped(files: &std::path::Path) -> (u64, u64) {
    let out = bin("consumer")
        .args(["inspect-state", "--json", "--files"])
        .arg(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let partitions = value
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![value.clone()]);
    partitions.iter().fold((0, 0), |(counted, dropped), p| {
        (
            counted + p["reports_counted"].as_u64().unwrap(),
            dropped + p["duplicates_dropped"].as_u64().unwrap(),
        )
    })
}

#[test]
fn a_producer_killed_again_and_again_and_resumed_neither_skips_nor_double_counts_a_day() {
    let broker = Broker::start();
    let topic = unique_topic("killed");
    let days: u64 = 400_000;
    let args = ["--keep-topic", "--seed", "3", "--days", &days.to_string()];
    let start_producer = || {
        let mut cmd = bin("producer");
        cmd.args(["--bootstrap-servers", &broker.bootstrap, "--topic", &topic])
            .args(["--delay", "0"])
            .args(args);
        Running::spawn(cmd)
    };
    // The first run creates the topic; the consumers wait for it.
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let mut first = start_consumer(&broker, &topic, &files, &[0, 1]);
    let mut second = start_consumer(&broker, &topic, &files, &[2, 3]);

    // One client of the test's own watches the topic grow.
    let watcher = watcher(&broker);
    let in_topic = || -> i64 { high_watermarks_with(&watcher, &topic).iter().sum() };
    let mut seed = Instant::now().elapsed().subsec_nanos() as u64 | 1;
    let mut random_below = |below: u64| {
        // xorshift: a different moment each kill, no crate needed.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let mut logs = String::new();
    for _kill in 0..5 {
        // A random moment while it sends at full speed.
        let before = in_topic();
        let mut producer = start_producer();
        wait_until("the producer to send", Duration::from_secs(60), || {
            in_topic() > before
        });
        std::thread::sleep(Duration::from_millis(random_below(50)));
        let finished = producer.child.try_wait().unwrap().is_some();
        assert!(
            !finished,
            "the producer finished before it was killed: make the stream longer"
        );
        producer.kill9();
        logs += &producer.stderr_text();
    }
    logs += &succeeded(producer(&broker, &topic, &args));
    // Some restart found days beyond its resume point (a partition ahead
    // of another when the previous run was killed) and sent them again.
    let resent: u64 = logs
        .lines()
        .filter_map(|l| {
            l.split("); ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(resent > 0, "no day was sent again: {logs}");

    let records = all_records(&broker, &topic);
    wait_for_records(&files, &records, Duration::from_secs(120));
    assert!(first.terminate().success());
    assert!(second.terminate().success());
    let expected = recompute(&records);
    assert_files_match(&files, &expected, 4);
    // Every day from 1990-01-01 to the last, once.
    let counted: u64 = expected
        .values()
        .flat_map(|months| months.values())
        .map(|s| s.0)
        .sum();
    assert_eq!(counted, days);
    for (partition, months) in &expected {
        for ((month, year), (count, _, start, end)) in months {
            let span = (*end - *start).num_days() as u64 + 1;
            assert_eq!(
                *count, span,
                "partition {partition}: {month}/{year} has a gap"
            );
        }
    }
    let (reports, dropped) = counted_and_dropped(&files);
    assert_eq!(reports, days);
    assert_eq!(
        dropped,
        records.len() as u64 - days,
        "every report sent again is a dropped duplicate"
    );
    let consumer_logs = first.stderr_text() + &second.stderr_text();
    assert!(!consumer_logs.contains("was re-created"), "{consumer_logs}");
}

#[test]
fn a_topic_that_does_not_fit_is_refused_and_foreign_records_are_passed_over() {
    let broker = Broker::start();
    let admin = weatherstream::kafka::TopicAdmin::connect(
        &weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
    )
    .unwrap();

    // Three partitions, not four: refused, nothing sent.
    let three = unique_topic("three");
    admin.recreate_topic(&three, 3, 1).unwrap();
    let out = producer(&broker, &three, &["--keep-topic", "--days", "10"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("has 3 partitions, not the 4 of --partitions"),
        "{stderr}"
    );

    // Foreign records after the stream's: passed over when looking for the
    // newest report, which is still found.
    let mixed = unique_topic("mixed");
    succeeded(producer(&broker, &mixed, &["--seed", "2", "--days", "100"]));
    let client: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    for p in 0..4 {
        for i in 0..100 {
            client
                .send(
                    BaseRecord::to(&mixed)
                        .partition(p)
                        .key("not-a-month")
                        .payload(&format!("foreign {i}")),
                )
                .unwrap();
        }
    }
    client.flush(Duration::from_secs(30)).unwrap();
    let log = succeeded(producer(
        &broker,
        &mixed,
        &["--keep-topic", "--seed", "2", "--days", "200"],
    ));
    assert!(
        log.contains("the first missing day is 1990-04-11 (day 100)"),
        "{log}"
    );

    // Only foreign records: the stream starts at day 0.
    let foreign = unique_topic("foreign");
    admin.recreate_topic(&foreign, 4, 1).unwrap();
    for p in 0..4 {
        client
            .send(BaseRecord::to(&foreign).partition(p).key("x").payload("y"))
            .unwrap();
    }
    client.flush(Duration::from_secs(30)).unwrap();
    let log = succeeded(producer(
        &broker,
        &foreign,
        &["--keep-topic", "--seed", "2", "--days", "20"],
    ));
    assert!(log.contains("holds no report of this stream"), "{log}");
    let records = all_records(&broker, &foreign);
    assert_eq!(records.len(), 4 + reports_for(20, 2));
}
