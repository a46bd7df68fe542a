//! The snapshot writer: a thread that owns the consumer's one producer and
//! writes each partition's committed state to the snapshot topic
//! ([`crate::store::changelog`] says what a record is), so that another
//! host can take the partition over without this one's disk. It is never
//! on the commit path: workers hand committed snapshots over (the newest
//! replaces one waiting), and a partition is written at most every
//! `interval`, at once when it stops. One record in flight per partition;
//! a failed write is retried later with the newest snapshot, with one
//! warning per interval; a missing permission ends snapshots with one
//! warning naming it, and the pipeline goes on without them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::kafka::{client_config, AdminError, ClientSettings, Offset, PartitionId, TopicAdmin};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::publish::health::Beat;
use crate::publish::metrics::{Metrics, SnapshotMetrics};
use crate::store::changelog;
use crate::store::snapshot::Snapshot;

/// Where and how often snapshots are written.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettings {
    /// The snapshot topic ([`changelog::default_topic`] of the source).
    pub topic: String,
    /// Longest a committed state waits before it is snapshotted; also the
    /// least time between two snapshots of a partition.
    pub interval: Duration,
}

/// The snapshot interval when none is given.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);

/// Compaction keeps at least the snapshots of this last while: well over
/// any consumer group's session timeout (45 s by default, at most 30 min
/// on most clusters' `group.max.session.timeout.ms`), so a partition
/// handed over mid-write still finds the snapshots before the last.
const MIN_COMPACTION_LAG_MS: &str = "3600000";
/// Snapshots waiting per hand-off channel; the writer takes them at once.
const CHANNEL_CAPACITY: usize = 256;
/// How often the writer polls its producer while a record is in flight.
const DELIVERY_POLL: Duration = Duration::from_millis(50);
/// A write not acknowledged by then is failed by librdkafka and retried
/// with the newest snapshot. librdkafka's default, as the producer's: an
/// outage is told by the broker-unreachable line, and the write in flight
/// goes through when a broker is back. Shorter, a write timed out under an
/// idempotent producer makes librdkafka start the partition's sequence
/// anew, and tansu 0.6's sqlite engine (a test broker) then panics on the
/// next write and refuses every producer's writes (seen in
/// tests/faults.rs's outage).
const MESSAGE_TIMEOUT_MS: &str = "300000";
/// Longest the last snapshots may take at a stop.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one "snapshot failed" line per this.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// What the writer is sent.
enum Offer {
    /// A committed snapshot: written when its partition is due.
    Committed(Arc<Snapshot>),
    /// A stopping partition's last snapshot: written now; `done`, when
    /// given, is answered once it (or a newer one) is acknowledged.
    Last(Arc<Snapshot>, Option<Sender<()>>),
    /// The partition was lost to another process: nothing more of it is
    /// written.
    Forget(PartitionId),
}

/// A way to the writer; it ends when all are dropped.
#[derive(Clone)]
pub(crate) struct ToSnapshots(Sender<Offer>);

impl ToSnapshots {
    /// Hands a committed snapshot over. Never blocks: when the writer is
    /// behind, this one is dropped and the next replaces it.
    pub(crate) fn offer(&self, snapshot: &Arc<Snapshot>) {
        let _ = self.0.try_send(Offer::Committed(snapshot.clone()));
    }

    /// Hands a stopping partition's last snapshot over, to be written now.
    pub(crate) fn last(&self, snapshot: &Arc<Snapshot>) {
        let _ = self.0.send(Offer::Last(snapshot.clone(), None));
    }

    /// Hands a partition's last snapshot over and waits, at most
    /// `timeout`, until it is acknowledged: the next owner restores from
    /// it. Whether it was.
    pub(crate) fn hand_over(&self, snapshot: &Arc<Snapshot>, timeout: Duration) -> bool {
        let (done, answer) = crossbeam_channel::bounded(1);
        if self
            .0
            .send(Offer::Last(snapshot.clone(), Some(done)))
            .is_err()
        {
            return false;
        }
        answer.recv_timeout(timeout).is_ok()
    }

