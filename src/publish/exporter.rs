//! The exporter thread: materializes committed snapshots as the
//! dashboard's files (`partition-N.json` through [`crate::store::published`], then
//! `month.svg` through [`crate::publish::chart`]). It coalesces bursts, spaces the
//! publishes of a partition that is catching up by their cost, never
//! publishes an older snapshot over a newer one, and keeps a snapshot it
//! could not write until it can. Before each partition file, its proof
//! goes to the state folder ([`crate::store::proof`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::kafka::{Offset, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::publish::chart::{chart_input, ChartInput, ChartRenderer};
use crate::publish::health::Beat;
use crate::publish::metrics::{Metrics, PartitionMetrics};
use crate::publish::snapshots::ToSnapshots;
use crate::store::folders::{Folders, Published};
use crate::store::proof::Proof;
use crate::store::snapshot::Snapshot;

/// Minimum time between two month.svg renderings.
const CHART_INTERVAL: Duration = Duration::from_secs(1);
/// Wait before retrying a publish that failed.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// At most one "cannot write" line per this while writes keep failing.
const WRITE_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// CommittedSnapshot snapshots in flight to the exporter. Workers block when it is
/// full, which only happens if the disk stalls: the exporter coalesces
/// whatever it receives, so a small bound costs nothing.
const CHANNEL_CAPACITY: usize = 256;
/// Minimum time between two publishes of one partition: under load, commits
/// come faster than anyone reads, and each publish costs a render and two
/// fsyncs; newer snapshots replace a waiting one. Well under the ~100 ms a
/// dashboard may lag, and never reached at the assignment's pace.
const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(25);
/// A partition waits this many times its last publish's duration before the
/// next one: with years of statistics a publish takes milliseconds, and
/// publishing at the minimum interval would spend a core on files nobody
/// reads that fast. Small partitions keep the minimum interval.
const PUBLISH_COST_FACTOR: u32 = 40;
/// The longest a partition's newest snapshot waits for its publish.
const MAX_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// A partition that is not behind waits this many times the CPU time its
/// publishes take: a publish rewrites the whole history, so with centuries
/// of it (an hour at ten times the assignment's pace) publishing every
/// commit would make the exporter's work grow with the history. This keeps
/// it under 1% of a core per partition. A young partition's publish takes
/// 0.3-0.6 ms of CPU, so 30-60 ms apart: less than the 100 ms between
/// reports at the assignment's pace. CPU time, not wall time: a slow fsync
/// costs no CPU, and must not delay the next publish.
const CAUGHT_UP_CPU_FACTOR: u32 = 100;

/// When a partition may publish again: `factor` times what its last
/// publish cost, within the minimum and maximum intervals.
fn spaced_by(cost: Duration, factor: u32) -> Duration {
    cost.saturating_mul(factor)
        .clamp(MIN_PUBLISH_INTERVAL, MAX_PUBLISH_INTERVAL)
}

/// What a partition's last publish took, and when it ended.
#[derive(Clone, Copy, Debug)]
struct LastPublish {
    ended: Instant,
    /// Wall time: render, write, fsyncs, rename.
    took: Duration,
    /// The exporter thread's CPU time per publish, a moving average: one
    /// publish that met a page-fault storm or reclaim must not hold the
    /// next one for long.
    cpu_average: Duration,
}

/// CPU time the calling thread has used, where the platform tells.
fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut time = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a pointer to a
        // local that outlives the call, and reads nothing of ours.
        #[allow(unsafe_code)] // std has no thread CPU clock.
        let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
        if status == 0 {
            return Some(
                Duration::from_secs(u64::try_from(time.tv_sec).ok()?)
                    + Duration::from_nanos(u64::try_from(time.tv_nsec).ok()?),
            );
        }
    }
    None
}

/// A committed snapshot, sent to the exporter.
pub struct CommittedSnapshot {
    pub snapshot: Arc<Snapshot>,
    /// More is waiting in the log (the partition is catching up): its
    /// publishes may be spaced by their cost, as a newer snapshot follows
    /// soon. A partition that is not behind publishes at the minimum
    /// interval.
    pub backlog: bool,
}

impl CommittedSnapshot {
    /// A snapshot to publish as soon as the minimum interval allows.
    pub fn current(snapshot: Arc<Snapshot>) -> Self {
        CommittedSnapshot {
            snapshot,
            backlog: false,
        }
    }
}

