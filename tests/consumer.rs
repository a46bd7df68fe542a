//! The consumer against a real broker: exactly-once under kill -9, split
//! changes, concurrent readers, topic re-creation, malformed input, import,
//! and partition ownership.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use common::*;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use weatherstream::generator::WeatherGenerator;
use weatherstream::report;

const ALL: [i32; 4] = [0, 1, 2, 3];

/// Reads every partition file continuously; counts parse failures and
/// checks that no published offset ever goes down.
struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Readers {
    fn start(files: &Path) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let (stop2, reads2, files) = (stop.clone(), reads.clone(), files.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut problems = Vec::new();
            let mut highest: BTreeMap<i32, i64> = BTreeMap::new();
            while !stop2.load(Ordering::SeqCst) {
                for p in ALL {
                    let Ok(text) =
                        std::fs::read_to_string(files.join(format!("partition-{p}.json")))
                    else {
                        continue;
                    };
                    reads2.fetch_add(1, Ordering::Relaxed);
                    match weatherstream::published::parse_partition_json(&text) {
                        Ok(parsed) => {
                            let top = highest.entry(p).or_insert(0);
                            if parsed.offset < *top {
                                problems.push(format!(
                                    "partition {p}: offset went from {top} to {}",
                                    parsed.offset
                                ));
                            }
                            *top = (*top).max(parsed.offset);
                        }
                        Err(e) => problems.push(format!("partition {p}: unparsable read: {e}")),
                    }
                }
            }
            problems
        });
        Readers {
            stop,
            reads,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let problems = self.thread.take().unwrap().join().unwrap();
        (self.reads.load(Ordering::Relaxed), problems)
    }
}

/// Waits for the producer of `(days, seed)` to finish and the consumers to
/// publish the whole topic, stops them (cleanly: exit 0), and checks every
/// file against the recomputation.
fn drain_and_check(
    broker: &Broker,
    topic: &str,
    files: &Path,
    producer: &mut Running,
    consumers: &mut [Running],
    (days, seed): (u64, u64),
) {
    assert!(
        producer.child.wait().unwrap().success(),
        "{}",
        producer.stderr_text()
    );
    let records = read_topic(
        &broker.bootstrap,
        topic,
        4,
        reports_for(days, seed),
        Duration::from_secs(60),
    );
    wait_for_records(files, &records, Duration::from_secs(90));
    for consumer in consumers {
        assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    }
    assert_files_match(files, &recompute(&records), 4);
}

#[test]
fn ten_years_end_to_end_match_an_independent_recomputation() {
    let broker = Broker::start();
    let topic = unique_topic("e2e");
    let files = tempfile::tempdir().unwrap();
    let records = produce_and_read(&broker, &topic, 3650, 7);
    let readers = Readers::start(files.path());
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &records, Duration::from_secs(120));
    assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    let (reads, problems) = readers.finish();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(reads > 10, "readers read {reads} times");
    assert_files_match(files.path(), &recompute(&records), 4);
    let svg = std::fs::read_to_string(files.path().join("month.svg")).unwrap();
    assert!(
        svg.contains("January-1999") && svg.contains("March-1999"),
        "the exporter renders the chart"
    );
    // `consumer verify` agrees: state, files and the log match.
    let out = broker.verify_cmd(&topic, files.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.matches(": OK, ").count(), 4, "{stdout}");
}

#[test]
fn kill_9_at_random_moments_never_loses_or_double_counts() {
    kill_9_at_random_moments(Storage::Sqlite);
}

