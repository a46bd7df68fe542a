//! `cargo bench`: speed of the pipeline, each figure next to a baseline
//! measured in the same run on the same broker and machine.
//!
//! Sections (all but soak by default; name some to run only those:
//! `cargo bench -- fold producer catchup freshness`, `cargo bench -- soak`):
//! - fold: decode + dedup + fold + sled commit in process, batch sizes 1,
//!   100 and 10,000, against decode + fold without persistence; the
//!   exporter's cost per publish against rendering alone.
//! - producer: the producer (generator, protobuf, production settings)
//!   against a raw librdkafka producer sending payloads of the same size
//!   with the same settings.
//! - catchup: the consumer on 4 partitions from empty state until every
//!   report is committed and published, against a raw librdkafka consumer
//!   that only touches each payload; wall time, CPU per report, peak RSS.
//! - freshness: at the assignment's pace (0.1 s per day), the time from a
//!   report's send to its appearance in partition-N.json, against the time
//!   to a raw consumer's receipt of the same reports.
//!
//! - failover: three `consumer --group` members share a files folder with
//!   the producer running; BENCH_FAILOVER_KILLS times (default 5) one is
//!   killed with `kill -9` (never the group's leader: tansu 0.6.0 cannot
//!   re-form a group whose leader died) and started again: the time from
//!   the kill to every partition owned again and publishing again (median
//!   and max), beside the session timeout, and the clean hand-off of each
//!   scale-out (the new owner's first publish after the old one's last).
//!
//! - soak (only when named): the producer at a steady pace (alone for one
//!   sample, as the broker's baseline) and then the consumer on 4
//!   partitions for a long time, sampled every 30 s: reports
//!   produced and published, lag, broker and consumer CPU, RSS, state size,
//!   fetch requests per second; then a verdict on whether anything grows
//!   or stalls.
//!
//! Sizes: BENCH_REPORTS (default 1,000,000), BENCH_FRESHNESS_SECS (60),
//! BENCH_SOAK_SECS (600), BENCH_SOAK_DELAY (0.01 s per day, ten times the
//! assignment's pace), BENCH_SOAK_SAMPLE_SECS (30), BENCH_SOAK_STORAGE
//! (sqlite, whose fetch cost does not grow with the log; or memory).
//! The broker: tansu started here (as the tests start it), or
//! KAFKA_BOOTSTRAP_SERVERS; TANSU_FETCH_WAIT_MS replaces the consumer's
//! fetch wait for tansu (15 ms) everywhere.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, TopicPartitionList};
use weatherstream::aggregate::{Aggregates, BatchFold};
use weatherstream::generator::WeatherGenerator;
use weatherstream::kafka::TopicAdmin;
use weatherstream::producer::{
    flush_promptly, production_settings, ProducerConfig, ReportSender, TopicStart,
};
use weatherstream::report::{self, MONTH_NAMES};
use weatherstream::shutdown::Shutdown;
use weatherstream::state::{BatchCommit, PartitionState};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of this process so far.
fn own_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into `usage`, a valid, exclusive rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// User + system CPU seconds of a child process so far (from /proc).
fn child_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // SAFETY: sysconf takes an integer and reads no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of /proc/PID/stat; index from after "(name)" state.
    (field(11) + field(12)) / ticks
}

/// Peak resident set of a child process, in MiB.
fn child_peak_rss_mib(pid: u32) -> f64 {
    child_status_mib(pid, "VmHWM:")
}