    /// Drops what is waiting of a partition another process now owns.
    pub(crate) fn forget(&self, partition: PartitionId) {
        let _ = self.0.send(Offer::Forget(partition));
    }
}

/// The writer thread.
pub(crate) struct SnapshotWriter {
    sender: Option<ToSnapshots>,
    thread: Option<JoinHandle<()>>,
}

impl SnapshotWriter {
    /// Makes sure the snapshot topic exists (created compacted, with the
    /// source's partitions and replicas, when missing) and starts the
    /// writer. None, after one warning naming what is missing, when the
    /// topic cannot be created: the consumer goes on without snapshots.
    /// `beat` tells `/healthz` whether the thread is busy or waits for
    /// work.
    pub(crate) fn start(
        client: &ClientSettings,
        source_topic: &str,
        settings: &SnapshotSettings,
        metrics: Arc<Metrics>,
        beat: Beat,
    ) -> anyhow::Result<Option<Self>> {
        if let Err(reason) = ensure_topic(client, source_topic, &settings.topic) {
            log::warn!(
                "snapshots are off: {reason}; the partitions run without them \
                 (--no-snapshots turns them off without this warning)"
            );
            return Ok(None);
        }
        let producer = snapshot_producer(client)?;
        let (sender, receiver) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let writer = WriteLoop {
            producer,
            source_topic: source_topic.to_string(),
            settings: settings.clone(),
            writer: writer_name(),
            metrics,
            partition_metrics: BTreeMap::new(),
            pending: BTreeMap::new(),
            urgent: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            last_sent: BTreeMap::new(),
            written: BTreeMap::new(),
            failures: LogLimiter::new(FAILURE_LOG_INTERVAL),
            refused: false,
            waiters: Vec::new(),
            beat,
        };
        let thread = crate::shutdown::spawn("snapshots", move || writer.run(receiver))?;
        Ok(Some(SnapshotWriter {
            sender: Some(ToSnapshots(sender)),
            thread: Some(thread),
        }))
    }

    pub(crate) fn sender(&self) -> ToSnapshots {
        self.sender.clone().expect("sender is kept until finish")
    }

    /// Writes the last snapshots (at most [`FINISH_TIMEOUT`]) and joins
    /// the thread; call it when every [`ToSnapshots`] is dropped.
    pub(crate) fn finish(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("snapshot writer thread panicked");
            }
        }
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.shut();
    }
}

/// "host/pid": who wrote a snapshot.
fn writer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}/{}", std::process::id())
}

/// The permission an authorization error says is missing.
fn missing_permission(code: RDKafkaErrorCode, topic: &str, action: &str) -> Option<String> {
    match code {
        RDKafkaErrorCode::TopicAuthorizationFailed => Some(format!(
            "the principal may not {action} topic {topic:?} (it needs {} on it)",
            if action == "create" {
                "CREATE"
            } else {
                "WRITE"
            }
        )),
        RDKafkaErrorCode::ClusterAuthorizationFailed => Some(format!(
            "the principal may not {action} topic {topic:?} (it needs {} on the cluster)",
            if action == "create" {
                "CREATE"
            } else {
                "IDEMPOTENT_WRITE"
            }
        )),
        _ => None,
    }
}