#[test]
fn a_restart_inside_a_broker_batch_reads_again_instead_of_skipping() {
    // tansu's in-memory engine answers a fetch in the middle of a batch with
    // the next batch. Large producer batches, tiny consumer batches (so the
    // committed offset lands inside a broker batch), then kill -9.
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("midbatch");
    let files = tempfile::tempdir().unwrap();
    let records = produce_and_read(&broker, &topic, 20_000, 13);
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--max-batch", "7"])
        .arg("--files")
        .arg(files.path())
        .args(["0", "1", "2", "3"]);
    let mut first = Running::spawn(cmd);
    wait_until("some progress", Duration::from_secs(60), || {
        (0..4).all(|p| read_partition_file(files.path(), p).is_some_and(|f| f.offset > 50))
    });
    first.kill9();
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &records, Duration::from_secs(120));
    assert!(consumer.terminate().success());
    assert!(
        !consumer.stderr_text().contains("missing from the log"),
        "{}",
        consumer.stderr_text()
    );
    assert_files_match(files.path(), &recompute(&records), 4);
}

fn kill_9_at_random_moments(storage: Storage) {
    let broker = Broker::start_with(storage);
    let topic = unique_topic("kill9");
    let files = tempfile::tempdir().unwrap();
    let days = 2500;
    let mut producer = start_paced_producer(&broker, &topic, days, 5, "0.003");
    let readers = Readers::start(files.path());
    let groups: [&[i32]; 2] = [&[0, 2], &[1, 3]];
    let mut consumers: Vec<Running> = groups
        .iter()
        .map(|g| start_consumer(&broker, &topic, files.path(), g))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut kills = [0u32; 2];
    let started = Instant::now();
    while kills.iter().any(|k| *k < 6) || producer.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "kill loop took too long"
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(150..700)));
        let which = rng.random_range(0..2);
        consumers[which].kill9();
        kills[which] += 1;
        consumers[which] = start_consumer(&broker, &topic, files.path(), groups[which]);
    }
    drain_and_check(
        &broker,
        &topic,
        files.path(),
        &mut producer,
        &mut consumers,
        (days, 5),
    );
    let (_, problems) = readers.finish();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(kills.iter().all(|k| *k >= 5), "{kills:?}");
}

#[test]
fn state_carries_over_when_partitions_move_between_processes() {
    let broker = Broker::start();
    let topic = unique_topic("split");
    let files = tempfile::tempdir().unwrap();
    let days = 1500;
    let mut producer = start_paced_producer(&broker, &topic, days, 6, "0.003");
    let splits: [&[&[i32]]; 3] = [&[&[0, 2], &[1, 3]], &[&[0, 1, 2, 3]], &[&[3], &[0, 1, 2]]];
    for (i, split) in splits.iter().enumerate() {
        let mut running: Vec<Running> = split
            .iter()
            .map(|g| start_consumer(&broker, &topic, files.path(), g))
            .collect();
        if i + 1 < splits.len() {
            // Let each split make progress before handing partitions over.
            let before: Vec<i64> = ALL
                .iter()
                .map(|p| read_partition_file(files.path(), *p).map_or(0, |f| f.offset))
                .collect();
            wait_until("progress under this split", Duration::from_secs(60), || {
                ALL.iter().zip(&before).all(|(p, b)| {
                    read_partition_file(files.path(), *p).is_some_and(|f| f.offset > *b)
                })
            });
            for r in &mut running {
                assert!(r.terminate().success(), "{}", r.stderr_text());
            }
        } else {
            drain_and_check(
                &broker,
                &topic,
                files.path(),
                &mut producer,
                &mut running,
                (days, 6),
            );
        }
    }
}

