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
//! offsets in the state, as in the manual mode.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::TopicPartitionList;

use super::clients::ClientObserver;
use super::partition::{Claimed, PartitionRun, Pipeline};
use super::{ConsumerConfig, Supervisor, SUPERVISE_INTERVAL};
use crate::kafka::link::{is_outage, BrokerLink};
use crate::kafka::{member_config, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::publish::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Longest a revoked partition may take to hand over: its last publish and
/// the acknowledgement of its last snapshot. The group waits for it (up
/// to `max.poll.interval.ms`).
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Group errors (other than outages): one line per this.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The member's side of the group protocol: librdkafka calls it on the
/// thread that polls the member's client.
struct Member {
    observer: ClientObserver,
    config: ConsumerConfig,
    metrics: Arc<Metrics>,
    owned: Mutex<Owned>,
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
                run.hand_off(HAND_OFF_TIMEOUT).map(|last| {
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

impl ClientContext for Member {
    fn stats_raw(&self, statistics: &[u8]) {
        self.observer.stats_raw(statistics);
    }
}

impl ConsumerContext for Member {
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
            Rebalance::Error(error) => log::warn!("group {}: rebalance: {error}", group_of(self)),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.metrics.rebalanced("assigned");
            // The partitions' own clients read; this one only holds them.
            if let Err(error) = consumer.pause(list) {
                log::debug!("pausing the member's own fetches: {error}");
            }
            self.assigned(&partitions_of(list, &self.config.topic));
        }
    }
}

fn group_of(member: &Member) -> &str {
    &member.config.group_id
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
    link: Arc<BrokerLink>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let member = Member {
        observer: ClientObserver::new(link.clone(), metrics.fetch_requests("member")),
        config: config.clone(),
        metrics: metrics.clone(),
        owned: Mutex::new(Owned {
            pipeline: Some(pipeline),
            runs: BTreeMap::new(),
            failed: None,
        }),
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
    let mut supervisor = Supervisor::new(config.progress_interval);
    let mut errors = LogLimiter::new(ERROR_LOG_INTERVAL);
    while !shutdown.requested() {
        match consumer.poll(SUPERVISE_INTERVAL) {
            None | Some(Ok(_)) => {}
            Some(Err(error)) if is_outage(&error) => link.report(&error, &error),
            Some(Err(error)) => {
                if let Some(suppressed) = errors.allow(std::time::Instant::now()) {
                    log::warn!(
                        "group {:?}: {error}{}",
                        config.group_id,
                        suppressed_note(suppressed)
                    );
                }
            }
        }
        let mut owned = consumer.context().lock();
        if owned.failed.is_some() {
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
