//! Faults under a running pipeline: a full disk under the consumer's files
//! and state, and the broker gone for a minute. The producer and consumers
//! must keep running, keep their last committed state, never publish an
//! older offset, and count every report exactly once when the fault ends;
//! after the outage their snapshots catch up with the log again.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

const ALL: [i32; 4] = [0, 1, 2, 3];

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None (with the reason) where this process may not mount.
    fn mount(size_mib: u32) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root, so no tmpfs can be mounted".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes 1 MiB blocks into `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 1 << 20];
    while file.write_all(&block).and_then(|_| file.sync_all()).is_ok() {}
}

/// Waits until every partition has published some progress, then samples
/// the published offsets every 50 ms (see `assert_never_went_back`).
fn sample_after_progress(files: &Path) -> (Arc<AtomicBool>, JoinHandle<Vec<String>>) {
    wait_until("some progress", Duration::from_secs(60), || {
        published_offsets(files)
            .iter()
            .all(|o| o.is_some_and(|o| o > 20))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_offsets(files.to_path_buf(), published_offsets(files), stop.clone());
    (stop, sampler)
}

#[test]
fn a_full_disk_stalls_the_consumer_which_recovers_without_losing_or_double_counting() {
    let tmpfs = match Tmpfs::mount(32) {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!(
                "skipped: {why}; run the tests as root (CI does) to fill a tmpfs under the consumer"
            );
            return;
        }
    };
    let files = tmpfs.path().join("files");
    let broker = Broker::start();
    let topic = unique_topic("fulldisk");
    let (days, seed) = (3000, 41);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.002");
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
        .arg(&files)
        .args(ALL.map(|p| p.to_string()));
    let mut consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    let (stop, sampler) = sample_after_progress(&files);

    // Full: commits fail; the consumer says so and keeps running.
    let filler = tmpfs.path().join("filler");
    fill(&filler);
    wait_until("a failed commit", Duration::from_secs(30), || {
        consumer.stderr_text().contains("cannot commit")
    });
    let exited = wait_until_or_timeout(Duration::from_secs(3), || {
        consumer.child.try_wait().unwrap().is_some()
    });
    assert!(!exited, "the consumer exited: {}", consumer.stderr_text());
    // Not ready while its storage is stalled, and alive: it waits.
    let mut stalled = String::new();
    wait_until("/readyz to name the stall", Duration::from_secs(10), || {
        let (status, _, body) = http(&address, "GET", "/readyz", None);
        stalled = String::from_utf8_lossy(&body).into_owned();
        status == 503 && stalled.contains("storage_stalled")
    });
    let (status, _, body) = http(&address, "GET", "/healthz", None);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // Space returns: everything is counted, once.
    std::fs::remove_file(&filler).unwrap();
    let records = finish_and_read(&broker, &topic, &mut producer, &files, days, seed);
    assert_never_went_back(&stop, sampler);
    let stderr = consumer.stderr_text();
    assert!(stderr.contains("storage works again"), "{stderr}");
    wait_until("ready again", Duration::from_secs(10), || {
        http(&address, "GET", "/readyz", None).0 == 200
    });
    assert!(
        !stderr.contains("failed to flush") && !stderr.contains("hit error"),
        "sled's own lines repeat the fault: {stderr}"
    );
    assert!(consumer.terminate().success(), "{stderr}");
    assert_files_match(&files, &recompute(&records), 4);
}

/// How long the broker stays down in the outage test: the minute.
const OUTAGE: Duration = Duration::from_secs(60);

#[test]
fn a_broker_gone_for_a_minute_is_survived_by_producer_and_consumers_with_exact_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    // sqlite: the broker's data outlives the process.
    let mut broker = Broker::start_with(Storage::Sqlite);
    if !broker.is_ours() {
        eprintln!("skipped: KAFKA_BOOTSTRAP_SERVERS names a broker this test cannot stop");
        return;
    }
    let topic = unique_topic("outage");
    // 100 reports a second for ~90 s: the outage comes mid-stream and the
    // producer is still sending when the broker is back.
    let (days, seed) = (9000, 47);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.01");
    let mut consumers = [
        start_consumer(&broker, &topic, &files, &[0, 2]),
        start_consumer(&broker, &topic, &files, &[1, 3]),
    ];
    let (stop, sampler) = sample_after_progress(&files);

    broker.kill_keeping_data();
    let outage_began = std::time::Instant::now();
    wait_until("every process to notice the outage", OUTAGE, || {
        consumers
            .iter()
            .chain([&producer])
            .all(|p| p.stderr_text().contains("broker unreachable"))
    });
    // The outage itself: nothing to poll for, only time to let pass.
    std::thread::sleep(OUTAGE.saturating_sub(outage_began.elapsed()));
    for process in consumers.iter_mut().chain([&mut producer]) {
        assert!(
            process.child.try_wait().unwrap().is_none(),
            "a process exited during the outage: {}",
            process.stderr_text()
        );
    }
    broker.restart();

    let records = finish_and_read(&broker, &topic, &mut producer, &files, days, seed);
    assert_never_went_back(&stop, sampler);
    let producer_log = producer.stderr_text();
    assert!(
        producer_log.contains(&format!("{} delivered, 0 failed", reports_for(days, seed))),
        "{producer_log}"
    );
    for process in consumers.iter().chain([&producer]) {
        let log = process.stderr_text();
        // One line when the broker goes, one when it is back; none per
        // librdkafka retry, and no reset.
        assert_eq!(log.matches("broker unreachable").count(), 1, "{log}");
        assert_eq!(log.matches("broker reachable again").count(), 1, "{log}");
        assert!(!log.contains("Broker transport failure"), "{log}");
        assert!(!log.contains("re-created"), "{log}");
    }
    // Snapshots resumed after the outage: while the consumers still run,
    // the snapshot topic alone catches up with the end of every partition.
    let expected = recompute(&records);
    let from_kafka = dir.path().join("from-kafka");
    let ends = end_offsets(&records);
    wait_until(
        "the snapshots to reach the end of the log",
        Duration::from_secs(60),
        || {
            export_from_kafka(&broker, &topic, &from_kafka)
                .status
                .success()
                && (0..4).all(|p| {
                    read_partition_file(&from_kafka, p)
                        .is_some_and(|f| Some(&f.offset) == ends.get(&p))
                })
        },
    );
    assert_files_match(&from_kafka, &expected, 4);
    for consumer in &mut consumers {
        assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
    }
    assert_files_match(&files, &expected, 4);
}