#[test]
fn topic_recreated_while_running_and_before_start_up() {
    // In-memory engine: tansu 0.6's sqlite engine panics on a fetch that
    // races with a topic deletion, which is exactly what this test does.
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("recreated");
    let files = tempfile::tempdir().unwrap();
    let first = produce_and_read(&broker, &topic, 600, 1);
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &first, Duration::from_secs(60));

    // Re-created shorter while running.
    let second = produce_and_read(&broker, &topic, 300, 2);
    wait_for_records(files.path(), &second, Duration::from_secs(60));
    assert_files_match(files.path(), &recompute(&second), 4);

    // Re-created longer while running.
    let third = produce_and_read(&broker, &topic, 900, 3);
    wait_until("stats of the third topic", Duration::from_secs(90), || {
        let ends = end_offsets(&third);
        (0..4).all(|p| read_partition_file(files.path(), p).is_some_and(|f| f.offset == ends[&p]))
            && std::panic::catch_unwind(|| assert_files_match(files.path(), &recompute(&third), 4))
                .is_ok()
    });
    assert!(consumer.terminate().success());
    assert!(
        consumer.stderr_text().contains("was re-created"),
        "{}",
        consumer.stderr_text()
    );

    // Re-created while no consumer runs: stale state at start-up.
    let fourth = produce_and_read(&broker, &topic, 200, 4);
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_until("stats of the fourth topic", Duration::from_secs(90), || {
        let ends = end_offsets(&fourth);
        (0..4).all(|p| read_partition_file(files.path(), p).is_some_and(|f| f.offset == ends[&p]))
            && std::panic::catch_unwind(|| assert_files_match(files.path(), &recompute(&fourth), 4))
                .is_ok()
    });
    assert!(consumer.terminate().success());
}

/// librdkafka >= 2.5 segfaults when tansu answers a fetch for a deleted
/// topic's id with a topic entry that has neither id nor name (a NULL name
/// reaches strcmp). The vendored librdkafka skips such an entry, with a
/// debug line; this test makes tansu send one and checks that the guard ran
/// and the consumer lived on. Without the patch (see docs/design.md, Dependencies)
/// the consumer dies with SIGSEGV here.
#[test]
fn librdkafka_survives_tansus_nameless_metadata_for_a_deleted_topic() {
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("nameless");
    let files = tempfile::tempdir().unwrap();
    let first = produce_and_read(&broker, &topic, 300, 4);
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.env("RDKAFKA_DEBUG", "metadata")
        .env("RUST_LOG", "warn,librdkafka=debug")
        .arg("--quiet")
        .arg("--files")
        .arg(files.path())
        .args(["0", "1", "2", "3"]);
    let mut consumer = Running::spawn(cmd);
    wait_for_records(files.path(), &first, Duration::from_secs(60));
    let second = produce_and_read(&broker, &topic, 200, 5);
    let ends = end_offsets(&second);
    let reached = wait_until_or_timeout(Duration::from_secs(60), || {
        if let Some(status) = consumer.child.try_wait().unwrap() {
            panic!("the consumer died ({status}) when the topic was re-created");
        }
        (0..4).all(|p| {
            read_partition_file(files.path(), p).is_some_and(|f| Some(&f.offset) == ends.get(&p))
        })
    });
    assert!(reached, "the second topic was not counted in time");
    assert!(
        consumer
            .stderr_text()
            .contains("topic with neither id nor name"),
        "tansu sent no nameless topic entry this time: the guard was not exercised"
    );
    assert!(consumer.terminate().success());
    assert_files_match(files.path(), &recompute(&second), 4);
}

fn raw_producer(broker: &Broker) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

