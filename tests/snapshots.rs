//! The snapshot topic against a real broker: a host that loses its whole
//! files folder (state included) restores every partition from Kafka, takes
//! the newest snapshot over an older one written after it (a zombie), skips
//! garbage, never publishes an offset below the snapshot's, and counts
//! exactly; `consumer export --from-kafka` builds the same files from the
//! topic alone; snapshots of a deleted and re-created topic are ignored.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use weatherstream::kafka::ClientSettings;
use weatherstream::{Counters, Fingerprint, Snapshot};

const ALL: [i32; 4] = [0, 1, 2, 3];

/// `consumer` on `files` with snapshots every half second.
fn start_snapshotting(broker: &Broker, topic: &str, files: &Path) -> Running {
    let mut cmd = broker.consumer_cmd(topic);
    cmd.args(["--quiet", "--snapshot-interval", "0.5", "--files"])
        .arg(files)
        .args(ALL.iter().map(|p| p.to_string()));
    Running::spawn(cmd)
}

/// Samples the published offsets every 20 ms; returns every one seen
/// below `floor` (a partition with no file yet is not below it).
fn sample_floor(
    files: PathBuf,
    floor: BTreeMap<i32, i64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut below = Vec::new();
        let mut samples = 0;
        while !stop.load(Ordering::SeqCst) || samples == 0 {
            for (p, offset) in published_offsets(&files).iter().enumerate() {
                if let Some(offset) = offset {
                    if *offset < floor[&(p as i32)] {
                        below.push(format!("partition {p}: {offset} < {}", floor[&(p as i32)]));
                    }
                }
            }
            samples += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        below
    })
}

fn raw_producer(broker: &Broker) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap()
}

#[test]
fn a_host_that_lost_its_disk_restores_every_partition_from_the_snapshot_topic() {
    let broker = Broker::start();
    let topic = unique_topic("hostloss");
    let snapshot_topic = format!("{topic}-snapshots");
    // 19,000 days: a little over 20,000 reports.
    let records = produce_and_read(&broker, &topic, 19_000, 11);
    assert!(records.len() >= 20_000, "{} reports", records.len());
    let ends = end_offsets(&records);
    let expected = recompute(&records);

    let host = tempfile::tempdir().unwrap();
    let files = host.path().join("files");
    let mut consumer = start_snapshotting(&broker, &topic, &files);
    wait_for_records(&files, &records, Duration::from_secs(120));
    // A clean stop writes every partition's last snapshot.
    assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    assert!(
        consumer
            .stderr_text()
            .contains("created the snapshot topic"),
        "{}",
        consumer.stderr_text()
    );

    // A zombie: an older snapshot of partition 1 (offset 10, its records
    // still in the topic) written after the newest one.
    let first_ten: Vec<&Record> = records
        .iter()
        .filter(|r| r.partition == 1 && r.offset < 10)
        .collect();
    let tenth = first_ten.iter().find(|r| r.offset == 9).unwrap();
    let zombie = Snapshot {
        partition: 1,
        epoch: 0,
        next_offset: 10,
        aggregates: Default::default(),
        counters: Counters::default(),
        last_record: Some(Fingerprint::of(
            9,
            tenth.key.as_deref(),
            tenth.value.as_deref(),
        )),
        anchor: None,
        last_commit_unix_ms: None,
    };
    weatherstream::write_snapshot(
        &ClientSettings::plaintext(&broker.bootstrap),
        &snapshot_topic,
        &topic,
        &zombie,
        1,
    )
    .unwrap();
    // Garbage, and a snapshot whose key names another partition.
    let raw = raw_producer(&broker);
    for (partition, key, value) in [
        (2, "2", b"\x08\xff\xff\xff not a snapshot".to_vec()),
        (3, "3", Vec::new()),
        (0, "zero", b"junk".to_vec()),
    ] {
        raw.send(
            BaseRecord::to(&snapshot_topic)
                .partition(partition)
                .key(key)
                .payload(&value),
        )
        .unwrap();
    }
    raw.flush(Duration::from_secs(30)).unwrap();

    // The host loses its disk: files and state are gone.
    std::fs::rename(&files, host.path().join("lost")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_floor(files.clone(), ends.clone(), stop.clone());
    let mut consumer = start_snapshotting(&broker, &topic, &files);
    wait_for_records(&files, &records, Duration::from_secs(120));
    stop.store(true, Ordering::SeqCst);
    let below = sampler.join().unwrap();
    assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    let stderr = consumer.stderr_text();
    assert!(below.is_empty(), "published below the snapshot: {below:?}");
    for partition in ALL {
        let line = format!(
            "partition {partition}: restored from the snapshot topic {snapshot_topic:?} at offset {}",
            ends[&partition]
        );
        assert!(stderr.contains(&line), "no {line:?} in\n{stderr}");
    }
    // Each record that is no snapshot was skipped, with a warning.
    assert!(
        stderr.contains("partition 2: skipped the record at offset")
            && stderr.contains("partition 0: skipped the record at offset"),
        "{stderr}"
    );
    assert_files_match(&files, &expected, 4);

    // A view of the cluster from Kafka alone, without any folder of the
    // consumers.
    let view = tempfile::tempdir().unwrap();
    let out = export_from_kafka(&broker, &topic, view.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!view.path().join("state").exists());
    assert_files_match(view.path(), &expected, 4);
    assert!(view.path().join("month.svg").exists());
}

#[test]
fn snapshots_of_a_recreated_topic_are_ignored_and_the_recount_is_exact() {
    // In-memory engine: the producer deletes the topic while nothing reads.
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("recreated-snap");
    let first = produce_and_read(&broker, &topic, 800, 1);
    let host = tempfile::tempdir().unwrap();
    let files = host.path().join("files");
    let mut consumer = start_snapshotting(&broker, &topic, &files);
    wait_for_records(&files, &first, Duration::from_secs(60));
    assert!(consumer.terminate().success(), "{}", consumer.stderr_text());

    // The topic is deleted and re-created with other reports, and the
    // host starts on an empty disk: the old snapshots are ahead of it.
    let second = produce_and_read(&broker, &topic, 300, 2);
    std::fs::rename(&files, host.path().join("lost")).unwrap();
    let mut consumer = start_snapshotting(&broker, &topic, &files);
    wait_for_records(&files, &second, Duration::from_secs(60));
    assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    let stderr = consumer.stderr_text();
    assert!(
        !stderr.contains("restored from the snapshot topic"),
        "{stderr}"
    );
    for partition in ALL {
        let line = format!("partition {partition}: 1 snapshots in");
        let warned = stderr
            .lines()
            .filter(|l| {
                l.contains(&format!("partition {partition}: "))
                    && l.contains("belong to an earlier topic")
            })
            .count();
        assert_eq!(
            warned, 1,
            "one warning for partition {partition} ({line}):\n{stderr}"
        );
    }
    assert_files_match(&files, &recompute(&second), 4);

    // The new count's snapshots order after the old topic's: the view from
    // Kafka shows the new topic.
    let view = tempfile::tempdir().unwrap();
    let out = export_from_kafka(&broker, &topic, view.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_files_match(view.path(), &recompute(&second), 4);
}
