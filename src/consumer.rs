//! The consumer: one worker thread per assigned partition, each reading its
//! partition with manual assignment from the offset stored in that
//! partition's sled state, folding each batch and committing statistics and
//! next offset in one transaction, then handing the committed snapshot to
//! the exporter. Kafka's consumer-group offsets are never used: the offset
//! lives with the state it describes, which is what makes a restart after
//! `kill -9` count every report exactly once.
//!
//! A stored offset may point into a different topic after the producer
//! deleted and re-created it. Each commit stores a fingerprint of the last
//! record; the worker checks it (and an older, already verified anchor)
//! against the topic at start-up, periodically, and whenever something looks
//! off (offset out of range, unknown partition, a report older than the
//! statistics). A missing or different record means re-creation: the
//! partition's state is reset and the new topic is read from offset 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use crossbeam_channel::Sender;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;

use crate::aggregate::{Aggregates, BatchFold, MonthYear};
use crate::export::{self, partition_file, Committed, Exporter};
use crate::kafka::{cached_high_watermark, client_config, Offset, PartitionId, TopicAdmin};
use crate::report::Validator;
use crate::shutdown::Shutdown;
use crate::state::{BatchCommit, Fingerprint, PartitionState, Snapshot};

/// What `consumer` is asked to do.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    pub files_dir: PathBuf,
    pub state_dir: PathBuf,
    pub partitions: Vec<PartitionId>,
    /// Most reports in one batch (one transaction).
    pub max_batch: usize,
    /// Longest a batch keeps collecting once it has a report.
    pub batch_timeout_ms: u64,
    /// How often a running worker re-checks that its topic was not re-created.
    pub verify_interval: Duration,
    /// Progress lines every this often; None: quiet.
    pub progress_interval: Option<Duration>,
    /// Re-render month.svg after publishing.
    pub render_chart: bool,
}

impl ConsumerConfig {
    /// Defaults for everything but the connection, folders and partitions.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        topic: impl Into<String>,
        files_dir: PathBuf,
        state_dir: PathBuf,
        partitions: Vec<PartitionId>,
    ) -> Self {
        ConsumerConfig {
            bootstrap_servers: bootstrap_servers.into(),
            topic: topic.into(),
            files_dir,
            state_dir,
            partitions,
            max_batch: 10_000,
            batch_timeout_ms: 100,
            verify_interval: Duration::from_secs(5),
            progress_interval: Some(Duration::from_secs(10)),
            render_chart: true,
        }
    }
}

/// Live counters of one worker, read by the progress reporter.
#[derive(Debug)]
pub struct Progress {
    pub partition: PartitionId,
    pub next_offset: AtomicI64,
    pub duplicates: AtomicU64,
    pub malformed: AtomicU64,
    /// High watermark minus next offset; -1 when the broker has not said.
    pub lag: AtomicI64,
}

impl Progress {
    fn new(snapshot: &Snapshot) -> Self {
        let this = Progress {
            partition: snapshot.partition,
            next_offset: AtomicI64::new(0),
            duplicates: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
        };
        this.update(snapshot);
        this
    }

    fn update(&self, snapshot: &Snapshot) {
        self.next_offset
            .store(snapshot.next_offset, Ordering::Relaxed);
        self.duplicates
            .store(snapshot.counters.duplicates, Ordering::Relaxed);
        self.malformed
            .store(snapshot.counters.malformed, Ordering::Relaxed);
    }
}

/// How often a worker refreshes its lag, for the progress lines.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Checks partition numbers: at least one, no repeats, none negative.
pub fn check_partition_list(partitions: &[PartitionId]) -> Result<(), String> {
    if partitions.is_empty() {
        return Err("give at least one partition".into());
    }
    for (i, p) in partitions.iter().enumerate() {
        if *p < 0 {
            return Err(format!("partition {p} is negative"));
        }
        if partitions[..i].contains(p) {
            return Err(format!("partition {p} is given twice"));
        }
    }
    Ok(())
}