#[test]
fn malformed_messages_are_skipped_counted_and_never_stall() {
    let broker = Broker::start();
    let topic = unique_topic("malformed");
    let files = tempfile::tempdir().unwrap();
    let admin = weatherstream::kafka::TopicAdmin::connect(
        &weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
    )
    .unwrap();
    admin.recreate_topic(&topic, 4, 1).unwrap();
    let producer = raw_producer(&broker);
    let mut injected = 0u64;
    let mut sent = 0usize;
    for (i, obs) in WeatherGenerator::new(Some(8)).take(400).enumerate() {
        let key = report::key_for(obs.date);
        producer
            .send(
                BaseRecord::to(&topic)
                    .key(key)
                    .payload(&report::encode(obs.date, obs.degrees)),
            )
            .unwrap();
        sent += 1;
        if i % 20 == 10 {
            let bad_date = weatherstream::report::Report {
                date: "1990-02-30".into(),
                degrees: 1.0,
            };
            let nan = report::encode(obs.date, f64::NAN);
            let wrong_key_value =
                report::encode(NaiveDate::from_ymd_opt(1990, 7, 4).unwrap(), 80.0);
            match (i / 20) % 4 {
                0 => producer
                    .send(
                        BaseRecord::to(&topic)
                            .key(key)
                            .payload(&[0xffu8, 0x01, 0x02][..]),
                    )
                    .unwrap(),
                1 => producer
                    .send(
                        BaseRecord::to(&topic)
                            .key(key)
                            .payload(&prost::Message::encode_to_vec(&bad_date)),
                    )
                    .unwrap(),
                2 => producer
                    .send(BaseRecord::to(&topic).key(key).payload(&nan))
                    .unwrap(),
                _ => producer
                    .send(BaseRecord::to(&topic).key(key).payload(&wrong_key_value))
                    .unwrap(),
            }
            injected += 1;
            sent += 1;
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let records = read_topic(&broker.bootstrap, &topic, 4, sent, Duration::from_secs(60));
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &records, Duration::from_secs(60));
    assert!(consumer.terminate().success());
    assert_files_match(files.path(), &recompute(&records), 4);
    let stderr = consumer.stderr_text();
    assert!(stderr.contains("skipped malformed message"), "{stderr}");
    let out = bin("consumer")
        .args(["inspect-state", "--json", "--files"])
        .arg(files.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let states: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let counted: u64 = states
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["malformed_skipped"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, injected);
}

/// Reports at the edges of f64, each in a month/year of its own (year 9001,
/// later than any the producer writes, so the chart shows them), injected
/// into a live stream: an overflowing pair, the largest finite numbers of
/// both signs, a subnormal, infinities and NaN.
#[test]
fn numbers_at_the_edge_of_f64_never_wedge_the_pipeline() {
    let broker = Broker::start();
    let topic = unique_topic("extremes");
    let files = tempfile::tempdir().unwrap();
    let mut producer = start_paced_producer(&broker, &topic, 1500, 21, "0.004");
    let readers = Readers::start(files.path());
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--shutdown-timeout", "10", "--files"])
        .arg(files.path())
        .args(["0", "1", "2", "3"]);
    let mut consumer = Running::spawn(cmd);
    wait_until("a first publish", Duration::from_secs(60), || {
        (0..4).any(|p| read_partition_file(files.path(), p).is_some_and(|f| f.offset > 0))
    });
    let svg_path = files.path().join("month.svg");
    let day = |month, day| NaiveDate::from_ymd_opt(9001, month, day).unwrap();
    let extremes = [
        (day(1, 1), 1e308),
        (day(1, 2), 1e308),
        (day(2, 1), f64::MAX),
        (day(3, 1), -f64::MAX),
        (day(4, 1), 5e-324),
        (day(5, 1), f64::INFINITY),
        (day(5, 2), f64::NEG_INFINITY),
        (day(5, 3), f64::NAN),
    ];
    let raw = raw_producer(&broker);
    for (date, degrees) in extremes {
        raw.send(
            BaseRecord::to(&topic)
                .key(report::key_for(date))
                .payload(&report::encode(date, degrees)),
        )
        .unwrap();
    }
    raw.flush(Duration::from_secs(30)).unwrap();
    // The chart shows the latest January to March: the year 9001, the
    // largest finite numbers of both signs on one axis.
    wait_until(
        "month.svg with the bars of 9001",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&svg_path).is_ok_and(|svg| {
                svg.contains("January-9001")
                    && svg.contains("February-9001")
                    && svg.contains("March-9001")
            })
        },
    );
    assert!(producer.child.wait().unwrap().success());
    let records = all_records(&broker, &topic);
    wait_for_records(files.path(), &records, Duration::from_secs(90));
    // The chart is drawn again after the stream ended: the exporter was
    // never stuck.
    let before = std::fs::metadata(&svg_path).unwrap().modified().unwrap();
    let late = NaiveDate::from_ymd_opt(9002, 1, 1).unwrap();
    raw.send(
        BaseRecord::to(&topic)
            .key(report::key_for(late))
            .payload(&report::encode(late, 1e300)),
    )
    .unwrap();
    raw.flush(Duration::from_secs(30)).unwrap();
    wait_until("month.svg drawn again", Duration::from_secs(60), || {
        std::fs::read_to_string(&svg_path).is_ok_and(|svg| svg.contains("January-9002"))
    });
    assert!(std::fs::metadata(&svg_path).unwrap().modified().unwrap() >= before);
    let records = all_records(&broker, &topic);
    wait_for_records(files.path(), &records, Duration::from_secs(60));

    let signalled = Instant::now();
    consumer.signal(libc::SIGTERM);
    let status = consumer.child.wait().unwrap();
    let stop_took = signalled.elapsed();
    assert!(status.success(), "{}", consumer.stderr_text());
    assert!(
        stop_took < Duration::from_secs(10),
        "SIGTERM took {stop_took:?}, past the 10 s deadline"
    );
    let (reads, problems) = readers.finish();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(reads > 10, "readers read {reads} times");

    // Every other month/year is exact.
    assert_files_match_in(files.path(), &recompute(&records), 4, |year| year < 9000);
    // The extremes: counted while every statistic stays finite, else
    // skipped as malformed, with one line naming partition and offset.
    let mut found = BTreeMap::new();
    for p in ALL {
        let text =
            std::fs::read_to_string(files.path().join(format!("partition-{p}.json"))).unwrap();
        // A strict parser: serde_json refuses NaN and Infinity.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (month, years) in value.as_object().unwrap() {
            let Some(years) = years.as_object() else {
                continue;
            };
            for (year, stats) in years {
                for (field, stat) in stats.as_object().unwrap() {
                    assert!(
                        !stat.is_null(),
                        "partition {p}: {month} {year} {field} is null"
                    );
                }
                if year.parse::<i32>().unwrap() > 9000 {
                    found.insert(
                        format!("{month}-{year}"),
                        (
                            stats["count"].as_u64().unwrap(),
                            stats["sum"].as_f64().unwrap(),
                        ),
                    );
                }
            }
        }
    }
    let expected = BTreeMap::from([
        ("January-9001".to_string(), (1, 1e308)),
        ("February-9001".to_string(), (1, f64::MAX)),
        ("March-9001".to_string(), (1, -f64::MAX)),
        ("April-9001".to_string(), (1, 5e-324)),
        ("January-9002".to_string(), (1, 1e300)),
    ]);
    assert_eq!(found, expected);
    let stderr = consumer.stderr_text();
    assert!(
        stderr.contains("would take the sum of its month/year"),
        "{stderr}"
    );
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("month.svg is XML");
    let texts: Vec<&str> = doc
        .descendants()
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    assert!(
        texts.contains(&"1.798e308") && texts.contains(&"-1.798e308"),
        "{texts:?}"
    );
    for text in &texts {
        assert!(
            !["NaN", "inf", "-inf", "n/a"].contains(&text.trim()),
            "{texts:?}"
        );
    }
    // `consumer verify` recounts by the same rule.
    let out = broker.verify_cmd(&topic, files.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
}

