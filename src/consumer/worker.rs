//! The partition worker's I/O shell (thread `partition-N`): it owns the
//! partition's librdkafka client, its sled state and its verifier, feeds
//! what they report to the [`PartitionMachine`] and carries out the actions
//! it returns: commit a batch (statistics, counters, fingerprint and next
//! offset in one transaction), hand the committed snapshot to the exporter,
//! re-create the client at an offset, ask the verifier, reset the partition.
//! Every decision lives in the machine; this module only does what it says.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use crossbeam_channel::Sender;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};

use super::machine::{
    Action, Event, Flow, Limits, PartitionMachine, PollError, Record, StorageRetry,
};
use super::verify::Verifier;
use super::{ConsumerConfig, Progress};
use crate::broker_link::BrokerLink;
use crate::exporter::Committed;
use crate::kafka::{assign, cached_high_watermark, reading_config, Offset, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::metrics::{BatchCounts, PartitionMetrics};
use crate::shutdown::Shutdown;
use crate::state::{BatchCommit, PartitionState, Snapshot, StateError};

/// How often a worker refreshes its lag, for the progress lines.
const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// Repeated lines about consumer errors and malformed messages: one per
/// this, with a count of the rest.
const NOISY_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// While re-reads wait for their budget, one line per this.
const REREAD_DEFERRED_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// While a commit keeps failing (a full disk), one error line per this.
const STORAGE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// The workers' consumer group name (joined by no one: manual assignment).
const WORKER_GROUP: &str = "weatherstream-consumer";
/// How often a worker's client reports its statistics (connection states,
/// requests sent): the source of "broker reachable again" for a partition
/// that receives nothing, and of the fetch request count.
const CLIENT_STATS_INTERVAL_MS: &str = "1000";

impl Record for BorrowedMessage<'_> {
    fn offset(&self) -> Offset {
        Message::offset(self)
    }
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }
    fn value(&self) -> Option<&[u8]> {
        Message::payload(self)
    }
}

/// Errors after which the stored offset must be checked against the topic.
/// Since librdkafka 2.5 fetches by topic id, a deleted topic can also show
/// as an unknown topic id (Apache Kafka's answer to a fetch for it).
pub(super) fn needs_verification(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopicId
        )
    )
}

/// The context of a worker's client: it tells the process's
/// [`BrokerLink`] when a broker connection is up, and adds the fetch
/// requests the client sent to the partition's metrics, both from
/// librdkafka's statistics.
pub(super) struct WorkerContext {
    link: Arc<BrokerLink>,
    metrics: PartitionMetrics,
    /// Fetch requests this client had sent at its last statistics.
    fetches_seen: AtomicU64,
    /// Responses this client had received from brokers at its last
    /// statistics.
    responses_seen: AtomicU64,
}

impl WorkerContext {
    /// Responses received from brokers, as of the last statistics (every
    /// [`CLIENT_STATS_INTERVAL_MS`]).
    pub(super) fn broker_responses(&self) -> u64 {
        self.responses_seen.load(Ordering::Relaxed)
    }
}

/// The part of librdkafka's statistics JSON read here (STATISTICS.md).
#[derive(serde::Deserialize)]
struct ClientStats {
    #[serde(default)]
    brokers: HashMap<String, BrokerStats>,
}

#[derive(serde::Deserialize)]
struct BrokerStats {
    /// -1 for a bootstrap broker, which is dropped once the cluster's own
    /// brokers are known.
    nodeid: i32,
    state: String,
    /// Responses received.
    #[serde(default)]
    rx: u64,
    /// Requests sent, by request type.
    #[serde(default)]
    req: HashMap<String, u64>,
}

impl ClientContext for WorkerContext {
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<ClientStats>(statistics) else {
            log::debug!("unreadable librdkafka statistics");
            return;
        };
        if stats
            .brokers
            .values()
            .any(|broker| broker.nodeid >= 0 && broker.state == "UP")
        {
            self.link.up();
        }
        let responses: u64 = stats.brokers.values().map(|broker| broker.rx).sum();
        self.responses_seen.fetch_max(responses, Ordering::Relaxed);
        let fetches: u64 = stats
            .brokers
            .values()
            .filter_map(|broker| broker.req.get("Fetch"))
            .sum();
        // A dropped bootstrap broker takes its count with it: never count
        // backwards.
        let seen = self.fetches_seen.fetch_max(fetches, Ordering::Relaxed);
        self.metrics
            .add_fetch_requests(fetches.saturating_sub(seen));
    }
}

