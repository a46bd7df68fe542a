//! The consumer: one worker thread per assigned partition, each reading its
//! partition with manual assignment from the offset stored in that
//! partition's sled state, folding each batch and committing statistics and
//! next offset in one transaction, then handing the committed snapshot to
//! the exporter. Kafka's consumer-group offsets are never used: the offset
//! lives with the state it describes, which is what makes a restart after
//! `kill -9` count every report exactly once.
//!
//! This module owns the process-level part: claiming the partitions, the
//! start-up rules for files and state, starting and supervising the
//! workers, and the progress lines. A worker is split in three:
//! - [`machine`]: every decision, as a state machine without I/O (what a
//!   batch counts, when to check for a re-created topic, when to reset,
//!   when to read again from earlier offsets, which client reads);
//! - [`worker`]: the I/O shell that carries the decisions out (librdkafka
//!   client, sled commit, exporter hand-off);
//! - [`verify`]: the verifier thread and its record probe, which tell
//!   whether stored fingerprints are still in the topic.
//!
//! [`clients`] owns the Kafka clients the workers read with: one of a
//! partition's own while it catches up, and one shared by the process for
//! every partition at the end of its log.

mod clients;
mod group_offsets;
mod machine;
mod stall;
mod verify;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::aggregate::Aggregates;
use crate::atomic_file;
use crate::broker_link::BrokerLink;
use crate::exporter::{Committed, Exporter};
use crate::kafka::{ClientSettings, Offset, PartitionId, TopicAdmin, DEFAULT_GROUP_ID};
use crate::metrics::{Metrics, PartitionMetrics};
use crate::proof;
use crate::published::{self, partition_file};
use crate::shutdown::Shutdown;
use crate::state::{self, PartitionState, Snapshot, StateError};
use crate::web::WebConfig;
use clients::{Observed, SharedClient};
use group_offsets::GroupCommitter;
use machine::{CheckOutcome, CheckRequest};
use stall::{StallNews, StallWatch};
use worker::{PartitionWorker, WorkerSetup};

/// How often the supervisor looks at its workers and the progress clock.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(100);
/// How often a topic that does not exist yet is looked for.
const TOPIC_WAIT_INTERVAL: Duration = Duration::from_millis(500);
/// How often a running worker re-checks, by default, that its topic was
/// not re-created: the producer re-creates it on every start.
const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(5);
/// How long a broker may hold an empty fetch, by default: librdkafka's own
/// default. Apache Kafka answers a waiting fetch as soon as a record
/// arrives, so this only sets how often an idle process asks (twice a
/// second: its partitions at the end of their log share one client); it
/// never delays a report. Brokers that hold every fetch for the whole wait
/// (tansu 0.6, librdkafka's mock cluster) delay every report by up to twice
/// this: give them a few milliseconds (the tests and the bench pass 15 for
/// tansu; the demo's embedded broker uses 5).
pub const DEFAULT_FETCH_WAIT_MS: u64 = 500;
/// Progress lines, by default.
const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// What `consumer` is asked to do.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub client: ClientSettings,
    pub topic: String,
    pub files_dir: PathBuf,
    pub state_dir: PathBuf,
    pub partitions: Vec<PartitionId>,
    /// Most reports in one batch (one transaction).
    pub max_batch: usize,
    /// Longest a batch keeps collecting once it has a report.
    pub batch_timeout_ms: u64,
    /// Longest the broker may hold a fetch that finds no new record
    /// (librdkafka's `fetch.wait.max.ms`): see [`DEFAULT_FETCH_WAIT_MS`].
    pub fetch_wait_ms: u64,
    /// How often a running worker re-checks that its topic was not re-created.
    pub verify_interval: Duration,
    /// Progress lines every this often; None: quiet.
    pub progress_interval: Option<Duration>,
    /// Re-render month.svg after publishing.
    pub render_chart: bool,
    /// Serve Prometheus metrics at `http://ADDR/metrics`; None: off.
    pub metrics_addr: Option<String>,
    /// TLS and basic auth of the metrics endpoint; None: plain HTTP.
    pub web: Option<Arc<WebConfig>>,
    /// The consumer group of every client, where each committed batch's
    /// next offset is committed for Kafka's tools (never read back).
    pub group_id: String,
    /// Commit offsets to `group_id`.
    pub commit_group_offsets: bool,
}