/// Creates the snapshot topic when it is missing; the reason when it
/// cannot be.
fn ensure_topic(client: &ClientSettings, source_topic: &str, topic: &str) -> Result<(), String> {
    let admin = TopicAdmin::connect(client).map_err(|e| e.to_string())?;
    if admin
        .partition_count(topic)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(());
    }
    let partitions = admin
        .partition_count(source_topic)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the source topic {source_topic:?} does not exist"))?;
    let replicas = admin
        .replica_count(source_topic)
        .map_err(|e| e.to_string())?
        .unwrap_or(1);
    let configs = [
        ("cleanup.policy", "compact"),
        ("min.compaction.lag.ms", MIN_COMPACTION_LAG_MS),
    ];
    match admin.create_topic_with(
        topic,
        i32::try_from(partitions).unwrap_or(i32::MAX),
        i32::try_from(replicas).unwrap_or(1),
        &configs,
    ) {
        Ok(created) => {
            if created {
                log::info!(
                    "created the snapshot topic {topic:?} (compacted, {partitions} partitions, \
                     replication factor {replicas})"
                );
            }
            Ok(())
        }
        Err(AdminError::TopicOperation { code, .. }) => {
            Err(missing_permission(code, topic, "create")
                .unwrap_or_else(|| format!("creating the snapshot topic {topic:?} failed: {code}")))
        }
        Err(error) => Err(format!(
            "creating the snapshot topic {topic:?} failed: {error}"
        )),
    }
}

/// The idempotent producer of snapshots: every write acknowledged by all
/// in-sync replicas, none duplicated or reordered by a retry.
fn snapshot_producer(client: &ClientSettings) -> anyhow::Result<BaseProducer<Deliveries>> {
    use anyhow::Context as _;
    client_config(client)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", MESSAGE_TIMEOUT_MS)
        .set("linger.ms", "5")
        .create_with_context(Deliveries::default())
        .context("creating the snapshot producer")
}

/// A snapshot's record key and value.
fn encoded(
    source_topic: &str,
    snapshot: &Snapshot,
    writer: &str,
    written_unix_ms: i64,
) -> (String, Vec<u8>) {
    let value = changelog::encode(source_topic, snapshot, writer, written_unix_ms);
    (changelog::key(snapshot.partition), value)
}

/// The record of `snapshot` to its partition of `topic`, carrying what
/// its delivery report needs.
fn record<'a>(
    topic: &'a str,
    key: &'a str,
    value: &'a [u8],
    snapshot: &Arc<Snapshot>,
) -> BaseRecord<'a, str, [u8], Box<Sent>> {
    let sent = Box::new(Sent {
        snapshot: snapshot.clone(),
        bytes: value.len(),
    });
    BaseRecord::with_opaque_to(topic, sent)
        .partition(snapshot.partition)
        .key(key)
        .payload(value)
}

/// What one write was.
struct Sent {
    snapshot: Arc<Snapshot>,
    bytes: usize,
}

/// Delivery reports, taken by the writer thread after each poll (the
/// producer calls back on the polling thread: the lock is never contended).
#[derive(Default)]
struct Deliveries {
    done: Mutex<Vec<(Sent, Result<(), KafkaError>)>>,
}

impl Deliveries {
    /// The reports that came in since the last call.
    fn take(&self) -> Vec<(Sent, Result<(), KafkaError>)> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Sent>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.clone()),
        };
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((*sent, outcome));
    }
}

struct WriteLoop {
    producer: BaseProducer<Deliveries>,
    source_topic: String,
    settings: SnapshotSettings,
    writer: String,
    metrics: Arc<Metrics>,
    partition_metrics: BTreeMap<PartitionId, SnapshotMetrics>,
    /// The newest snapshot of each partition not written yet.
    pending: BTreeMap<PartitionId, Arc<Snapshot>>,
    /// Partitions whose pending snapshot is written without waiting.
    urgent: BTreeSet<PartitionId>,
    in_flight: BTreeSet<PartitionId>,
    last_sent: BTreeMap<PartitionId, Instant>,
    /// (epoch, next offset) of each partition's last acknowledged write.
    written: BTreeMap<PartitionId, (u64, Offset)>,
    failures: LogLimiter,
    /// A permission is missing: nothing more is written.
    refused: bool,
    /// Who waits for a partition's snapshot of at least this order to be
    /// acknowledged.
    waiters: Vec<(PartitionId, (u64, Offset), Sender<()>)>,
    /// The thread's heartbeat (`/healthz`).
    beat: Beat,
}