impl ConsumerContext for WorkerContext {}

type WorkerClient = BaseConsumer<WorkerContext>;

/// Every broker connection of a client is down.
fn is_outage(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown)
}

/// One connection failed; librdkafka reconnects with backoff.
fn is_reconnect(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure)
}

/// A client that reads one partition from the offsets we keep.
fn partition_client(
    config: &ConsumerConfig,
    link: &Arc<BrokerLink>,
    metrics: &PartitionMetrics,
) -> anyhow::Result<WorkerClient> {
    reading_config(
        &config.bootstrap_servers,
        WORKER_GROUP,
        config.fetch_wait_ms,
    )
    .set("statistics.interval.ms", CLIENT_STATS_INTERVAL_MS)
    .create_with_context(WorkerContext {
        link: link.clone(),
        metrics: metrics.clone(),
        fetches_seen: AtomicU64::new(0),
        responses_seen: AtomicU64::new(0),
    })
    .context("creating a Kafka consumer")
}

/// One partition's worker; [`PartitionWorker::run`] is its thread.
pub(super) struct PartitionWorker {
    config: ConsumerConfig,
    state: PartitionState,
    machine: PartitionMachine,
    exporter: Sender<Committed>,
    progress: Arc<Progress>,
    metrics: PartitionMetrics,
    shutdown: Shutdown,
    /// The client reading the partition; replaced on every `ReadFrom`.
    client: Option<WorkerClient>,
    link: Arc<BrokerLink>,
    errors: LogLimiter,
    bad_input: LogLimiter,
    storage_errors: LogLimiter,
    rereads_deferred: LogLimiter,
}

impl PartitionWorker {
    pub(super) fn new(
        config: ConsumerConfig,
        state: PartitionState,
        exporter: Sender<Committed>,
        progress: Arc<Progress>,
        metrics: PartitionMetrics,
        link: Arc<BrokerLink>,
        shutdown: Shutdown,
    ) -> Self {
        let limits = Limits {
            max_batch: config.max_batch,
            batch_timeout: Duration::from_millis(config.batch_timeout_ms),
            verify_interval: config.verify_interval,
        };
        metrics.set_next_offset(state.snapshot().next_offset);
        PartitionWorker {
            machine: PartitionMachine::new(state.snapshot(), limits, Instant::now()),
            metrics,
            config,
            state,
            exporter,
            progress,
            shutdown,
            client: None,
            link,
            errors: LogLimiter::new(NOISY_LOG_INTERVAL),
            bad_input: LogLimiter::new(NOISY_LOG_INTERVAL),
            storage_errors: LogLimiter::new(STORAGE_ERROR_LOG_INTERVAL),
            rereads_deferred: LogLimiter::new(REREAD_DEFERRED_LOG_INTERVAL),
        }
    }

    fn partition(&self) -> PartitionId {
        self.progress.partition
    }

    pub(super) fn run(mut self) -> anyhow::Result<()> {
        let verifier = Verifier::spawn(
            &self.config.bootstrap_servers,
            &self.config.topic,
            self.partition(),
            &self.shutdown,
        )?;
        let mut last_lag = Instant::now();
        while !self.shutdown.requested() {
            let event = match verifier.poll() {
                Some(outcome) => Event::Verdict(outcome?),
                None => Event::Tick,
            };
            let actions = self.machine.handle(event, Instant::now());
            self.execute(actions, &verifier)?;
            if !self.machine.is_reading() {
                continue;
            }
            let Some(client) = self.client.take() else {
                return Err(anyhow!("reading without a client (a bug)"));
            };
            let end = self.read_batch(&client)?;
            self.client = Some(client);
            if last_lag.elapsed() >= LAG_INTERVAL {
                if let Event::BatchEnded {
                    high_watermark: Some(high),
                    ..
                } = end
                {
                    last_lag = Instant::now();
                    self.metrics.set_lag(self.progress.set_lag(high));
                }
            }
            let actions = self.machine.handle(end, Instant::now());
            self.execute(actions, &verifier)?;
        }
        Ok(())
    }