impl ConsumerConfig {
    /// Defaults for everything but the connection, folders and partitions.
    pub fn new(
        client: ClientSettings,
        topic: impl Into<String>,
        files_dir: PathBuf,
        state_dir: PathBuf,
        partitions: Vec<PartitionId>,
    ) -> Self {
        ConsumerConfig {
            client,
            topic: topic.into(),
            files_dir,
            state_dir,
            partitions,
            max_batch: 10_000,
            batch_timeout_ms: 100,
            fetch_wait_ms: DEFAULT_FETCH_WAIT_MS,
            verify_interval: DEFAULT_VERIFY_INTERVAL,
            progress_interval: Some(DEFAULT_PROGRESS_INTERVAL),
            render_chart: true,
            metrics_addr: None,
            web: None,
            group_id: DEFAULT_GROUP_ID.to_string(),
            commit_group_offsets: true,
        }
    }
}

/// Live counters of one worker, read by the progress reporter.
#[derive(Debug)]
struct Progress {
    partition: PartitionId,
    next_offset: AtomicI64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
    /// High watermark minus next offset; -1 when the broker has not said.
    lag: AtomicI64,
    /// Commits fail (a full disk): the partition waits for its storage.
    storage_stalled: AtomicBool,
    /// The offset of a record batch that cannot be decoded; -1: none.
    undecodable_at: AtomicI64,
}

