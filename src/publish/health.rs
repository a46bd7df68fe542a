//! Liveness and readiness, as `/healthz` and `/readyz` answer them on the
//! server of `--metrics-addr` (and the dashboard's). This module owns the
//! process's health facts: the heartbeats of the threads that do the work,
//! each owned partition's phase, whether a broker is reachable, whether a
//! group member has its assignment, and whether a stop has begun. The
//! consumer sets them; the pages read them. The rules that turn facts into
//! an answer ([`Facts::liveness`], [`Facts::readiness`]) take the time as
//! an argument and are tested without sleeping.
//!
//! Liveness fails only for a thread that is busy with one step for longer
//! than the wedge limit: a thread that waits (for the broker in an outage,
//! for its storage, for work) says so and is not wedged, so an outage never
//! restarts a pod. Readiness is 503 until every owned partition has opened,
//! reconciled and restored its state and published it, while a partition's
//! storage is stalled, while no broker is reachable, while a group member
//! waits for its assignment, and from the first SIGTERM on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::kafka::PartitionId;
use crate::shutdown::Shutdown;
use crate::web::{Page, StatusCode};

/// A thread busy with one step for longer than this is wedged, by default:
/// a batch's read, commit and hand-off take milliseconds, and every wait
/// (an outage, a failing disk, an idle log) is announced as one.
pub const DEFAULT_WEDGED_AFTER: Duration = Duration::from_secs(60);

/// Milliseconds since `origin`, the clock of every heartbeat (an atomic
/// holds it).
fn millis_since(origin: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// A heartbeat's "not busy": the thread waits, which is never wedged.
const WAITING: u64 = u64::MAX;

/// One thread's heartbeat, registered while the handle lives.
pub(crate) struct Beat {
    origin: Instant,
    busy_since_ms: Arc<AtomicU64>,
    name: String,
    health: Arc<Health>,
}

impl Beat {
    /// The thread starts a step (or goes on with the next one): it must
    /// end it, or wait, within the wedge limit.
    pub(crate) fn busy(&self) {
        self.busy_since_ms
            .store(millis_since(self.origin, Instant::now()), Ordering::Relaxed);
    }

    /// The thread waits, for as long as it takes (an outage, a failing
    /// disk, nothing to do): not wedged, whatever the time.
    pub(crate) fn waiting(&self) {
        self.busy_since_ms.store(WAITING, Ordering::Relaxed);
    }

    /// Waits on `stop` for `duration`, announced as a wait; true when the
    /// stop came. The step goes on afterwards.
    pub(crate) fn wait(&self, stop: &Shutdown, duration: Duration) -> bool {
        self.waiting();
        let stopped = stop.wait(duration);
        self.busy();
        stopped
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        self.health.lock().threads.remove(&self.name);
    }
}

/// Where a partition's start is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// Not started yet: the topic is not there, or its turn has not come.
    Waiting = 0,
    /// Opening, reconciling and restoring its state.
    Starting = 1,
    /// Published and counting.
    Running = 2,
}

impl Phase {
    fn of(value: u8) -> Phase {
        match value {
            0 => Phase::Waiting,
            1 => Phase::Starting,
            _ => Phase::Running,
        }
    }
}

/// One owned partition's health, registered while the handle lives.
pub(crate) struct PartitionHealth {
    partition: PartitionId,
    shared: Arc<PartitionFacts>,
    health: Arc<Health>,
}

#[derive(Default)]
struct PartitionFacts {
    phase: AtomicU8,
    storage_stalled: AtomicBool,
}

impl PartitionHealth {
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.shared.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_storage_stalled(&self, stalled: bool) {
        self.shared
            .storage_stalled
            .store(stalled, Ordering::Relaxed);
    }

    /// The heartbeat of the partition's thread, `partition-N`.
    pub(crate) fn beat(&self) -> Beat {
        self.health.beat(format!("partition-{}", self.partition))
    }

    /// The heartbeat of the partition's re-creation check, `recheck-N`.
    pub(crate) fn recheck_beat(&self) -> Beat {
        self.health.beat(format!("recheck-{}", self.partition))
    }
}

impl Drop for PartitionHealth {
    fn drop(&mut self) {
        let mut registry = self.health.lock();
        // A later handle of the same partition (stopped and started again)
        // is not this one's to remove.
        if registry
            .partitions
            .get(&self.partition)
            .is_some_and(|facts| Arc::ptr_eq(facts, &self.shared))
        {
            registry.partitions.remove(&self.partition);
        }
    }
}

