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
//! - [`verify`]: the rechecker thread and its record probe, which tell
//!   whether stored fingerprints are still in the topic.
//!
//! [`clients`] owns the Kafka clients the workers read with: one of a
//! partition's own while it catches up, and one shared by the process for
//! every partition at the end of its log.

mod clients;
mod group;
mod group_offsets;
mod machine;
mod partition;
mod recheck;
mod restore;
mod stall;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::kafka::link::BrokerLink;
use crate::kafka::{ClientSettings, Offset, PartitionId, TopicAdmin, DEFAULT_GROUP_ID};
pub use crate::publish::health::DEFAULT_WEDGED_AFTER;
use crate::publish::health::{Beat, Health, Ownership};
use crate::publish::metrics::Metrics;
pub use crate::publish::snapshots::{SnapshotSettings, DEFAULT_SNAPSHOT_INTERVAL};
use crate::shutdown::Shutdown;
use crate::store::atomic_file;
use crate::store::changelog;
use crate::store::snapshot::Snapshot;
use crate::web::WebConfig;
use partition::{Claimed, PartitionRun, Pipeline};
use stall::{StallNews, StallWatch};

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
/// Longest a stopping partition waits for its last publish: a write that
/// fails is told at once, so this is only reached by an exporter that
/// hangs (and the shutdown deadline ends the process then anyway).
const STOP_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// `/healthz` fails when a worker thread is busy with one step for
    /// longer than this (waits do not count).
    pub wedged_after: Duration,
    /// The consumer group of every client (one group ACL covers them),
    /// where each committed batch's next offset is committed for Kafka's
    /// tools (never read back). Never in `client` as well.
    pub group_id: String,
    /// Commit offsets to `group_id`.
    pub commit_group_offsets: bool,
    /// Run as a member of consumer group `group_id` (`consumer --group`):
    /// the group assigns the partitions, and `partitions` is empty.
    pub join_group: bool,
    /// The snapshot topic and interval; None: no snapshots are written or
    /// restored (`--no-snapshots`).
    pub snapshots: Option<SnapshotSettings>,
    /// When the offset to resume from is below the log start: count from
    /// the log start (the statistics are then partial) instead of failing.
    pub count_from_log_start: bool,
}

impl ConsumerConfig {
    /// Progress lines, by default.
    pub const DEFAULT_PROGRESS_INTERVAL: Option<Duration> = Some(Duration::from_secs(10));