    /// Carries out the machine's actions in order; a verdict awaited on the
    /// way adds the actions it calls for.
    fn execute(&mut self, actions: Vec<Action>, verifier: &Verifier) -> anyhow::Result<()> {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::ReadFrom(offset) => {
                    log::debug!("partition {}: reading from offset {offset}", self.partition());
                    self.client = Some(self.client_at(offset)?);
                }
                Action::Ask(request) => verifier.ask(request)?,
                Action::AwaitVerdict => {
                    let Some(outcome) = verifier.wait() else {
                        // Shutdown ends a verifier; anything else is a bug,
                        // and waiting again would spin.
                        if self.shutdown.requested() {
                            return Ok(());
                        }
                        return Err(anyhow!("the verifier thread stopped"));
                    };
                    queue.extend(self.machine.handle(Event::Verdict(outcome?), Instant::now()));
                }
                Action::Pause(duration) => {
                    self.shutdown.wait(duration);
                }
                Action::SetAnchor(anchor) => {
                    if self
                        .durably("record of a verified fingerprint", |state, _| {
                            state.set_anchor(anchor)
                        })?
                        .is_none()
                    {
                        return Ok(()); // shutdown
                    }
                    self.machine.set_committed(self.state.snapshot());
                }
                Action::Reset {
                    gone_offset,
                    noticed_by,
                } => {
                    log::warn!(
                        "partition {}: topic {:?} was re-created (the record at offset {gone_offset} is gone or different; noticed by {noticed_by}); \
                         resetting this partition's statistics from offset {} to 0",
                        self.partition(),
                        self.config.topic,
                        self.state.snapshot().next_offset
                    );
                    // Repeating a reset that did reach the disk only bumps
                    // the epoch again.
                    let Some(snapshot) = self.durably("reset", |state, _| state.reset())? else {
                        return Ok(()); // shutdown
                    };
                    self.progress.update(&snapshot);
                    self.metrics.reset();
                    self.machine.set_committed(snapshot.clone());
                    self.publish(Committed::current(snapshot))?;
                }
                Action::Publish { backlog } => self.publish(Committed {
                    snapshot: self.state.snapshot(),
                    backlog,
                })?,
                Action::ReadBack { wanted, from } => {
                    log::info!(
                        "partition {}: the broker did not serve offset {wanted} (it served a later one, or nothing while the log goes on); reading again from offset {from}",
                        self.partition()
                    );
                    self.client = Some(self.client_at(from)?);
                }
                Action::ReadBackDeferred { wanted, wait } => {
                    if let Some(suppressed) = self.rereads_deferred.allow(Instant::now()) {
                        log::warn!(
                            "partition {}: offset {wanted} is still not served, and this minute's re-reads are spent; waiting instead of reading more from a broker that may be overloaded{}",
                            self.partition(),
                            suppressed_note(suppressed)
                        );
                    }
                    self.shutdown.wait(wait);
                }
                Action::GapAccepted { from } => log::warn!(
                    "partition {}: offsets from {from} are missing from the log even when read from the start; going on after them",
                    self.partition()
                ),
            }
        }
        Ok(())
    }

    /// A new client reading this partition from `offset`.
    fn client_at(&self, offset: Offset) -> anyhow::Result<WorkerClient> {
        let client = partition_client(&self.config, &self.link, &self.metrics)?;
        assign(&client, &self.config.topic, self.partition(), offset)
            .context("assigning the partition")?;
        Ok(client)
    }

    /// Reads one batch, commits what it counted, and returns how it ended.
    fn read_batch(&mut self, client: &WorkerClient) -> anyhow::Result<Event> {
        let partition = self.partition();
        let mut batch = self.machine.batch();
        while batch.wants_more() {
            if batch.clock_due() && batch.clock(Instant::now()) == Flow::Stop {
                break;
            }
            let Some(polled) = client.poll(batch.poll_wait()) else {
                break;
            };
            let flow = match polled {
                Ok(message) => {
                    self.link.up();
                    let offset = Message::offset(&message);
                    match batch.offer(message) {
                        Flow::Malformed(reason) => {
                            if let Some(suppressed) = self.bad_input.allow(Instant::now()) {
                                log::warn!(
                                    "partition {partition} offset {offset}: skipped malformed message: {reason}{}",
                                    suppressed_note(suppressed)
                                );
                            }
                            Flow::Continue
                        }
                        flow => flow,
                    }
                }
                Err(error) if needs_verification(&error) => {
                    batch.poll_error(PollError::NeedsCheck(format!("consumer error: {error}")))
                }
                Err(error) if is_outage(&error) => {
                    self.link.down(&error);
                    batch.poll_error(PollError::Transient)
                }
                Err(error) if is_reconnect(&error) => {
                    // librdkafka reconnects by itself; if every broker is
                    // gone, AllBrokersDown follows and is told once.
                    log::debug!("partition {partition}: {error}");
                    batch.poll_error(PollError::Transient)
                }
                Err(error) => {
                    if let Some(suppressed) = self.errors.allow(Instant::now()) {
                        log::warn!(
                            "partition {partition}: {error}{}",
                            suppressed_note(suppressed)
                        );
                    }
                    batch.poll_error(PollError::Transient)
                }
            };
            if flow == Flow::Stop {
                break;
            }
        }
        let (commit, end) = batch.finish();
        let committed = match commit {
            Some(commit) => {
                let counts = BatchCounts {
                    counted: commit.counted,
                    duplicates: commit.duplicates,
                    malformed: commit.malformed,
                };
                let started = Instant::now();
                match self.commit_durably(commit)? {
                    Some(snapshot) => {
                        self.metrics
                            .committed(&counts, snapshot.next_offset, started.elapsed());
                        self.progress.update(&snapshot);
                        Some(snapshot)
                    }
                    // Shutdown during a storage fault: nothing more to do.
                    None => None,
                }
            }
            None => None,
        };
        Ok(Event::BatchEnded {
            end,
            committed,
            high_watermark: cached_high_watermark(client, &self.config.topic, partition),
            broker_responses: client.context().broker_responses(),
        })
    }

    /// Commits a batch durably, through storage faults (see
    /// [`Self::durably`]). Retrying the identical transaction is
    /// exactly-once safe: it writes the same statistics and offset.
    fn commit_durably(&mut self, commit: BatchCommit) -> anyhow::Result<Option<Arc<Snapshot>>> {
        self.durably("commit", |state, retrying| {
            // If the failed transaction did reach the disk, the batch is
            // committed already.
            if retrying && state.snapshot().next_offset == commit.next_offset {
                return Ok(state.snapshot());
            }
            state.commit(commit.clone())
        })
    }

    /// Runs a state write until it succeeds, while storage fails (a full
    /// or failing disk): the last committed state is kept meanwhile. One
    /// error line, then at most one per [`STORAGE_ERROR_LOG_INTERVAL`];
    /// retries with backoff, each on a freshly opened sled database
    /// (sled's handle keeps failing after an I/O error); one line when
    /// storage works again. `write` gets `true` on a retry and must be
    /// safe to repeat. None: shutdown came first (what was not written is
    /// read again at the next start).
    fn durably<T>(
        &mut self,
        what: &str,
        mut write: impl FnMut(&mut PartitionState, bool) -> Result<T, StateError>,
    ) -> anyhow::Result<Option<T>> {
        let mut retry = StorageRetry::new();
        let mut failing_since: Option<Instant> = None;
        loop {
            let attempt = if failing_since.is_some() {
                self.state
                    .reopen()
                    .and_then(|()| write(&mut self.state, true))
            } else {
                write(&mut self.state, false)
            };
            match attempt {
                Ok(written) => {
                    if let Some(since) = failing_since {
                        log::warn!(
                            "partition {}: storage works again after {:.1} s; the waiting {what} is done (next offset {})",
                            self.partition(),
                            since.elapsed().as_secs_f64(),
                            self.state.snapshot().next_offset
                        );
                        self.set_storage_stalled(false);
                    }
                    return Ok(Some(written));
                }
                Err(
                    error @ (StateError::Sled { .. }
                    | StateError::Closed { .. }
                    | StateError::Owner { .. }),
                ) => {
                    let now = Instant::now();
                    if failing_since.is_none() {
                        failing_since = Some(now);
                        self.set_storage_stalled(true);
                    }
                    if let Some(suppressed) = self.storage_errors.allow(now) {
                        log::error!(
                            "partition {}: cannot {what}: {:#}; the last committed state (offset {}) is kept, retrying{}",
                            self.partition(),
                            anyhow::Error::from(error),
                            self.state.snapshot().next_offset,
                            suppressed_note(suppressed)
                        );
                    }
                    if self.shutdown.wait(retry.after_failure()) {
                        log::warn!(
                            "partition {}: stopping with the last committed state (offset {}); what was not written is read again at the next start",
                            self.partition(),
                            self.state.snapshot().next_offset
                        );
                        return Ok(None);
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn set_storage_stalled(&self, stalled: bool) {
        self.progress
            .storage_stalled
            .store(stalled, std::sync::atomic::Ordering::Relaxed);
        self.metrics.set_storage_stalled(stalled);
    }

    fn publish(&self, committed: Committed) -> anyhow::Result<()> {
        self.exporter
            .send(committed)
            .map_err(|_| anyhow!("the exporter stopped"))
    }
}