/// What the exporter is sent.
enum Export {
    CommittedSnapshot(CommittedSnapshot),
    /// The partition stops in this process: publish this, its last
    /// snapshot, now, forget the partition (from then on the chart reads
    /// its file), and answer.
    Release {
        snapshot: Arc<Snapshot>,
        done: Sender<Result<(), String>>,
    },
    /// The partition was lost to another process: drop what waits of it,
    /// unwritten, and forget it.
    Forget(PartitionId),
}

/// A worker's way to the exporter, and to the snapshot writer when there
/// is one; the exporter ends when all are dropped.
#[derive(Clone)]
pub(crate) struct ToExporter(Sender<Export>, Option<ToSnapshots>);

/// The exporter has stopped (its thread ended).
#[derive(Debug, thiserror::Error)]
#[error("the exporter stopped")]
pub(crate) struct ExporterStopped;

impl ToExporter {
    /// Hands a committed snapshot over; it is published when due.
    pub(crate) fn publish(&self, committed: CommittedSnapshot) -> Result<(), ExporterStopped> {
        if let Some(snapshots) = &self.1 {
            snapshots.offer(&committed.snapshot);
        }
        self.0
            .send(Export::CommittedSnapshot(committed))
            .map_err(|_| ExporterStopped)
    }

    /// Publishes `snapshot`, a stopping partition's last, and waits until
    /// it is written (or was already, or something newer was), at most
    /// `timeout`; the exporter then forgets the partition.
    /// A partition lost to another process: nothing more of it is
    /// published or written to the snapshot topic (what waits is dropped).
    pub(crate) fn forget(&self, partition: PartitionId) {
        if let Some(snapshots) = &self.1 {
            snapshots.forget(partition);
        }
        let _ = self.0.send(Export::Forget(partition));
    }

    /// Waits, at most `timeout`, until `snapshot` (a released partition's
    /// last) is acknowledged by the snapshot topic; whether it was (true
    /// without snapshots: there is nothing to wait for).
    pub(crate) fn hand_over(&self, snapshot: &Arc<Snapshot>, timeout: Duration) -> bool {
        match &self.1 {
            Some(snapshots) => snapshots.hand_over(snapshot, timeout),
            None => true,
        }
    }

    pub(crate) fn release(&self, snapshot: Arc<Snapshot>, timeout: Duration) -> anyhow::Result<()> {
        let partition = snapshot.partition;
        if let Some(snapshots) = &self.1 {
            snapshots.last(&snapshot);
        }
        let (done, answer) = crossbeam_channel::bounded(1);
        self.0
            .send(Export::Release { snapshot, done })
            .map_err(|_| ExporterStopped)?;
        match answer.recv_timeout(timeout) {
            Ok(result) => result.map_err(|reason| {
                anyhow::anyhow!("partition {partition}: the last publish failed: {reason}")
            }),
            Err(RecvTimeoutError::Timeout) => Err(anyhow::anyhow!(
                "partition {partition}: the last publish did not end within {timeout:?}"
            )),
            Err(RecvTimeoutError::Disconnected) => Err(ExporterStopped.into()),
        }
    }
}

/// The exporter thread and the sending side of its channel.
pub struct Exporter {
    sender: Option<ToExporter>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Starts the exporter; `render_chart` re-renders month.svg after
    /// publishing (at most once per [`CHART_INTERVAL`]). Each publish is
    /// preceded by its proof in the state folder ([`Folders::publish`]).
    /// `beat`, when given, tells `/healthz` whether the thread is busy or
    /// waits for work.
    pub(crate) fn spawn(
        folders: Folders,
        render_chart: bool,
        metrics: Option<Arc<Metrics>>,
        beat: Option<Beat>,
    ) -> std::io::Result<Self> {
        let mut export = ExportLoop::new(folders, render_chart);
        export.metrics = metrics;
        export.beat = beat;
        Self::start(export)
    }

    fn start(export: ExportLoop) -> std::io::Result<Self> {
        let (sender, receiver) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let thread = crate::shutdown::spawn("exporter", move || export.run(receiver))?;
        Ok(Exporter {
            sender: Some(ToExporter(sender, None)),
            thread: Some(thread),
        })
    }

