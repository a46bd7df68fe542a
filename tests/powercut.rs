//! Power loss and damaged state under the consumer. A power cut is played
//! on the tests' own FUSE file system (common/powercut.rs), which forgets
//! at a cut everything not fsynced, as a disk's cache does: the consumer
//! is killed with SIGKILL, the power is cut, the consumer starts again.
//! What must hold: no published offset ever goes back from what survived
//! the cut, the statistics end exact, and a partition resumes from its
//! sled state (its commits were made durable) rather than from the
//! published file. Then a state that sled recovers as empty, and one it
//! cannot open at all: the published file is kept, never taken back.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::powercut::PowerCutFs;
use common::*;
use rand::{Rng, SeedableRng};

const ALL: [i32; 4] = [0, 1, 2, 3];

/// The power-cut file system mounted under a new temporary folder, or why
/// this machine cannot run the test (printed, and the test returns).
fn mount_or_skip(root: &Path) -> Option<PowerCutFs> {
    if let Some(why) = PowerCutFs::unavailable() {
        eprintln!("skipped: {why}; run the tests as root with /dev/fuse (CI does)");
        return None;
    }
    Some(PowerCutFs::mount(&root.join("mnt")).expect("mounting the power-cut file system"))
}

/// How each partition came back at one start, from the consumer's log.
fn tally_restarts(stderr: &str, tally: &mut BTreeMap<&'static str, u32>) {
    for line in stderr.lines() {
        let how = if line.contains("resuming from the state") {
            "from sled"
        } else if line.contains("adopting the published file") {
            "adopted file"
        } else if line.contains(": imported ") {
            "imported file"
        } else {
            continue;
        };
        *tally.entry(how).or_default() += 1;
    }
}

fn reached_beyond(files: &Path, before: &[Option<i64>]) -> bool {
    published_offsets(files)
        .iter()
        .zip(before)
        .all(|(now, before)| now.is_some() && now > before)
}

/// The test's own instrument first: what was fsynced survives a cut,
/// what was not (data, a file's size, a name in a folder) does not.
#[test]
fn the_power_cut_file_system_keeps_only_what_was_fsynced() {
    use std::io::Write;
    let root = tempfile::tempdir().unwrap();
    let Some(mut fs) = mount_or_skip(root.path()) else {
        return;
    };
    let dir = fs.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let mut kept = std::fs::File::create(dir.join("kept")).unwrap();
    kept.write_all(b"durable").unwrap();
    kept.sync_all().unwrap();
    std::fs::File::open(&dir).unwrap().sync_all().unwrap();
    std::fs::File::open(fs.path()).unwrap().sync_all().unwrap();
    kept.write_all(b" and more").unwrap();
    drop(kept);
    std::fs::write(dir.join("unnamed"), b"synced, but its folder is not").unwrap();
    std::fs::File::open(dir.join("unnamed"))
        .unwrap()
        .sync_all()
        .unwrap();
    std::fs::write(dir.join("lost"), b"never synced").unwrap();
    assert_eq!(
        std::fs::read(dir.join("kept")).unwrap(),
        b"durable and more"
    );

    fs.cut().unwrap();
    assert_eq!(std::fs::read(dir.join("kept")).unwrap(), b"durable");
    assert!(!dir.join("unnamed").exists());
    assert!(!dir.join("lost").exists());
}

#[test]
fn power_cuts_under_a_running_producer_lose_nothing_and_resume_from_sled() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut fs) = mount_or_skip(root.path()) else {
        return;
    };
    let files = fs.path().join("files");
    let broker = Broker::start();
    let topic = unique_topic("powercut");
    // Far more days than the cuts take: the producer runs throughout, and
    // is stopped after the last cut.
    let mut producer = start_paced_producer(&broker, &topic, 1_000_000, 47, "0.002");
    let mut rng = rand::rngs::StdRng::seed_from_u64(47);
    let mut tally = BTreeMap::new();
    let cuts = 8;
    for cut in 0..=cuts {
        // What survived the last cut is the baseline: from it on, no
        // published offset may go back.
        let survived = published_offsets(&files);
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_offsets(files.clone(), survived.clone(), stop.clone());
        let mut consumer = start_consumer(&broker, &topic, &files, &ALL);
        if cut == cuts {
            assert!(producer.terminate().success(), "{}", producer.stderr_text());
            let records = all_records(&broker, &topic);
            wait_for_records(&files, &records, Duration::from_secs(120));
            assert_never_went_back(&stop, sampler);
            assert!(consumer.terminate().success(), "{}", consumer.stderr_text());
            tally_restarts(&consumer.stderr_text(), &mut tally);
            assert_files_match(&files, &recompute(&records), 4);
            break;
        }
        wait_until(
            "every partition to publish beyond what survived",
            Duration::from_secs(90),
            || reached_beyond(&files, &survived),
        );
        // Somewhere in the middle of a batch.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        consumer.kill9();
        assert_never_went_back(&stop, sampler);
        if cut > 0 {
            tally_restarts(&consumer.stderr_text(), &mut tally);
        }
        fs.cut().expect("power cut");
    }
    let restarts: u32 = tally.values().sum();
    let from_sled = tally.get("from sled").copied().unwrap_or(0);
    eprintln!(
        "{cuts} power cuts, {restarts} partition restarts: {tally:?}; {} fsyncs reached the file system",
        fs.fsyncs()
    );
    assert_eq!(restarts, cuts * 4, "{tally:?}");
    assert!(
        from_sled * 10 >= restarts * 9,
        "only {from_sled} of {restarts} partition restarts resumed from sled: {tally:?}"
    );
}

