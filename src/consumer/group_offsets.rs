//! The consumer group's committed offsets, for Kafka's own tools
//! (`kafka-consumer-groups.sh --describe`, Burrow, Kafka UI): after each
//! committed batch a worker hands its partition's next offset here, and
//! thread `group-offsets` commits the newest of each partition to the
//! group, as Flink's Kafka source does after a checkpoint.
//!
//! The thread commits synchronously, one commit at a time, each with the
//! newest offset of every partition: a commit that librdkafka retries (a
//! coordinator that moved) can then never land after a newer one and take
//! a partition's offset back. It is asynchronous to the workers, which
//! only leave their offsets here and never wait.
//!
//! Nothing reads these offsets back: the sled state stays the only source
//! of truth, so a commit that fails (an ACL, a coordinator that is away)
//! costs nothing but the tools' view, and is told as one warning, then at
//! most one per [`FAILURE_LOG_INTERVAL`]. The processes of one group join
//! nothing (manual assignment), so the group shows as Empty, with offsets.

use std::collections::BTreeMap;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::{Receiver, Sender};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::TopicPartitionList;

use crate::kafka::{manual_assign_config, ClientSettings, Offset, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::shutdown::Shutdown;

/// Failed commits: one warning, then at most one per this.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(300);
/// At shutdown, how long the last commits may take before the process
/// goes on without them.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(3);
/// After a failed commit, the next try waits this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Where the workers leave their newest committed offsets.
pub(crate) struct GroupOffsets {
    pending: Mutex<BTreeMap<PartitionId, Offset>>,
    /// Bounded to one: a wake-up already pending covers every later offset.
    wake: Sender<()>,
}

impl GroupOffsets {
    /// `partition`'s state is committed up to `next_offset`.
    pub(crate) fn committed(&self, partition: PartitionId, next_offset: Offset) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(partition, next_offset);
        let _ = self.wake.try_send(());
    }

    fn take(&self) -> BTreeMap<PartitionId, Offset> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Tells failed commits; see the module comment.
struct CommitReporter {
    group: String,
    failures: Mutex<LogLimiter>,
}

impl CommitReporter {
    fn failed(&self, error: &dyn std::fmt::Display) {
        let allowed = self
            .failures
            .lock()
            .map_or(Some(0), |mut limiter| limiter.allow(Instant::now()));
        if let Some(suppressed) = allowed {
            log::warn!(
                "cannot commit offsets to consumer group {:?} ({error}); counting goes on, the state keeps the offsets, and Kafka's tools show older ones{}",
                self.group,
                suppressed_note(suppressed)
            );
        }
    }
}

impl ClientContext for CommitReporter {
    // Broker trouble is told by the partition clients; here it would only
    // repeat it.
    fn error(&self, error: KafkaError, reason: &str) {
        log::debug!("group offsets client: {error}: {reason}");
    }
}

impl ConsumerContext for CommitReporter {}

/// Owns thread `group-offsets`; [`GroupCommitter::finish`] commits what is
/// left and joins it.
pub(crate) struct GroupCommitter {
    offsets: Arc<GroupOffsets>,
    stop: Shutdown,
    thread: Option<JoinHandle<()>>,
    /// Closed by the thread when it ends.
    ended: Receiver<()>,
}

impl GroupCommitter {
    pub(crate) fn start(
        settings: &ClientSettings,
        group: &str,
        topic: &str,
    ) -> anyhow::Result<Self> {
        let client: BaseConsumer<CommitReporter> = manual_assign_config(settings, group)
            .create_with_context(CommitReporter {
                group: group.to_string(),
                failures: Mutex::new(LogLimiter::new(FAILURE_LOG_INTERVAL)),
            })
            .context("creating the group offsets client")?;
        let (wake, woken) = crossbeam_channel::bounded(1);
        let offsets = Arc::new(GroupOffsets {
            pending: Mutex::new(BTreeMap::new()),
            wake,
        });
        let stop = Shutdown::new();
        let (end, ended) = crossbeam_channel::bounded::<()>(0);
        let thread = {
            let (offsets, stop, topic) = (offsets.clone(), stop.clone(), topic.to_string());
            crate::shutdown::spawn("group-offsets", move || {
                commit_loop(&client, &offsets, &woken, &stop, &topic);
                drop(end);
            })
            .context("starting the group offsets thread")?
        };
        Ok(GroupCommitter {
            offsets,
            stop,
            thread: Some(thread),
            ended,
        })
    }

    pub(crate) fn offsets(&self) -> Arc<GroupOffsets> {
        self.offsets.clone()
    }

    /// Commits the last offsets and joins the thread (see the Drop).
    pub(crate) fn finish(self) {}
}

impl Drop for GroupCommitter {
    /// A commit that hangs on a broker that is away (librdkafka waits up to
    /// its request timeout) holds the shutdown at most [`FINAL_COMMIT_WAIT`].
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.request();
        let _ = self.offsets.wake.try_send(());
        match self.ended.recv_timeout(FINAL_COMMIT_WAIT) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => log::warn!(
                "the last offset commit to the consumer group did not finish within {}s; stopping without it (the state has the offsets)",
                FINAL_COMMIT_WAIT.as_secs()
            ),
            _ => {
                if thread.join().is_err() {
                    log::error!("group offsets thread panicked");
                }
            }
        }
    }
}

/// Commits the newest offset of every partition, synchronously on this
/// thread, whenever a worker committed a batch; after a failure the next
/// try waits [`RETRY_AFTER_FAILURE`]. At stop, one last commit of what is
/// not committed yet.
fn commit_loop(
    client: &BaseConsumer<CommitReporter>,
    offsets: &GroupOffsets,
    woken: &Receiver<()>,
    stop: &Shutdown,
    topic: &str,
) {
    let mut newest = BTreeMap::new();
    let mut dirty = false;
    let mut retry_at: Option<Instant> = None;
    loop {
        let _ = woken.recv_timeout(RETRY_AFTER_FAILURE);
        let stopping = stop.requested();
        let taken = offsets.take();
        dirty |= !taken.is_empty();
        newest.extend(taken);
        let due = stopping || retry_at.is_none_or(|at| Instant::now() >= at);
        if dirty && due {
            match commit(client, topic, &newest) {
                Ok(()) => {
                    dirty = false;
                    retry_at = None;
                }
                Err(error) => {
                    client.context().failed(&error);
                    retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

fn commit(
    client: &BaseConsumer<CommitReporter>,
    topic: &str,
    newest: &BTreeMap<PartitionId, Offset>,
) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    for (&partition, &offset) in newest {
        list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    }
    client.commit(&list, CommitMode::Sync)
}
