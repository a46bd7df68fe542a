//! The consumer-group mode (`consumer --group NAME`): Kafka's group
//! protocol, cooperative-sticky, decides which member runs which
//! partition, and this module turns its decisions into partition
//! lifecycles ([`Pipeline::run`], [`PartitionRun`]):
//! - assigned: the partition's state is claimed in this member's own state
//!   folder and the partition started (restored from the highest of state,
//!   published file and snapshot topic, then run);
//! - revoked (a clean hand-off): the current batch is committed, the last
//!   snapshot published and acknowledged by the snapshot topic, the state
//!   released, and only then does the group go on;
//! - lost (the session expired: another member may own it already): the
//!   partition ends at once and nothing more of it is published or
//!   written to the snapshot topic.
//!
//! What members share is fenced where it is written, not here: a partition
//! file never goes back whoever writes it ([`crate::store::folders`]), and
//! a restore takes the newest verified snapshot, not the last written.
//!
//! The member's own client reads no records: its partitions are paused as
//! soon as they are assigned; the partitions' clients read from the
//! offsets in the state, as in the manual mode. It commits its partitions'
//! next offsets to the group for Kafka's tools (the group's lag), one
//! commit in flight at a time (unless one stays unanswered, which
//! librdkafka does with a commit sent during a rebalance); nothing reads
//! them back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset as KafkaOffset, TopicPartitionList};

