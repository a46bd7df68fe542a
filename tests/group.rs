//! `consumer --group` against the real test broker, with the producer
//! running throughout: a member killed with `kill -9`, a member paused past
//! its session (a zombie) and resumed, scale out and back in, random churn,
//! and a member that lost its disk. Each test samples every partition file
//! every 50 ms and fails if an offset ever goes back, and ends with the
//! statistics exact against the tests' own recount of the topic.
//!
//! tansu 0.6.0, the test broker, cannot re-form a group whose leader (the
//! member that joined first) died or is paused: it names the dead leader
//! in every JoinGroup answer (seen for over 45 s), so no one else gets its
//! partitions until it comes back. Apache Kafka's coordinator removes any
//! member whose session ended, the leader too. So here the first member
//! lives throughout, and the members killed or paused joined after it.
//!
//! The tests run one at a time: each runs a broker, a producer and up to
//! three members, and a member starved of CPU by a neighbouring test would
//! miss its heartbeats and turn a test of a failover into one of many.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::group::*;
use common::*;

const ALL: [i32; 4] = [0, 1, 2, 3];

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits until every partition file is beyond `before`.
fn wait_for_publishing_past(files: &Path, before: &[Option<i64>], timeout: Duration) {
    wait_until("every partition to publish again", timeout, || {
        published_offsets(files)
            .iter()
            .zip(before)
            .all(|(now, before)| now.is_some() && now > before)
    });
}