/// Replaces partition `partition`'s sled folder under `state` with one as
/// sled would recover it from damage: `initialized` at offset 0 with
/// nothing counted (the first commit of a first start, the point sled went
/// back to in the damage this guards against), or else empty.
fn state_recovered_as_empty(state: &Path, partition: i32, initialized: bool) {
    let scratch = tempfile::tempdir().unwrap();
    {
        let mut fresh =
            weatherstream::state::PartitionState::open(scratch.path(), partition).unwrap();
        if initialized {
            fresh
                .initialize(0, weatherstream::aggregate::Aggregates::new(), 0)
                .unwrap();
        }
    }
    let folder = format!("partition-{partition}");
    std::fs::remove_dir_all(state.join(&folder)).unwrap();
    std::fs::rename(scratch.path().join(&folder), state.join(&folder)).unwrap();
}

/// Damage beyond sled's recovery: its `conf` file scrambled.
fn state_sled_cannot_open(state: &Path, partition: i32) {
    let conf = state.join(format!("partition-{partition}")).join("conf");
    let scrambled: Vec<u8> = std::fs::read(&conf)
        .unwrap()
        .iter()
        .map(|b| b ^ 0x5a)
        .collect();
    std::fs::write(&conf, scrambled).unwrap();
}

#[test]
fn a_state_recovered_as_empty_or_unopenable_never_takes_the_published_file_back() {
    let broker = Broker::start();
    let topic = unique_topic("emptied");
    let files = tempfile::tempdir().unwrap();
    let state = files.path().join("state");
    let (days, seed) = (4000, 53);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.001");
    let newest = run_to_offsets(&broker, &topic, files.path(), 300);

    state_recovered_as_empty(&state, 0, true);
    state_recovered_as_empty(&state, 1, false);
    state_sled_cannot_open(&state, 2);

    let (records, stderr) = consume_to_end_sampled(
        &broker,
        &topic,
        &mut producer,
        files.path(),
        days,
        seed,
        newest.clone(),
    );
    let lines_of = |partition: i32| -> String {
        stderr
            .lines()
            .filter(|l| l.contains(&format!("partition {partition}: ")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // At offset 0 with no record of its own: the file's proof shows the
    // topic is the same, so the file is adopted, with one warning naming
    // both offsets.
    let adopted = lines_of(0);
    assert!(
        adopted.contains("the state (offset 0) is behind")
            && adopted.contains(&format!("(offset {})", newest[0].unwrap()))
            && adopted.contains("adopting the published file"),
        "{stderr}"
    );
    // Empty: imported, as on a first start.
    assert!(lines_of(1).contains(": imported "), "{stderr}");
    // Unopenable: moved aside with one warning naming path and way out;
    // the other partitions went on from their own state.
    let moved = lines_of(2);
    assert!(
        moved.contains("cannot be opened") && moved.contains("moved it to"),
        "{stderr}"
    );
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("partition-2.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{stderr}");
    assert!(lines_of(2).contains(": imported "), "{stderr}");
    assert!(lines_of(3).contains("resuming from the state"), "{stderr}");
    assert_files_match(files.path(), &recompute(&records), 4);
}

/// The crash window the adoption rule guards: the topic was re-created,
/// the consumer committed its reset (offset 0, a new epoch), and crashed
/// before publishing it. The file on disk is the old topic's, ahead of
/// the state: its statistics must never come back.
#[test]
fn a_reset_committed_but_not_published_never_brings_the_old_topic_back() {
    let broker = Broker::start_with(Storage::Memory);
    let topic = unique_topic("resetcrash");
    let files = tempfile::tempdir().unwrap();
    let state = files.path().join("state");
    let old = produce_and_read(&broker, &topic, 300, 59);
    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_for_records(files.path(), &old, Duration::from_secs(60));
    assert!(consumer.terminate().success());
    let old_offsets = published_offsets(files.path());

    // Re-created, longer than before, with other reports.
    let new = produce_and_read(&broker, &topic, 900, 61);
    for partition in ALL {
        let mut reset = weatherstream::state::PartitionState::open(&state, partition).unwrap();
        let epoch = reset.snapshot().epoch;
        reset
            .initialize(0, weatherstream::aggregate::Aggregates::new(), epoch + 1)
            .unwrap();
    }
    assert_eq!(published_offsets(files.path()), old_offsets);

    let mut consumer = start_consumer(&broker, &topic, files.path(), &ALL);
    wait_until("stats of the new topic", Duration::from_secs(90), || {
        let ends = end_offsets(&new);
        ALL.iter()
            .all(|p| read_partition_file(files.path(), *p).is_some_and(|f| f.offset == ends[p]))
    });
    assert!(consumer.terminate().success());
    let stderr = consumer.stderr_text();
    assert!(!stderr.contains("adopting the published file"), "{stderr}");
    assert_files_match(files.path(), &recompute(&new), 4);
}
