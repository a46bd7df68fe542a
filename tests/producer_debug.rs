//! The producer and `debug` against a real broker.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveDate};
use common::*;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use weatherstream::kafka::TopicAdmin;
use weatherstream::report;

/// The Java client's placement (murmur2, tested against its reference
/// values in `resume`'s unit tests).
fn murmur2_partition(key: &str, partitions: u32) -> i32 {
    weatherstream::producer::partition_for(key.as_bytes(), partitions as usize)
}

#[test]
fn producer_creates_the_topic_and_recreates_it_on_restart() {
    let broker = Broker::start();
    let topic = unique_topic("recreate");
    let first = produce(&broker, &topic, 30, 1);
    assert!(
        String::from_utf8_lossy(&first.stdout).contains(&topic),
        "prints the topic list"
    );
    let admin = TopicAdmin::connect(&weatherstream::kafka::ClientSettings::plaintext(
        &broker.bootstrap,
    ))
    .unwrap();
    assert_eq!(admin.partition_count(&topic).unwrap(), Some(4));
    let records = read_topic(
        &broker.bootstrap,
        &topic,
        4,
        reports_for(30, 1),
        Duration::from_secs(30),
    );
    assert_eq!(records.len(), reports_for(30, 1));

    // Second start: old messages are gone, only the new run's are there.
    produce(&broker, &topic, 5, 2);
    assert_eq!(admin.partition_count(&topic).unwrap(), Some(4));
    let records = read_topic(
        &broker.bootstrap,
        &topic,
        4,
        reports_for(5, 2),
        Duration::from_secs(30),
    );
    let dates: BTreeSet<String> = records
        .iter()
        .map(|r| report::decode(r.value.as_deref().unwrap()).unwrap().date)
        .collect();
    assert_eq!(dates.len(), 5);
    assert!(
        dates.iter().all(|d| d.as_str() <= "1990-01-05"),
        "{dates:?}"
    );
}

#[test]
fn four_hundred_days_land_keyed_by_month_and_placed_by_murmur2() {
    let broker = Broker::start();
    let topic = unique_topic("days400");
    produce(&broker, &topic, 400, 11);
    let expected = reports_for(400, 11);
    let records = read_topic(
        &broker.bootstrap,
        &topic,
        4,
        expected,
        Duration::from_secs(60),
    );
    let mut dates = BTreeSet::new();
    let mut duplicates = 0;
    let mut month_partition: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for r in &records {
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        let value = report::decode(r.value.as_deref().unwrap()).unwrap();
        let date = NaiveDate::parse_from_str(&value.date, "%Y-%m-%d").unwrap();
        assert_eq!(
            key,
            report::month_name(date.month()),
            "key is the month of {date}"
        );
        if !dates.insert(date) {
            duplicates += 1;
            assert_eq!(value.degrees, 1_000_000.0);
        }
        month_partition
            .entry(key.clone())
            .or_default()
            .insert(r.partition);
        assert_eq!(
            r.partition,
            murmur2_partition(&key, 4),
            "{key} placed as murmur2 places it"
        );
    }
    assert_eq!(dates.len(), 400);
    assert_eq!(records.len(), 400 + duplicates);
    assert!(duplicates > 0, "the model sends duplicates");
    assert_eq!(
        *dates.iter().next().unwrap(),
        NaiveDate::from_ymd_opt(1990, 1, 1).unwrap()
    );
    assert!(
        month_partition.values().all(|p| p.len() == 1),
        "{month_partition:?}"
    );
    // The assignment's example: January, April, June and December together.
    let p = |m: &str| month_partition[m].iter().next().copied();
    assert_eq!(p("January"), p("April"));
    assert_eq!(p("January"), p("June"));
    assert_eq!(p("January"), p("December"));
}

