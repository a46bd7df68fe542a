//! One partition's lifecycle in this process, as a unit that starts and
//! stops while the others run: [`Claimed::open`] takes its state (the lock
//! that keeps a second process off it), [`Pipeline::run`] reconciles that
//! state with the published file and the topic and starts its worker, and
//! [`PartitionRun::stop`] ends it after its current batch: the batch is
//! committed, its last snapshot published, and the state released.
//! [`Pipeline`] holds what the partitions of a process share: the
//! exporter, the shared Kafka client, the broker link and the group
//! offsets. `consumer 0 2` runs a fixed set; the consumer-group mode starts
//! and stops partitions as Kafka assigns and revokes them.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use super::clients::{ClientObserver, SharedClient};
use super::group_offsets::GroupCommitter;
use super::machine::{CheckOutcome, CheckRequest};
use super::worker::{PartitionWorker, WorkerSetup};
use super::{recheck, restore, ConsumerConfig, Progress, TOPIC_WAIT_INTERVAL};
use crate::kafka::link::BrokerLink;
use crate::kafka::{Offset, PartitionId};
use crate::model::aggregate::Aggregates;
use crate::publish::exporter::{CommittedSnapshot, Exporter, ToExporter};
use crate::publish::health::{Health, Phase};
use crate::publish::metrics::{Metrics, PartitionMetrics};
use crate::publish::snapshots::SnapshotWriter;
use crate::shutdown::Shutdown;
use crate::store::changelog::SnapshotRecord;
use crate::store::folders::{self, partition_file, Folders};
use crate::store::published;
use crate::store::snapshot::Snapshot;
use crate::store::state::{self, PartitionState, StateError};

/// A partition whose state this process holds, not yet running.
pub(super) struct Claimed {
    state: PartitionState,
}

impl Claimed {
    /// Takes the partition's state: a second process fails here, naming
    /// the holder.
    pub(super) fn open(state_dir: &Path, partition: PartitionId) -> anyhow::Result<Self> {
        Ok(Claimed {
            state: open_or_move_aside(state_dir, partition)?,
        })
    }
}

/// A group member's hold on its state folder: the partitions' states are
/// claimed only as the group assigns them, so this is what keeps a second
/// member off the folder from the start (released when dropped, or when
/// the process dies).
pub(super) struct MemberLock {
    _file: std::fs::File,
}

impl MemberLock {
    pub(super) fn take(state_dir: &Path) -> anyhow::Result<Self> {
        let path = folders::member_lock_file(state_dir);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match crate::store::fence::flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => bail!(
                "the state folder {} is held by another consumer process (group member); \
                 each member needs a state folder of its own",
                state_dir.display()
            ),
            Err(error) => return Err(error).with_context(|| format!("locking {}", path.display())),
        }
        Ok(MemberLock { _file: file })
    }
}

/// What the partitions of one process share.
pub(super) struct Pipeline {
    config: ConsumerConfig,
    metrics: Arc<Metrics>,
    exporter: Exporter,
    /// The snapshot writer; None without snapshots.
    snapshots: Option<SnapshotWriter>,
    /// One view of the brokers for the whole process: an outage is one
    /// warning, not one per partition.
    link: Arc<BrokerLink>,
    shared: Arc<SharedClient>,
    group: Option<GroupCommitter>,
    start_readers: Arc<restore::StartReaders>,
    health: Arc<Health>,
    shutdown: Shutdown,
}