/// A memory figure of /proc/PID/status (kB there), in MiB.
fn child_status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Bytes of the files under `dir`, in MiB.
fn dir_mib(dir: &Path) -> f64 {
    fn bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
    }
    bytes(dir) as f64 / (1024.0 * 1024.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

/// Distinct days that make about `reports` reports with seed 1.
fn days_for(reports: u64) -> u64 {
    let mut gen = WeatherGenerator::new(Some(1));
    let mut sent = 0;
    while sent < reports {
        gen.next();
        sent += 1;
    }
    gen.days_generated()
}

fn main() {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    println!("machine: {}", machine());
    if sections.iter().any(|s| s == "soak") {
        bench_soak();
        return;
    }
    if want("fold") {
        bench_fold();
    }
    if want("failover")
        && !(want("producer") || want("catchup") || want("freshness") || want("restore"))
    {
        bench_failover(env_number("BENCH_FAILOVER_KILLS", 5));
        return;
    }
    if !(want("producer") || want("catchup") || want("freshness") || want("restore")) {
        return;
    }
    // The in-memory engine: the sqlite engine serves a fetch from a large
    // partition in seconds and saturates under several clients, which would
    // measure the broker, not us. Nothing here restarts mid-batch, where the
    // in-memory engine's fetch quirk would matter.
    let broker = Broker::start_with(Storage::Memory);
    println!(
        "broker: {}",
        if std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok() {
            "KAFKA_BOOTSTRAP_SERVERS"
        } else {
            "tansu 0.6.0, in-memory storage, loopback"
        }
    );
    let reports = env_number("BENCH_REPORTS", 1_000_000);
    if want("producer") || want("catchup") {
        let topic = bench_producer(&broker, reports);
        if want("catchup") {
            bench_catchup(&broker, &topic);
        }
    }
    if want("freshness") {
        bench_freshness(&broker, env_number("BENCH_FRESHNESS_SECS", 60));
    }
    if want("restore") {
        // The sqlite engine: the in-memory one answers a fetch in the
        // middle of a record batch with the next batch, so each check of a
        // record there reads back from earlier offsets for seconds (see
        // docs/design.md), which would measure that quirk, not the restore.
        drop(broker);
        let broker = Broker::start_with(Storage::Sqlite);
        bench_restore(&broker);
    }
    if want("failover") {
        bench_failover(env_number("BENCH_FAILOVER_KILLS", 5));
    }
}

/// See the module's note. The sqlite engine, as the tests use it (a
/// restore checks records in the middle of batches).
fn bench_failover(kills: u64) {
    use common::group::{owned, owned_by, start_member, SESSION_MS};
    use std::collections::BTreeSet;
    println!(
        "\n== failover: 3 group members, {kills} x kill -9 and start again, producer running (tansu sqlite) =="
    );
    let broker = Broker::start_with(Storage::Sqlite);
    let topic = unique_topic("bench-failover");
    let group = format!("{topic}-group");
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    // Far more days than the run needs; stopped at the end.
    let mut producer = start_paced_producer(&broker, &topic, 1_000_000, 7, "0.004");
    let member = |i: usize| {
        start_member(
            &broker,
            &topic,
            &group,
            &files,
            &dir.path().join(format!("state-{i}")),
        )
    };
    let all: BTreeSet<i32> = (0..4).collect();
    let leader = member(0);
    wait_until(
        "the first member to run all",
        Duration::from_secs(60),
        || owned(&leader) == all,
    );
    let mut members = vec![leader, member(1), member(2)];
    let shared = |members: &[Running]| {
        members.iter().all(|m| !owned(m).is_empty()) && owned_by(members) == all
    };
    wait_until("three members to share", Duration::from_secs(60), || {
        shared(&members)
    });
    let (mut owned_s, mut publishing_s, mut hand_off_s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..kills {
        let slot = 1 + (round as usize % 2);
        let before = published_offsets(&files);
        let killed = Instant::now();
        members[slot].kill9();
        let survivors: Vec<&Running> = members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != slot)
            .map(|(_, m)| m)
            .collect();
        wait_until("the others to own all", Duration::from_secs(120), || {
            owned_by(survivors.iter().copied()) == all
        });
        owned_s.push(killed.elapsed().as_secs_f64());
        wait_until(
            "every partition to publish again",
            Duration::from_secs(120),
            || {
                published_offsets(&files)
                    .iter()
                    .zip(&before)
                    .all(|(now, before)| now.is_some() && now > before)
            },
        );
        publishing_s.push(killed.elapsed().as_secs_f64());
        members[slot] = member(slot);
        wait_until(
            "the restarted member to get partitions",
            Duration::from_secs(120),
            || shared(&members),
        );
        // A scale-out: the restarted member's own measure of each clean
        // hand-off to it ("publishing again X s after its previous owner").
        let gaps = || -> Vec<f64> {
            members[slot]
                .stderr_text()
                .lines()
                .filter_map(|line| {
                    line.split_once("publishing again ")?
                        .1
                        .split_once(" s after")
                })
                .filter_map(|(seconds, _)| seconds.parse().ok())
                .collect()
        };
        let got = owned(&members[slot]).len();
        wait_until("the hand-offs to publish", Duration::from_secs(60), || {
            gaps().len() >= got
        });
        hand_off_s.extend(gaps());
    }
    let show = |name: &str, mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        println!(
            "  {name}: median {:.1} s, max {:.1} s ({} samples)",
            percentile(&values, 0.5),
            values.last().copied().unwrap_or(f64::NAN),
            values.len()
        );
    };
    println!(
        "  session timeout (session.timeout.ms): {:.1} s",
        SESSION_MS as f64 / 1000.0
    );
    show("kill -9 to every partition owned again", owned_s);
    show("kill -9 to every partition publishing again", publishing_s);
    show(
        "clean hand-off (old owner's last publish to new owner's first)",
        hand_off_s,
    );
    producer.kill9();
    for mut member in members {
        member.terminate();
    }
}