    /// Every committed snapshot handed over from now on goes to the
    /// snapshot writer too.
    pub(crate) fn with_snapshots(mut self, snapshots: ToSnapshots) -> Self {
        if let Some(sender) = &mut self.sender {
            sender.1 = Some(snapshots);
        }
        self
    }

    /// A sender for one worker; the exporter ends when all are dropped.
    pub(crate) fn sender(&self) -> ToExporter {
        self.sender.clone().expect("sender is kept until finish")
    }

    /// Publishes what is pending and joins the thread.
    pub fn finish(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("exporter thread panicked");
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.shut();
    }
}

struct ExportLoop {
    folders: Folders,
    /// Each partition's recent proofs, oldest first.
    proofs: BTreeMap<PartitionId, Vec<Proof>>,
    render_chart: bool,
    /// (epoch, offset) last written per partition: never go back.
    published: BTreeMap<PartitionId, (u64, Offset)>,
    /// Snapshots waiting to be written, each with when it may be.
    pending: BTreeMap<PartitionId, (Arc<Snapshot>, Instant)>,
    last_publish: BTreeMap<PartitionId, LastPublish>,
    /// What the chart needs of each partition published here.
    chart_inputs: BTreeMap<PartitionId, ChartInput>,
    chart: ChartRenderer,
    chart_due: bool,
    last_chart: Option<Instant>,
    /// A full or failing disk fails every retry: one line per interval.
    write_errors: LogLimiter,
    /// Publishes left out for a newer file: one line per this interval.
    fenced_lines: LogLimiter,
    metrics: Option<Arc<Metrics>>,
    /// Each partition's metric handles, looked up once.
    partition_metrics: BTreeMap<PartitionId, PartitionMetrics>,
    /// The thread's heartbeat (`/healthz`).
    beat: Option<Beat>,
}

impl ExportLoop {
    fn new(folders: Folders, render_chart: bool) -> Self {
        ExportLoop {
            chart: ChartRenderer::new(folders.files_dir().to_path_buf()),
            folders,
            proofs: BTreeMap::new(),
            render_chart,
            published: BTreeMap::new(),
            pending: BTreeMap::new(),
            last_publish: BTreeMap::new(),
            chart_inputs: BTreeMap::new(),
            chart_due: false,
            last_chart: None,
            write_errors: LogLimiter::new(WRITE_ERROR_LOG_INTERVAL),
            fenced_lines: LogLimiter::new(WRITE_ERROR_LOG_INTERVAL),
            metrics: None,
            partition_metrics: BTreeMap::new(),
            beat: None,
        }
    }