#[test]
fn unreachable_broker_fails_fast_with_one_clear_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let out = bin("producer")
        .args([
            "--bootstrap-servers",
            &format!("127.0.0.1:{port}"),
            "--days",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach a Kafka broker"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["--delay", "-1"][..],
        &["--delay", "soon"],
        &["--partitions", "0"],
        &["--days"],
    ] {
        let out = bin("producer").args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

struct Debug {
    running: std::process::Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Debug {
    fn start(broker: &Broker, topic: &str, group: &str) -> Debug {
        let mut child = bin("debug")
            .args([
                "--bootstrap-servers",
                &broker.bootstrap,
                "--topic",
                topic,
                "--group",
                group,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Debug {
            running: child,
            stdout,
            stderr,
        }
    }
}

impl Drop for Debug {
    fn drop(&mut self) {
        let _ = self.running.kill();
        let _ = self.running.wait();
    }
}

fn send(producer: &BaseProducer, topic: &str, key: &str, value: &[u8]) {
    producer
        .send(BaseRecord::to(topic).key(key).payload(value))
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
}

#[test]
fn debug_prints_only_messages_produced_after_it_joined_in_the_assignment_format() {
    let broker = Broker::start();
    let topic = unique_topic("debug");
    produce(&broker, &topic, 20, 3);
    let debug = Debug::start(&broker, &topic, &unique_topic("group"));
    wait_until(
        "debug's partition assignment",
        Duration::from_secs(30),
        || {
            debug
                .stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("assigned partitions"))
        },
    );
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    // The group's start position is looked up after assignment: send
    // markers until one shows, so that what follows is surely after it.
    let marker = NaiveDate::from_ymd_opt(2050, 1, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !debug
        .stdout
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("2050-01-01"))
    {
        assert!(Instant::now() < deadline, "debug printed no marker");
        send(&producer, &topic, "January", &report::encode(marker, 1.0));
        std::thread::sleep(Duration::from_millis(300));
    }
    let reports = [
        ("2000-12-26", 31.5235),
        ("2000-12-27", 35.0),
        ("2000-12-28", 1_000_000.0),
        ("2000-12-29", 40.391),
        ("2000-12-30", -2.5),
    ];
    for (date, degrees) in reports {
        let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap();
        send(
            &producer,
            &topic,
            "December",
            &report::encode(date, degrees),
        );
    }
    // A value that is not a Report: one stderr line, and printing goes on.
    send(&producer, &topic, "December", &[0xff, 0xff, 0xff]);
    send(
        &producer,
        &topic,
        "December",
        &report::encode(NaiveDate::from_ymd_opt(2000, 12, 31).unwrap(), 46.1511),
    );
    let partition = murmur2_partition("December", 4);
    let want: Vec<String> = [
        "{'partition': P, 'key': 'December', 'date': '2000-12-26', 'degrees': 31.5235}",
        "{'partition': P, 'key': 'December', 'date': '2000-12-27', 'degrees': 35.0}",
        "{'partition': P, 'key': 'December', 'date': '2000-12-28', 'degrees': 1000000.0}",
        "{'partition': P, 'key': 'December', 'date': '2000-12-29', 'degrees': 40.391}",
        "{'partition': P, 'key': 'December', 'date': '2000-12-30', 'degrees': -2.5}",
        "{'partition': P, 'key': 'December', 'date': '2000-12-31', 'degrees': 46.1511}",
    ]
    .iter()
    .map(|l| l.replace('P', &partition.to_string()))
    .collect();
    wait_until("debug's lines", Duration::from_secs(30), || {
        debug
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("'2000-12-"))
            .count()
            >= want.len()
    });
    let lines = debug.stdout.lock().unwrap().clone();
    let got: Vec<&String> = lines.iter().filter(|l| l.contains("'2000-12-")).collect();
    assert_eq!(got, want.iter().collect::<Vec<_>>());
    assert!(
        !lines.iter().any(|l| l.contains("'1990-")),
        "printed messages from before it joined: {lines:?}"
    );
    let stderr = debug.stderr.lock().unwrap().join("\n");
    assert!(
        stderr.contains(&format!("partition {partition} offset"))
            && stderr.contains("not a Report"),
        "{stderr}"
    );
}

#[test]
fn producer_stops_cleanly_on_sigterm_with_everything_sent_delivered() {
    let broker = Broker::start();
    let topic = unique_topic("sigterm");
    let mut producer = start_paced_producer(&broker, &topic, u64::MAX, 4, "0.001");
    wait_until("some reports sent", Duration::from_secs(30), || {
        read_topic_prefix(&broker, &topic) > 100
    });
    assert!(producer.terminate().success(), "{}", producer.stderr_text());
    let stderr = producer.stderr_text();
    let done = stderr
        .lines()
        .find(|l| l.contains("done:"))
        .expect("a summary line");
    let sent: usize = done
        .split("reports sent")
        .next()
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        done.contains(&format!("{sent} delivered, 0 failed")),
        "{done}"
    );
    // Exactly what was sent is in the topic: nothing lost in flight.
    read_topic(&broker.bootstrap, &topic, 4, sent, Duration::from_secs(30));
}

/// How many records partition 0..4 hold so far (a quick, partial count).
fn read_topic_prefix(broker: &Broker, topic: &str) -> usize {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "prefix")
        .create()
        .unwrap();
    (0..4)
        .map(|p| {
            rdkafka::consumer::Consumer::fetch_watermarks(
                &consumer,
                topic,
                p,
                Duration::from_secs(5),
            )
            .map_or(0, |(_, high)| high as usize)
        })
        .sum()
}