/// A partition of 30 years restored on an empty disk from its snapshot
/// topic, with 5,000 older snapshots before the newest (tansu never
/// compacts: the worst case of a topic nobody compacted), against the same
/// start with --no-snapshots, which counts the partition again from offset
/// 0. Alternating rounds; the restore's own time is the one its log line
/// gives.
fn bench_restore(broker: &Broker) {
    const OLDER: i64 = 5_000;
    let days = 30 * 365;
    println!("\n== restore: a 30-year partition, {OLDER} older snapshots before the newest (tansu sqlite) ==");
    let topic = unique_topic("bench-restore");
    let snapshot_topic = format!("{topic}-snapshots");
    let records = produce_and_read(broker, &topic, days, 5);
    let files = tempfile::tempdir().unwrap();
    let mut consumer = start_consumer(broker, &topic, files.path(), &[0, 1, 2, 3]);
    wait_for_records(files.path(), &records, Duration::from_secs(300));
    assert!(consumer.terminate().success());
    let end = end_offsets(&records)[&0];
    let published = read_partition_file(files.path(), 0).unwrap();
    let last = records
        .iter()
        .find(|r| r.partition == 0 && r.offset == end - 1)
        .unwrap();
    let newest = weatherstream::Snapshot {
        partition: 0,
        epoch: 0,
        next_offset: end,
        aggregates: published.aggregates.clone(),
        counters: weatherstream::Counters::default(),
        last_record: Some(weatherstream::Fingerprint::of(
            end - 1,
            last.key.as_deref(),
            last.value.as_deref(),
        )),
        anchor: None,
        last_commit_unix_ms: None,
    };
    let newest_value = weatherstream::changelog::encode(&topic, &newest, "bench/1", 2);
    println!(
        "  partition 0: {end} records, {} month/years; a snapshot of it is {} bytes ({:.0} bytes/s for 4 such partitions at the default 5 s interval)",
        published.aggregates.len(),
        newest_value.len(),
        newest_value.len() as f64 * 4.0 / 5.0
    );
    // Older snapshots of the same size (as a long history's would be),
    // then the newest: in the topic the consumer's run wrote already.
    let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    for i in 0..OLDER {
        let older = weatherstream::Snapshot {
            next_offset: end - 1 - (i % (end - 1)),
            last_record: None,
            ..newest.clone()
        };
        let value = weatherstream::changelog::encode(&topic, &older, "bench/1", 1);
        loop {
            match producer.send(
                BaseRecord::to(&snapshot_topic)
                    .partition(0)
                    .key("0")
                    .payload(&value),
            ) {
                Ok(()) => break,
                Err((_, _)) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .send(
            BaseRecord::to(&snapshot_topic)
                .partition(0)
                .key("0")
                .payload(&newest_value),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).unwrap();

    let start_on_empty = |args: &[&str]| -> (f64, Option<f64>) {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let mut cmd = broker.consumer_cmd(&topic);
        cmd.args(args).arg("--files").arg(dir.path()).arg("0");
        let mut consumer = Running::spawn(cmd);
        wait_until("partition 0 at its end", Duration::from_secs(600), || {
            read_partition_file(dir.path(), 0).is_some_and(|f| f.offset == end)
        });
        let wall = started.elapsed().as_secs_f64();
        assert!(consumer.terminate().success());
        let log = consumer.stderr_text();
        let restore_secs = log
            .lines()
            .find(|l| l.contains("restored from the snapshot topic"))
            .and_then(|l| l.rsplit("in ").next())
            .and_then(|t| t.trim_end_matches(" s").trim().parse::<f64>().ok());
        (wall, restore_secs)
    };
    let (mut restored, mut own, mut recounted) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let (wall, secs) = start_on_empty(&[]);
        restored.push(wall);
        own.push(secs.expect("the restore's log line"));
        let (wall, secs) = start_on_empty(&["--no-snapshots"]);
        assert!(secs.is_none());
        recounted.push(wall);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (restored, own, recounted) = (
        median(&mut restored),
        median(&mut own),
        median(&mut recounted),
    );
    println!(
        "  start on an empty disk to the end offset published: {restored:.2} s restored (the restore itself {own:.2} s), {recounted:.2} s counted again from offset 0 with --no-snapshots (medians of 3, alternating)"
    );
}

fn encoded_reports(n: usize) -> Vec<(&'static str, Vec<u8>)> {
    WeatherGenerator::new(Some(3))
        .take(n)
        .map(|o| (report::key_for(o.date), report::encode(o.date, o.degrees)))
        .collect()
}

fn bench_fold() {
    println!("\n== fold: decode + dedup + fold + sled commit, in process ==");
    let all = encoded_reports(1_000_000);
    // Baseline: the same work without persistence.
    let started = Instant::now();
    let empty = Aggregates::new();
    let mut fold = BatchFold::new(&empty);
    for (key, value) in &all {
        if let Ok(valid) = report::validate(Some(key.as_bytes()), Some(value)) {
            fold.add(&valid);
        }
    }
    let baseline = all.len() as f64 / started.elapsed().as_secs_f64();
    println!("  baseline decode + validate + fold (no sled): {baseline:>12.0} reports/s");
    for (batch, count) in [(1usize, 2_000usize), (100, 200_000), (10_000, 1_000_000)] {
        let dir = tempfile::tempdir().unwrap();
        let mut state = PartitionState::open(dir.path(), 0).unwrap();
        state.initialize(0, Aggregates::new(), 0).unwrap();
        let started = Instant::now();
        let mut next_offset = 0;
        for chunk in all[..count].chunks(batch) {
            let snapshot = state.snapshot();
            let mut fold = BatchFold::new(&snapshot.aggregates);
            let mut malformed = 0;
            for (key, value) in chunk {
                match report::validate(Some(key.as_bytes()), Some(value)) {
                    Ok(valid) => {
                        fold.add(&valid);
                    }
                    Err(_) => malformed += 1,
                }
            }
            next_offset += chunk.len() as i64;
            let (counted, duplicates) = (fold.counted, fold.duplicates);
            state
                .commit(BatchCommit {
                    touched: fold.into_touched(),
                    counted,
                    duplicates,
                    malformed,
                    next_offset,
                    last_record: None,
                })
                .unwrap();
        }
        let rate = count as f64 / started.elapsed().as_secs_f64();
        println!(
            "  batch {batch:>6}: {rate:>12.0} reports/s  ({:.3} of baseline; {count} reports)",
            rate / baseline
        );
    }
    // The exporter's cost per publish, for a 20-year partition.
    let dir = tempfile::tempdir().unwrap();
    let mut state = PartitionState::open(dir.path(), 0).unwrap();
    state.initialize(0, Aggregates::new(), 0).unwrap();
    let mut fold_all = BatchFold::new(&empty);
    for (key, value) in all.iter().take(7_700) {
        if let Ok(valid) = report::validate(Some(key.as_bytes()), Some(value)) {
            fold_all.add(&valid);
        }
    }
    let snapshot = state
        .commit(BatchCommit {
            touched: fold_all.into_touched(),
            next_offset: 7_700,
            ..Default::default()
        })
        .unwrap();
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(
            weatherstream::published::partition_json(0, snapshot.next_offset, &snapshot.aggregates)
                .expect("finite statistics"),
        );
    }
    let render = started.elapsed().as_secs_f64() / rounds as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        weatherstream::published::write(&dir.path().join("partition-0.json"), &snapshot).unwrap();
    }
    let publish = started.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "  exporter, 20-year partition ({} month/years): render {:.0} us, atomic publish (render + fsync + rename + fsync dir) {:.0} us = {:.1}x render",
        snapshot.aggregates.len(),
        render * 1e6,
        publish * 1e6,
        publish / render
    );
}