/// What a process runs: a fixed partition list, or a group's share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// These partitions, from the start (`consumer 0 2`); the ones without
    /// a handle yet are waiting.
    Manual(Vec<PartitionId>),
    /// What the group assigns (`consumer --group`).
    Group,
    /// No partitions (the dashboard).
    None,
}

/// The health facts of one process.
pub(crate) struct Health {
    origin: Instant,
    wedged_after: Duration,
    ownership: Ownership,
    stop: Shutdown,
    broker_down: AtomicBool,
    assigned: AtomicBool,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    threads: BTreeMap<String, Arc<AtomicU64>>,
    partitions: BTreeMap<PartitionId, Arc<PartitionFacts>>,
}

impl Health {
    /// Facts of a process that owns `ownership` and stops on `stop`.
    pub(crate) fn new(ownership: Ownership, wedged_after: Duration, stop: &Shutdown) -> Arc<Self> {
        Arc::new(Health {
            origin: Instant::now(),
            wedged_after,
            ownership,
            stop: stop.clone(),
            broker_down: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            registry: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A heartbeat for the thread `name`, busy from now on.
    pub(crate) fn beat(self: &Arc<Self>, name: impl Into<String>) -> Beat {
        let name = name.into();
        let busy_since_ms = Arc::new(AtomicU64::new(millis_since(self.origin, Instant::now())));
        self.lock()
            .threads
            .insert(name.clone(), busy_since_ms.clone());
        Beat {
            origin: self.origin,
            busy_since_ms,
            name,
            health: self.clone(),
        }
    }

    /// The health of an owned partition, starting from now on.
    pub(crate) fn partition(self: &Arc<Self>, partition: PartitionId) -> PartitionHealth {
        let shared = Arc::new(PartitionFacts::default());
        shared.phase.store(Phase::Starting as u8, Ordering::Relaxed);
        self.lock().partitions.insert(partition, shared.clone());
        PartitionHealth {
            partition,
            shared,
            health: self.clone(),
        }
    }

    pub(crate) fn set_broker_down(&self, down: bool) {
        self.broker_down.store(down, Ordering::Relaxed);
    }

    /// A group member got its (first) assignment, empty or not.
    pub(crate) fn set_assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }

    /// The facts as of now.
    pub(crate) fn facts(&self) -> Facts {
        let now = Instant::now();
        let registry = self.lock();
        let threads: BTreeMap<String, Option<Duration>> = registry
            .threads
            .iter()
            .map(|(name, since)| {
                let since = since.load(Ordering::Relaxed);
                let busy = (since != WAITING).then(|| {
                    Duration::from_millis(millis_since(self.origin, now).saturating_sub(since))
                });
                (name.clone(), busy)
            })
            .collect();
        let mut partitions: BTreeMap<PartitionId, PartitionFact> = registry
            .partitions
            .iter()
            .map(|(partition, facts)| {
                let fact = PartitionFact {
                    phase: Phase::of(facts.phase.load(Ordering::Relaxed)),
                    storage_stalled: facts.storage_stalled.load(Ordering::Relaxed),
                };
                (*partition, fact)
            })
            .collect();
        if let Ownership::Manual(list) = &self.ownership {
            for partition in list {
                partitions.entry(*partition).or_insert(PartitionFact {
                    phase: Phase::Waiting,
                    storage_stalled: false,
                });
            }
        }
        Facts {
            wedged_after: self.wedged_after,
            threads,
            partitions,
            stopping: self.stop.requested(),
            broker_down: self.broker_down.load(Ordering::Relaxed),
            waiting_for_assignment: self.ownership == Ownership::Group
                && !self.assigned.load(Ordering::Relaxed),
        }
    }

    /// `/healthz`.
    pub(crate) fn liveness_page(&self) -> Page {
        self.facts().liveness().page()
    }

    /// `/readyz`.
    pub(crate) fn readiness_page(&self) -> Page {
        self.facts().readiness().page()
    }
}

/// One partition, as the facts show it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PartitionFact {
    pub(crate) phase: Phase,
    pub(crate) storage_stalled: bool,
}

/// The facts an answer is made from, at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    pub(crate) wedged_after: Duration,
    /// Each watched thread, and for how long it has been on its step
    /// when it is busy (None: it waits).
    pub(crate) threads: BTreeMap<String, Option<Duration>>,
    pub(crate) partitions: BTreeMap<PartitionId, PartitionFact>,
    pub(crate) stopping: bool,
    pub(crate) broker_down: bool,
    pub(crate) waiting_for_assignment: bool,
}