impl Progress {
    fn new(snapshot: &Snapshot) -> Self {
        let this = Progress {
            partition: snapshot.partition,
            next_offset: AtomicI64::new(0),
            duplicates: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
            storage_stalled: AtomicBool::new(false),
            undecodable_at: AtomicI64::new(-1),
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

    /// The lag, from the end of the log as the client last heard it;
    /// returns it.
    fn set_lag(&self, high_watermark: Offset) -> Offset {
        let next = self.next_offset.load(Ordering::Relaxed);
        let lag = (high_watermark - next).max(0);
        self.lag.store(lag, Ordering::Relaxed);
        lag
    }
}

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
    // Every client of the process carries the group id: one group ACL.
    let config = &{
        let mut config = config.clone();
        config.client.set_owned("group.id", config.group_id.clone());
        config
    };
    // Bound first: a bad address is an error before any partition is touched.
    let metrics = Metrics::new();
    let _metrics_server = match &config.metrics_addr {
        Some(address) => Some(crate::metrics::serve(
            address,
            config.web.clone(),
            metrics.clone(),
        )?),
        None => None,
    };
    // Durably: a folder whose name is lost at a power cut takes everything
    // committed in it along.
    atomic_file::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state folder {}", config.state_dir.display()))?;
    // Claim every partition first: a second process fails before touching anything.
    let mut states = Vec::new();
    for &partition in &config.partitions {
        states.push(open_or_move_aside(&config.state_dir, partition)?);
    }
    if let Err(e) = atomic_file::create_dir_all(&config.files_dir) {
        log::error!(
            "cannot create files folder {}: {e}",
            config.files_dir.display()
        );
    }

    let admin = TopicAdmin::connect(&config.client)?;
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

    let exporter = Exporter::spawn(
        config.files_dir.clone(),
        Some(config.state_dir.clone()),
        config.render_chart,
        Some(metrics.clone()),
    )
    .context("starting the exporter thread")?;
    // One view of the brokers for the whole process: an outage is one
    // warning, not one per partition.
    let link = Arc::new(BrokerLink::new(
        "the partitions wait, keeping their committed state",
    ));
    let shared = SharedClient::start(
        config,
        Observed::new(link.clone(), metrics.fetch_requests("shared")),
    )?;
    let group = if config.commit_group_offsets {
        Some(GroupCommitter::start(
            &config.client,
            &config.group_id,
            &config.topic,
        )?)
    } else {
        None
    };
    let mut workers = Vec::new();
    for mut state in states {
        let partition = state.snapshot().partition;
        let probe_context = Observed::new(
            link.clone(),
            metrics.fetch_requests(&format!("verify-{partition}")),
        );
        reconcile_at_start(config, &mut state, probe_context, shutdown)?;
        let snapshot = state.snapshot();
        if let Some(group) = &group {
            group.offsets().committed(partition, snapshot.next_offset);
        }
        let progress = Arc::new(Progress::new(&snapshot));
        exporter
            .sender()
            .send(Committed::current(snapshot))
            .map_err(|_| anyhow!("exporter stopped"))?;
        let partition_metrics = metrics.partition(partition);
        let worker = PartitionWorker::new(
            state,
            WorkerSetup {
                config: config.clone(),
                exporter: exporter.sender(),
                progress: progress.clone(),
                metrics: metrics.clone(),
                shared: shared.clone(),
                link: link.clone(),
                group: group.as_ref().map(GroupCommitter::offsets),
                shutdown: shutdown.clone(),
            },
        );
        workers.push(WorkerHandle::spawn(worker, progress, partition_metrics)?);
    }

    let result = supervise(config, &mut workers, &link, shutdown);
    shutdown.request();
    let mut first_error = result.err();
    for worker in workers {
        if let Err(e) = worker.join() {
            first_error.get_or_insert(e);
        }
    }
    if let Some(group) = group {
        group.finish();
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
        if shutdown.wait(TOPIC_WAIT_INTERVAL) {
            return Ok(None);
        }
    }
}

/// Opens a partition's state; one that sled cannot open (damaged beyond
/// its own recovery) is moved aside, with one warning, and the partition
/// starts from its published file, as on a first start. The other
/// partitions are not touched either way.
fn open_or_move_aside(state_dir: &Path, partition: PartitionId) -> anyhow::Result<PartitionState> {
    match PartitionState::open(state_dir, partition) {
        Err(StateError::Unopenable { path, cause, .. }) => {
            let aside = state::move_aside(state_dir, partition).with_context(|| {
                format!(
                    "partition {partition}: the state {} cannot be opened ({cause}), \
                     and moving it aside failed; move it away by hand to start the partition \
                     from its published file",
                    path.display()
                )
            })?;
            log::warn!(
                "partition {partition}: the state {} cannot be opened ({cause}); \
                 moved it to {} and starting from the published file",
                path.display(),
                aside.display()
            );
            Ok(PartitionState::open(state_dir, partition)?)
        }
        other => Ok(other?),
    }
}

/// A published file ahead of its state (an old state folder restored, a
/// damaged database that sled recovered to an older point or as empty) is
/// a durable, consistent snapshot of statistics and offset: the state
/// adopts it, so that the published offset never goes back. A state ahead
/// of its file is the normal case (a crash between commit and publish) and
/// stays.
///
/// Only with proof that the file belongs to the topic as it is now: a
/// crash between a reset's commit and its publish leaves a state at offset
/// 0 behind a file of the topic as it was before re-creation, whose
/// statistics must not come back. The proof is the file's own, kept beside
/// the state ([`proof`]): published before the state's reset (an older
/// epoch), the file is never adopted; otherwise the topic must still hold
/// the record it names (or, for a file without one, the state's last
/// counted record) and the record before the file's offset.
fn adopt_newer_file(
    config: &ConsumerConfig,
    state: &mut PartitionState,
    probe_context: Observed,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let snapshot = state.snapshot();
    let partition = snapshot.partition;
    let path = partition_file(&config.files_dir, partition);
    let parsed = match std::fs::read_to_string(&path) {
        Ok(text) => match published::parse_partition_json(&text) {
            Ok(parsed) => Some(parsed),
            Err(reason) => {
                // The state decides; the file is rewritten at the next publish.
                log::warn!(
                    "partition {partition}: {} is not a valid partition file ({reason}); \
                     resuming from the state, which replaces it at the next publish",
                    path.display()
                );
                None
            }
        },
        Err(_) => None,
    };
    let Some(published) =
        parsed.filter(|p| p.partition == partition && p.offset > snapshot.next_offset)
    else {
        log::info!(
            "partition {partition}: resuming from the state (offset {})",
            snapshot.next_offset
        );
        return Ok(());
    };
    let (file_offset, state_offset) = (published.offset, snapshot.next_offset);
    let proof = proof::find(&config.state_dir, partition, file_offset);
    if let Some(proof) = proof.filter(|p| p.epoch < snapshot.epoch) {
        log::warn!(
            "partition {partition}: {} (offset {file_offset}) is ahead of the state (offset {state_offset}), \
             but it was published before the state was reset for a re-created topic \
             (epoch {} < {}): keeping the state",
            path.display(),
            proof.epoch,
            snapshot.epoch
        );
        return Ok(());
    }
    let proven_record = proof.and_then(|p| p.record);
    let Some(expected) = proven_record.or(snapshot.last_record) else {
        log::warn!(
            "partition {partition}: {} (offset {file_offset}) is ahead of the state (offset {state_offset}), \
             and neither its proof nor the state names a record to show the topic is the same; keeping the state",
            path.display()
        );
        return Ok(());
    };
    let probe = verify::RecordProbe::new(
        &config.client,
        &config.topic,
        partition,
        probe_context,
        shutdown,
    )?;
    let questions = [
        CheckRequest {
            expected: vec![expected],
            adopt_offset: expected.offset,
            last_record: None,
        },
        CheckRequest {
            expected: Vec::new(),
            adopt_offset: file_offset - 1,
            last_record: None,
        },
    ];
    for question in &questions {
        loop {
            match verify::check_records(&probe, question, shutdown)? {
                CheckOutcome::Current { .. } => break,
                CheckOutcome::Gone { offset } => {
                    log::warn!(
                        "partition {partition}: {} (offset {file_offset}) is ahead of the state (offset {state_offset}), \
                         but the record at offset {offset} is gone or different: keeping the state",
                        path.display()
                    );
                    return Ok(());
                }
                CheckOutcome::Undecided => {
                    if shutdown.wait(TOPIC_WAIT_INTERVAL) {
                        return Ok(());
                    }
                }
            }
        }
    }
    log::warn!(
        "partition {partition}: the state (offset {state_offset}) is behind {} (offset {file_offset}): \
         it was restored or recovered to an older point; adopting the published file",
        path.display()
    );
    let epoch = proof.map_or(snapshot.epoch, |p| p.epoch.max(snapshot.epoch));
    state.initialize_from(file_offset, published.aggregates, epoch, proven_record)?;
    Ok(())
}

/// The assignment's start-up rules, with sled as the source of truth.
fn reconcile_at_start(
    config: &ConsumerConfig,
    state: &mut PartitionState,
    probe_context: Observed,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    if state.is_initialized() {
        // Only a build before the fold kept every statistic finite wrote
        // such a state; publishing it would fail at every attempt.
        if let Some(field) = published::first_non_finite(&state.snapshot().aggregates) {
            bail!(
                "partition {}: the state {} holds a statistic that is not a finite number ({field}); \
                 move that folder away to count the partition again from the topic",
                state.snapshot().partition,
                state.path().display()
            );
        }
        return adopt_newer_file(config, state, probe_context, shutdown);
    }
    let partition = state.snapshot().partition;
    let path = partition_file(&config.files_dir, partition);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let published = published::parse_partition_json(&text).map_err(|e| {
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
            // The file's proof, when there is one, names its last record:
            // the re-creation checks then compare it with the topic as
            // they would a state's own.
            let proof = proof::find(&config.state_dir, partition, published.offset);
            state.initialize_from(
                published.offset,
                published.aggregates,
                proof.map_or(0, |p| p.epoch),
                proof.and_then(|p| p.record),
            )?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            state.initialize(0, Aggregates::new(), 0)?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(())
}

/// Watches the workers until one ends or shutdown: stalls (see
/// [`stall`]) and the progress lines.
fn supervise(
    config: &ConsumerConfig,
    workers: &mut [WorkerHandle],
    link: &BrokerLink,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut watches: Vec<StallWatch> = workers
        .iter()
        .map(|w| {
            StallWatch::new(
                w.progress.next_offset.load(Ordering::Relaxed),
                Instant::now(),
            )
        })
        .collect();
    let mut last_report = Instant::now();
    let mut last_offsets: Vec<Offset> = workers
        .iter()
        .map(|w| w.progress.next_offset.load(Ordering::Relaxed))
        .collect();
    while !shutdown.wait(SUPERVISE_INTERVAL) {
        if workers.iter().any(|w| w.is_finished()) {
            return Ok(());
        }
        for (worker, watch) in workers.iter().zip(watches.iter_mut()) {
            watch_stall(worker, watch, link);
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
            let undecodable_at = p.undecodable_at.load(Ordering::Relaxed);
            let stalled = if p.storage_stalled.load(Ordering::Relaxed) {
                ", STALLED: commits fail (storage)".to_string()
            } else if undecodable_at >= 0 {
                format!(", STALLED: cannot decode the record batch at offset {undecodable_at}")
            } else {
                String::new()
            };
            log::info!(
                "partition {}: next offset {next}, {rate:.1} reports/s, {} duplicates dropped, {} malformed skipped, lag {lag}{stalled}",
                p.partition,
                p.duplicates.load(Ordering::Relaxed),
                p.malformed.load(Ordering::Relaxed),
            );
        }
    }
    Ok(())
}

/// Samples one partition for [`StallWatch`] and says what it finds.
fn watch_stall(worker: &WorkerHandle, watch: &mut StallWatch, link: &BrokerLink) {
    let p = &worker.progress;
    let next_offset = p.next_offset.load(Ordering::Relaxed);
    // A storage fault, an undecodable batch and a broker outage have
    // warnings of their own.
    let undecodable = p.undecodable_at.load(Ordering::Relaxed) >= 0;
    let lag = Some(p.lag.load(Ordering::Relaxed))
        .filter(|lag| *lag >= 0)
        .filter(|_| !p.storage_stalled.load(Ordering::Relaxed) && !undecodable && !link.is_down());
    let news = watch.observe(next_offset, lag, Instant::now());
    worker
        .metrics
        .set_progress_stalled(watch.is_stalled() || undecodable);
    let Some(news) = news else {
        return;
    };
    match news {
        StallNews::Stalled {
            lag,
            since_record,
            first: true,
        } => log::warn!(
            "partition {}: STALLED: behind by {lag} records and no record read for {:.0} s (next offset {next_offset}); the broker may be overloaded or the partition's leader unavailable",
            p.partition,
            since_record.as_secs_f64()
        ),
        StallNews::Stalled {
            lag, since_record, ..
        } => log::warn!(
            "partition {}: still STALLED: behind by {lag} records, no record read for {:.0} s (next offset {next_offset})",
            p.partition,
            since_record.as_secs_f64()
        ),
        StallNews::Moving { since_record } => log::warn!(
            "partition {}: progressing again, {:.0} s after the last record before the stall (next offset {next_offset})",
            p.partition,
            since_record.as_secs_f64()
        ),
    }
}

/// A named worker thread, its counters and its metrics.
struct WorkerHandle {
    partition: PartitionId,
    progress: Arc<Progress>,
    metrics: PartitionMetrics,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl WorkerHandle {
    fn spawn(
        worker: PartitionWorker,
        progress: Arc<Progress>,
        metrics: PartitionMetrics,
    ) -> anyhow::Result<Self> {
        let partition = progress.partition;
        let thread = crate::shutdown::spawn(format!("partition-{partition}"), move || worker.run())
            .context("starting a partition worker")?;
        Ok(WorkerHandle {
            partition,
            progress,
            metrics,
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