/// Round-trip time given to the embedded broker to stall a partition:
/// longer than the consumer's 30 s stall rule, shorter than librdkafka's
/// 60 s request timeout (so it is a slow broker, not a lost one).
const SLOW_BROKER_RTT: Duration = Duration::from_secs(40);

#[test]
fn a_partition_behind_and_stalled_is_told_once_and_when_it_moves_again() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    // librdkafka's mock cluster, for its fault injection: every answer of
    // the broker delayed by a round-trip time the test sets.
    let cluster = MockCluster::new(1).unwrap();
    let topic = unique_topic("stall");
    cluster.create_topic(&topic, 4, 1).unwrap();
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .unwrap();
    // Far more than the consumer prefetches, so that it is behind the log,
    // not only behind its queue, when the broker slows down.
    let reports = 100_000;
    let first = chrono::NaiveDate::from_ymd_opt(1990, 1, 1).unwrap();
    for day in 0..reports {
        let date = first + chrono::Days::new(day);
        let value = weatherstream::report::encode(date, 10.0);
        let key = weatherstream::report::key_for(date);
        let record = BaseRecord::to(&topic).partition(0).key(key).payload(&value);
        let mut record = Some(record);
        while let Some(r) = record.take() {
            if let Err((_, r)) = producer.send(r) {
                producer.poll(Duration::from_millis(10));
                record = Some(r);
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let mut cmd = bin("consumer");
    cmd.args(["--bootstrap-servers", &cluster.bootstrap_servers()])
        .args(["--topic", &topic, "--fetch-wait-ms", "5", "--quiet"])
        .args(["--max-batch", "100", "--metrics-addr", "127.0.0.1:0"])
        .arg("--files")
        .arg(&files)
        .arg("0");
    let mut consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    wait_until("some progress", Duration::from_secs(60), || {
        published_offsets(&files)[0].is_some_and(|o| o > 0)
    });
    let stalled_metric = || {
        let (_, _, body) = http(&address, "GET", "/metrics", None);
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("weatherstream_progress_stalled{partition=\"0\"} "))
            .map(str::to_string)
    };

    cluster.broker_round_trip_time(1, SLOW_BROKER_RTT).unwrap();
    let warned = wait_until_or_timeout(SLOW_BROKER_RTT, || {
        consumer
            .stderr_text()
            .contains("partition 0: STALLED: behind by")
    });
    assert!(
        warned,
        "no stall warning; published {:?}; metrics {:?}; {}",
        published_offsets(&files),
        http(&address, "GET", "/metrics", None).2.len(),
        consumer.stderr_text()
    );
    let offset = published_offsets(&files)[0].unwrap();
    assert!(
        offset < reports as i64,
        "caught up at {offset}: no stall to see"
    );
    assert_eq!(stalled_metric().as_deref(), Some("1"));

    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    wait_until("progress again", Duration::from_secs(60), || {
        consumer
            .stderr_text()
            .contains("partition 0: progressing again")
    });
    assert_eq!(stalled_metric().as_deref(), Some("0"));
    wait_until("the end of the log", Duration::from_secs(60), || {
        published_offsets(&files)[0] == Some(reports as i64)
    });
    assert!(consumer.terminate().success());
    let log = consumer.stderr_text();
    assert_eq!(log.matches("STALLED").count(), 1, "{log}");
    assert_eq!(log.matches("progressing again").count(), 1, "{log}");
    assert!(!log.contains("broker unreachable"), "{log}");
    // A broker that answers nothing is waited for, not read from again.
    assert!(!log.contains("reading again from offset"), "{log}");
}

/// A record batch that cannot be decoded (its attributes say gzip, its
/// data is not) after good reports on partition 1: the reports before it
/// are counted exactly, partition 1 stops at it with one warning naming the
/// offset and the cause and shows as stalled in the progress line and the
/// metric, and the other partitions are not held up.
#[test]
fn an_undecodable_batch_stalls_its_partition_with_one_warning_naming_offset_and_cause() {
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("undecodable");
    produce(&broker, &topic, 300, 3);
    let records = read_topic(
        &broker.bootstrap,
        &topic,
        4,
        reports_for(300, 3),
        Duration::from_secs(60),
    );
    let ends = end_offsets(&records);
    let at = wire::produce_batch(&broker.bootstrap, &topic, 1, &wire::corrupt_gzip_batch(3));
    assert_eq!(at, ends[&1], "the bad batch follows the good reports");

    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let mut cmd = broker.consumer_cmd(&topic);
    cmd.args(["--metrics-addr", "127.0.0.1:0", "--files"])
        .arg(&files)
        .args(ALL.map(|p| p.to_string()));
    let mut consumer = Running::spawn(cmd);
    let address = consumer.listening_address();
    wait_for_records(&files, &records, Duration::from_secs(60));
    let warning = format!("partition 1: STALLED: cannot decode the record batch at offset {at}");
    wait_until("the warning", Duration::from_secs(30), || {
        consumer.stderr_text().contains(&warning)
    });
    let stalled = |partition: i32| {
        let (_, _, body) = http(&address, "GET", "/metrics", None);
        let series = format!("weatherstream_progress_stalled{{partition=\"{partition}\"}} ");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(&series).map(str::to_string))
    };
    wait_until("the stalled metric", Duration::from_secs(10), || {
        stalled(1).as_deref() == Some("1")
    });
    // A progress line (every 10 s) comes after the batch has been fetched
    // and refused again and again.
    let progress = format!("partition 1: next offset {at},");
    wait_until(
        "a progress line that says so",
        Duration::from_secs(30),
        || {
            consumer.stderr_text().lines().any(|l| {
                l.contains(&progress)
                    && l.ends_with(&format!(
                        "STALLED: cannot decode the record batch at offset {at}"
                    ))
            })
        },
    );
    for partition in [0, 2, 3] {
        assert_eq!(
            stalled(partition).as_deref(),
            Some("0"),
            "partition {partition}"
        );
    }
    assert!(consumer.terminate().success());
    let log = consumer.stderr_text();
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
    assert!(
        log.contains("its compressed data cannot be decompressed"),
        "the cause: {log}"
    );
    assert!(!log.contains("Message consumption error"), "{log}");
    assert_eq!(published_offsets(&files)[1], Some(at));
    assert_files_match(&files, &recompute(&records), 4);
}