#[test]
fn imports_an_assignment_format_file_when_there_is_no_state() {
    let broker = Broker::start();
    let topic = unique_topic("import");
    let files = tempfile::tempdir().unwrap();
    let records = produce_and_read(&broker, &topic, 500, 9);
    // Partition 2's first half, as the Python solution would have written it.
    let half = end_offsets(&records)[&2] / 2;
    let earlier: Vec<Record> = records
        .iter()
        .filter(|r| r.partition == 2 && r.offset < half)
        .cloned()
        .collect();
    let mut file = serde_json::Map::new();
    file.insert("partition".into(), 2.into());
    file.insert("offset".into(), half.into());
    for ((month, year), (count, sum, start, end)) in &recompute(&earlier)[&2] {
        let entry = file
            .entry(report::month_name(*month))
            .or_insert_with(|| serde_json::json!({}));
        entry[year.to_string()] = serde_json::json!({
            "count": count, "sum": sum, "avg": sum / *count as f64,
            "end": end.to_string(), "start": start.to_string(),
        });
    }
    std::fs::write(
        files.path().join("partition-2.json"),
        serde_json::to_string(&file).unwrap(),
    )
    .unwrap();
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &records, Duration::from_secs(60));
    assert!(consumer.terminate().success());
    assert!(
        consumer.stderr_text().contains("imported"),
        "{}",
        consumer.stderr_text()
    );
    assert_files_match(files.path(), &recompute(&records), 4);
}