/// An answer of `/healthz` or `/readyz`, as its JSON body.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Answer {
    /// `ok`, `wedged` or `not_ready`.
    pub(crate) status: &'static str,
    /// Why not ok; empty when ok.
    pub(crate) reasons: Vec<String>,
    /// Each owned partition's state, and why it is not running.
    pub(crate) partitions: BTreeMap<String, PartitionAnswer>,
    /// Liveness only: each watched thread, `busy` or `waiting`, so that
    /// an operator sees what the answer covers.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) threads: BTreeMap<String, &'static str>,
}

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct PartitionAnswer {
    pub(crate) state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

impl Answer {
    fn ok(&self) -> bool {
        self.status == "ok"
    }

    fn page(&self) -> Page {
        let mut body = serde_json::to_vec(self).unwrap_or_default();
        body.push(b'\n');
        Page {
            status: if self.ok() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            content_type: "application/json",
            body,
        }
    }
}

impl Facts {
    fn partition_answers(&self) -> BTreeMap<String, PartitionAnswer> {
        self.partitions
            .iter()
            .map(|(partition, fact)| {
                let (state, reason) = match (fact.phase, fact.storage_stalled) {
                    (_, true) => (
                        "storage_stalled",
                        Some("its commits fail (a full or failing disk); it keeps its committed state and retries".to_string()),
                    ),
                    (Phase::Waiting, _) => (
                        "waiting",
                        Some("not started yet (the topic is not there yet)".to_string()),
                    ),
                    (Phase::Starting, _) => (
                        "starting",
                        Some("opening, reconciling and restoring its state".to_string()),
                    ),
                    (Phase::Running, _) => ("running", None),
                };
                (partition.to_string(), PartitionAnswer { state, reason })
            })
            .collect()
    }

    /// `/healthz`: fails only for a thread busy with one step for longer
    /// than the wedge limit.
    pub(crate) fn liveness(&self) -> Answer {
        let reasons: Vec<String> = self
            .threads
            .iter()
            .filter_map(|(thread, busy)| busy.map(|busy| (thread, busy)))
            .filter(|(_, busy)| *busy > self.wedged_after)
            .map(|(thread, busy)| {
                format!(
                    "thread {thread} has been busy with one step for {:.0} s (limit {:.0} s)",
                    busy.as_secs_f64(),
                    self.wedged_after.as_secs_f64()
                )
            })
            .collect();
        let threads = self
            .threads
            .iter()
            .map(|(thread, busy)| {
                let state = if busy.is_some() { "busy" } else { "waiting" };
                (thread.clone(), state)
            })
            .collect();
        Answer {
            status: if reasons.is_empty() { "ok" } else { "wedged" },
            reasons,
            partitions: self.partition_answers(),
            threads,
        }
    }

    /// `/readyz`: see the module comment.
    pub(crate) fn readiness(&self) -> Answer {
        let mut reasons = Vec::new();
        if self.stopping {
            reasons.push("stopping: a stop was asked for (SIGTERM or SIGINT)".to_string());
        }
        if self.broker_down {
            reasons.push("no broker is reachable".to_string());
        }
        if self.waiting_for_assignment {
            reasons.push("waiting for the group's assignment".to_string());
        }
        let partitions = self.partition_answers();
        for (partition, answer) in &partitions {
            if let Some(reason) = &answer.reason {
                reasons.push(format!("partition {partition}: {reason}"));
            }
        }
        Answer {
            status: if reasons.is_empty() {
                "ok"
            } else {
                "not_ready"
            },
            reasons,
            partitions,
            threads: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            wedged_after: Duration::from_secs(60),
            threads: BTreeMap::new(),
            partitions: BTreeMap::from([(
                0,
                PartitionFact {
                    phase: Phase::Running,
                    storage_stalled: false,
                },
            )]),
            stopping: false,
            broker_down: false,
            waiting_for_assignment: false,
        }
    }

    #[test]
    fn readiness_names_every_reason_and_each_partition() {
        assert_eq!(facts().readiness().status, "ok");
        assert!(facts().readiness().reasons.is_empty());

        let mut f = facts();
        f.partitions.insert(
            1,
            PartitionFact {
                phase: Phase::Starting,
                storage_stalled: false,
            },
        );
        f.partitions.insert(
            2,
            PartitionFact {
                phase: Phase::Running,
                storage_stalled: true,
            },
        );
        f.partitions.insert(
            3,
            PartitionFact {
                phase: Phase::Waiting,
                storage_stalled: false,
            },
        );
        f.broker_down = true;
        f.stopping = true;
        f.waiting_for_assignment = true;
        let answer = f.readiness();
        assert_eq!(answer.status, "not_ready");
        let text = answer.reasons.join("\n");
        for expected in [
            "stopping",
            "no broker",
            "group's assignment",
            "partition 1: opening",
            "partition 2: its commits fail",
            "partition 3: not started",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
        assert!(!text.contains("partition 0"), "{text}");
        assert_eq!(answer.partitions["0"].state, "running");
        assert_eq!(answer.partitions["1"].state, "starting");
        assert_eq!(answer.partitions["2"].state, "storage_stalled");
        assert_eq!(answer.partitions["3"].state, "waiting");
        // None of these is a liveness failure.
        assert_eq!(f.liveness().status, "ok");

        let page = f.readiness().page();
        assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        assert_eq!(body["partitions"]["1"]["state"], "starting");
        assert_eq!(facts().readiness().page().status, StatusCode::OK);
    }

    #[test]
    fn only_a_step_longer_than_the_limit_is_wedged() {
        let mut f = facts();
        f.threads
            .insert("partition-0".into(), Some(Duration::from_secs(60)));
        f.threads
            .insert("exporter".into(), Some(Duration::from_secs(1)));
        f.threads.insert("snapshots".into(), None);
        assert_eq!(f.liveness().status, "ok", "at the limit");
        f.threads
            .insert("partition-0".into(), Some(Duration::from_secs(61)));
        let answer = f.liveness();
        assert_eq!(answer.status, "wedged");
        assert_eq!(answer.reasons.len(), 1);
        assert!(answer.reasons[0].contains("partition-0"), "{answer:?}");
        assert_eq!(answer.threads["partition-0"], "busy");
        assert_eq!(answer.threads["snapshots"], "waiting");
        assert!(
            f.readiness().threads.is_empty(),
            "liveness alone lists them"
        );
        assert_eq!(answer.page().status, StatusCode::SERVICE_UNAVAILABLE);
        // Readiness does not repeat it: a wedged process is restarted.
        assert_eq!(f.readiness().status, "ok");
    }

    #[test]
    fn handles_register_while_they_live() {
        let stop = Shutdown::new();
        let health = Health::new(
            Ownership::Manual(vec![0, 1]),
            Duration::from_millis(50),
            &stop,
        );
        let facts = health.facts();
        assert_eq!(facts.partitions[&0].phase, Phase::Waiting);
        let zero = health.partition(0);
        assert_eq!(health.facts().partitions[&0].phase, Phase::Starting);
        zero.set_phase(Phase::Running);
        zero.set_storage_stalled(true);
        assert!(health.facts().partitions[&0].storage_stalled);
        let again = health.partition(0);
        drop(zero);
        assert_eq!(
            health.facts().partitions[&0].phase,
            Phase::Starting,
            "the old handle leaves the new one"
        );
        drop(again);

        let beat = health.beat("partition-1");
        assert!(health.facts().threads["partition-1"].is_some());
        beat.waiting();
        assert_eq!(
            health.facts().threads["partition-1"],
            None,
            "a wait is not busy"
        );
        beat.busy();
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(health.facts().liveness().status, "wedged");
        drop(beat);
        assert_eq!(health.facts().liveness().status, "ok");
        assert!(
            health.facts().threads.is_empty(),
            "a dropped beat is not watched"
        );

        let group = Health::new(Ownership::Group, DEFAULT_WEDGED_AFTER, &stop);
        assert!(group.facts().waiting_for_assignment);
        group.set_assigned();
        assert_eq!(group.facts().readiness().status, "ok");
        stop.request();
        assert_eq!(group.facts().readiness().status, "not_ready");
    }
}