impl Pipeline {
    /// Starts the exporter, the shared client and the group offsets.
    pub(super) fn start(
        config: &ConsumerConfig,
        metrics: Arc<Metrics>,
        health: &Arc<Health>,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let snapshots = match &config.snapshots {
            Some(settings) => SnapshotWriter::start(
                &config.client,
                &config.topic,
                settings,
                metrics.clone(),
                health.beat("snapshots"),
            )?,
            None => None,
        };
        let folders = Folders::new(&config.files_dir, &config.state_dir);
        // Group members take turns on a partition's file: fenced.
        let folders = if config.join_group {
            folders.fenced()
        } else {
            folders
        };
        let mut exporter = Exporter::spawn(
            folders,
            config.render_chart,
            Some(metrics.clone()),
            Some(health.beat("exporter")),
        )
        .context("starting the exporter thread")?;
        if let Some(writer) = &snapshots {
            exporter = exporter.with_snapshots(writer.sender());
        }
        let link = Arc::new(BrokerLink::new(
            "the partitions wait, keeping their committed state",
        ));
        let shared = SharedClient::start(
            config,
            ClientObserver::new(link.clone(), metrics.fetch_requests("shared")),
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
        Ok(Pipeline {
            config: config.clone(),
            metrics,
            exporter,
            snapshots,
            link,
            shared,
            group,
            start_readers: Arc::default(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        })
    }

    pub(super) fn link(&self) -> &BrokerLink {
        &self.link
    }

    pub(super) fn shared_link(&self) -> Arc<BrokerLink> {
        self.link.clone()
    }

    /// Starts a claimed partition's thread: it reconciles the state (the
    /// assignment's start-up rules, then the snapshot topic and the log
    /// start), publishes it, and runs the worker. Partitions start side by
    /// side, and a stop during the start ends it.
    pub(super) fn run(&self, claimed: Claimed) -> anyhow::Result<PartitionRun> {
        let Claimed { state } = claimed;
        let partition = state.snapshot().partition;
        let progress = Arc::new(Progress::new(&state.snapshot()));
        let stop = self.shutdown.child();
        let exporter = self.exporter.sender();
        let start = PartitionStart {
            readers: self.start_readers.clone(),
            setup: WorkerSetup {
                config: self.config.clone(),
                exporter: exporter.clone(),
                progress: progress.clone(),
                metrics: self.metrics.clone(),
                shared: self.shared.clone(),
                link: self.link.clone(),
                group: self.group.as_ref().map(GroupCommitter::offsets),
                shutdown: stop.clone(),
                health: self.health.partition(partition),
            },
        };
        let thread =
            crate::shutdown::spawn(format!("partition-{partition}"), move || start.run(state))
                .context("starting a partition worker")?;
        Ok(PartitionRun {
            progress,
            metrics: self.metrics.partition(partition),
            stop,
            exporter,
            thread,
        })
    }

    /// Ends what the partitions shared, once every [`PartitionRun`] has
    /// ended: the last group offsets are committed and every pending
    /// snapshot published.
    pub(super) fn finish(self) {
        if let Some(group) = self.group {
            group.finish();
        }
        self.exporter.finish();
        if let Some(snapshots) = self.snapshots {
            snapshots.finish();
        }
    }
}

/// What a partition's thread needs to start it and then run its worker.
struct PartitionStart {
    readers: Arc<restore::StartReaders>,
    setup: WorkerSetup,
}

impl PartitionStart {
    /// Returns the last committed snapshot, or None when stopped before
    /// the partition ran (nothing was published then).
    fn run(self, mut state: PartitionState) -> anyhow::Result<Option<Arc<Snapshot>>> {
        let PartitionStart { readers, setup } = self;
        let partition = state.snapshot().partition;
        let (config, stop) = (&setup.config, &setup.shutdown);
        let probe_context = || {
            ClientObserver::new(
                setup.link.clone(),
                setup.metrics.fetch_requests(&format!("verify-{partition}")),
            )
        };
        let published_before = published_mark(&config.files_dir, partition);
        let mut snapshots_seen = Vec::new();
        let started = (|| {
            reconcile_at_start(config, &mut state, probe_context(), stop)?;
            if let Some(settings) = &config.snapshots {
                snapshots_seen = restore::restore_from_snapshots(
                    config,
                    settings,
                    &readers,
                    &mut state,
                    probe_context(),
                    stop,
                    &setup.metrics,
                )?;
            }
            restore::check_log_start(config, &readers, &mut state, stop)
        })();
        // A stop during the start ends it where it is (a wait for the
        // broker ends with an error then): nothing is published.
        if stop.requested() {
            return Ok(None);
        }
        started?;
        let snapshot = state.snapshot();
        if let Some(group) = &setup.group {
            group.committed(partition, snapshot.next_offset);
        }
        setup.progress.update(&snapshot);
        let earlier = Earlier::of(published_before, &snapshots_seen, snapshot.epoch);
        let resumed_from = snapshot.next_offset;
        setup
            .exporter
            .publish(CommittedSnapshot::current(snapshot))?;
        earlier.report(partition, resumed_from, config.join_group, &setup.metrics);
        let running = setup.metrics.partition(partition);
        running.set_running(true);
        setup.health.set_phase(Phase::Running);
        let ended = PartitionWorker::new(state, setup).run().map(Some);
        running.set_running(false);
        ended
    }
}

/// What a start saw of the partition's earlier owners (this process
/// before a restart, or another group member): how far they had published
/// it, and when they last did.
struct Earlier {
    /// The newest offset the partition file or the snapshot topic showed.
    newest_offset: Option<Offset>,
    /// When the partition file was last written or the newest snapshot
    /// taken, whichever was later.
    last_unix_ms: Option<i64>,
}

impl Earlier {
    /// From the partition file as the start found it and the snapshots it
    /// read; snapshots of an earlier topic of this name (an older epoch
    /// than the state's) are not this count's.
    fn of(file: Option<(Offset, i64)>, snapshots: &[SnapshotRecord], epoch: u64) -> Earlier {
        let current = snapshots.iter().filter(|r| r.snapshot.epoch >= epoch);
        let (snapshot_offset, snapshot_unix_ms) = current.fold((None, None), |(o, t), r| {
            (
                o.max(Some(r.snapshot.next_offset)),
                t.max(Some(r.written_unix_ms)),
            )
        });
        Earlier {
            newest_offset: file.map(|(offset, _)| offset).max(snapshot_offset),
            last_unix_ms: file.map(|(_, unix_ms)| unix_ms).max(snapshot_unix_ms),
        }
    }

    /// Counts the records the start resumed behind what was published (as
    /// far as the file and the snapshot topic show: a killed owner's last
    /// batches, committed in its own state only, are not seen), and a
    /// group member's take-over time.
    fn report(
        &self,
        partition: PartitionId,
        resumed_from: Offset,
        member: bool,
        metrics: &Metrics,
    ) {
        let replayed = self
            .newest_offset
            .map_or(0, |newest| newest.saturating_sub(resumed_from).max(0));
        metrics.replayed(partition, u64::try_from(replayed).unwrap_or(0));
        if !member {
            if replayed > 0 {
                log::info!(
                    "partition {partition}: resumed from offset {resumed_from}, {replayed} records \
                     behind what was published of it; they are counted again"
                );
            }
            return;
        }
        let Some(last_unix_ms) = self.last_unix_ms else {
            log::info!(
                "partition {partition}: taken over at offset {resumed_from}; nothing was published of it before"
            );
            return;
        };
        let gap_ms = (chrono::Utc::now().timestamp_millis() - last_unix_ms).max(0);
        let took = Duration::from_millis(u64::try_from(gap_ms).unwrap_or(0));
        metrics.handed_over(partition, took);
        log::info!(
            "partition {partition}: taken over at offset {resumed_from} ({replayed} records behind \
             what was published of it), publishing again {:.1} s after its previous owner last did",
            took.as_secs_f64()
        );
    }
}

/// The offset of the partition file in `files_dir` and when it was
/// written; None when there is none or it does not parse.
fn published_mark(files_dir: &Path, partition: PartitionId) -> Option<(Offset, i64)> {
    let path = partition_file(files_dir, partition);
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    let unix_ms = modified
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())?;
    let text = std::fs::read_to_string(&path).ok()?;
    let parsed = published::parse_partition_json(&text).ok()?;
    (parsed.partition == partition).then_some((parsed.offset, unix_ms))
}

/// A running partition: its worker thread, counters and metrics.
pub(super) struct PartitionRun {
    /// Its counters; they name the partition.
    pub(super) progress: Arc<Progress>,
    pub(super) metrics: PartitionMetrics,
    /// This partition's stop; also set by the process's.
    stop: Shutdown,
    exporter: ToExporter,
    thread: JoinHandle<anyhow::Result<Option<Arc<Snapshot>>>>,
}

impl PartitionRun {
    pub(super) fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops this partition while the others run: its worker ends after
    /// the current batch, committed; its state is released (another
    /// process, or this one, may open it now); its last snapshot is
    /// published, waiting at most `publish_timeout`. Returns that snapshot;
    /// None when the stop came before the partition ran.
    /// A publish that fails is logged, not returned: the committed state
    /// is what counts, and it is published again at the next start.
    pub(super) fn stop(self, publish_timeout: Duration) -> anyhow::Result<Option<Arc<Snapshot>>> {
        self.stop.request();
        let exporter = self.exporter.clone();
        let Some(snapshot) = self.join()? else {
            return Ok(None);
        };
        if let Err(error) = exporter.release(snapshot.clone(), publish_timeout) {
            log::error!(
                "{error:#}; the committed state (offset {}) is kept",
                snapshot.next_offset
            );
        }
        Ok(Some(snapshot))
    }