#[test]
fn a_held_partition_is_refused_and_the_holder_keeps_running() {
    let broker = Broker::start();
    let topic = unique_topic("held");
    let files = tempfile::tempdir().unwrap();
    let records = produce_and_read(&broker, &topic, 100, 2);
    let mut first = start_consumer(&broker, &topic, files.path(), &[0, 1]);
    wait_until("first consumer's files", Duration::from_secs(30), || {
        [0, 1]
            .iter()
            .all(|p| read_partition_file(files.path(), *p).is_some())
    });
    let out = bin("consumer")
        .args([
            "--bootstrap-servers",
            &broker.bootstrap,
            "--topic",
            &topic,
            "--files",
        ])
        .arg(files.path())
        .args(["1", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("partition 1 is held by another consumer process")
            && stderr.contains(&format!("pid {}", first.child.id())),
        "{stderr}"
    );
    assert!(
        first.child.try_wait().unwrap().is_none(),
        "the holder is unaffected"
    );
    let ends = end_offsets(&records);
    wait_until("holder's progress", Duration::from_secs(60), || {
        [0, 1]
            .iter()
            .all(|p| read_partition_file(files.path(), *p).is_some_and(|f| f.offset == ends[p]))
    });
    assert!(first.terminate().success());
}

#[test]
fn bad_start_up_input_gives_one_clear_error() {
    let broker = Broker::start();
    let topic = unique_topic("badinput");
    let files = tempfile::tempdir().unwrap();
    produce(&broker, &topic, 10, 1);
    let run = |args: &[&str]| {
        bin("consumer")
            .args([
                "--bootstrap-servers",
                &broker.bootstrap,
                "--topic",
                &topic,
                "--files",
            ])
            .arg(files.path())
            .args(args)
            .output()
            .unwrap()
    };
    // A partition the topic does not have: the error lists the valid ones.
    let out = run(&["7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("valid: 0, 1, 2, 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Usage errors.
    for args in [
        &["0", "0"][..],
        &["x"],
        &[],
        &["--fetch-wait-ms", "0", "0"],
        &["--fetch-wait-ms", "soon", "0"],
    ] {
        assert_eq!(run(args).status.code(), Some(2), "{args:?}");
    }
    // The fetch wait is documented with the default that fits Apache Kafka.
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    assert!(
        help.contains("--fetch-wait-ms") && help.contains("[default: 500]"),
        "{help}"
    );
    // A corrupt partition file and no state: refuse, name it, leave it alone.
    let path = files.path().join("partition-3.json");
    std::fs::write(&path, "{\"partition\": 3, \"offset\": ").unwrap();
    let out = run(&["3"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("partition-3.json") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"partition\": 3, \"offset\": "
    );
}

#[test]
fn waits_for_a_topic_that_does_not_exist_yet() {
    let broker = Broker::start();
    let topic = unique_topic("later");
    let files = tempfile::tempdir().unwrap();
    let mut consumer = start_consumer(&broker, &topic, files.path(), &[0]);
    wait_until("the waiting message", Duration::from_secs(30), || {
        consumer.stderr_text().contains("does not exist yet")
    });
    let records = produce_and_read(&broker, &topic, 50, 3);
    let ends = end_offsets(&records);
    wait_until("partition 0 consumed", Duration::from_secs(60), || {
        read_partition_file(files.path(), 0)
            .is_some_and(|f| f.offset == ends.get(&0).copied().unwrap_or(0))
    });
    assert!(consumer.interrupt().success(), "Ctrl-C stops cleanly");
}

#[test]
fn periodic_checks_never_reset_a_healthy_partition_on_a_batching_broker() {
    // tansu's in-memory engine answers a fetch in the middle of a batch
    // with the next batch; a catch-up long enough for several periodic
    // checks must still never take that for a re-created topic.
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("healthy");
    let files = tempfile::tempdir().unwrap();
    let records = produce_and_read(&broker, &topic, 150_000, 12);
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &records, Duration::from_secs(120));
    // One more periodic check on the caught-up partitions.
    std::thread::sleep(Duration::from_secs(6));
    assert!(consumer.terminate().success());
    let stderr = consumer.stderr_text();
    assert!(!stderr.contains("re-created"), "{stderr}");
    assert_files_match(files.path(), &recompute(&records), 4);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_state_restored_from_an_older_copy_never_takes_the_published_offset_back() {
    let broker = Broker::start();
    let topic = unique_topic("restored");
    let files = tempfile::tempdir().unwrap();
    let (days, seed) = (4000, 31);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.001");
    let state = files.path().join("state");
    let old_copy = tempfile::tempdir().unwrap();

    let reached = |min: i64| {
        published_offsets(files.path())
            .iter()
            .all(|o| o.is_some_and(|o| o >= min))
    };
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_until("a first stretch", Duration::from_secs(60), || reached(50));
    assert!(consumer.terminate().success());
    copy_dir(&state, &old_copy.path().join("state"));
    let old: Vec<i64> = published_offsets(files.path())
        .into_iter()
        .flatten()
        .collect();

    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    // Each partition well ahead of its old offset (a partition may hold
    // fewer records than another's offset).
    wait_until("a second stretch", Duration::from_secs(60), || {
        published_offsets(files.path())
            .iter()
            .zip(&old)
            .all(|(now, old)| now.is_some_and(|now| now >= old + 100))
    });
    assert!(consumer.terminate().success());
    let newest = published_offsets(files.path());

    // The old state comes back, behind the published files.
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&old_copy.path().join("state"), &state);

    // Sample the published offsets every 50 ms while the consumer starts
    // on the old state and goes on to the end.
    let (records, stderr) = consume_to_end_sampled(
        &broker,
        &topic,
        &mut producer,
        files.path(),
        days,
        seed,
        newest.clone(),
    );
    assert_eq!(
        stderr.matches("adopting the published file").count(),
        4,
        "{stderr}"
    );
    assert_files_match(files.path(), &recompute(&records), 4);
}

/// Overwrites 4 KiB in the middle of a stopped partition's sled log, as a
/// failing disk might: sled then recovers an older prefix of its log.
fn damage_sled_log(state: &Path, partition: i32) {
    use std::io::{Seek, SeekFrom, Write};
    let path = state.join(format!("partition-{partition}")).join("db");
    let len = std::fs::metadata(&path).unwrap().len();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(len / 2)).unwrap();
    file.write_all(&[0xAB; 4096]).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn a_damaged_state_never_takes_the_published_offset_back() {
    let broker = Broker::start();
    let topic = unique_topic("damaged");
    let files = tempfile::tempdir().unwrap();
    let (days, seed) = (4000, 37);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.001");
    let newest = run_to_offsets(&broker, &topic, files.path(), 300);
    for partition in ALL {
        damage_sled_log(&files.path().join("state"), partition);
    }

    // Sample the published offsets every 50 ms while the consumer starts
    // on the damaged state and goes on to the end.
    let (records, stderr) = consume_to_end_sampled(
        &broker,
        &topic,
        &mut producer,
        files.path(),
        days,
        seed,
        newest,
    );
    // sled recovered older states: the damage reached the worker.
    assert!(stderr.contains("adopting the published file"), "{stderr}");
    assert_files_match(files.path(), &recompute(&records), 4);
}