/// Produces `reports` with the producer and with a raw producer; returns
/// the producer's topic, which the catch-up section reads.
/// Rounds of the producer comparison, each side going first in turn, so
/// that neither always meets a fresher broker; the best round of each side
/// is reported.
const PRODUCER_ROUNDS: usize = 2;

fn bench_producer(broker: &Broker, reports: u64) -> String {
    println!("\n== producer: {reports} reports, --delay 0, acks=all + idempotence ==");
    let days = days_for(reports);
    // (reports/s, CPU seconds per report) of the best round.
    let mut ours_best = (0.0_f64, f64::NAN);
    let mut raw_best = (0.0_f64, f64::NAN);
    let mut first_topic = None;
    for round in 0..PRODUCER_ROUNDS {
        for ours_turn in [round % 2 == 0, round % 2 == 1] {
            if ours_turn {
                let (topic, rate, cpu_per) = producer_ours(broker, days);
                first_topic.get_or_insert(topic);
                if rate > ours_best.0 {
                    ours_best = (rate, cpu_per);
                }
            } else {
                let (rate, cpu_per) = producer_raw(broker, reports);
                if rate > raw_best.0 {
                    raw_best = (rate, cpu_per);
                }
            }
        }
    }
    println!(
        "  raw librdkafka producer: {:>9.0} reports/s, {:.2} us CPU/report (best of {PRODUCER_ROUNDS})",
        raw_best.0,
        raw_best.1 * 1e6
    );
    println!(
        "  producer (ours):         {:>9.0} reports/s, {:.2} us CPU/report  => {:.2} of raw",
        ours_best.0,
        ours_best.1 * 1e6,
        ours_best.0 / raw_best.0
    );
    first_topic.expect("at least one round")
}

/// Our producer, `days` days: (topic, reports/s, CPU seconds per report).
fn producer_ours(broker: &Broker, days: u64) -> (String, f64, f64) {
    let topic = unique_topic("bench-producer");
    let config = ProducerConfig {
        client: weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
        topic: topic.clone(),
        partitions: 4,
        replication_factor: 1,
        delay: Duration::ZERO,
        days: Some(days),
        seed: Some(1),
        start: TopicStart::Recreate,
        print_topics: false,
    };
    let cpu = own_cpu_seconds();
    let started = Instant::now();
    let summary = weatherstream::producer::run(&config, &Shutdown::new()).unwrap();
    let wall = started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu;
    let delivered = summary.delivered as f64;
    (topic, delivered / wall, cpu / delivered)
}

/// A raw producer with the same settings sending `reports` same-size
/// payloads: (reports/s, CPU seconds per report).
fn producer_raw(broker: &Broker, reports: u64) -> (f64, f64) {
    let raw_topic = unique_topic("bench-raw");
    let cpu = own_cpu_seconds();
    let started = Instant::now();
    TopicAdmin::connect(&weatherstream::kafka::ClientSettings::plaintext(
        &broker.bootstrap,
    ))
    .unwrap()
    .recreate_topic(&raw_topic, 4, 1)
    .unwrap();
    let producer: ThreadedProducer<DefaultProducerContext> = production_settings(
        &mut weatherstream::kafka::client_config(&weatherstream::kafka::ClientSettings::plaintext(
            &broker.bootstrap,
        )),
        Duration::ZERO,
    )
    .create()
    .unwrap();
    let payload = report::encode(NaiveDate::from_ymd_opt(1990, 1, 1).unwrap(), 12.3456);
    for i in 0..reports {
        let mut record = BaseRecord::to(&raw_topic)
            .key(MONTH_NAMES[(i / 31 % 12) as usize])
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    flush_promptly(&producer, Duration::from_secs(120)).unwrap();
    let wall = started.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu;
    (reports as f64 / wall, cpu / reports as f64)
}

/// The bench topic's 4 partitions, each from `start`.
fn all_partitions(topic: &str, start: rdkafka::Offset) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for p in 0..4 {
        list.add_partition_offset(topic, p, start).unwrap();
    }
    list
}