    /// Asks the worker to stop after its current batch, without waiting:
    /// partitions revoked together end side by side.
    pub(super) fn request_stop(&self) {
        self.stop.request();
    }

    /// Stops this partition for another process to take it over (a
    /// group's revoke): as [`PartitionRun::stop`], and then waits, until
    /// `deadline` at most, for its last snapshot to be acknowledged, so
    /// that the next owner restores from it. Whether it was is logged.
    pub(super) fn hand_off(self, deadline: Instant) -> anyhow::Result<Option<Arc<Snapshot>>> {
        let exporter = self.exporter.clone();
        let partition = self.progress.partition;
        let left = || deadline.saturating_duration_since(Instant::now());
        let last = self.stop(left())?;
        if let Some(snapshot) = &last {
            if !exporter.hand_over(snapshot, left()) {
                log::warn!(
                    "partition {partition}: the last snapshot (offset {}) was not acknowledged in time; \
                     the next owner restores an older one and counts the rest again",
                    snapshot.next_offset,
                );
            }
        }
        Ok(last)
    }

    /// Ends this partition at once, as another process owns it now (a
    /// group member whose session expired): its current batch is
    /// committed to this process's own state, and nothing more of it is
    /// published or written to the snapshot topic.
    pub(super) fn abandon(self) -> anyhow::Result<()> {
        self.stop.request();
        let exporter = self.exporter.clone();
        let partition = self.progress.partition;
        let ended = self.join();
        exporter.forget(partition);
        ended.map(|_| ())
    }