    /// Defaults for everything but the connection, folders and partitions;
    /// set the rest in the same expression (`ConsumerConfig { max_batch:
    /// 1, ..ConsumerConfig::new(..) }`). The settings' `group.id` and
    /// `fetch.wait.max.ms` become [`ConsumerConfig::group_id`] and
    /// [`ConsumerConfig::fetch_wait_ms`] and leave `client`: each setting
    /// has one value, which every client is made from.
    pub fn new(
        mut client: ClientSettings,
        topic: impl Into<String>,
        files_dir: PathBuf,
        state_dir: PathBuf,
        partitions: Vec<PartitionId>,
    ) -> Self {
        let group_id = client
            .take("group.id")
            .unwrap_or_else(|| DEFAULT_GROUP_ID.to_string());
        // librdkafka checks the number when a client is made: a setting
        // that does not parse here would fail there too.
        let fetch_wait_ms = client
            .take("fetch.wait.max.ms")
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(DEFAULT_FETCH_WAIT_MS);
        let topic = topic.into();
        ConsumerConfig {
            client,
            files_dir,
            state_dir,
            partitions,
            max_batch: 10_000,
            batch_timeout_ms: 100,
            fetch_wait_ms,
            verify_interval: DEFAULT_VERIFY_INTERVAL,
            progress_interval: Self::DEFAULT_PROGRESS_INTERVAL,
            render_chart: true,
            metrics_addr: None,
            web: None,
            wedged_after: DEFAULT_WEDGED_AFTER,
            snapshots: Some(SnapshotSettings {
                topic: changelog::default_topic(&topic),
                interval: DEFAULT_SNAPSHOT_INTERVAL,
            }),
            count_from_log_start: false,
            topic,
            group_id,
            commit_group_offsets: true,
            join_group: false,
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
    if !config.join_group {
        check_partition_list(&config.partitions).map_err(|e| anyhow!(e))?;
    }
    // Bound first: a bad address is an error before any partition is touched.
    let metrics = Metrics::new();
    let ownership = if config.join_group {
        Ownership::Group
    } else {
        Ownership::Manual(config.partitions.clone())
    };
    let health = Health::new(ownership, config.wedged_after, shutdown);
    let _metrics_server = match &config.metrics_addr {
        Some(address) => Some(crate::publish::metrics::serve(
            address,
            config.web.clone(),
            metrics.clone(),
            health.clone(),
        )?),
        None => None,
    };
    // Durably: a folder whose name is lost at a power cut takes everything
    // committed in it along.
    atomic_file::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state folder {}", config.state_dir.display()))?;
    // A group member claims its partitions as they are assigned; a second
    // member on the same state folder fails here, before joining.
    let _member_lock = if config.join_group {
        Some(partition::MemberLock::take(&config.state_dir)?)
    } else {
        None
    };
    // Claim every partition first: a second process fails before touching anything.
    let mut claimed = Vec::new();
    for &partition in &config.partitions {
        claimed.push(Claimed::open(&config.state_dir, partition)?);
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

    if config.join_group {
        let pipeline = Pipeline::start(config, metrics.clone(), &health, shutdown)?;
        let link = pipeline.shared_link();
        return group::run(config, pipeline, metrics, &health, link, shutdown);
    }
    let pipeline = Pipeline::start(config, metrics.clone(), &health, shutdown)?;
    metrics.set_partitions_owned(claimed.len());
    let mut runs = Vec::new();
    let mut first_error = None;
    for claimed in claimed {
        match pipeline.run(claimed) {
            Ok(run) => runs.push(run),
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    if first_error.is_none() {
        first_error = supervise(config, &runs, pipeline.link(), &health, shutdown).err();
    }
    shutdown.request();
    for run in runs {
        if let Err(e) = run.stop(STOP_PUBLISH_TIMEOUT) {
            first_error.get_or_insert(e);
        }
    }
    pipeline.finish();
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

/// Watches the workers until one ends or shutdown: stalls (see
/// [`stall`]) and the progress lines.
fn supervise(
    config: &ConsumerConfig,
    workers: &[PartitionRun],
    link: &BrokerLink,
    health: &Arc<Health>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let mut supervisor = Supervisor::new(config.progress_interval, health);
    while !shutdown.wait(SUPERVISE_INTERVAL) {
        if workers.iter().any(|w| w.is_finished()) {
            return Ok(());
        }
        supervisor.look(workers.iter(), link);
    }
    Ok(())
}

/// What is watched of the running partitions, whichever they are at the
/// moment (a group member's change): stalls and the progress lines.
struct Supervisor {
    progress_interval: Option<Duration>,
    /// Told whether a broker is reachable (`/readyz`).
    health: Arc<Health>,
    /// The supervising thread's heartbeat (`/healthz`): it looks every
    /// [`SUPERVISE_INTERVAL`].
    beat: Beat,
    /// Per partition: its stall watch and its offset at the last line.
    watches: BTreeMap<PartitionId, (StallWatch, Offset)>,
    last_report: Instant,
}

impl Supervisor {
    fn new(progress_interval: Option<Duration>, health: &Arc<Health>) -> Self {
        Supervisor {
            progress_interval,
            health: health.clone(),
            beat: health.beat("supervisor"),
            watches: BTreeMap::new(),
            last_report: Instant::now(),
        }
    }

    fn look<'a>(&mut self, workers: impl Iterator<Item = &'a PartitionRun>, link: &BrokerLink) {
        self.beat.busy();
        self.health.set_broker_down(link.is_down());
        let workers: Vec<&PartitionRun> = workers.collect();
        self.watches
            .retain(|p, _| workers.iter().any(|w| w.progress.partition == *p));
        for worker in &workers {
            let p = &worker.progress;
            let (watch, _) = self.watches.entry(p.partition).or_insert_with(|| {
                let next = p.next_offset.load(Ordering::Relaxed);
                (StallWatch::new(next, Instant::now()), next)
            });
            watch_stall(worker, watch, link);
        }
        let Some(interval) = self.progress_interval else {
            return;
        };
        if self.last_report.elapsed() < interval {
            return;
        }
        let seconds = self.last_report.elapsed().as_secs_f64();
        self.last_report = Instant::now();
        for worker in &workers {
            let p = &worker.progress;
            let Some((_, last)) = self.watches.get_mut(&p.partition) else {
                continue;
            };
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
}

/// Samples one partition for [`StallWatch`] and says what it finds.
fn watch_stall(worker: &PartitionRun, watch: &mut StallWatch, link: &BrokerLink) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_and_the_fetch_wait_leave_the_settings_as_values() {
        let mut settings = ClientSettings::plaintext("localhost:9092");
        settings.set_owned("group.id", "from-x");
        settings.set_owned("fetch.wait.max.ms", "15");
        let config = ConsumerConfig::new(settings, "t", "f".into(), "s".into(), vec![0]);
        assert_eq!(
            (config.group_id.as_str(), config.fetch_wait_ms),
            ("from-x", 15)
        );
        // One value per setting: the clients are made from these alone.
        assert_eq!(config.client.get("group.id"), None);
        assert_eq!(config.client.get("fetch.wait.max.ms"), None);
        let defaults = ConsumerConfig::new(
            ClientSettings::plaintext("localhost:9092"),
            "t",
            "f".into(),
            "s".into(),
            vec![0],
        );
        assert_eq!(
            (defaults.group_id.as_str(), defaults.fetch_wait_ms),
            (DEFAULT_GROUP_ID, DEFAULT_FETCH_WAIT_MS)
        );
    }
}