fn bench_catchup(broker: &Broker, topic: &str) {
    // Count what is there by reading it (watermarks are not trusted).
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // Left at 1 s, librdkafka idles after every fetch that fills its
        // queue: 3x slower here. The ceiling is the tuned client.
        .set("fetch.queue.backoff.ms", "10")
        .create()
        .unwrap();
    let list = all_partitions(topic, rdkafka::Offset::Beginning);
    let cpu = own_cpu_seconds();
    let started = Instant::now();
    consumer.assign(&list).unwrap();
    let (mut count, mut touched, mut at_end) = (0u64, 0u64, 0);
    let mut first: Option<Duration> = None;
    while at_end < 4 {
        match consumer.poll(Duration::from_secs(120)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(|| started.elapsed());
                count += 1;
                touched =
                    touched.wrapping_add(m.payload().map_or(0, |p| u64::from(p[p.len() / 2])));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => at_end += 1,
            Some(Err(e)) => panic!("{e}"),
            None => panic!("raw consumer stalled at {count}"),
        }
    }
    let raw_wall = started.elapsed().as_secs_f64();
    let raw_cpu = own_cpu_seconds() - cpu;
    std::hint::black_box(touched);
    drop(consumer);
    println!("\n== catch-up: {count} reports, 4 partitions, from empty state ==");
    let raw_rate = count as f64 / raw_wall;
    println!(
        "  raw librdkafka consumer: {raw_rate:>9.0} reports/s, {:.2} us CPU/report (first report after {:.1} s)",
        raw_cpu / count as f64 * 1e6,
        first.unwrap_or_default().as_secs_f64()
    );

    let plain = catch_up_ours(broker, topic, count, &[]);
    let (wall, cpu, rss, files) = &plain;
    let rate = count as f64 / wall;
    let cpu_per = cpu / count as f64 * 1e6;
    println!(
        "  consumer (ours):         {rate:>9.0} reports/s, {cpu_per:.2} us CPU/report  => {:.2} of raw in wall time, {:.2}x raw CPU/report",
        rate / raw_rate,
        cpu_per / (raw_cpu / count as f64 * 1e6)
    );
    println!("  consumer peak RSS (4 partitions): {rss:.1} MiB");

    // The cost of --metrics-addr: rounds alternate without and with it, so
    // that drift in the machine falls on both sides; medians compared.
    let (mut without, mut with) = (vec![*cpu], Vec::new());
    for round in 0..5 {
        let metrics = round % 2 == 0;
        let args: &[&str] = if metrics {
            &["--metrics-addr", "127.0.0.1:0"]
        } else {
            &[]
        };
        let (_, cpu, _, _) = catch_up_ours(broker, topic, count, args);
        if metrics { &mut with } else { &mut without }.push(cpu);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain_cpu, metrics_cpu) = (median(&mut without), median(&mut with));
    println!(
        "  with --metrics-addr:      {:.2} us CPU/report against {:.2} without (median of 3 each, alternating) => {:+.1}%",
        metrics_cpu / count as f64 * 1e6,
        plain_cpu / count as f64 * 1e6,
        (metrics_cpu / plain_cpu - 1.0) * 100.0
    );

    // Snapshots (on by default) against --no-snapshots, alternating.
    let (mut on_cpu, mut off_cpu, mut on_wall, mut off_wall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..6 {
        let snapshots = round % 2 == 1;
        let args: &[&str] = if snapshots { &[] } else { &["--no-snapshots"] };
        let (wall, cpu, _, _) = catch_up_ours(broker, topic, count, args);
        if snapshots {
            on_cpu.push(cpu);
            on_wall.push(wall);
        } else {
            off_cpu.push(cpu);
            off_wall.push(wall);
        }
    }
    let (on_cpu, off_cpu) = (median(&mut on_cpu), median(&mut off_cpu));
    let (on_wall, off_wall) = (median(&mut on_wall), median(&mut off_wall));
    println!(
        "  snapshots on:              {:.2} us CPU/report, {:.0} reports/s; off (--no-snapshots): {:.2} us, {:.0} reports/s (median of 3 each, alternating) => CPU {:+.1}%, wall {:+.1}%",
        on_cpu / count as f64 * 1e6,
        count as f64 / on_wall,
        off_cpu / count as f64 * 1e6,
        count as f64 / off_wall,
        (on_cpu / off_cpu - 1.0) * 100.0,
        (on_wall / off_wall - 1.0) * 100.0
    );

    // consumer verify on the state the first run left: reads and recomputes
    // all 4 partitions from offset 0.
    let started = Instant::now();
    let out = broker.verify_cmd(topic, files.path()).output().unwrap();
    let verify_wall = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "verify failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "  consumer verify (4 partitions, in parallel): {:>9.0} records/s read and recomputed ({count} in {verify_wall:.2} s) => {:.2} of the raw consumer",
        count as f64 / verify_wall,
        count as f64 / verify_wall / raw_rate
    );
}