/// What every partition's run saw of a hand-off, in the order of the
/// members' log lines (their timestamps): each `handed off at offset P`
/// followed, in the next owner's log, by `taken over at offset R`. Returns
/// (partition, P, R) for each.
fn hand_offs(members: &[&Running]) -> Vec<(i32, i64, i64)> {
    let mut lines: Vec<String> = members
        .iter()
        .flat_map(|m| {
            m.stderr_text()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    // "[2026-12-06T02:59:01.909Z INFO ] ...": the timestamps sort as text.
    lines.sort();
    let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
    let mut found = Vec::new();
    for line in &lines {
        if let Some(p) = partition_in(line, ": handed off at offset") {
            if let Some(offset) = offset_after(line, ": handed off at offset ") {
                pending.insert(p, offset);
            }
        } else if let Some(p) = partition_in(line, ": taken over at offset") {
            let resumed = offset_after(line, ": taken over at offset ").unwrap();
            if let Some(handed) = pending.remove(&p) {
                found.push((p, handed, resumed));
            }
        }
    }
    found
}

/// A value of a `/metrics` series of `member`, summed over its labels.
fn metric_sum(member: &Running, name: &str) -> f64 {
    let (status, _, body) = http(&member.listening_address(), "GET", "/metrics", None);
    assert_eq!(status, 200);
    String::from_utf8(body)
        .unwrap()
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Every partition file of a folder read every 50 ms, from nothing.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Sampler {
    fn start(files: &Path) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = sample_offsets(files.to_path_buf(), vec![None; 4], stop.clone());
        Sampler { stop, thread }
    }

    /// Stops it; fails if any offset went back meanwhile.
    fn check(self) {
        assert_never_went_back(&self.stop, self.thread);
    }
}

struct Scene {
    broker: Broker,
    topic: String,
    group: String,
    dir: tempfile::TempDir,
    producer: Running,
    days: u64,
    seed: u64,
}

impl Scene {
    /// A broker and a producer of `days` at `delay` seconds a report.
    fn start(name: &str, days: u64, seed: u64, delay: &str) -> Scene {
        let broker = Broker::start();
        let topic = unique_topic(name);
        let producer = start_paced_producer(&broker, &topic, days, seed, delay);
        Scene {
            group: format!("{topic}-group"),
            broker,
            topic,
            dir: tempfile::tempdir().unwrap(),
            producer,
            days,
            seed,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The group's first member, once it runs every partition: it leads
    /// the group (see the module's note on tansu).
    fn leader(&self, files: &Path, state: &str) -> Running {
        let leader = self.member(files, state);
        wait_until(
            "the first member to run all",
            Duration::from_secs(60),
            || owned(&leader) == BTreeSet::from(ALL),
        );
        leader
    }

    fn member(&self, files: &Path, state: &str) -> Running {
        start_member(
            &self.broker,
            &self.topic,
            &self.group,
            files,
            &self.path(state),
        )
    }

    /// Waits for the producer's end; the whole topic.
    fn finish_producing(&mut self) -> Vec<Record> {
        assert!(self.producer.child.wait().unwrap().success());
        read_topic(
            &self.broker.bootstrap,
            &self.topic,
            4,
            reports_for(self.days, self.seed),
            Duration::from_secs(60),
        )
    }
}

#[test]
fn after_a_kill_9_the_others_take_over_and_the_statistics_are_exact() {
    let _serial = one_at_a_time();
    // 9,000 days at 4 ms a report: about 40 s of producing.
    let mut scene = Scene::start("failover", 9_000, 31, "0.004");
    let files = scene.path("files");
    let sampler = Sampler::start(&files);
    // The first to join leads the group (see the module's note on tansu).
    let leader = scene.leader(&files, "state-0");
    let mut members: Vec<Running> = [leader]
        .into_iter()
        .chain((1..3).map(|i| scene.member(&files, &format!("state-{i}"))))
        .collect();
    wait_until(
        "three members to share the four partitions",
        Duration::from_secs(60),
        || {
            members.iter().all(|m| !owned(m).is_empty())
                && owned_by(&members) == BTreeSet::from(ALL)
        },
    );
    wait_until(
        "every partition to publish",
        Duration::from_secs(30),
        || published_offsets(&files).iter().all(Option::is_some),
    );

    let mut victim = members.remove(2);
    let its = owned(&victim);
    let before = published_offsets(&files);
    let killed = Instant::now();
    victim.kill9();
    wait_until(
        "the others to own every partition",
        Duration::from_secs(60),
        || owned_by(&members) == BTreeSet::from(ALL),
    );
    let all_owned = killed.elapsed();
    wait_for_publishing_past(&files, &before, Duration::from_secs(60));
    let all_publishing = killed.elapsed();
    eprintln!(
        "kill -9 of the owner of {its:?}: every partition owned again after {:.1} s, \
         publishing again after {:.1} s (session timeout {:.1} s)",
        all_owned.as_secs_f64(),
        all_publishing.as_secs_f64(),
        SESSION_MS as f64 / 1000.0
    );
    // The bound: the session timeout, a rebalance and a restore. Measured
    // on tansu 0.6.0: 9-11 s.
    let bound = Duration::from_millis(SESSION_MS) + Duration::from_secs(20);
    assert!(
        all_publishing < bound,
        "every partition published again only {all_publishing:?} after the kill"
    );

    let records = scene.finish_producing();
    wait_for_records(&files, &records, Duration::from_secs(60));
    sampler.check();
    assert_files_match(&files, &recompute(&records), 4);
    for mut member in members {
        assert!(member.terminate().success(), "{}", member.stderr_text());
    }
}

#[test]
fn a_member_paused_past_its_session_takes_nothing_back_when_it_wakes() {
    let _serial = one_at_a_time();
    let mut scene = Scene::start("zombie", 9_000, 32, "0.004");
    let files = scene.path("files");
    let sampler = Sampler::start(&files);
    // The paused member is the one that joined second, not the group's
    // leader: tansu 0.6.0 (the test broker) names a paused leader in every
    // JoinGroup answer until it resumes, so no one else can take over
    // meanwhile (Kafka's coordinator drops it when its session ends).
    let mut other = scene.leader(&files, "state-other");
    let zombie = scene.member(&files, "state-zombie");
    wait_until(
        "two members to share the partitions",
        Duration::from_secs(60),
        || {
            !owned(&zombie).is_empty()
                && !owned(&other).is_empty()
                && owned_by([&zombie, &other]) == BTreeSet::from(ALL)
        },
    );
    wait_until(
        "every partition to publish",
        Duration::from_secs(30),
        || published_offsets(&files).iter().all(Option::is_some),
    );
    let its = owned(&zombie);

    zombie.signal(libc::SIGSTOP);
    wait_until(
        "the other member to take the paused one's partitions",
        Duration::from_secs(60),
        || owned(&other) == BTreeSet::from(ALL),
    );
    let taken = published_offsets(&files);
    wait_for_publishing_past(&files, &taken, Duration::from_secs(30));
    zombie.signal(libc::SIGCONT);
    // It learns it lost them, and writes nothing of them from then on.
    wait_until(
        "the woken member to give its partitions up",
        Duration::from_secs(60),
        || {
            let text = zombie.stderr_text();
            its.iter().all(|p| {
                text.contains(&format!(
                    "partition {p}: lost (this member's session expired)"
                ))
            })
        },
    );

    let records = scene.finish_producing();
    wait_for_records(&files, &records, Duration::from_secs(90));
    sampler.check();
    let expected = recompute(&records);
    assert_files_match(&files, &expected, 4);
    let mut zombie = zombie;
    assert!(zombie.terminate().success(), "{}", zombie.stderr_text());
    assert!(other.terminate().success(), "{}", other.stderr_text());
    // A later restore (here, the view of the snapshot topic alone) finds
    // the newest state, not whatever the zombie wrote last.
    let rebuilt = scene.path("rebuilt");
    let out = export_from_kafka(&scene.broker, &scene.topic, &rebuilt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        published_offsets(&rebuilt),
        published_offsets(&files),
        "the snapshot topic's newest"
    );
    assert_files_match(&rebuilt, &expected, 4);
}

#[test]
fn scaling_out_and_back_in_hands_every_partition_over_at_its_last_offset() {
    let _serial = one_at_a_time();
    let mut scene = Scene::start("scale", 9_000, 33, "0.004");
    let files = scene.path("files");
    let sampler = Sampler::start(&files);
    let first = scene.leader(&files, "state-0");
    wait_until(
        "every partition to publish",
        Duration::from_secs(30),
        || published_offsets(&files).iter().all(Option::is_some),
    );

    let mut more: Vec<Running> = (1..3)
        .map(|i| scene.member(&files, &format!("state-{i}")))
        .collect();
    // A joining member is not ready before its assignment (tansu takes
    // seconds to form the group), nor while its partitions restore.
    for member in &more {
        let (status, _, body) = http(&member.listening_address(), "GET", "/readyz", None);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("waiting for the group's assignment") || body.contains("\"starting\""),
            "{body}"
        );
    }
    wait_until(
        "three members to share the partitions",
        Duration::from_secs(60),
        || {
            !owned(&first).is_empty()
                && more.iter().all(|m| !owned(m).is_empty())
                && owned_by(more.iter().chain([&first])) == BTreeSet::from(ALL)
        },
    );
    let before = published_offsets(&files);
    wait_for_publishing_past(&files, &before, Duration::from_secs(30));
    wait_until("every member ready", Duration::from_secs(30), || {
        more.iter()
            .chain([&first])
            .all(|m| http(&m.listening_address(), "GET", "/readyz", None).0 == 200)
    });

    for member in &mut more {
        assert!(member.terminate().success(), "{}", member.stderr_text());
    }
    wait_until(
        "the first member to run all again",
        Duration::from_secs(60),
        || owned(&first) == BTreeSet::from(ALL),
    );
    let records = scene.finish_producing();
    wait_for_records(&files, &records, Duration::from_secs(60));
    sampler.check();
    assert_files_match(&files, &recompute(&records), 4);

    // Out: the first hands two or three partitions over; in: the others
    // hand them back. Each new owner resumes where the last one stopped.
    let members: Vec<&Running> = more.iter().chain([&first]).collect();
    let hand_offs = hand_offs(&members);
    eprintln!("hand-offs (partition, handed off at, taken over at): {hand_offs:?}");
    assert!(hand_offs.len() >= 4, "{hand_offs:?}");
    for (partition, handed, resumed) in &hand_offs {
        let replayed = handed - resumed;
        assert!(
            (0..MAX_BATCH).contains(&replayed),
            "partition {partition}: handed off at {handed}, taken over at {resumed}"
        );
    }
    // The group's offsets, for Kafka's tools, follow the state.
    let ends = end_offsets(&records);
    let mut seen = BTreeMap::new();
    let reached = wait_until_or_timeout(Duration::from_secs(30), || {
        seen = group_offsets(&scene.broker.bootstrap, &[], &scene.group, &scene.topic);
        seen == ends
    });
    assert!(reached, "the group's offsets {seen:?}, the ends {ends:?}");
    assert_eq!(
        metric_sum(&first, "weatherstream_records_replayed_total"),
        0.0
    );
    assert_eq!(metric_sum(&first, "weatherstream_partitions_owned"), 4.0);
    assert_eq!(metric_sum(&first, "weatherstream_partition_running"), 4.0);
    assert!(metric_sum(&first, "weatherstream_rebalances_total") >= 2.0);
    // Having taken partitions over, it shows every series the Grafana
    // dashboard queries; and it is ready, its four partitions running.
    let (status, _, body) = http(&first.listening_address(), "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert_dashboard_metrics_exist(&String::from_utf8(body).unwrap());
    let (status, _, body) = http(&first.listening_address(), "GET", "/readyz", None);
    let ready: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{ready}");
    for partition in ["0", "1", "2", "3"] {
        assert_eq!(
            ready["partitions"][partition]["state"], "running",
            "{ready}"
        );
    }
    let mut first = first;
    assert!(first.terminate().success(), "{}", first.stderr_text());
}

#[test]
fn a_member_that_lost_its_disk_restores_its_partitions_from_the_snapshot_topic() {
    let _serial = one_at_a_time();
    let mut scene = Scene::start("diskloss", 9_000, 34, "0.004");
    // Two hosts, each with its own files and state: what one publishes the
    // other does not see, so a partition moving between them restores
    // from the snapshot topic.
    let host = |name: &str| (scene.path(name).join("files"), format!("{name}/state"));
    let (files_a, state_a) = host("a");
    let (files_b, state_b) = host("b");
    // Host a's files go with its disk: its sampler starts again after.
    let (sampler_a, sampler_b) = (Sampler::start(&files_a), Sampler::start(&files_b));
    // b joins first and leads the group (see the module's note on tansu).
    let b = scene.leader(&files_b, &state_b);
    let mut a = scene.member(&files_a, &state_a);
    wait_until(
        "two members to share the partitions",
        Duration::from_secs(60),
        || {
            !owned(&a).is_empty()
                && !owned(&b).is_empty()
                && owned_by([&a, &b]) == BTreeSet::from(ALL)
        },
    );
    let a_had = owned(&a);
    wait_until("both hosts to publish", Duration::from_secs(30), || {
        let (on_a, on_b) = (published_offsets(&files_a), published_offsets(&files_b));
        ALL.iter().all(|&p| {
            let here = if a_had.contains(&p) { &on_a } else { &on_b };
            here[p as usize].is_some_and(|offset| offset > 0)
        })
    });

    a.kill9();
    sampler_a.check();
    std::fs::remove_dir_all(scene.path("a")).unwrap();
    let sampler_a = Sampler::start(&files_a);
    wait_until(
        "the other member to run all",
        Duration::from_secs(60),
        || owned(&b) == BTreeSet::from(ALL),
    );
    let a = scene.member(&files_a, &state_a);
    wait_until(
        "the restarted member to get partitions back",
        Duration::from_secs(60),
        || !owned(&a).is_empty(),
    );
    let got_back = owned(&a);
    wait_until(
        "its partitions to be restored",
        Duration::from_secs(30),
        || {
            let text = a.stderr_text();
            got_back
                .iter()
                .all(|p| text.contains(&format!("partition {p}: taken over at offset")))
        },
    );
    let text = a.stderr_text();
    for p in &got_back {
        assert!(
            text.contains(&format!("partition {p}: restored from the snapshot topic")),
            "partition {p} was not restored from the snapshot topic:\n{text}"
        );
    }

    let records = scene.finish_producing();
    let ends = end_offsets(&records);
    // Each partition's newest file, on whichever host.
    let newest = || -> Vec<(i64, PathBuf)> {
        ALL.iter()
            .map(|&p| {
                [&files_a, &files_b]
                    .iter()
                    .filter_map(|files| {
                        read_partition_file(files, p).map(|f| (f.offset, files.to_path_buf()))
                    })
                    .max()
                    .unwrap_or((-1, PathBuf::new()))
            })
            .collect()
    };
    wait_until(
        "the newest files to show the end",
        Duration::from_secs(60),
        || {
            newest()
                .iter()
                .zip(ALL)
                .all(|((offset, _), p)| *offset == ends[&p])
        },
    );
    for sampler in [sampler_a, sampler_b] {
        sampler.check();
    }
    let merged = scene.path("merged");
    std::fs::create_dir_all(&merged).unwrap();
    for ((_, files), p) in newest().iter().zip(ALL) {
        let name = format!("partition-{p}.json");
        std::fs::copy(files.join(&name), merged.join(&name)).unwrap();
    }
    assert_files_match(&merged, &recompute(&records), 4);
    for mut member in [a, b] {
        assert!(member.terminate().success(), "{}", member.stderr_text());
    }
}

/// One step of the churn: what happens to which member slot.
#[derive(Debug, Clone, Copy)]
enum Churn {
    Kill(usize),
    Pause(usize),
    Stop(usize),
    Start(usize),
}

#[test]
fn twenty_random_kills_pauses_and_starts_lose_nothing_and_count_nothing_twice() {
    use rand::{Rng, SeedableRng};
    let _serial = one_at_a_time();
    let seed: u64 = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id().into());
    eprintln!("churn seed {seed} (CHURN_SEED repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // 30,000 days at 4 ms a report: a little over two minutes.
    let mut scene = Scene::start("churn", 30_000, 35, "0.004");
    let files = scene.path("files");
    let sampler = Sampler::start(&files);
    let slots = 3;
    // Slot 0 joins first, leads the group and stays (see the module's note
    // on tansu); the churn is on the other two.
    let leader = scene.leader(&files, "state-0");
    let mut members: Vec<Option<Running>> = [Some(leader)]
        .into_iter()
        .chain((1..slots).map(|i| Some(scene.member(&files, &format!("state-{i}")))))
        .collect();
    let mut paused: Vec<usize> = Vec::new();
    let mut done: Vec<Churn> = Vec::new();
    let mut ended: Vec<Running> = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(rng.random_range(3_000..9_000)));
        // A pause lasts until the next step: some past the session, some
        // not.
        for slot in paused.drain(..) {
            if let Some(member) = &members[slot] {
                member.signal(libc::SIGCONT);
            }
        }
        let slot = rng.random_range(1..slots);
        let step = match &members[slot] {
            None => Churn::Start(slot),
            Some(_) => match rng.random_range(0..3) {
                0 => Churn::Kill(slot),
                1 => Churn::Pause(slot),
                _ => Churn::Stop(slot),
            },
        };
        match step {
            Churn::Start(slot) => {
                members[slot] = Some(scene.member(&files, &format!("state-{slot}")));
            }
            Churn::Kill(slot) => {
                let mut member = members[slot].take().unwrap();
                member.kill9();
                ended.push(member);
            }
            Churn::Pause(slot) => {
                members[slot].as_ref().unwrap().signal(libc::SIGSTOP);
                paused.push(slot);
            }
            Churn::Stop(slot) => {
                let mut member = members[slot].take().unwrap();
                let status = member.terminate();
                assert!(status.success(), "{status}: {}", member.stderr_text());
                ended.push(member);
            }
        }
        done.push(step);
    }
    eprintln!("churn: {done:?}");
    for slot in paused.drain(..) {
        if let Some(member) = &members[slot] {
            member.signal(libc::SIGCONT);
        }
    }

    let records = scene.finish_producing();
    wait_for_records(&files, &records, Duration::from_secs(120));
    sampler.check();
    assert_files_match(&files, &recompute(&records), 4);
    for mut member in members.into_iter().flatten() {
        assert!(member.terminate().success(), "{}", member.stderr_text());
    }
}

#[test]
fn a_partition_list_with_group_and_a_second_member_on_one_state_folder_are_refused() {
    let out = bin("consumer")
        .args([
            "--group",
            "g",
            "0",
            "2",
            "--bootstrap-servers",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--group") && stderr.contains("PARTITION"),
        "{stderr}"
    );

    // The first member holds its state folder from the start (here it
    // waits for a topic that does not exist).
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let member = |dir: &Path| {
        let mut cmd = broker.consumer_cmd(&unique_topic("nowhere"));
        cmd.args(["--group", "g"])
            .arg("--files")
            .arg(dir.join("files"))
            .arg("--state-dir")
            .arg(dir.join("state"));
        cmd
    };
    let mut first = Running::spawn(member(dir.path()));
    wait_until(
        "the first member to hold its folder",
        Duration::from_secs(30),
        || dir.path().join("state/member.lock").exists(),
    );
    let second = member(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is held by another consumer process"),
        "{stderr}"
    );
    assert!(first.terminate().success(), "{}", first.stderr_text());
}