    fn run(mut self, receiver: Receiver<Export>) {
        loop {
            let wait = self.next_wakeup();
            if let Some(beat) = &self.beat {
                beat.waiting();
            }
            let first = match wait {
                None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(timeout) => receiver.recv_timeout(timeout),
            };
            if let Some(beat) = &self.beat {
                beat.busy();
            }
            match first {
                Ok(message) => self.take(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(message) = receiver.try_recv() {
                self.take(message);
            }
            self.publish_due(false);
            self.maybe_render_chart(false);
        }
        self.publish_due(true);
        self.maybe_render_chart(true);
    }

    fn take(&mut self, message: Export) {
        match message {
            Export::CommittedSnapshot(committed) => self.accept(committed),
            Export::Release { snapshot, done } => {
                // The caller may have given up waiting: nothing to tell then.
                let _ = done.send(self.release(snapshot));
            }
            Export::Forget(partition) => {
                self.pending.remove(&partition);
                self.forget(partition);
            }
        }
    }

    fn forget(&mut self, partition: PartitionId) {
        self.published.remove(&partition);
        self.last_publish.remove(&partition);
        self.proofs.remove(&partition);
        if self.chart_inputs.remove(&partition).is_some() {
            self.chart_due = true;
        }
    }

    /// Publishes a stopping partition's last snapshot now and forgets the
    /// partition. A snapshot that cannot be written is dropped, not
    /// retried: the partition is no longer this process's to publish.
    fn release(&mut self, snapshot: Arc<Snapshot>) -> Result<(), String> {
        let partition = snapshot.partition;
        self.accept(CommittedSnapshot::current(snapshot));
        let result = match self.pending.remove(&partition) {
            Some((snapshot, _)) => self.write(partition, &snapshot),
            // Already published, or something newer was.
            None => Ok(()),
        };
        self.forget(partition);
        result.map_err(|e| e.to_string())
    }

    fn next_wakeup(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut wake: Option<Duration> = self
            .pending
            .values()
            .map(|(_, due)| due.saturating_duration_since(now))
            .min();
        if self.chart_due {
            let left = self.last_chart.map_or(Duration::ZERO, |t| {
                CHART_INTERVAL.saturating_sub(t.elapsed())
            });
            wake = Some(wake.map_or(left, |w| w.min(left)));
        }
        wake
    }

    fn accept(&mut self, committed: CommittedSnapshot) {
        let CommittedSnapshot { snapshot, backlog } = committed;
        let partition = snapshot.partition;
        let newer = |s: &Snapshot, than: (u64, Offset)| (s.epoch, s.next_offset) >= than;
        if let Some(&done) = self.published.get(&partition) {
            if !newer(&snapshot, done) {
                return;
            }
        }
        let mut due = match self.last_publish.get(&partition) {
            None => Instant::now(),
            Some(last) if backlog => last.ended + spaced_by(last.took, PUBLISH_COST_FACTOR),
            Some(last) => last.ended + spaced_by(last.cpu_average, CAUGHT_UP_CPU_FACTOR),
        };
        if let Some((queued, queued_due)) = self.pending.get(&partition) {
            if !newer(&snapshot, (queued.epoch, queued.next_offset)) {
                return;
            }
            due = due.min(*queued_due);
        }
        self.pending.insert(partition, (snapshot, due));
    }

    /// Writes pending snapshots that are due (all of them when `all`).
    fn publish_due(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<PartitionId> = self
            .pending
            .iter()
            .filter(|(_, (_, at))| all || *at <= now)
            .map(|(p, _)| *p)
            .collect();
        for partition in due {
            let Some((snapshot, _)) = self.pending.remove(&partition) else {
                continue;
            };
            if let Err(error) = self.write(partition, &snapshot) {
                if let Some(suppressed) = self.write_errors.allow(Instant::now()) {
                    log::error!(
                        "cannot write {}: {error}; state is kept, retrying{}",
                        self.folders.partition_file(partition).display(),
                        suppressed_note(suppressed)
                    );
                }
                self.pending
                    .insert(partition, (snapshot, Instant::now() + RETRY_INTERVAL));
            }
        }
    }

    /// Writes one snapshot (its proof first) and notes what it cost.
    fn write(&mut self, partition: PartitionId, snapshot: &Snapshot) -> std::io::Result<()> {
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        let published = self
            .folders
            .publish(snapshot, self.proofs.entry(partition).or_default())?;
        if let Published::Fenced { file_offset } = published {
            // Another process owns the partition now, or did and got
            // further: its file stays. Not an error; nothing to retry.
            if let Some(metrics) = &self.metrics {
                metrics.fenced(partition);
            }
            if let Some(suppressed) = self.fenced_lines.allow(Instant::now()) {
                log::info!(
                    "partition {partition}: {} is newer ({}) than this process's offset {}: left as it is{}",
                    self.folders.partition_file(partition).display(),
                    file_offset
                        .map_or_else(|| "a newer epoch".to_string(), |o| format!("offset {o}")),
                    snapshot.next_offset,
                    suppressed_note(suppressed)
                );
            }
            self.published
                .insert(partition, (snapshot.epoch, snapshot.next_offset));
            return Ok(());
        }
        let took = started.elapsed();
        let cpu = thread_cpu_time()
            .zip(cpu_started)
            .map_or(took, |(end, start)| end.saturating_sub(start));
        let cpu_average = self
            .last_publish
            .get(&partition)
            .map_or(cpu, |last| (last.cpu_average * 7 + cpu) / 8);
        self.published
            .insert(partition, (snapshot.epoch, snapshot.next_offset));
        self.last_publish.insert(
            partition,
            LastPublish {
                ended: Instant::now(),
                took,
                cpu_average,
            },
        );
        if let Some(metrics) = &self.metrics {
            self.partition_metrics
                .entry(partition)
                .or_insert_with(|| metrics.partition(partition))
                .published(took);
        }
        if self.render_chart {
            self.chart_inputs
                .insert(partition, chart_input(&snapshot.aggregates));
            self.chart_due = true;
        }
        Ok(())
    }

    fn maybe_render_chart(&mut self, force: bool) {
        if !self.chart_due {
            return;
        }
        if !force
            && self
                .last_chart
                .is_some_and(|t| t.elapsed() < CHART_INTERVAL)
        {
            return;
        }
        self.last_chart = Some(Instant::now());
        self.chart_due = false;
        if let Err(error) = self.chart.render(&self.chart_inputs) {
            log::warn!("cannot render month.svg: {error:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aggregate::Aggregates;
    use crate::store::folders::partition_file;
    use crate::store::published::parse_partition_json;

    /// Folders in `dir`, the state folder (where the proofs go) made.
    fn folders(files_dir: &std::path::Path, state_dir: &std::path::Path) -> Folders {
        std::fs::create_dir_all(state_dir).unwrap();
        Folders::new(files_dir, state_dir)
    }

    fn folders_in(dir: &std::path::Path) -> Folders {
        folders(dir, &dir.join("state"))
    }

    fn empty_snapshot(partition: PartitionId, epoch: u64, next_offset: Offset) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            partition,
            epoch,
            next_offset,
            aggregates: Aggregates::new(),
            counters: Default::default(),
            last_record: None,
            anchor: None,
            last_commit_unix_ms: None,
        })
    }

    #[test]
    fn exporter_never_publishes_an_older_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut exporter = ExportLoop::new(folders_in(dir.path()), false);
        let snap = |epoch, offset| empty_snapshot(0, epoch, offset);
        let offset_on_disk = || {
            let text = std::fs::read_to_string(partition_file(dir.path(), 0)).unwrap();
            parse_partition_json(&text).unwrap().offset
        };
        exporter.accept(CommittedSnapshot::current(snap(0, 10)));
        exporter.accept(CommittedSnapshot::current(snap(0, 5)));
        exporter.publish_due(true);
        assert_eq!(offset_on_disk(), 10);
        exporter.accept(CommittedSnapshot::current(snap(0, 7)));
        exporter.publish_due(true);
        assert_eq!(offset_on_disk(), 10);
        // A reset (new epoch) may go back to 0.
        exporter.accept(CommittedSnapshot::current(snap(1, 0)));
        exporter.publish_due(true);
        assert_eq!(offset_on_disk(), 0);
    }

    #[test]
    fn publishes_are_spaced_by_their_cost_and_when_caught_up_by_their_cpu_time() {
        assert_eq!(
            spaced_by(Duration::from_micros(300), PUBLISH_COST_FACTOR),
            MIN_PUBLISH_INTERVAL
        );
        assert_eq!(
            spaced_by(Duration::from_millis(5), PUBLISH_COST_FACTOR),
            Duration::from_millis(200)
        );
        assert_eq!(
            spaced_by(Duration::from_secs(2), PUBLISH_COST_FACTOR),
            MAX_PUBLISH_INTERVAL
        );

        let dir = tempfile::tempdir().unwrap();
        let mut exporter = ExportLoop::new(folders_in(dir.path()), false);
        let snap = |offset| empty_snapshot(0, 0, offset);
        // As if the last publish ended now and took 5 ms, 0.1 ms of CPU.
        let ended = Instant::now();
        exporter.last_publish.insert(
            0,
            LastPublish {
                ended,
                took: Duration::from_millis(5),
                cpu_average: Duration::from_micros(100),
            },
        );
        exporter.accept(CommittedSnapshot {
            snapshot: snap(1),
            backlog: true,
        });
        assert_eq!(exporter.pending[&0].1, ended + Duration::from_millis(200));
        // Another full batch keeps the wait; a batch that drained the
        // backlog is published at the minimum interval.
        exporter.accept(CommittedSnapshot {
            snapshot: snap(2),
            backlog: true,
        });
        assert_eq!(exporter.pending[&0].1, ended + Duration::from_millis(200));
        exporter.accept(CommittedSnapshot::current(snap(3)));
        assert_eq!(exporter.pending[&0].0.next_offset, 3);
        assert_eq!(exporter.pending[&0].1, ended + MIN_PUBLISH_INTERVAL);
        // A caught-up partition whose publish cost 2 ms of CPU (centuries
        // of statistics) waits 100 times that.
        exporter.pending.clear();
        exporter.last_publish.insert(
            0,
            LastPublish {
                ended,
                took: Duration::from_millis(3),
                cpu_average: Duration::from_millis(2),
            },
        );
        exporter.accept(CommittedSnapshot::current(snap(4)));
        assert_eq!(exporter.pending[&0].1, ended + Duration::from_millis(200));
        // The first publish of a partition waits for nothing.
        exporter.accept(CommittedSnapshot {
            snapshot: empty_snapshot(1, 0, 1),
            backlog: true,
        });
        assert!(exporter.pending[&1].1 <= Instant::now());
    }

    #[cfg(unix)]
    #[test]
    fn the_thread_cpu_clock_counts_work_not_sleep() {
        let start = thread_cpu_time().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_time().unwrap() - start;
        assert!(slept < Duration::from_millis(20), "{slept:?}");
        // Work advances it (within a wall-clock deadline, however loaded the
        // machine is).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        while thread_cpu_time().unwrap() - start < slept + Duration::from_millis(30) {
            assert!(
                Instant::now() < deadline,
                "the thread CPU clock stood still"
            );
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    #[test]
    fn unwritable_folder_keeps_the_snapshot_pending() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not-yet");
        let mut exporter = ExportLoop::new(folders(&missing, &dir.path().join("state")), false);
        exporter.accept(CommittedSnapshot::current(Arc::new(Snapshot {
            partition: 3,
            epoch: 0,
            next_offset: 4,
            aggregates: Aggregates::new(),
            counters: Default::default(),
            last_record: None,
            anchor: None,
            last_commit_unix_ms: None,
        })));
        exporter.publish_due(true);
        assert_eq!(exporter.pending.len(), 1);
        std::fs::create_dir(&missing).unwrap();
        exporter.publish_due(true);
        assert!(exporter.pending.is_empty());
        assert!(partition_file(&missing, 3).exists());
    }

    /// The child's side of the test below: an exporter whose renderer
    /// never returns, a real SIGTERM, then the usual stop, which waits for
    /// the exporter forever. The deadline must end the process.
    fn stuck_exporter_child() {
        static DRAWING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        fn never_returns(_: &[crate::publish::chart::Bar]) -> anyhow::Result<String> {
            DRAWING.store(true, std::sync::atomic::Ordering::SeqCst);
            loop {
                std::thread::park();
            }
        }
        let shutdown =
            crate::shutdown::Shutdown::install("exporter-test", Duration::from_millis(1500))
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut export = ExportLoop::new(folders_in(dir.path()), true);
        export.chart = ChartRenderer::new(dir.path().to_path_buf()).drawing_with(never_returns);
        let exporter = Exporter::start(export).unwrap();
        exporter
            .sender()
            .publish(CommittedSnapshot::current(empty_snapshot(0, 0, 1)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !DRAWING.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the renderer was never called");
            std::thread::sleep(Duration::from_millis(5));
        }
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        assert!(shutdown.requested());
        exporter.finish();
        unreachable!("the exporter cannot finish");
    }

    #[test]
    fn a_renderer_that_never_returns_cannot_hold_up_the_stop() {
        const CHILD: &str = "WEATHERSTREAM_STUCK_EXPORTER_CHILD";
        if std::env::var_os(CHILD).is_some() {
            stuck_exporter_child();
            return;
        }
        let started = Instant::now();
        // This test's own name, wherever the module lives.
        let name = concat!(
            module_path!(),
            "::a_renderer_that_never_returns_cannot_hold_up_the_stop"
        );
        let name = name.split_once("::").map_or(name, |(_, path)| path);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Far above the 1.5 s deadline: only a stop that never ends fails.
        let limit = Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                child.kill().unwrap();
                panic!("the process did not end within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("did not stop within"))
            .unwrap_or_else(|| panic!("no deadline line in {stderr:?}"));
        assert!(
            line.starts_with("exporter-test: error: did not stop within 1.5 s"),
            "{line}"
        );
        assert!(line.contains("still running: exporter"), "{line}");
        assert!(started.elapsed() >= Duration::from_millis(1500));
    }
}