/// Our consumer from empty state until every report is published: wall
/// seconds, CPU seconds, peak RSS in MiB, and its files folder.
fn catch_up_ours(
    broker: &Broker,
    topic: &str,
    count: u64,
    extra_args: &[&str],
) -> (f64, f64, f64, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut cmd = broker.consumer_cmd(topic);
    // A snapshot topic of its own: one that a run before filled would be
    // restored from, and nothing would be caught up.
    if !extra_args.contains(&"--no-snapshots") {
        cmd.args(["--snapshot-topic", &unique_topic("bench-catchup-snapshots")]);
    }
    cmd.arg("--quiet")
        .args(extra_args)
        .arg("--files")
        .arg(files.path())
        .args(["0", "1", "2", "3"]);
    let mut ours = Running::spawn(cmd);
    let pid = ours.child.id();
    let (mut cpu, mut rss) = (0.0, 0.0);
    wait_until(
        "the consumer to publish every report",
        Duration::from_secs(600),
        || {
            cpu = child_cpu_seconds(pid);
            rss = child_peak_rss_mib(pid);
            (0..4)
                .filter_map(|p| read_partition_file(files.path(), p))
                .map(|f| f.offset as u64)
                .sum::<u64>()
                >= count
        },
    );
    let wall = started.elapsed().as_secs_f64();
    assert!(ours.terminate().success());
    (wall, cpu, rss, files)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(name: &str, mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
    println!(
        "  {name}: p50 {p50:>6.1} ms, p99 {p99:>6.1} ms, max {:>6.1} ms ({} reports)",
        ms.last().copied().unwrap_or(f64::NAN),
        ms.len()
    );
    (p50, p99)
}

fn bench_freshness(broker: &Broker, seconds: u64) {
    for snapshots in [true, false] {
        freshness_round(broker, seconds, snapshots);
    }
}

fn freshness_round(broker: &Broker, seconds: u64, snapshots: bool) {
    println!(
        "\n== freshness: {seconds} s at 0.1 s per day, snapshots {} ==",
        if snapshots { "on" } else { "off" }
    );
    let topic = unique_topic("bench-fresh");
    TopicAdmin::connect(&weatherstream::kafka::ClientSettings::plaintext(
        &broker.bootstrap,
    ))
    .unwrap()
    .recreate_topic(&topic, 4, 1)
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    let mut consumer = {
        let mut cmd = broker.consumer_cmd(&topic);
        if !snapshots {
            cmd.arg("--no-snapshots");
        }
        cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
            .arg(files.path())
            .args(["0", "1", "2", "3"]);
        Running::spawn(cmd)
    };
    let metrics_address = consumer.listening_address();
    let metric = |name: &str| {
        let body = http(&metrics_address, "GET", "/metrics", None).2;
        metric_sum(&String::from_utf8_lossy(&body), name)
    };
    let fsyncs = || metric("weatherstream_fsyncs_total");
    wait_until(
        "the consumer's first files",
        Duration::from_secs(30),
        || (0..4).all(|p| read_partition_file(files.path(), p).is_some()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // When each date became visible: to a raw consumer, and in the files.
    let received: Arc<Mutex<BTreeMap<NaiveDate, Instant>>> = Arc::default();
    let published: Arc<Mutex<BTreeMap<NaiveDate, Instant>>> = Arc::default();
    let raw = {
        let (stop, received, bootstrap, topic) = (
            stop.clone(),
            received.clone(),
            broker.bootstrap.clone(),
            topic.clone(),
        );
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", "bench-fresh")
                // The consumer's setting here: tansu answers a waiting fetch
                // only when this expires.
                .set("fetch.wait.max.ms", tansu_fetch_wait_ms())
                .create()
                .unwrap();
            c.assign(&all_partitions(&topic, rdkafka::Offset::Offset(0)))
                .unwrap();
            while !stop.load(Ordering::SeqCst) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
                    if let Ok(r) = report::validate(m.key(), m.payload()) {
                        received
                            .lock()
                            .unwrap()
                            .entry(r.date)
                            .or_insert_with(Instant::now);
                    }
                }
            }
        })
    };
    let watcher = {
        let (stop, published, dir) = (stop.clone(), published.clone(), files.path().to_path_buf());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let now = Instant::now();
                for p in 0..4 {
                    let Some(file) = read_partition_file(Path::new(&dir), p) else {
                        continue;
                    };
                    let mut seen = published.lock().unwrap();
                    // Every day up to `end` is in: reports that came in one
                    // batch (after a broker stall, say) are visible at once,
                    // although only the last shows as `end`.
                    for stats in file.aggregates.values() {
                        if seen.contains_key(&stats.end) {
                            continue; // every day up to it is in already
                        }
                        for day in stats.start.iter_days().take_while(|d| *d <= stats.end) {
                            seen.entry(day).or_insert(now);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut sender = ReportSender::new(
        &weatherstream::kafka::ClientSettings::plaintext(&broker.bootstrap),
        &topic,
        Duration::from_millis(100),
    )
    .unwrap();
    let mut sent: BTreeMap<NaiveDate, Instant> = BTreeMap::new();
    let fsyncs_before = fsyncs();
    let snapshot_bytes_before = metric("weatherstream_snapshot_bytes_total");
    let started = Instant::now();
    let mut next = Instant::now();
    for obs in WeatherGenerator::new(Some(4)) {
        if started.elapsed() >= Duration::from_secs(seconds) {
            break;
        }
        if !obs.duplicate {
            sent.insert(obs.date, Instant::now());
        }
        sender.send(obs.date, obs.degrees).unwrap();
        next += Duration::from_millis(100);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    sender.flush(Duration::from_secs(10)).unwrap();
    let fsyncs_per_sec = (fsyncs() - fsyncs_before) / started.elapsed().as_secs_f64();
    let snapshot_bytes_per_sec = (metric("weatherstream_snapshot_bytes_total")
        - snapshot_bytes_before)
        / started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    raw.join().unwrap();
    watcher.join().unwrap();
    assert!(consumer.terminate().success());
    let latencies = |seen: &BTreeMap<NaiveDate, Instant>| -> Vec<f64> {
        sent.iter()
            .filter_map(|(date, at)| {
                seen.get(date)
                    .map(|s| s.saturating_duration_since(*at).as_secs_f64() * 1e3)
            })
            .collect()
    };
    let raw_ms = latencies(&received.lock().unwrap());
    // A report is visible once its month/year's `end` reaches its day.
    let ours_ms = latencies(&published.lock().unwrap());
    let (_, raw_p99) = summary("send -> raw consumer receives      ", raw_ms);
    let (_, ours_p99) = summary("send -> visible in partition-N.json", ours_ms);
    println!(
        "  p99 ours - p99 raw: {:.1} ms (our batching, sled commit + flush, atomic publish)",
        ours_p99 - raw_p99
    );
    println!("  fsyncs by the consumer: {fsyncs_per_sec:.1}/s (commits, proofs, publishes)");
    if snapshots {
        println!(
            "  snapshot bytes written: {snapshot_bytes_per_sec:.0}/s (4 young partitions; see restore for a 30-year one)"
        );
    }
}

/// One row of the soak table.
struct SoakSample {
    at_secs: f64,
    produced: i64,
    published: i64,
    offsets: Vec<i64>,
    lags: Vec<i64>,
    broker_cpu_per_min: f64,
    consumer_cpu_per_min: f64,
    rss_mib: f64,
    state_mib: f64,
    fetches_per_sec: f64,
}

/// The sum of one metric's series in a text exposition.
fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn bench_soak() {
    let seconds = env_number("BENCH_SOAK_SECS", 600);
    let sample_every = Duration::from_secs(env_number("BENCH_SOAK_SAMPLE_SECS", 30));
    let delay = std::env::var("BENCH_SOAK_DELAY").unwrap_or_else(|_| "0.01".into());
    // The consumer's wait for tansu (which holds an empty fetch that long).
    let fetch_wait_ms = tansu_fetch_wait_ms();
    println!(
        "\n== soak: {seconds} s, producer --delay {delay}, consumer 0 1 2 3, sampled every {} s ==",
        sample_every.as_secs()
    );
    let (storage, storage_name) = match std::env::var("BENCH_SOAK_STORAGE").as_deref() {
        Ok("memory") => (Storage::Memory, "in-memory"),
        _ => (Storage::Sqlite, "sqlite"),
    };
    let broker = Broker::start_with(storage);
    let Some(broker_pid) = broker.pid() else {
        println!("  skipped: the soak needs a broker it starts (to measure its CPU); unset KAFKA_BOOTSTRAP_SERVERS");
        return;
    };
    println!("broker: tansu 0.6.0, {storage_name} storage, loopback");
    let topic = unique_topic("soak");
    let files = tempfile::tempdir().unwrap();
    let mut producer = {
        let mut cmd = bin("producer");
        cmd.args(["--bootstrap-servers", &broker.bootstrap, "--topic", &topic])
            .args(["--delay", &delay]);
        let producer = Running::spawn(cmd);
        wait_until("the topic", Duration::from_secs(60), || {
            producer.stderr_text().contains("created topic")
        });
        producer
    };
    // The baseline: what the producer alone costs the broker.
    let (cpu, at) = (child_cpu_seconds(broker_pid), Instant::now());
    std::thread::sleep(sample_every);
    println!(
        "  broker CPU with the producer alone: {:.2} s/min",
        (child_cpu_seconds(broker_pid) - cpu) / at.elapsed().as_secs_f64() * 60.0
    );
    let mut consumer = {
        let mut cmd = bin("consumer");
        cmd.args(["--bootstrap-servers", &broker.bootstrap, "--topic", &topic])
            .args(["--fetch-wait-ms", &fetch_wait_ms]);
        cmd.args(["--quiet", "--metrics-addr", "127.0.0.1:0", "--files"])
            .arg(files.path())
            .args(["0", "1", "2", "3"]);
        Running::spawn(cmd)
    };
    let address = consumer.listening_address();
    let consumer_pid = consumer.child.id();
    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let started = Instant::now();
    let mut last = (
        Instant::now(),
        child_cpu_seconds(broker_pid),
        child_cpu_seconds(consumer_pid),
        0.0,
    );
    let mut samples: Vec<SoakSample> = Vec::new();
    println!(
        "  {:>6} {:>9} {:>9} {:>22} {:>11} {:>11} {:>8} {:>8} {:>9}",
        "time s",
        "produced",
        "published",
        "lag per partition",
        "broker s/min",
        "consumer s/min",
        "RSS MiB",
        "state MiB",
        "fetches/s"
    );
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(sample_every);
        let now = Instant::now();
        let highs: Vec<i64> = (0..4)
            .map(|p| {
                watermarks
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .map_or(0, |(_, high)| high)
            })
            .collect();
        let offsets: Vec<i64> = published_offsets(files.path())
            .iter()
            .map(|o| o.unwrap_or(0))
            .collect();
        let body = String::from_utf8_lossy(&http(&address, "GET", "/metrics", None).2).into_owned();
        let fetches = metric_sum(&body, "weatherstream_fetch_requests_total");
        let (broker_cpu, consumer_cpu) = (
            child_cpu_seconds(broker_pid),
            child_cpu_seconds(consumer_pid),
        );
        let minutes = now.duration_since(last.0).as_secs_f64() / 60.0;
        let sample = SoakSample {
            at_secs: started.elapsed().as_secs_f64(),
            produced: highs.iter().sum(),
            published: offsets.iter().sum(),
            lags: highs
                .iter()
                .zip(&offsets)
                .map(|(h, o)| (h - o).max(0))
                .collect(),
            offsets,
            broker_cpu_per_min: (broker_cpu - last.1) / minutes,
            consumer_cpu_per_min: (consumer_cpu - last.2) / minutes,
            rss_mib: child_status_mib(consumer_pid, "VmRSS:"),
            state_mib: dir_mib(&files.path().join("state")),
            fetches_per_sec: (fetches - last.3) / (minutes * 60.0),
        };
        last = (now, broker_cpu, consumer_cpu, fetches);
        println!(
            "  {:>6.0} {:>9} {:>9} {:>22} {:>11.2} {:>11.2} {:>8.1} {:>8.1} {:>9.0}",
            sample.at_secs,
            sample.produced,
            sample.published,
            format!("{:?}", sample.lags),
            sample.broker_cpu_per_min,
            sample.consumer_cpu_per_min,
            sample.rss_mib,
            sample.state_mib,
            sample.fetches_per_sec
        );
        samples.push(sample);
    }
    producer.terminate();
    let consumer_log = consumer.stderr_text();
    assert!(consumer.terminate().success(), "{consumer_log}");
    soak_verdict(&samples, &consumer_log);
}

/// Prints each rule of the soak's verdict, PASS or FAIL, and the whole.
fn soak_verdict(samples: &[SoakSample], consumer_log: &str) {
    println!("  verdict:");
    if samples.len() < 3 {
        println!("    too few samples for a verdict (run longer)");
        return;
    }
    let third = samples.len() / 3;
    let (first, last) = (&samples[..third], &samples[samples.len() - third..]);
    let mean = |part: &[SoakSample], f: &dyn Fn(&SoakSample) -> f64| {
        part.iter().map(f).sum::<f64>() / part.len() as f64
    };
    let max = |part: &[SoakSample], f: &dyn Fn(&SoakSample) -> f64| {
        part.iter().map(f).fold(0.0, f64::max)
    };
    let mut all_pass = true;
    let mut rule = |pass: bool, text: String| {
        all_pass &= pass;
        println!("    {} {text}", if pass { "PASS" } else { "FAIL" });
    };
    // Behind at two samples in a row without moving: stalled a whole
    // sample interval.
    let stalled: Vec<String> = samples
        .windows(2)
        .flat_map(|pair| {
            (0..4).filter_map(move |p| {
                let behind = pair[0].lags[p] > 0 && pair[1].lags[p] > 0;
                (behind && pair[0].offsets[p] == pair[1].offsets[p])
                    .then(|| format!("partition {p} at {:.0} s", pair[1].at_secs))
            })
        })
        .collect();
    rule(
        stalled.is_empty() && !consumer_log.contains("STALLED"),
        format!("no partition behind without progress for a sample interval or more (stalls: {stalled:?})"),
    );
    let lag = |s: &SoakSample| s.lags.iter().copied().max().unwrap_or(0) as f64;
    // One second of reports at the soak's pace is no backlog.
    let lag_floor = 100.0;
    rule(
        max(last, &lag) <= (1.5 * max(first, &lag)).max(lag_floor),
        format!(
            "lag bounded: largest {:.0} in the last third, {:.0} in the first",
            max(last, &lag),
            max(first, &lag)
        ),
    );
    let mut grows = |name: &str,
                     unit: &str,
                     (base, base_name): (&[SoakSample], &str),
                     f: &dyn Fn(&SoakSample) -> f64,
                     (factor, floor): (f64, f64)| {
        let (a, b) = (mean(base, f), mean(last, f));
        rule(
            b <= (factor * a).max(a + floor),
            format!(
                "{name}: {a:.2} {unit} in the {base_name} third, {b:.2} in the last (at most {factor}x, or +{floor} {unit})"
            ),
        );
    };
    grows(
        "broker CPU",
        "s/min",
        (first, "first"),
        &|s| s.broker_cpu_per_min,
        (1.5, 0.3),
    );
    grows(
        "consumer CPU",
        "s/min",
        (first, "first"),
        &|s| s.consumer_cpu_per_min,
        (1.5, 0.3),
    );
    // Memory and state fill up first (librdkafka's buffers, sled's segments
    // until it reuses them): flat means no growth after the first third.
    let middle = &samples[third..samples.len() - third];
    grows(
        "consumer RSS",
        "MiB",
        (middle, "middle"),
        &|s| s.rss_mib,
        (1.2, 1.0),
    );
    grows(
        "state size",
        "MiB",
        (middle, "middle"),
        &|s| s.state_mib,
        (1.2, 1.0),
    );
    println!(
        "    fetch requests: {:.0}/s in the first third, {:.0}/s in the last",
        mean(first, &|s| s.fetches_per_sec),
        mean(last, &|s| s.fetches_per_sec)
    );
    println!("  => {}", if all_pass { "STEADY" } else { "NOT STEADY" });
}