/// Runs the consumer until shutdown; returns the first worker error.
pub fn run(config: &ConsumerConfig, shutdown: &Shutdown) -> anyhow::Result<()> {
    check_partition_list(&config.partitions).map_err(|e| anyhow!(e))?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state folder {}", config.state_dir.display()))?;
    // Claim every partition first: a second process fails before touching anything.
    let mut states = Vec::new();
    for &partition in &config.partitions {
        states.push(PartitionState::open(&config.state_dir, partition)?);
    }
    if let Err(e) = std::fs::create_dir_all(&config.files_dir) {
        log::error!(
            "cannot create files folder {}: {e}",
            config.files_dir.display()
        );
    }

    let admin = TopicAdmin::connect(&config.bootstrap_servers)?;
    let Some(partition_count) = wait_for_topic(&admin, &config.topic, shutdown)? else {
        return Ok(());
    };
    drop(admin);
    let invalid: Vec<_> = config
        .partitions
        .iter()
        .filter(|p| usize::try_from(**p).map_or(true, |p| p >= partition_count))
        .collect();
    if !invalid.is_empty() {
        let valid: Vec<String> = (0..partition_count).map(|p| p.to_string()).collect();
        bail!(
            "topic {:?} has no partition {} (valid: {})",
            config.topic,
            invalid
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            valid.join(", ")
        );
    }

    let exporter = Exporter::spawn(config.files_dir.clone(), config.render_chart)
        .context("starting the exporter thread")?;
    let mut workers = Vec::new();
    for mut state in states {
        reconcile_at_start(config, &mut state)?;
        let snapshot = state.snapshot();
        let progress = Arc::new(Progress::new(&snapshot));
        exporter
            .sender()
            .send(Committed::current(snapshot))
            .map_err(|_| anyhow!("exporter stopped"))?;
        let worker = PartitionWorker {
            config: config.clone(),
            state,
            exporter: exporter.sender(),
            progress: progress.clone(),
            shutdown: shutdown.clone(),
            gap: None,
            accepted_gap: None,
            errors: LogLimiter::new(),
            bad_input: LogLimiter::new(),
            validator: Validator::default(),
        };
        workers.push(WorkerHandle::spawn(worker, progress)?);
    }

    let result = supervise(config, &mut workers, shutdown);
    shutdown.request();
    let mut first_error = result.err();
    for worker in workers {
        if let Err(e) = worker.join() {
            first_error.get_or_insert(e);
        }
    }
    exporter.finish();
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Waits until the topic is listed; None if shutdown came first.
fn wait_for_topic(
    admin: &TopicAdmin,
    topic: &str,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<usize>> {
    let mut told = false;
    loop {
        if let Some(count) = admin.partition_count(topic)? {
            return Ok(Some(count));
        }
        if !told {
            log::info!("topic {topic:?} does not exist yet; waiting for it");
            told = true;
        }
        if shutdown.wait(Duration::from_millis(500)) {
            return Ok(None);
        }
    }
}

/// The assignment's start-up rules, with sled as the source of truth.
fn reconcile_at_start(config: &ConsumerConfig, state: &mut PartitionState) -> anyhow::Result<()> {
    if state.is_initialized() {
        return Ok(());
    }
    let partition = state.snapshot().partition;
    let path = partition_file(&config.files_dir, partition);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let published = export::parse_partition_json(&text).map_err(|e| {
                anyhow!(
                    "{} is not a valid partition file ({e}); it was left untouched: \
                     fix it, or move it away to start partition {partition} afresh",
                    path.display()
                )
            })?;
            if published.partition != partition {
                bail!(
                    "{} says it is partition {}, not {partition}; it was left untouched",
                    path.display(),
                    published.partition
                );
            }
            log::info!(
                "partition {partition}: imported {} (offset {}, {} month/years)",
                path.display(),
                published.offset,
                published.aggregates.len()
            );
            state.initialize(published.offset, published.aggregates, 0)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            state.initialize(0, Aggregates::new(), 0)?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(())
}

fn supervise(
    config: &ConsumerConfig,
    workers: &mut [WorkerHandle],
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut last_report = Instant::now();
    let mut last_offsets: Vec<Offset> = workers
        .iter()
        .map(|w| w.progress.next_offset.load(Ordering::Relaxed))
        .collect();
    while !shutdown.wait(Duration::from_millis(100)) {
        if workers.iter().any(|w| w.is_finished()) {
            return Ok(());
        }
        let Some(interval) = config.progress_interval else {
            continue;
        };
        if last_report.elapsed() < interval {
            continue;
        }
        let seconds = last_report.elapsed().as_secs_f64();
        last_report = Instant::now();
        for (worker, last) in workers.iter().zip(last_offsets.iter_mut()) {
            let p = &worker.progress;
            let next = p.next_offset.load(Ordering::Relaxed);
            let rate = (next - *last).max(0) as f64 / seconds;
            *last = next;
            let lag = match p.lag.load(Ordering::Relaxed) {
                l if l < 0 => "unknown".to_string(),
                l => l.to_string(),
            };
            log::info!(
                "partition {}: next offset {next}, {rate:.1} reports/s, {} duplicates dropped, {} malformed skipped, lag {lag}",
                p.partition,
                p.duplicates.load(Ordering::Relaxed),
                p.malformed.load(Ordering::Relaxed),
            );
        }
    }
    Ok(())
}

/// A named worker thread and its counters.
struct WorkerHandle {
    partition: PartitionId,
    progress: Arc<Progress>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl WorkerHandle {
    fn spawn(worker: PartitionWorker, progress: Arc<Progress>) -> anyhow::Result<Self> {
        let partition = progress.partition;
        let thread = std::thread::Builder::new()
            .name(format!("partition-{partition}"))
            .spawn(move || worker.run())
            .context("starting a partition worker")?;
        Ok(WorkerHandle {
            partition,
            progress,
            thread,
        })
    }

    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn join(self) -> anyhow::Result<()> {
        let partition = self.partition;
        self.thread
            .join()
            .map_err(|_| anyhow!("partition {partition} worker panicked"))?
            .with_context(|| format!("partition {partition}"))
    }
}

/// How long a worker gets nothing, with the log going on, before it reads
/// from earlier offsets (see [`REFETCH_BACK`]).
const FETCH_STALL: Duration = Duration::from_secs(1);

fn partition_consumer(bootstrap_servers: &str) -> anyhow::Result<BaseConsumer> {
    client_config(bootstrap_servers)
        // Needed by librdkafka; assign() joins no group and commits nothing.
        .set("group.id", "weatherstream-consumer")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // An offset outside the log is a question for us (re-created
        // topic?), never something to silently jump over.
        .set("auto.offset.reset", "error")
        .set("allow.auto.create.topics", "false")
        // A broker that answers a waiting fetch as soon as data arrives
        // (Apache Kafka) makes this only the idle poll period; tansu answers
        // when the wait is over, so it bounds the delay a report sees. Idle,
        // a consumer of 4 partitions uses 3% of a core at 5 ms (2% at 20).
        .set("fetch.wait.max.ms", "5")
        // librdkafka prefetches up to 100,000 messages per partition by
        // default; one batch (--max-batch, 10,000) is enough, and each
        // worker has its own client.
        .set("queued.min.messages", "10000")
        .set("queued.max.messages.kbytes", "4096")
        // When the prefetch queue is over those limits librdkafka waits
        // this long before fetching again (default 1 s): a worker empties
        // its queue in milliseconds, so the default idled catch-up 2/3 of
        // the time.
        .set("fetch.queue.backoff.ms", "10")
        // librdkafka allocates a ~280-byte structure per message of a fetch
        // response at once. Some brokers (tansu) ignore the per-partition
        // limit and answer with megabytes; this total caps a response, so
        // one client's queue stays a few MiB. A larger record batch still
        // comes whole (Kafka since 0.10.1). message.max.bytes must not
        // exceed it; a consumer does not otherwise use it.
        .set("fetch.max.bytes", "524288")
        .set("message.max.bytes", "524288")
        .create()
        .context("creating a Kafka consumer")
}

fn assign(
    consumer: &BaseConsumer,
    topic: &str,
    partition: PartitionId,
    offset: Offset,
) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    consumer.assign(&list).context("assigning the partition")?;
    Ok(())
}

/// Errors after which the stored offset must be checked against the topic.
fn needs_verification(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

/// What the topic holds at one offset.
#[derive(Debug, PartialEq)]
enum Probed {
    Found(Fingerprint),
    /// The log does not hold this offset (any more).
    Missing,
    /// The topic or partition is not listed: deleted, not yet re-created.
    Absent,
    /// No answer in time.
    Unknown,
}

/// Longest one forward read of a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// Silence after reading records that means the log ends there.
const PROBE_QUIET: Duration = Duration::from_secs(2);

/// Reads single records by offset, for verification.
struct RecordProbe {
    consumer: BaseConsumer,
    topic: String,
    partition: PartitionId,
    /// Probes end early on shutdown, so the worker can join its verifier.
    shutdown: Shutdown,
}

impl RecordProbe {
    fn new(
        bootstrap_servers: &str,
        topic: &str,
        partition: PartitionId,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let consumer = client_config(bootstrap_servers)
            .set("group.id", "weatherstream-probe")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true")
            .set("allow.auto.create.topics", "false")
            .set("fetch.wait.max.ms", "20")
            // It reads one record at a time: keep its buffers small.
            .set("queued.min.messages", "1000")
            .set("queued.max.messages.kbytes", "256")
            .set("max.partition.fetch.bytes", "65536")
            .set("fetch.max.bytes", "65536")
            .set("message.max.bytes", "65536")
            .create()
            .context("creating the verification consumer")?;
        Ok(RecordProbe {
            consumer,
            topic: topic.into(),
            partition,
            shutdown: shutdown.clone(),
        })
    }

    fn partition_listed(&self) -> anyhow::Result<Option<bool>> {
        // List all topics: naming the topic can make a broker auto-create it.
        let metadata = match self.consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        Ok(Some(metadata.topics().iter().any(|t| {
            t.name() == self.topic
                && t.error().is_none()
                && t.partitions().iter().any(|p| p.id() == self.partition)
        })))
    }

    /// What the topic holds at `offset`. "Missing" needs proof: records
    /// before the offset were read, and then the log passed the offset or
    /// ended without it. Brokers differ in where a fetch starts (Kafka: at
    /// the record; tansu's in-memory engine: at the next batch boundary), so
    /// reads start ever further back until one gives an answer.
    fn record_at(&self, offset: Offset) -> anyhow::Result<Probed> {
        match self.partition_listed()? {
            None => return Ok(Probed::Unknown),
            Some(false) => return Ok(Probed::Absent),
            Some(true) => {}
        }
        let mut result = Probed::Unknown;
        let mut tried: Vec<Offset> = Vec::new();
        for back in [0, 1_000, 10_000, 100_000, Offset::MAX] {
            let from = offset.saturating_sub(back).max(0);
            if tried.contains(&from) {
                continue;
            }
            tried.push(from);
            match self.read_from(from, offset)? {
                Read::Found(fp) => result = Probed::Found(fp),
                Read::Absent => result = Probed::Absent,
                Read::Passed { saw_before: true } | Read::Ended { saw_before: true } => {
                    result = Probed::Missing
                }
                // An empty partition, or one whose records up to here are gone.
                Read::Ended { saw_before: false } | Read::Passed { saw_before: false }
                    if from == 0 =>
                {
                    result = Probed::Missing
                }
                // The read started after the offset, or saw nothing: go back.
                Read::Passed { saw_before: false } | Read::Ended { saw_before: false } => continue,
                // Nothing at all: some brokers say nothing for an offset in
                // the middle of their last batch; earlier starts tell.
                Read::Stalled if from > 0 => continue,
                Read::Stalled => result = Probed::Unknown,
            }
            break;
        }
        log::debug!(
            "probe of partition {} offset {offset}: {result:?}",
            self.partition
        );
        Ok(result)
    }

    /// Reads forward from `from` until the record at `offset`, a record past
    /// it, or the end of the log.
    fn read_from(&self, from: Offset, offset: Offset) -> anyhow::Result<Read> {
        assign(&self.consumer, &self.topic, self.partition, from)?;
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut saw_before = false;
        let result = loop {
            // Quiet for a while after reading records: the log ends there. A
            // broker that sends nothing at all is asked again later instead.
            let quiet = last_progress.elapsed();
            if self.shutdown.requested() {
                break Read::Stalled;
            }
            if quiet >= PROBE_QUIET {
                break if saw_before {
                    Read::Ended { saw_before }
                } else {
                    Read::Stalled
                };
            }
            if started.elapsed() >= PROBE_TIMEOUT {
                break if saw_before {
                    Read::Ended { saw_before }
                } else {
                    Read::Stalled
                };
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(message)) if message.offset() == offset => {
                    break Read::Found(Fingerprint::of(offset, message.key(), message.payload()))
                }
                Some(Ok(message)) if message.offset() > offset => {
                    break Read::Passed { saw_before }
                }
                Some(Ok(_)) => {
                    saw_before = true;
                    last_progress = Instant::now();
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break Read::Ended { saw_before },
                Some(Err(e)) if needs_verification(&e) => {
                    break match e.rdkafka_error_code() {
                        Some(
                            RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                        ) => Read::Ended { saw_before },
                        _ => Read::Absent,
                    }
                }
                Some(Err(e)) => {
                    log::debug!("probe of partition {} offset {offset}: {e}", self.partition)
                }
            }
        };
        self.consumer.unassign().context("unassigning the probe")?;
        Ok(result)
    }
}

/// What one forward read from some offset showed.
#[derive(Debug)]
enum Read {
    Found(Fingerprint),
    /// A record past the offset came before the offset did.
    Passed {
        saw_before: bool,
    },
    /// The log ended (end of partition, out of range, or quiet after records).
    Ended {
        saw_before: bool,
    },
    /// The topic or partition is not there.
    Absent,
    /// Nothing at all arrived for a while.
    Stalled,
}

/// A question for the verifier: does the topic still hold these records?
struct CheckRequest {
    expected: Vec<Fingerprint>,
    /// With nothing to compare (imported state), the record here only has
    /// to exist, and becomes the anchor.
    adopt_offset: Offset,
    /// Becomes the anchor when every expected record is found.
    last_record: Option<Fingerprint>,
}

/// The verifier's answer.
#[derive(Debug)]
enum CheckOutcome {
    Current { anchor: Option<Fingerprint> },
    Gone { offset: Offset },
    Undecided,
}

/// Probes the topic for a request's records; waits while the topic is
/// absent (deleted, not yet re-created).
fn check_records(
    probe: &RecordProbe,
    request: &CheckRequest,
    shutdown: &Shutdown,
) -> anyhow::Result<CheckOutcome> {
    let mut told_absent = false;
    let mut probe_until_settled = |offset: Offset| -> anyhow::Result<Option<Probed>> {
        loop {
            match probe.record_at(offset)? {
                Probed::Absent => {
                    if !told_absent {
                        log::warn!(
                            "partition {}: topic {:?} is not there (deleted?); waiting for it",
                            probe.partition,
                            probe.topic
                        );
                        told_absent = true;
                    }
                    if shutdown.wait(Duration::from_millis(500)) {
                        return Ok(None);
                    }
                }
                Probed::Unknown => return Ok(None),
                settled => return Ok(Some(settled)),
            }
        }
    };
    if request.expected.is_empty() {
        return Ok(match probe_until_settled(request.adopt_offset)? {
            Some(Probed::Found(fp)) => CheckOutcome::Current { anchor: Some(fp) },
            Some(_) => CheckOutcome::Gone {
                offset: request.adopt_offset,
            },
            None => CheckOutcome::Undecided,
        });
    }
    for expected in &request.expected {
        match probe_until_settled(expected.offset)? {
            Some(Probed::Found(fp)) if fp == *expected => {}
            Some(_) => {
                return Ok(CheckOutcome::Gone {
                    offset: expected.offset,
                })
            }
            None => return Ok(CheckOutcome::Undecided),
        }
    }
    Ok(CheckOutcome::Current {
        anchor: request.last_record,
    })
}

/// A partition's verifier thread (`verify-N`): answers check requests with
/// its own Kafka client, so that routine checks never pause consumption.
struct Verifier {
    requests: Option<Sender<CheckRequest>>,
    answers: crossbeam_channel::Receiver<anyhow::Result<CheckOutcome>>,
    thread: Option<JoinHandle<()>>,
    busy: bool,
}

impl Verifier {
    fn spawn(
        bootstrap_servers: &str,
        topic: &str,
        partition: PartitionId,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let probe = RecordProbe::new(bootstrap_servers, topic, partition, shutdown)?;
        let (requests, inbox) = crossbeam_channel::bounded::<CheckRequest>(1);
        let (outbox, answers) = crossbeam_channel::bounded(1);
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(format!("verify-{partition}"))
            .spawn(move || {
                for request in inbox {
                    if outbox
                        .send(check_records(&probe, &request, &shutdown))
                        .is_err()
                    {
                        break;
                    }
                }
            })
            .context("starting a verifier thread")?;
        Ok(Verifier {
            requests: Some(requests),
            answers,
            thread: Some(thread),
            busy: false,
        })
    }

    fn busy(&self) -> bool {
        self.busy
    }

    fn ask(&mut self, request: CheckRequest) -> anyhow::Result<()> {
        self.requests
            .as_ref()
            .and_then(|r| r.send(request).ok())
            .ok_or_else(|| anyhow!("the verifier thread stopped"))?;
        self.busy = true;
        Ok(())
    }

    /// The answer, if one is ready.
    fn poll(&mut self) -> Option<anyhow::Result<CheckOutcome>> {
        let answer = self.answers.try_recv().ok()?;
        self.busy = false;
        Some(answer)
    }

    /// Waits for the answer; None if the thread is gone.
    fn wait(&mut self) -> Option<anyhow::Result<CheckOutcome>> {
        let answer = self.answers.recv().ok();
        self.busy = false;
        answer
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// The stored offset belongs to the topic as it is now.
    Current,
    /// The topic was re-created; the state was reset to offset 0.
    Reset,
    /// No conclusion (broker slow, or shutting down); ask again later.
    Undecided,
}

/// Rate-limits a kind of log line to one per interval, counting the rest.
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> Self {
        LogLimiter {
            last: None,
            suppressed: 0,
        }
    }

    fn allow(&mut self) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct PartitionWorker {
    config: ConsumerConfig,
    state: PartitionState,
    exporter: Sender<Committed>,
    progress: Arc<Progress>,
    shutdown: Shutdown,
    /// The offset the broker just skipped past, for the run loop to re-read.
    gap: Option<Offset>,
    /// A gap that reading from the start confirmed: compaction or markers.
    accepted_gap: Option<Offset>,
    /// Rate limits for consumer errors and for malformed-message lines,
    /// kept across batches.
    errors: LogLimiter,
    bad_input: LogLimiter,
    validator: Validator,
}

/// How far back the worker re-reads, step by step, when the broker skips
/// past the offset it asked for or answers nothing for it.
const REFETCH_BACK: [Offset; 4] = [1_000, 10_000, 100_000, Offset::MAX];

/// Why a batch ended early and the partition needs a check.
struct Trigger {
    reason: String,
    /// The record that raised it, if one did; after a passed check it is
    /// processed normally.
    at_offset: Option<Offset>,
}

impl PartitionWorker {
    fn partition(&self) -> PartitionId {
        self.progress.partition
    }

    fn run(mut self) -> anyhow::Result<()> {
        let partition = self.partition();
        let topic = self.config.topic.clone();
        let mut verifier = Verifier::spawn(
            &self.config.bootstrap_servers,
            &topic,
            partition,
            &self.shutdown,
        )?;
        let mut verdict = self.verify_now(&mut verifier, "start-up")?;
        while verdict == Verdict::Undecided && !self.shutdown.requested() {
            self.shutdown.wait(Duration::from_secs(1));
            verdict = self.verify_now(&mut verifier, "start-up")?;
        }
        let mut consumer = self.client_at(self.state.snapshot().next_offset)?;
        let mut last_verify = Instant::now();
        let mut trigger: Option<Trigger> = None;
        // Records at or below this offset passed a check already.
        let mut cleared_through: Offset = -1;
        let mut last_lag = Instant::now();
        // The gap being re-read, and how far back the last re-read started.
        let mut refetch: Option<(Offset, usize)> = None;
        // The offset reached, and since when nothing came.
        let mut progressed = (self.state.snapshot().next_offset, Instant::now());
        while !self.shutdown.requested() {
            let mut verdict = None;
            if let Some(t) = &trigger {
                // Read nothing more until the question is settled.
                let reason = t.reason.clone();
                match self.verify_now(&mut verifier, &reason)? {
                    Verdict::Undecided => {
                        self.shutdown.wait(Duration::from_millis(500));
                        continue;
                    }
                    settled => {
                        let cleared = trigger.take().and_then(|t| t.at_offset).unwrap_or(-1);
                        cleared_through = cleared_through.max(cleared);
                        verdict = Some(settled);
                    }
                }
                last_verify = Instant::now();
            } else if let Some(outcome) = verifier.poll() {
                // A routine check ran beside consumption; a reset discards
                // whatever was read meanwhile.
                if self.apply(outcome?, "periodic check")? == Verdict::Reset {
                    verdict = Some(Verdict::Reset);
                }
            } else if !verifier.busy() && last_verify.elapsed() >= self.config.verify_interval {
                last_verify = Instant::now();
                if let Some(request) = self.check_request() {
                    verifier.ask(request)?;
                }
            }
            if let Some(verdict) = verdict {
                if verdict == Verdict::Reset {
                    cleared_through = -1;
                }
                // A fresh client: after a re-creation the old one may hold
                // stale metadata or an error state.
                consumer = self.client_at(self.state.snapshot().next_offset)?;
            }
            trigger = self.consume_batch(&consumer, cleared_through)?;
            let next_offset = self.progress.next_offset.load(Ordering::Relaxed);
            if next_offset != progressed.0 {
                progressed = (next_offset, Instant::now());
            } else if self.gap.is_none()
                && next_offset > 0
                && progressed.1.elapsed() >= FETCH_STALL
                && cached_high_watermark(&consumer, &topic, partition)
                    .is_some_and(|high| high > next_offset)
            {
                // Nothing arrives although the log goes on: tansu's
                // in-memory engine answers nothing for an offset inside a
                // record batch when no later batch exists. Like a skip past
                // the offset, read from earlier, step by step (the last
                // counted record is compared on the way: see consume_batch),
                // but never give up on the offset for it.
                progressed.1 = Instant::now();
                let tried_all = refetch
                    .is_some_and(|(at, step)| at == next_offset && step + 1 >= REFETCH_BACK.len());
                if !tried_all {
                    self.gap = Some(next_offset);
                }
            }
            if let Some(expected) = self.gap.take() {
                let step = match refetch {
                    Some((at, step)) if at == expected => step + 1,
                    _ => 0,
                };
                if let Some(back) = REFETCH_BACK.get(step) {
                    refetch = Some((expected, step));
                    consumer = self.client_at(expected.saturating_sub(*back).max(0))?;
                } else {
                    log::warn!("partition {partition}: offsets from {expected} are missing from the log even when read from the start; going on after them");
                    self.accepted_gap = Some(expected);
                }
            }
            if last_lag.elapsed() >= LAG_INTERVAL {
                last_lag = Instant::now();
                self.refresh_lag(&consumer);
            }
        }
        Ok(())
    }

    /// A new client reading this partition from `offset`.
    fn client_at(&self, offset: Offset) -> anyhow::Result<BaseConsumer> {
        let consumer = partition_consumer(&self.config.bootstrap_servers)?;
        assign(&consumer, &self.config.topic, self.partition(), offset)?;
        Ok(consumer)
    }

    /// What to check: the verified anchor and the last record, or for
    /// imported state (no fingerprints) the record before the offset.
    fn check_request(&self) -> Option<CheckRequest> {
        let snapshot = self.state.snapshot();
        if snapshot.next_offset == 0 {
            return None;
        }
        let mut expected: Vec<Fingerprint> = snapshot.anchor.into_iter().collect();
        expected.extend(snapshot.last_record.filter(|r| Some(*r) != snapshot.anchor));
        Some(CheckRequest {
            expected,
            adopt_offset: snapshot.next_offset - 1,
            last_record: snapshot.last_record,
        })
    }

    /// Checks now and waits for the answer (start-up, and after a trigger).
    fn verify_now(&mut self, verifier: &mut Verifier, reason: &str) -> anyhow::Result<Verdict> {
        // A routine check may be under way; its answer counts too.
        if verifier.busy() {
            if let Some(outcome) = verifier.wait() {
                if self.apply(outcome?, reason)? == Verdict::Reset {
                    return Ok(Verdict::Reset);
                }
            }
        }
        let Some(request) = self.check_request() else {
            return Ok(Verdict::Current);
        };
        verifier.ask(request)?;
        match verifier.wait() {
            Some(outcome) => self.apply(outcome?, reason),
            None => Ok(Verdict::Undecided),
        }
    }

    /// Acts on a check's answer: a new anchor, or a reset.
    fn apply(&mut self, outcome: CheckOutcome, reason: &str) -> anyhow::Result<Verdict> {
        match outcome {
            CheckOutcome::Undecided => Ok(Verdict::Undecided),
            CheckOutcome::Current { anchor } => {
                if let Some(anchor) = anchor {
                    self.state.set_anchor(anchor)?;
                }
                Ok(Verdict::Current)
            }
            CheckOutcome::Gone { offset } => {
                log::warn!(
                    "partition {}: topic {:?} was re-created (the record at offset {offset} is gone or different; noticed by {reason}); \
                     resetting this partition's statistics from offset {} to 0",
                    self.partition(),
                    self.config.topic,
                    self.state.snapshot().next_offset
                );
                let snapshot = self.state.reset()?;
                self.progress.update(&snapshot);
                self.publish(Committed::current(snapshot))?;
                Ok(Verdict::Reset)
            }
        }
    }

    /// Updates the lag from the watermark of the last fetch response.
    fn refresh_lag(&self, consumer: &BaseConsumer) {
        if let Some(high) = cached_high_watermark(consumer, &self.config.topic, self.partition()) {
            let next = self.progress.next_offset.load(Ordering::Relaxed);
            self.progress
                .lag
                .store((high - next).max(0), Ordering::Relaxed);
        }
    }

    fn publish(&self, committed: Committed) -> anyhow::Result<()> {
        self.exporter
            .send(committed)
            .map_err(|_| anyhow!("the exporter stopped"))
    }

    /// Reads one batch, commits it, and returns a trigger if one came up.
    fn consume_batch(
        &mut self,
        consumer: &BaseConsumer,
        cleared_through: Offset,
    ) -> anyhow::Result<Option<Trigger>> {
        let snapshot = self.state.snapshot();
        let partition = self.partition();
        let mut fold = BatchFold::new(&snapshot.aggregates);
        let mut next_offset = snapshot.next_offset;
        let mut last_message: Option<BorrowedMessage<'_>> = None;
        let mut malformed = 0u64;
        let mut trigger = None;
        let mut seen = 0usize;
        let mut wait = Duration::from_millis(100);
        let mut deadline: Option<Instant> = None;
        while seen < self.config.max_batch {
            // Reading the clock per message shows in profiles: check every 128.
            if seen % 128 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let Some(result) = consumer.poll(wait) else {
                break;
            };
            let message: BorrowedMessage<'_> = match result {
                Ok(message) => message,
                Err(error) if needs_verification(&error) => {
                    trigger = Some(Trigger {
                        reason: format!("consumer error: {error}"),
                        at_offset: None,
                    });
                    break;
                }
                Err(error) => {
                    if let Some(suppressed) = self.errors.allow() {
                        log::warn!(
                            "partition {partition}: {error} ({suppressed} similar suppressed)"
                        );
                    }
                    if seen == 0 {
                        // Nothing read yet: do not spin on a failing broker.
                        self.shutdown.wait(Duration::from_millis(100));
                    }
                    break;
                }
            };
            let offset = message.offset();
            if offset < next_offset {
                // Already counted (re-delivered after a seek, or read again
                // from earlier): skip. The last counted record must still
                // be the one counted; if not, the topic was re-created.
                let counted = snapshot.last_record.filter(|fp| fp.offset == offset);
                if counted.is_some_and(|fp| {
                    fp != Fingerprint::of(offset, message.key(), message.payload())
                }) {
                    trigger = Some(Trigger {
                        reason: format!(
                            "the record at offset {offset} differs from the one counted"
                        ),
                        at_offset: None,
                    });
                    break;
                }
                continue;
            }
            if offset > next_offset && self.accepted_gap != Some(next_offset) {
                // A broker that serves from batch boundaries (tansu's
                // in-memory engine, after a restart mid-batch) starts after
                // the offset asked for: read again from earlier.
                self.gap = Some(next_offset);
                break;
            }
            if deadline.is_none() {
                deadline =
                    Some(Instant::now() + Duration::from_millis(self.config.batch_timeout_ms));
                // Take what is already fetched, without waiting for more.
                wait = Duration::ZERO;
            }
            match self.validator.validate(message.key(), message.payload()) {
                Ok(valid) => {
                    let recorded_end = fold.current(MonthYear::of(valid.date)).map(|s| s.end);
                    if recorded_end.is_some_and(|end| valid.date < end) && offset > cleared_through
                    {
                        // Retries repeat the last date, never an older one:
                        // this smells of a re-created topic. Stop before it.
                        trigger = Some(Trigger {
                            reason: format!("report for {} at offset {offset} is older than recorded statistics", valid.date),
                            at_offset: Some(offset),
                        });
                        break;
                    }
                    fold.add(&valid);
                }
                Err(reason) => {
                    malformed += 1;
                    if let Some(suppressed) = self.bad_input.allow() {
                        log::warn!(
                            "partition {partition} offset {offset}: skipped malformed message: {reason}{}",
                            if suppressed > 0 { format!(" ({suppressed} more suppressed)") } else { String::new() }
                        );
                    }
                }
            }
            next_offset = offset + 1;
            // Kept, not hashed: only the batch's last record is remembered.
            last_message = Some(message);
            seen += 1;
        }
        let last_record = last_message.map(|m| Fingerprint::of(m.offset(), m.key(), m.payload()));
        if next_offset != snapshot.next_offset {
            let counted = fold.counted;
            let duplicates = fold.duplicates;
            let committed = self.state.commit(BatchCommit {
                touched: fold.into_touched(),
                counted,
                duplicates,
                malformed,
                next_offset,
                last_record,
            })?;
            self.progress.update(&committed);
            // Behind the end of the log (as of the last fetch response):
            // this snapshot will soon be outdated.
            let behind = cached_high_watermark(consumer, &self.config.topic, partition)
                .is_some_and(|high| high > next_offset);
            self.publish(Committed {
                snapshot: committed,
                backlog: behind || seen == self.config.max_batch,
            })?;
        }
        Ok(trigger)
    }
}