use super::clients::ClientObserver;
use super::partition::{Claimed, PartitionRun, Pipeline};
use super::{ConsumerConfig, Supervisor, SUPERVISE_INTERVAL};
use crate::kafka::link::{is_outage, BrokerLink};
use crate::kafka::{member_config, Offset, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::publish::health::Health;
use crate::publish::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Longest the partitions revoked together may take to hand over: their
/// last publishes and the acknowledgements of their last snapshots. The
/// group waits for it (up to `max.poll.interval.ms`); it is below the
/// default `--shutdown-timeout`, so a stop hands off before its deadline.
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(8);
/// How often the owned partitions' next offsets are committed to the group.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
/// A commit unanswered for this long no longer holds the next back.
const COMMIT_STUCK: Duration = Duration::from_secs(5);
/// Group errors (other than outages): one line per this.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The member's side of the group protocol: librdkafka calls it on the
/// thread that polls the member's client.
struct Member {
    observer: ClientObserver,
    /// Told when the first assignment comes (`/readyz`).
    health: Arc<Health>,
    config: ConsumerConfig,
    metrics: Arc<Metrics>,
    owned: Mutex<Owned>,
    /// A commit to the group is in flight.
    committing: AtomicBool,
    /// When the last commit was sent.
    commit_sent: Mutex<Option<Instant>>,
}

struct Owned {
    /// None once the member has finished.
    pipeline: Option<Pipeline>,
    runs: BTreeMap<PartitionId, PartitionRun>,
    /// The first error that ends the member.
    failed: Option<anyhow::Error>,
}

impl Member {
    fn lock(&self) -> MutexGuard<'_, Owned> {
        // A panic in a callback leaves at most a partition unstarted.
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the assigned partitions.
    fn assigned(&self, partitions: &[PartitionId]) {
        let mut owned = self.lock();
        for &partition in partitions {
            if owned.runs.contains_key(&partition) || owned.failed.is_some() {
                continue;
            }
            let started = Claimed::open(&self.config.state_dir, partition).and_then(|claimed| {
                owned
                    .pipeline
                    .as_ref()
                    .context("the member has finished")?
                    .run(claimed)
            });
            match started {
                Ok(run) => {
                    log::info!("partition {partition}: assigned to this member");
                    owned.runs.insert(partition, run);
                }
                Err(error) => {
                    owned.failed.get_or_insert(error);
                }
            }
        }
        self.metrics.set_partitions_owned(owned.runs.len());
    }

    /// Stops the revoked partitions: handed off, or abandoned when lost.
    fn revoked(&self, partitions: &[PartitionId], lost: bool) {
        let mut owned = self.lock();
        // All end side by side, within one deadline.
        for partition in partitions {
            if let Some(run) = owned.runs.get(partition) {
                run.request_stop();
            }
        }
        let deadline = Instant::now() + HAND_OFF_TIMEOUT;
        for partition in partitions {
            let Some(run) = owned.runs.remove(partition) else {
                continue;
            };
            let ended = if lost {
                log::warn!(
                    "partition {partition}: lost (this member's session expired); \
                     stopped without publishing, its new owner counts on"
                );
                run.abandon()
            } else {
                run.hand_off(deadline).map(|last| {
                    log::info!(
                        "partition {partition}: handed off at offset {}",
                        last.map_or_else(
                            || "none (it had not started)".into(),
                            |s| s.next_offset.to_string()
                        )
                    );
                })
            };
            if let Err(error) = ended {
                owned.failed.get_or_insert(error);
            }
        }
        self.metrics.set_partitions_owned(owned.runs.len());
    }
}

impl Member {
    /// Commits the owned partitions' next offsets, unless a commit is still
    /// in flight or nothing moved since the last.
    fn commit_offsets(
        &self,
        consumer: &BaseConsumer<Member>,
        runs: &BTreeMap<PartitionId, PartitionRun>,
        last: &mut BTreeMap<PartitionId, Offset>,
    ) {
        let now: BTreeMap<PartitionId, Offset> = runs
            .iter()
            .map(|(p, run)| (*p, run.progress.next_offset.load(Ordering::Relaxed)))
            .filter(|(_, next)| *next > 0)
            .collect();
        let mut sent = self
            .commit_sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // librdkafka may hold a commit sent during a rebalance without ever
        // answering it: one unanswered for long no longer holds the next.
        let answered_or_stuck = !self.committing.load(Ordering::Acquire)
            || sent.is_some_and(|at| at.elapsed() >= COMMIT_STUCK);
        if now == *last || !answered_or_stuck {
            return;
        }
        *sent = Some(Instant::now());
        let mut list = TopicPartitionList::new();
        for (partition, next) in &now {
            if let Err(error) = list.add_partition_offset(
                &self.config.topic,
                *partition,
                KafkaOffset::Offset(*next),
            ) {
                log::debug!("partition {partition}: offset {next} not committed: {error}");
            }
        }
        self.committing.store(true, Ordering::Release);
        match consumer.commit(&list, CommitMode::Async) {
            Ok(()) => *last = now,
            Err(error) => {
                self.committing.store(false, Ordering::Release);
                log::debug!(
                    "committing offsets to group {:?}: {error}",
                    self.config.group_id
                );
            }
        }
    }
}

impl ClientContext for Member {
    fn stats_raw(&self, statistics: &[u8]) {
        self.observer.stats_raw(statistics);
    }
}

impl ConsumerContext for Member {
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        self.committing.store(false, Ordering::Release);
        if let Err(error) = result {
            // The state is what counts; only Kafka's tools see older offsets.
            log::debug!(
                "committing offsets to group {:?}: {error}",
                self.config.group_id
            );
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                // librdkafka may miss the lost flag when the session ends
                // during a rebalance (its PR #5604): the files' fence and
                // the restore's order hold without it.
                let lost = consumer.assignment_lost();
                self.metrics
                    .rebalanced(if lost { "lost" } else { "revoked" });
                self.revoked(&partitions_of(list, &self.config.topic), lost);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => {
                log::warn!("group {}: rebalance: {error}", self.config.group_id)
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.metrics.rebalanced("assigned");
            self.health.set_assigned();
            // The partitions' own clients read; this one only holds them.
            if let Err(error) = consumer.pause(list) {
                log::debug!("pausing the member's own fetches: {error}");
            }
            self.assigned(&partitions_of(list, &self.config.topic));
        }
    }
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<PartitionId> {
    list.elements_for_topic(topic)
        .iter()
        .map(|element| element.partition())
        .collect()
}

/// Runs this process as a member of `config.group_id` until shutdown or an
/// error: joins, runs what the group assigns, and at the end hands every
/// partition off before leaving.
pub(super) fn run(
    config: &ConsumerConfig,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    health: &Arc<Health>,
    link: Arc<BrokerLink>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let member = Member {
        health: health.clone(),
        observer: ClientObserver::new(link.clone(), metrics.fetch_requests("member")),
        config: config.clone(),
        metrics: metrics.clone(),
        owned: Mutex::new(Owned {
            pipeline: Some(pipeline),
            runs: BTreeMap::new(),
            failed: None,
        }),
        committing: AtomicBool::new(false),
        commit_sent: Mutex::new(None),
    };
    let consumer: BaseConsumer<Member> = member_config(&config.client, &config.group_id)
        .set(
            "statistics.interval.ms",
            super::clients::CLIENT_STATS_INTERVAL_MS,
        )
        .create_with_context(member)
        .context("creating the group member's Kafka client")?;
    consumer
        .subscribe(&[&config.topic])
        .with_context(|| format!("joining group {:?}", config.group_id))?;
    log::info!(
        "joined group {:?} for topic {:?}; partitions start as the group assigns them",
        config.group_id,
        config.topic
    );
    let mut supervisor = Supervisor::new(config.progress_interval, health);
    let mut errors = LogLimiter::new(ERROR_LOG_INTERVAL);
    let (mut committed, mut last_commit) = (BTreeMap::new(), Instant::now());
    while !shutdown.requested() {
        match consumer.poll(SUPERVISE_INTERVAL) {
            None | Some(Ok(_)) => {}
            Some(Err(error)) if is_outage(&error) => link.report(&error, &error),
            Some(Err(error)) => {
                if let Some(suppressed) = errors.allow(Instant::now()) {
                    log::warn!(
                        "group {:?}: {error}{}",
                        config.group_id,
                        suppressed_note(suppressed)
                    );
                }
            }
        }
        let mut owned = consumer.context().lock();
        // A stop ends the partitions too: they are handed off below.
        if owned.failed.is_some() || shutdown.requested() {
            break;
        }
        // A partition that ended by itself ended with an error.
        let ended: Vec<PartitionId> = owned
            .runs
            .iter()
            .filter(|(_, run)| run.is_finished())
            .map(|(partition, _)| *partition)
            .collect();
        if let Some(partition) = ended.first() {
            if let Some(run) = owned.runs.remove(partition) {
                let error = run
                    .join()
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("partition {partition} ended"));
                owned.failed = Some(error);
            }
            break;
        }
        supervisor.look(owned.runs.values(), &link);
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            last_commit = Instant::now();
            consumer
                .context()
                .commit_offsets(&consumer, &owned.runs, &mut committed);
        }
    }
    shutdown.request();
    // Hand everything off first (the final snapshots acknowledged), then
    // leave: the group's next assignment restores from them.
    let member = consumer.context();
    let partitions: Vec<PartitionId> = member.lock().runs.keys().copied().collect();
    member.revoked(&partitions, false);
    consumer.unsubscribe();
    let mut owned = member.lock();
    if let Some(pipeline) = owned.pipeline.take() {
        pipeline.finish();
    }
    match owned.failed.take() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