fn order(snapshot: &Snapshot) -> (u64, Offset) {
    (snapshot.epoch, snapshot.next_offset)
}

impl WriteLoop {
    fn run(mut self, receiver: Receiver<Offer>) {
        loop {
            // Every step between two waits is a few calls that do not block:
            // librdkafka queues the writes and reports deliveries on a poll.
            self.beat.waiting();
            let message = match self.next_wakeup(Instant::now()) {
                None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(wait) => receiver.recv_timeout(wait),
            };
            self.beat.busy();
            match message {
                Ok(offer) => self.take(offer),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(offer) = receiver.try_recv() {
                self.take(offer);
            }
            self.send_due(Instant::now());
            self.producer.poll(Duration::ZERO);
            self.take_deliveries();
            self.answer_waiters();
        }
        self.finish();
    }

    /// Answers those waiting for snapshots now acknowledged, or that will
    /// never be written (a missing permission).
    fn answer_waiters(&mut self) {
        let (written, refused) = (&self.written, self.refused);
        self.waiters.retain(|(partition, order, done)| {
            let acknowledged = written.get(partition).is_some_and(|w| w >= order);
            if acknowledged || refused {
                let _ = done.send(());
            }
            !(acknowledged || refused)
        });
    }

    fn take(&mut self, offer: Offer) {
        let (snapshot, urgent) = match offer {
            Offer::Committed(snapshot) => (snapshot, false),
            Offer::Last(snapshot, done) => {
                if let Some(done) = done {
                    if snapshot.next_offset == 0 {
                        // Nothing counted is nothing to hand over.
                        let _ = done.send(());
                    } else {
                        self.waiters
                            .push((snapshot.partition, order(&snapshot), done));
                    }
                }
                (snapshot, true)
            }
            Offer::Forget(partition) => {
                self.pending.remove(&partition);
                self.urgent.remove(&partition);
                return;
            }
        };
        let partition = snapshot.partition;
        let newer_than = |known: Option<(u64, Offset)>| known.is_none_or(|k| order(&snapshot) > k);
        if !newer_than(self.written.get(&partition).copied())
            || !newer_than(self.pending.get(&partition).map(|s| order(s)))
        {
            return;
        }
        // Nothing counted yet: nothing another host could not count itself.
        if snapshot.next_offset == 0 {
            return;
        }
        self.pending.insert(partition, snapshot);
        if urgent {
            self.urgent.insert(partition);
        }
    }

    /// When `partition`'s pending snapshot may be written (`now` if at once).
    fn due_at(&self, partition: PartitionId, now: Instant) -> Option<Instant> {
        if self.in_flight.contains(&partition) || !self.pending.contains_key(&partition) {
            return None;
        }
        match (
            self.urgent.contains(&partition),
            self.last_sent.get(&partition),
        ) {
            (true, _) | (false, None) => Some(now),
            (false, Some(sent)) => Some(*sent + self.settings.interval),
        }
    }

    fn next_wakeup(&self, now: Instant) -> Option<Duration> {
        let due = self
            .pending
            .keys()
            .filter_map(|p| self.due_at(*p, now))
            .min()
            .map(|at| at.saturating_duration_since(now));
        if self.in_flight.is_empty() {
            due
        } else {
            Some(due.map_or(DELIVERY_POLL, |d| d.min(DELIVERY_POLL)))
        }
    }

    fn send_due(&mut self, now: Instant) {
        if self.refused {
            self.pending.clear();
            return;
        }
        let due: Vec<PartitionId> = self
            .pending
            .keys()
            .copied()
            .filter(|p| self.due_at(*p, now).is_some_and(|at| at <= now))
            .collect();
        for partition in due {
            let Some(snapshot) = self.pending.remove(&partition) else {
                continue;
            };
            self.urgent.remove(&partition);
            let now_ms = chrono::Utc::now().timestamp_millis();
            let (key, value) = encoded(&self.source_topic, &snapshot, &self.writer, now_ms);
            match self
                .producer
                .send(record(&self.settings.topic, &key, &value, &snapshot))
            {
                Ok(()) => {
                    self.in_flight.insert(partition);
                    self.last_sent.insert(partition, now);
                }
                Err((error, _)) => {
                    self.last_sent.insert(partition, now);
                    self.failed(&snapshot, &error);
                }
            }
        }
    }

    fn take_deliveries(&mut self) {
        for (sent, outcome) in self.producer.context().take() {
            let partition = sent.snapshot.partition;
            self.in_flight.remove(&partition);
            match outcome {
                Ok(()) => {
                    self.written.insert(partition, order(&sent.snapshot));
                    self.partition_metrics(partition)
                        .written(sent.bytes, sent.snapshot.next_offset);
                }
                Err(error) => self.failed(&sent.snapshot, &error),
            }
        }
    }

    fn partition_metrics(&mut self, partition: PartitionId) -> &SnapshotMetrics {
        let metrics = &self.metrics;
        self.partition_metrics
            .entry(partition)
            .or_insert_with(|| metrics.snapshots(partition))
    }

    /// A write failed: warn (rate-limited), count it, and keep the snapshot
    /// for the next try unless a newer one is waiting. A missing
    /// permission ends snapshots instead.
    fn failed(&mut self, snapshot: &Arc<Snapshot>, error: &KafkaError) {
        let partition = snapshot.partition;
        self.partition_metrics(partition).failed();
        let code = error.rdkafka_error_code();
        if let Some(permission) =
            code.and_then(|c| missing_permission(c, &self.settings.topic, "write to"))
        {
            if !self.refused {
                log::warn!(
                    "snapshots are off: {permission}; the partitions run without them \
                     (--no-snapshots turns them off without this warning)"
                );
            }
            self.refused = true;
            return;
        }
        if let Some(suppressed) = self.failures.allow(Instant::now()) {
            log::warn!(
                "partition {partition}: the snapshot at offset {} was not written to {:?} ({error}); \
                 retrying within {} s with the newest{}",
                snapshot.next_offset,
                self.settings.topic,
                self.settings.interval.as_secs_f64(),
                suppressed_note(suppressed)
            );
        }
        self.pending
            .entry(partition)
            .or_insert_with(|| snapshot.clone());
    }

    /// At a stop: every waiting snapshot now, then the acknowledgements,
    /// within [`FINISH_TIMEOUT`].
    fn finish(&mut self) {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        loop {
            self.urgent.extend(self.pending.keys().copied());
            self.send_due(Instant::now());
            self.producer.poll(DELIVERY_POLL);
            self.take_deliveries();
            let waiting = self.in_flight.len() + self.pending.len();
            if waiting == 0 || self.refused {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "{waiting} partitions' last snapshots were not acknowledged within {} s; \
                     their committed state is kept, and the next snapshot carries it",
                    FINISH_TIMEOUT.as_secs()
                );
                return;
            }
            // A failed write came back to pending: give it a moment.
            if self.in_flight.is_empty() {
                std::thread::sleep(DELIVERY_POLL);
            }
        }
    }
}

/// Writes `snapshot` to `topic` once and waits for the acknowledgement:
/// for tests and tools that seed a snapshot topic.
pub fn write_once(
    client: &ClientSettings,
    topic: &str,
    source_topic: &str,
    snapshot: &Snapshot,
    written_unix_ms: i64,
) -> anyhow::Result<()> {
    let producer = snapshot_producer(client)?;
    let (key, value) = encoded(source_topic, snapshot, &writer_name(), written_unix_ms);
    producer
        .send(record(topic, &key, &value, &Arc::new(snapshot.clone())))
        .map_err(|(error, _)| error)?;
    producer.flush(Duration::from_secs(30))?;
    match producer.context().take().into_iter().next() {
        Some((_, Ok(()))) => Ok(()),
        Some((_, Err(error))) => Err(error.into()),
        None => anyhow::bail!("the snapshot was not acknowledged"),
    }
}
