//! The partition worker's I/O shell (thread `partition-N`): it owns the
//! partition's [`Reader`] (a client of its own, or its queue of the shared
//! client), its sled state and its rechecker, feeds what they report to the
//! [`PartitionMachine`] and carries out the actions it returns: commit a
//! batch (statistics, counters, fingerprint and next offset in one
//! transaction), hand the committed snapshot to the exporter, read from an
//! offset with a fresh client or follow with the shared one, ask the
//! rechecker, reset the partition. Every decision lives in the machine; this
//! module only does what it says.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};

use super::clients::{
    is_reconnect, needs_verification, own_client, undecodable, ClientObserver, Reader, SharedClient,
};
use super::group_offsets::GroupOffsets;
use super::machine::{
    Action, Event, Flow, Limits, PartitionMachine, PollError, Record, StorageRetry,
};
use super::recheck::Rechecker;
use super::{ConsumerConfig, Progress};
use crate::kafka::link::{is_outage, BrokerLink};
use crate::kafka::{Offset, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::publish::exporter::{CommittedSnapshot, ToExporter};
use crate::publish::health::{Beat, PartitionHealth};
use crate::publish::metrics::{BatchCounts, Metrics, PartitionMetrics};
use crate::shutdown::Shutdown;
use crate::store::snapshot::Snapshot;
use crate::store::state::{BatchCommit, PartitionState, StateError};

/// How often a worker refreshes its lag, for the progress lines.
const LAG_INTERVAL: Duration = Duration::from_secs(1);
/// Repeated lines about consumer errors and malformed messages: one per
/// this, with a count of the rest.
const NOISY_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// While re-reads wait for their budget, one line per this.
const REREAD_DEFERRED_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// While a commit keeps failing (a full disk), one error line per this.
const STORAGE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// While the shared client refuses a partition, one line per this.
const FOLLOW_REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(60);

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

/// One partition's worker; [`PartitionWorker::run`] is its thread.
pub(super) struct PartitionWorker {
    config: ConsumerConfig,
    state: PartitionState,
    machine: PartitionMachine,
    exporter: ToExporter,
    progress: Arc<Progress>,
    metrics: PartitionMetrics,
    /// For the fetch request counters of the clients this worker creates.
    all_metrics: Arc<Metrics>,
    shutdown: Shutdown,
    /// What reads the partition; replaced on every `ReadFrom` and `Follow`.
    reader: Option<Reader>,
    shared: Arc<SharedClient>,
    link: Arc<BrokerLink>,
    group: Option<Arc<GroupOffsets>>,
    errors: LogLimiter,
    bad_input: LogLimiter,
    storage_errors: LogLimiter,
    rereads_deferred: LogLimiter,
    follow_refused: LogLimiter,
    undecodable: UndecodableBatch,
    /// The partition's readiness (`/readyz`).
    health: PartitionHealth,
    /// The thread's heartbeat (`/healthz`).
    beat: Beat,
    /// Test hook only ([`TEST_WEDGE_ENV`]): wedge after the first commit.
    test_wedge: bool,
}

/// Test hook, for the liveness test alone: a partition whose number this
/// environment variable holds stops beating after its first committed
/// batch, as a wedged thread would (it still ends at a stop).
const TEST_WEDGE_ENV: &str = "WEATHERSTREAM_TEST_WEDGE_PARTITION";

/// A record batch the partition cannot decode: one warning per offset, and
/// the offset in the progress, where the supervisor shows the partition as
/// stalled. Nothing is skipped: counting the batch later, or never, is the
/// only exactly-once choice.
struct UndecodableBatch {
    /// The batch's offset once warned about; None while the partition reads.
    at: Option<Offset>,
    progress: Arc<Progress>,
}

impl UndecodableBatch {
    fn refused(&mut self, offset: Offset, error: &KafkaError) {
        if self.at == Some(offset) {
            return;
        }
        self.at = Some(offset);
        self.progress
            .undecodable_at
            .store(offset, Ordering::Relaxed);
        log::warn!(
            "partition {}: STALLED: cannot decode the record batch at offset {offset}: {} (librdkafka: {}); it is fetched again, and nothing after it is counted until it can be read",
            self.progress.partition,
            undecodable(error).unwrap_or("undecodable"),
            error
                .rdkafka_error_code()
                .map_or_else(|| error.to_string(), |code| code.to_string()),
        );
    }

    fn read_again(&mut self) {
        if let Some(offset) = self.at.take() {
            self.progress.undecodable_at.store(-1, Ordering::Relaxed);
            log::warn!(
                "partition {}: reading again past the batch at offset {offset} that could not be decoded",
                self.progress.partition
            );
        }
    }
}

/// What a worker is given besides its partition's state.
pub(super) struct WorkerSetup {
    pub(super) config: ConsumerConfig,
    pub(super) exporter: ToExporter,
    pub(super) progress: Arc<Progress>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shared: Arc<SharedClient>,
    pub(super) link: Arc<BrokerLink>,
    /// Where committed offsets go for the consumer group; None: off.
    pub(super) group: Option<Arc<GroupOffsets>>,
    pub(super) shutdown: Shutdown,
    pub(super) health: PartitionHealth,
}

impl PartitionWorker {
    pub(super) fn new(state: PartitionState, setup: WorkerSetup) -> Self {
        let WorkerSetup {
            config,
            exporter,
            progress,
            metrics: all_metrics,
            shared,
            link,
            group,
            shutdown,
            health,
        } = setup;
        let metrics = all_metrics.partition(progress.partition);
        let partition_label = progress.partition.to_string();
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
            progress: progress.clone(),
            all_metrics,
            shutdown,
            reader: None,
            shared,
            link,
            group,
            errors: LogLimiter::new(NOISY_LOG_INTERVAL),
            bad_input: LogLimiter::new(NOISY_LOG_INTERVAL),
            storage_errors: LogLimiter::new(STORAGE_ERROR_LOG_INTERVAL),
            rereads_deferred: LogLimiter::new(REREAD_DEFERRED_LOG_INTERVAL),
            follow_refused: LogLimiter::new(FOLLOW_REFUSED_LOG_INTERVAL),
            undecodable: UndecodableBatch { at: None, progress },
            beat: health.beat(),
            health,
            test_wedge: std::env::var(TEST_WEDGE_ENV).is_ok_and(|wedged| wedged == partition_label),
        }
    }

    fn partition(&self) -> PartitionId {
        self.progress.partition
    }

    /// Runs until the partition's stop (or the process's); returns the
    /// last committed snapshot. The state is released when this returns.
    pub(super) fn run(mut self) -> anyhow::Result<Arc<Snapshot>> {
        let rechecker = Rechecker::spawn(
            &self.config,
            self.partition(),
            self.observed(format!("verify-{}", self.partition())),
            &self.shutdown,
            self.health.recheck_beat(),
        )?;
        let mut last_lag = Instant::now();
        while !self.shutdown.requested() {
            self.beat.busy();
            if self.test_wedge && self.progress.next_offset.load(Ordering::Relaxed) > 0 {
                self.wedge_for_the_test();
                continue;
            }
            let event = match rechecker.poll() {
                Some(outcome) => Event::Verdict(outcome?),
                None => Event::Tick,
            };
            let actions = self.machine.handle(event, Instant::now());
            self.execute(actions, &rechecker)?;
            if !self.machine.is_reading() {
                continue;
            }
            let Some(reader) = self.reader.take() else {
                return Err(anyhow!("reading without a client (a bug)"));
            };
            let end = self.read_batch(&reader)?;
            self.reader = Some(reader);
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
            self.execute(actions, &rechecker)?;
        }
        Ok(self.state.snapshot())
    }

    /// Carries out the machine's actions in order; a verdict awaited on the
    /// way adds the actions it calls for.
    fn execute(&mut self, actions: Vec<Action>, rechecker: &Rechecker) -> anyhow::Result<()> {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::ReadFrom(offset) => {
                    log::debug!("partition {}: reading from offset {offset}", self.partition());
                    self.read_from(offset)?;
                }
                Action::Follow => self.follow(),
                Action::Ask(request) => rechecker.ask(request)?,
                Action::AwaitVerdict => {
                    // The check may wait out an outage.
                    self.beat.waiting();
                    let verdict = rechecker.wait();
                    self.beat.busy();
                    let Some(outcome) = verdict else {
                        // Shutdown ends a rechecker; anything else is a bug,
                        // and waiting again would spin.
                        if self.shutdown.requested() {
                            return Ok(());
                        }
                        return Err(anyhow!("the rechecker thread stopped"));
                    };
                    queue.extend(self.machine.handle(Event::Verdict(outcome?), Instant::now()));
                }
                Action::Pause(duration) => {
                    self.beat.wait(&self.shutdown, duration);
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
                    self.tell_group(&snapshot);
                    self.metrics.reset();
                    self.machine.set_committed(snapshot.clone());
                    self.publish(CommittedSnapshot::current(snapshot))?;
                }
                Action::Publish { backlog } => self.publish(CommittedSnapshot {
                    snapshot: self.state.snapshot(),
                    backlog,
                })?,
                Action::ReadBack { wanted, from } => {
                    log::info!(
                        "partition {}: the broker did not serve offset {wanted} (it served a later one, or nothing while the log goes on); reading again from offset {from}",
                        self.partition()
                    );
                    self.read_from(from)?;
                }
                Action::ReadBackDeferred { wanted, wait } => {
                    if let Some(suppressed) = self.rereads_deferred.allow(Instant::now()) {
                        log::warn!(
                            "partition {}: offset {wanted} is still not served, and this minute's re-reads are spent; waiting instead of reading more from a broker that may be overloaded{}",
                            self.partition(),
                            suppressed_note(suppressed)
                        );
                    }
                    self.beat.wait(&self.shutdown, wait);
                }
                Action::GapAccepted { from } => log::warn!(
                    "partition {}: offsets from {from} are missing from the log even when read from the start; going on after them",
                    self.partition()
                ),
            }
        }
        Ok(())
    }

    /// The consumer group's offset follows each commit (for Kafka's tools).
    fn tell_group(&self, snapshot: &Snapshot) {
        if let Some(group) = &self.group {
            group.committed(self.partition(), snapshot.next_offset);
        }
    }

    /// A context for a new client, counting its fetch requests as `client`.
    fn observed(&self, client: String) -> ClientObserver {
        ClientObserver::new(self.link.clone(), self.all_metrics.fetch_requests(&client))
    }

    /// Reads on from `offset` with a new client of the partition's own.
    fn read_from(&mut self, offset: Offset) -> anyhow::Result<()> {
        // The old reader first: a partition followed by the shared client
        // is unassigned there before its own client starts.
        self.reader = None;
        let context = self.observed(format!("partition-{}", self.partition()));
        self.reader = Some(Reader::Own(own_client(
            &self.config,
            self.partition(),
            offset,
            context,
        )?));
        Ok(())
    }

    /// Hands the partition to the shared client at its committed offset; if
    /// that fails, reading goes on with the current client.
    fn follow(&mut self) {
        let offset = self.state.snapshot().next_offset;
        match self.shared.follow(self.partition(), offset) {
            Ok(followed) => {
                log::debug!(
                    "partition {}: at the end of its log; following it with the shared client from offset {offset}",
                    self.partition()
                );
                self.reader = Some(Reader::Shared(followed));
            }
            Err(error) => {
                if let Some(suppressed) = self.follow_refused.allow(Instant::now()) {
                    log::warn!(
                        "partition {}: the shared client cannot take it on ({error:#}); reading on with its own client{}",
                        self.partition(),
                        suppressed_note(suppressed)
                    );
                }
                self.machine.follow_refused(Instant::now());
            }
        }
    }

    /// Reads one batch, commits what it counted, and returns how it ended.
    fn read_batch(&mut self, reader: &Reader) -> anyhow::Result<Event> {
        let partition = self.partition();
        let mut batch = self.machine.batch();
        while batch.wants_more() {
            if batch.clock_due() && batch.clock(Instant::now()) == Flow::Stop {
                break;
            }
            let Some(polled) = reader.poll(batch.poll_wait()) else {
                break;
            };
            let flow = match polled {
                Ok(message) => {
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
                Err(error) if undecodable(&error).is_some() => {
                    self.undecodable.refused(batch.next_offset(), &error);
                    batch.poll_error(PollError::Undecodable)
                }
                Err(error) if is_outage(&error) => {
                    self.link.report(&error, &error);
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
        if batch.next_offset() > self.undecodable.at.unwrap_or(Offset::MAX) {
            self.undecodable.read_again();
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
                        self.tell_group(&snapshot);
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
            high_watermark: reader.high_watermark(&self.config.topic, partition),
            broker_responses: reader.broker_responses(),
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
                    | StateError::Sync { .. }
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
                    if self.beat.wait(&self.shutdown, retry.after_failure()) {
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
            .store(stalled, Ordering::Relaxed);
        self.metrics.set_storage_stalled(stalled);
        self.health.set_storage_stalled(stalled);
    }

    /// Test hook ([`TEST_WEDGE_ENV`]): busy without a beat until the stop.
    fn wedge_for_the_test(&self) {
        log::warn!(
            "partition {}: wedged on purpose ({TEST_WEDGE_ENV}, a test hook)",
            self.partition()
        );
        while !self.shutdown.wait(Duration::from_millis(50)) {}
    }

    fn publish(&self, committed: CommittedSnapshot) -> anyhow::Result<()> {
        Ok(self.exporter.publish(committed)?)
    }
}