    /// Waits for the thread to end (after a stop, or on its own with an
    /// error); returns the last committed snapshot, None when it ended
    /// before the partition ran.
    pub(super) fn join(self) -> anyhow::Result<Option<Arc<Snapshot>>> {
        let partition = self.progress.partition;
        self.thread
            .join()
            .map_err(|_| anyhow!("partition {partition} worker panicked"))?
            .with_context(|| format!("partition {partition}"))
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
    probe_context: ClientObserver,
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
    // Not the last word when snapshots are on: the restore that follows
    // takes a newer verified snapshot, which a new group member's state,
    // behind the shared file, usually finds.
    let keeping = if config.snapshots.is_some() {
        "keeping the state, unless the snapshot topic holds a newer verified snapshot"
    } else {
        "keeping the state"
    };
    let proof = folders::find_proof(&config.state_dir, partition, file_offset);
    if let Some(proof) = proof.filter(|p| p.epoch < snapshot.epoch) {
        log::warn!(
            "partition {partition}: {} (offset {file_offset}) is ahead of the state (offset {state_offset}), \
             but it was published before the state was reset for a re-created topic \
             (epoch {} < {}): {keeping}",
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
             and neither its proof nor the state names a record to show the topic is the same; {keeping}",
            path.display()
        );
        return Ok(());
    };
    let probe = recheck::RecordProbe::new(config, partition, probe_context, shutdown)?;
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
            match recheck::check_records(&probe, question)? {
                CheckOutcome::Current { .. } => break,
                CheckOutcome::Gone { offset } => {
                    log::warn!(
                        "partition {partition}: {} (offset {file_offset}) is ahead of the state (offset {state_offset}), \
                         but the record at offset {offset} is gone or different: {keeping}",
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
    let epoch = proof
        .map(|p| p.epoch)
        .max(folders::published_epoch(&config.files_dir, partition))
        .map_or(snapshot.epoch, |e| e.max(snapshot.epoch));
    state.initialize_from(file_offset, published.aggregates, epoch, proven_record)?;
    Ok(())
}

/// The assignment's start-up rules, with sled as the source of truth.
fn reconcile_at_start(
    config: &ConsumerConfig,
    state: &mut PartitionState,
    probe_context: ClientObserver,
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
            let proof = folders::find_proof(&config.state_dir, partition, published.offset);
            // A file that group members share keeps its epoch in its fence.
            let epoch = proof
                .map(|p| p.epoch)
                .max(folders::published_epoch(&config.files_dir, partition))
                .unwrap_or(0);
            state.initialize_from(
                published.offset,
                published.aggregates,
                epoch,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use chrono::NaiveDate;
    use rdkafka::config::RDKafkaLogLevel;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::ClientConfig;

    use super::*;
    use crate::kafka::{ClientSettings, Offset};
    use crate::model::report::{encode, key_for};

    const TOPIC: &str = "lifecycle";

    /// librdkafka's in-process broker, held by an idle producer.
    fn mock_broker() -> (BaseProducer, String) {
        let holder: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .set("log_level", "0")
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .unwrap();
        let servers = {
            let cluster = holder.client().mock_cluster().unwrap();
            cluster.create_topic(TOPIC, 4, 1).unwrap();
            // The mock cluster does not always answer CreateTopics.
            cluster
                .create_topic(&crate::store::changelog::default_topic(TOPIC), 4, 1)
                .unwrap();
            cluster.bootstrap_servers()
        };
        (holder, servers)
    }

    /// Days `from..from + count` of a year of their own to `partition`.
    fn produce(servers: &str, partition: PartitionId, from: u64, count: u64) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .create()
            .unwrap();
        let first = NaiveDate::from_ymd_opt(2000 + partition, 1, 1).unwrap();
        for day in from..from + count {
            let date = first + chrono::Days::new(day);
            producer
                .send(
                    BaseRecord::to(TOPIC)
                        .partition(partition)
                        .key(key_for(date))
                        .payload(&encode(date, 20.0)),
                )
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    fn published_offset(config: &ConsumerConfig, partition: PartitionId) -> Option<Offset> {
        let text = std::fs::read_to_string(partition_file(&config.files_dir, partition)).ok()?;
        Some(published::parse_partition_json(&text).ok()?.offset)
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn one_partition_stops_and_starts_again_while_the_others_run() {
        let (_broker, servers) = mock_broker();
        let dir = tempfile::tempdir().unwrap();
        let config = ConsumerConfig {
            // The mock broker holds an empty fetch for the whole wait.
            fetch_wait_ms: 5,
            progress_interval: None,
            commit_group_offsets: false,
            ..ConsumerConfig::new(
                ClientSettings::plaintext(&servers),
                TOPIC,
                dir.path().to_path_buf(),
                dir.path().join("state"),
                vec![0, 1, 2],
            )
        };
        std::fs::create_dir_all(&config.state_dir).unwrap();
        for partition in [0, 1, 2] {
            produce(&servers, partition, 0, 50);
        }
        let shutdown = Shutdown::new();
        let health = Health::new(
            crate::publish::health::Ownership::Group,
            Duration::from_secs(60),
            &shutdown,
        );
        health.set_assigned();
        let pipeline = Pipeline::start(&config, Metrics::new(), &health, &shutdown).unwrap();
        let mut runs: BTreeMap<PartitionId, PartitionRun> = [0, 1, 2]
            .into_iter()
            .map(|p| {
                let claimed = Claimed::open(&config.state_dir, p).unwrap();
                (p, pipeline.run(claimed).unwrap())
            })
            .collect();
        wait_for("every partition at offset 50", || {
            [0, 1, 2]
                .iter()
                .all(|p| published_offset(&config, *p) == Some(50))
        });
        wait_for("ready", || health.facts().readiness().status == "ok");
        assert_eq!(health.facts().partitions.len(), 3);
        // Liveness watches every thread that does the work.
        let watched = health.facts().threads;
        for thread in ["exporter", "partition-1", "recheck-1", "snapshots"] {
            assert!(watched.contains_key(thread), "{thread}: {watched:?}");
        }

        // Stop partition 1: committed, published, and its state released
        // (it opens again, here, while the process runs).
        let last = runs
            .remove(&1)
            .unwrap()
            .stop(Duration::from_secs(10))
            .unwrap()
            .expect("partition 1 ran");
        assert_eq!(last.next_offset, 50);
        assert_eq!(last.counters.counted, 50);
        assert_eq!(published_offset(&config, 1), Some(50));
        assert!(
            !health.facts().partitions.contains_key(&1),
            "a stopped partition is not owned"
        );
        let watched = health.facts().threads;
        assert!(!watched.contains_key("partition-1"), "{watched:?}");
        assert!(!watched.contains_key("recheck-1"), "{watched:?}");
        let reopened = Claimed::open(&config.state_dir, 1).unwrap();
        assert_eq!(reopened.state.snapshot().next_offset, 50);
        drop(reopened);

        // The others keep running; the stopped one stays where it was.
        produce(&servers, 0, 50, 30);
        produce(&servers, 1, 50, 30);
        wait_for("partition 0 at offset 80", || {
            published_offset(&config, 0) == Some(80)
        });
        assert_eq!(published_offset(&config, 1), Some(50));
        assert!(runs.values().all(|run| !run.is_finished()));

        // Started again, it resumes from its committed offset.
        let claimed = Claimed::open(&config.state_dir, 1).unwrap();
        runs.insert(1, pipeline.run(claimed).unwrap());
        wait_for("partition 1 at offset 80", || {
            published_offset(&config, 1) == Some(80)
        });

        shutdown.request();
        for (_, run) in runs {
            run.stop(Duration::from_secs(10)).unwrap();
        }
        pipeline.finish();
        for (partition, offset, counted) in [(0, 80, 80), (1, 80, 80), (2, 50, 50)] {
            let state = PartitionState::open_existing(&config.state_dir, partition).unwrap();
            let snapshot = state.snapshot();
            assert_eq!(
                (snapshot.next_offset, snapshot.counters.counted),
                (offset, counted),
                "partition {partition}"
            );
        }
    }

    fn test_health(shutdown: &Shutdown) -> Arc<Health> {
        Health::new(
            crate::publish::health::Ownership::Group,
            Duration::from_secs(60),
            shutdown,
        )
    }

    fn mock_config(servers: &str, dir: &Path, partitions: Vec<PartitionId>) -> ConsumerConfig {
        ConsumerConfig {
            fetch_wait_ms: 5,
            progress_interval: None,
            commit_group_offsets: false,
            ..ConsumerConfig::new(
                ClientSettings::plaintext(servers),
                TOPIC,
                dir.to_path_buf(),
                dir.join("state"),
                partitions,
            )
        }
    }

    #[test]
    fn an_unwritable_snapshot_topic_is_one_failure_and_the_counts_go_on() {
        let (broker, servers) = mock_broker();
        let dir = tempfile::tempdir().unwrap();
        let config = mock_config(&servers, dir.path(), vec![0]);
        std::fs::create_dir_all(&config.state_dir).unwrap();
        produce(&servers, 0, 0, 40);
        // From now on every produce request is refused as an ACL would.
        let cluster = broker.client().mock_cluster().unwrap();
        cluster.request_errors(
            rdkafka_sys::types::RDKafkaApiKey::Produce,
            &[rdkafka_sys::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
        );
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let pipeline =
            Pipeline::start(&config, metrics.clone(), &test_health(&shutdown), &shutdown).unwrap();
        let run = pipeline
            .run(Claimed::open(&config.state_dir, 0).unwrap())
            .unwrap();
        wait_for("partition 0 at offset 40", || {
            published_offset(&config, 0) == Some(40)
        });
        wait_for("the refused snapshot", || {
            metrics
                .encode()
                .contains("weatherstream_snapshots_failed_total{partition=\"0\"} 1")
        });
        shutdown.request();
        let last = run
            .stop(Duration::from_secs(10))
            .unwrap()
            .expect("the partition ran");
        pipeline.finish();
        assert_eq!((last.next_offset, last.counters.counted), (40, 40));
        // Refused once, then never tried again, not even at the stop.
        let text = metrics.encode();
        assert!(
            text.contains("weatherstream_snapshots_failed_total{partition=\"0\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("weatherstream_snapshots_written_total{partition=\"0\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn an_offset_below_the_log_start_is_refused_unless_partial_counts_are_asked_for() {
        let (_broker, servers) = mock_broker();
        let dir = tempfile::tempdir().unwrap();
        let config = mock_config(&servers, dir.path(), vec![2]);
        std::fs::create_dir_all(&config.state_dir).unwrap();
        // librdkafka's mock broker keeps 5 MiB per partition: more moves
        // its log start past offset 0, as retention would.
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .create()
            .unwrap();
        // Each under the consumer's 512 KiB fetch limit, which the mock
        // broker keeps to.
        let big = vec![b'x'; 400_000];
        for _ in 0..16 {
            producer
                .send(BaseRecord::to(TOPIC).partition(2).key("June").payload(&big))
                .unwrap();
            producer.flush(Duration::from_secs(30)).unwrap();
        }
        produce(&servers, 2, 0, 10);
        let (log_start, end) = producer
            .client()
            .fetch_watermarks(TOPIC, 2, Duration::from_secs(10))
            .unwrap();
        assert!(log_start > 0 && end == 26, "{log_start}..{end}");

        let shutdown = Shutdown::new();
        let pipeline =
            Pipeline::start(&config, Metrics::new(), &test_health(&shutdown), &shutdown).unwrap();
        // The partition's thread ends with the error, which its join returns.
        let error = pipeline
            .run(Claimed::open(&config.state_dir, 2).unwrap())
            .unwrap()
            .join()
            .expect_err("a new partition cannot count a log that lost its start");
        let message = format!("{error:#}");
        assert!(
            message.contains(&format!(
                "the offset to resume from, 0, is below the log start of topic \"{TOPIC}\" partition 2, {log_start}"
            )) && message.contains("--count-from-log-start"),
            "{message}"
        );
        pipeline.finish();
        assert_eq!(published_offset(&config, 2), None);

        let config = ConsumerConfig {
            count_from_log_start: true,
            ..config
        };
        let pipeline =
            Pipeline::start(&config, Metrics::new(), &test_health(&shutdown), &shutdown).unwrap();
        let run = pipeline
            .run(Claimed::open(&config.state_dir, 2).unwrap())
            .unwrap();
        wait_for("partition 2 at its end", || {
            published_offset(&config, 2) == Some(26)
        });
        shutdown.request();
        let last = run
            .stop(Duration::from_secs(10))
            .unwrap()
            .expect("the partition ran");
        pipeline.finish();
        // The big records left in the log are no reports: only the ten are.
        assert_eq!(last.counters.counted, 10);
    }

    /// A partition's start waits out a broker outage, as a running
    /// partition does; stopped while it waits, it ends at once (not after
    /// the reads' timeouts) and publishes nothing, as its start decided
    /// nothing.
    #[test]
    fn a_start_waits_out_an_outage_and_a_stop_during_it_ends_it_at_once() {
        let (broker, servers) = mock_broker();
        let dir = tempfile::tempdir().unwrap();
        let config = mock_config(&servers, dir.path(), vec![1]);
        std::fs::create_dir_all(&config.state_dir).unwrap();
        produce(&servers, 1, 0, 20);
        let shutdown = Shutdown::new();
        let pipeline =
            Pipeline::start(&config, Metrics::new(), &test_health(&shutdown), &shutdown).unwrap();
        let cluster = broker.client().mock_cluster().unwrap();
        cluster.broker_down(1).unwrap();
        let starting = |config: &ConsumerConfig| {
            let run = pipeline
                .run(Claimed::open(&config.state_dir, 1).unwrap())
                .unwrap();
            // Past the first failed attempts, still starting.
            std::thread::sleep(Duration::from_millis(1500));
            assert!(!run.is_finished(), "the start gave up in an outage");
            run
        };

        let run = starting(&config);
        let asked = Instant::now();
        let ended = run.stop(Duration::from_secs(10)).unwrap();
        let took = asked.elapsed();
        assert!(ended.is_none(), "stopped before it ran: {ended:?}");
        assert!(took < Duration::from_secs(5), "the stop took {took:?}");
        assert_eq!(published_offset(&config, 1), None);

        // The state was released; started again, the partition runs once
        // the broker is back.
        let run = starting(&config);
        assert_eq!(published_offset(&config, 1), None);
        cluster.broker_up(1).unwrap();
        wait_for("partition 1 at its end", || {
            published_offset(&config, 1) == Some(20)
        });
        shutdown.request();
        let last = run.stop(Duration::from_secs(10)).unwrap();
        assert_eq!(last.map(|s| s.counters.counted), Some(20));
        pipeline.finish();
    }
}
