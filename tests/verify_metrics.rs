//! `consumer verify` and `consumer --metrics-addr` against a real broker:
//! verification of a finished pipeline, of a tampered state, of a live
//! pipeline and of a re-created topic; a scrape checked against what the
//! test produced; 404s; an address that cannot be bound.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

const ALL: [i32; 4] = [0, 1, 2, 3];

fn verify(broker: &Broker, topic: &str, files: &Path, partitions: &[&str]) -> Output {
    broker
        .verify_cmd(topic, files)
        .args(partitions)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a pipeline of `days` to the end and stops the consumer.
fn finished_pipeline(broker: &Broker, topic: &str, files: &Path, days: u64) -> Vec<Record> {
    let records = produce_and_read(broker, topic, days, 21);
    let mut consumer = start_consumer(broker, topic, files, &ALL);
    wait_for_records(files, &records, Duration::from_secs(60));
    assert!(consumer.terminate().success());
    records
}

#[test]
fn verify_passes_a_finished_pipeline_and_names_a_tampered_month() {
    let broker = Broker::start();
    let topic = unique_topic("verify");
    let files = tempfile::tempdir().unwrap();
    let records = finished_pipeline(&broker, &topic, files.path(), 800);
    let out = verify(&broker, &topic, files.path(), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let ends = end_offsets(&records);
    for p in ALL {
        let line = format!(
            "partition {p}: OK, {} records to offset {}",
            ends[&p], ends[&p]
        );
        assert!(stdout.contains(&line), "{line} not in\n{stdout}");
    }
    assert!(
        stdout.contains("4 OK, 0 differ, 0 not verified"),
        "{stdout}"
    );

    // Tamper with one month/year of a published file (consistently: avg
    // still sum/count), import it into a fresh state, and verify.
    let tampered = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(files.path().join("partition-0.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&original).unwrap();
    let (month, year) = {
        let top = value.as_object().unwrap();
        let month = top
            .keys()
            .find(|k| *k != "partition" && *k != "offset")
            .unwrap()
            .clone();
        let year = top[&month]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        (month, year)
    };
    let stats = &mut value[&month][&year];
    let count = stats["count"].as_u64().unwrap() + 1;
    let sum = stats["sum"].as_f64().unwrap() + 10.0;
    stats["count"] = count.into();
    stats["sum"] = sum.into();
    stats["avg"] = (sum / count as f64).into();
    std::fs::write(
        tampered.path().join("partition-0.json"),
        serde_json::to_string_pretty(&value).unwrap(),
    )
    .unwrap();
    let mut importer = start_consumer(&broker, &topic, tampered.path(), &[0]);
    wait_until("the import", Duration::from_secs(30), || {
        importer.stderr_text().contains("imported")
            || tampered.path().join("state/partition-0").exists()
    });
    assert!(importer.terminate().success());
    let out = verify(&broker, &topic, tampered.path(), &["0"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("partition 0: DIFFERS"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{month} {year}: count expected {}, found {count}",
            count - 1
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{month} {year}: sum expected")),
        "{stdout}"
    );
}

#[test]
fn verify_checks_a_live_pipeline_from_its_published_files() {
    let broker = Broker::start();
    let topic = unique_topic("verifylive");
    let files = tempfile::tempdir().unwrap();
    let mut producer = start_paced_producer(&broker, &topic, 100_000, 22, "0.002");
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_until("some progress", Duration::from_secs(60), || {
        ALL.iter()
            .all(|p| read_partition_file(files.path(), *p).is_some_and(|f| f.offset > 20))
    });
    let out = verify(&broker, &topic, files.path(), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.matches("(live: ").count(), 4, "{stdout}");
    assert!(
        consumer.child.try_wait().unwrap().is_none(),
        "the consumer stopped"
    );
    assert!(producer.terminate().success());
    assert!(consumer.terminate().success());
}

#[test]
fn verify_reports_a_recreated_topic_instead_of_verifying_it() {
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("verifyrecreated");
    let files = tempfile::tempdir().unwrap();
    finished_pipeline(&broker, &topic, files.path(), 600);
    // Shorter: the stored offsets are past the end of the new log.
    produce_and_read(&broker, &topic, 100, 23);
    let out = verify(&broker, &topic, files.path(), &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(!stdout.contains(": OK"), "{stdout}");
    assert_eq!(stdout.matches("NOT VERIFIED").count(), 4, "{stdout}");
    assert!(stdout.contains("re-created"), "{stdout}");
    // Longer: the records at the stored offsets exist but are others.
    produce_and_read(&broker, &topic, 1_200, 24);
    let out = verify(&broker, &topic, files.path(), &["1"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("partition 1: NOT VERIFIED, the topic was re-created"),
        "{stdout}"
    );
    // No topic at all.
    let out = verify(&broker, "no-such-topic", files.path(), &["0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("does not exist"),
        "{}",
        text(&out.stdout)
    );
}

/// GET `path` from `address`; returns the status code and body.
fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// The value of one series in a text exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// 500 records produced, and a consumer of all partitions serving metrics
/// that has published them: the records, the consumer and its address.
fn caught_up_with_metrics(
    broker: &Broker,
    topic: &str,
    files: &Path,
) -> (Vec<Record>, Running, String) {
    let records = produce_and_read(broker, topic, 500, 25);
    let mut cmd = broker.consumer_cmd(topic);
    cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
        .arg(files)
        .args(["0", "1", "2", "3"]);
    let consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    wait_for_records(files, &records, Duration::from_secs(60));
    (records, consumer, address)
}

#[test]
fn metrics_are_scraped_during_a_run_and_match_what_was_produced() {
    let broker = Broker::start();
    let topic = unique_topic("metrics");
    let files = tempfile::tempdir().unwrap();
    let (records, mut consumer, address) = caught_up_with_metrics(&broker, &topic, files.path());
    let ends = end_offsets(&records);
    let expected = recompute(&records);
    let counted: u64 = expected
        .values()
        .flat_map(|m| m.values())
        .map(|s| s.0)
        .sum();
    // Metrics follow the files within the exporter's publish; poll.
    let mut body = String::new();
    wait_until(
        "metrics to show every record",
        Duration::from_secs(10),
        || {
            body = http_get(&address, "/metrics").1;
            let total: f64 = ALL
                .iter()
                .filter_map(|p| {
                    sample(
                        &body,
                        &format!("weatherstream_reports_counted_total{{partition=\"{p}\"}}"),
                    )
                })
                .sum();
            total as u64 == counted
        },
    );
    for p in ALL {
        let label = format!("{{partition=\"{p}\"}}");
        assert_eq!(
            sample(&body, &format!("weatherstream_next_offset{label}")),
            Some(ends[&p] as f64),
            "{body}"
        );
        assert!(
            sample(
                &body,
                &format!("weatherstream_batches_committed_total{label}")
            )
            .unwrap()
                >= 1.0
        );
        assert_eq!(
            sample(
                &body,
                &format!("weatherstream_recreations_detected_total{label}")
            ),
            Some(0.0)
        );
        assert!(
            sample(
                &body,
                &format!("weatherstream_commit_duration_seconds_count{label}")
            )
            .unwrap()
                >= 1.0
        );
        assert!(
            sample(
                &body,
                &format!("weatherstream_publish_duration_seconds_count{label}")
            )
            .unwrap()
                >= 1.0
        );
        assert!(
            sample(
                &body,
                &format!("weatherstream_last_publish_timestamp_seconds{label}")
            )
            .unwrap()
                > 1.7e9
        );
    }
    // The standard series every Prometheus client exports, and which
    // build this is.
    // (in whole seconds: 0 for a short run)
    assert!(
        sample(&body, "process_cpu_seconds_total").is_some(),
        "{body}"
    );
    assert!(
        sample(&body, "process_resident_memory_bytes").unwrap() > 1e6,
        "{body}"
    );
    assert!(
        sample(&body, "process_start_time_seconds").unwrap() > 1.7e9,
        "{body}"
    );
    let build = format!(
        "weatherstream_build_info{{librdkafka=\"{}\",version=\"{}\"}}",
        rdkafka::util::get_rdkafka_version().1,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&body, &build), Some(1.0), "{body}");
    assert_eq!(
        sample(&body, "weatherstream_partitions_owned"),
        Some(4.0),
        "{body}"
    );
    for p in ALL {
        assert_eq!(
            sample(
                &body,
                &format!("weatherstream_partition_running{{partition=\"{p}\"}}")
            ),
            Some(1.0),
            "{body}"
        );
    }
    // Each partition's snapshot reaches its end offset (within the
    // snapshot interval of its last commit).
    wait_until(
        "snapshots at the end offsets",
        Duration::from_secs(20),
        || {
            body = http_get(&address, "/metrics").1;
            ALL.iter().all(|p| {
                sample(
                    &body,
                    &format!("weatherstream_snapshot_offset{{partition=\"{p}\"}}"),
                ) == Some(ends[p] as f64)
            })
        },
    );
    for p in ALL {
        let label = format!("{{partition=\"{p}\"}}");
        let written = sample(
            &body,
            &format!("weatherstream_snapshots_written_total{label}"),
        );
        let bytes = sample(&body, &format!("weatherstream_snapshot_bytes_total{label}"));
        // A snapshot holds at least its header and one month/year.
        assert!(
            written.is_some_and(|w| w >= 1.0)
                && bytes.is_some_and(|b| b >= 40.0 * written.unwrap_or(0.0)),
            "{body}"
        );
        assert_eq!(
            sample(
                &body,
                &format!("weatherstream_snapshots_failed_total{label}")
            ),
            Some(0.0),
            "{body}"
        );
        // The start read the (new, empty) snapshot topic.
        assert!(
            sample(
                &body,
                &format!("weatherstream_restore_duration_seconds{label}")
            )
            .is_some_and(|s| s > 0.0 && s < 30.0),
            "{body}"
        );
    }
    let processed: f64 = ["reports_counted", "duplicates_dropped", "malformed_skipped"]
        .iter()
        .flat_map(|m| {
            ALL.map(|p| {
                sample(
                    &body,
                    &format!("weatherstream_{m}_total{{partition=\"{p}\"}}"),
                )
                .unwrap()
            })
        })
        .sum();
    assert_eq!(processed as usize, records.len(), "{body}");
    let (status, _) = http_get(&address, "/");
    assert_eq!(status, 404);
    let (status, _) = http_get(&address, "/metrics/../state");
    assert_eq!(status, 404);
    assert!(consumer.terminate().success());
}

/// Every `weatherstream_fetch_requests_total` series, by client.
fn fetch_requests(address: &str) -> BTreeMap<String, f64> {
    http_get(address, "/metrics")
        .1
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("weatherstream_fetch_requests_total{client=\"")?;
            let (client, value) = rest.split_once("\"} ")?;
            Some((client.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn an_idle_consumer_fetches_with_one_shared_client_and_checks_nothing() {
    let broker = Broker::start();
    let topic = unique_topic("idle-load");
    let files = tempfile::tempdir().unwrap();
    let (_, mut consumer, address) = caught_up_with_metrics(&broker, &topic, files.path());
    // Idle: once the checks of what was counted are done, no client but the
    // shared one fetches. Routine checks run every 5 s, so quiet for longer
    // than that means they stopped (librdkafka's statistics come every 1 s).
    let others = |mut series: BTreeMap<String, f64>| {
        series.remove("shared");
        series
    };
    let mut quiet_since = (std::time::Instant::now(), others(fetch_requests(&address)));
    wait_until(
        "every client but the shared one to stop fetching for 7 s",
        Duration::from_secs(60),
        || {
            let now = others(fetch_requests(&address));
            if now != quiet_since.1 {
                quiet_since = (std::time::Instant::now(), now);
            }
            quiet_since.0.elapsed() >= Duration::from_secs(7)
        },
    );
    let before = fetch_requests(&address);
    let window = Duration::from_secs(10);
    std::thread::sleep(window); // a measurement window, not a wait for an event
    let after = fetch_requests(&address);
    for p in ALL {
        assert!(
            after.contains_key(&format!("verify-{p}")),
            "partition {p}'s verifier is not counted: {after:?}"
        );
    }
    let of_shared = |series: &BTreeMap<String, f64>| series.get("shared").copied().unwrap_or(0.0);
    let shared = of_shared(&after) - of_shared(&before);
    assert_eq!(
        others(before),
        others(after),
        "clients other than the shared one fetched"
    );
    // One long-polling fetch per fetch wait (tansu holds each that long; a
    // Kafka broker answers an idle one when it expires), with slack for
    // scheduling: one client per partition would be four times this.
    let wait_ms: f64 = if broker.is_ours() {
        tansu_fetch_wait_ms().parse().unwrap()
    } else {
        weatherstream::consumer::DEFAULT_FETCH_WAIT_MS as f64
    };
    let per_second = shared / window.as_secs_f64();
    let bound = 2.0 * 1000.0 / wait_ms;
    assert!(
        per_second > 0.0 && per_second <= bound,
        "shared client: {per_second:.1} fetch requests/s idle, expected at most {bound:.1}"
    );
    assert!(consumer.terminate().success());
}

#[test]
fn a_metrics_address_that_cannot_be_bound_fails_before_touching_partitions() {
    let broker = Broker::start();
    let topic = unique_topic("metricsbind");
    produce(&broker, &topic, 10, 26);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let files = tempfile::tempdir().unwrap();
    let out = broker
        .consumer_cmd(&topic)
        .args(["--metrics-addr", &address, "--files"])
        .arg(files.path())
        .arg("0")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {address}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        !files.path().join("state").exists(),
        "a partition was touched"
    );
}
