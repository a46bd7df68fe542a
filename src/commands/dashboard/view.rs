//! The dashboard's view of the snapshot topic (`dashboard --from-kafka`):
//! the newest snapshot of every partition, kept by thread
//! `dashboard-snapshots`, which reads the end of each partition of the
//! topic once and then follows it. The pages are served from this view
//! instead of a files folder, so processes on many hosts, with no folder
//! in common, have one page.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::commands::export::FromKafka;
use crate::kafka::tail::{TailError, TailReader};
use crate::kafka::{Offset, PartitionId, TopicAdmin};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::shutdown::Shutdown;
use crate::store::changelog::{self, SnapshotRecord};

/// Wait between two attempts to start reading (a broker away, no topic yet).
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// At most one line of a kind per this.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

type Newest = Arc<Mutex<BTreeMap<PartitionId, SnapshotRecord>>>;

/// The newest snapshot of each partition, as read so far; the thread that
/// keeps it stops when this is dropped.
pub(crate) struct SnapshotView {
    newest: Newest,
    stop: Shutdown,
    thread: Option<JoinHandle<()>>,
    pub(crate) snapshot_topic: String,
}

impl SnapshotView {
    /// Starts following `from.snapshot_topic`; stops with `shutdown`, or
    /// when dropped.
    pub(crate) fn start(from: FromKafka, shutdown: &Shutdown) -> std::io::Result<Self> {
        let newest = Newest::default();
        let stop = shutdown.child();
        let snapshot_topic = from.snapshot_topic.clone();
        let thread = {
            let (newest, stop) = (newest.clone(), stop.clone());
            crate::shutdown::spawn("dashboard-snapshots", move || {
                follow(&from, &newest, &stop);
            })?
        };
        Ok(SnapshotView {
            newest,
            stop,
            thread: Some(thread),
            snapshot_topic,
        })
    }

    /// A copy of what is known now.
    pub(crate) fn newest(&self) -> BTreeMap<PartitionId, SnapshotRecord> {
        self.newest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        self.stop.request();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Keeps `newest` up to date until `stop`: reads each partition's tail,
/// then follows every partition; any failure starts over after a pause.
fn follow(from: &FromKafka, newest: &Newest, stop: &Shutdown) {
    let mut told = LogLimiter::new(LOG_INTERVAL);
    while !stop.requested() {
        if let Err(reason) = read_and_follow(from, newest, stop) {
            if let Some(suppressed) = told.allow(Instant::now()) {
                log::warn!(
                    "the snapshot topic {:?}: {reason}; trying again every {} s{}",
                    from.snapshot_topic,
                    RETRY_INTERVAL.as_secs(),
                    suppressed_note(suppressed)
                );
            }
        }
        stop.wait(RETRY_INTERVAL);
    }
}

fn read_and_follow(from: &FromKafka, newest: &Newest, stop: &Shutdown) -> Result<(), String> {
    let admin = TopicAdmin::connect(&from.client).map_err(|e| e.to_string())?;
    let count = admin
        .partition_count(&from.snapshot_topic)
        .map_err(|e| e.to_string())?
        .ok_or("it does not exist (yet): no consumer has written a snapshot")?;
    drop(admin);
    let reader = TailReader::new(&from.client, &from.group_id, &from.snapshot_topic)
        .map_err(|e| e.to_string())?;
    let mut follow_from: Vec<(PartitionId, Offset)> = Vec::new();
    for partition in 0..PartitionId::try_from(count).unwrap_or(PartitionId::MAX) {
        let (found, end) = changelog::newest_to_end(&reader, partition, &from.source_topic)
            .map_err(|e| e.to_string())?;
        for record in found {
            offer(newest, record);
        }
        follow_from.push((partition, end));
    }
    log::info!(
        "following the snapshot topic {:?} ({count} partitions)",
        from.snapshot_topic
    );
    reader.follow(&follow_from).map_err(|e| e.to_string())?;
    let mut skipped = LogLimiter::new(LOG_INTERVAL);
    let mut failed = LogLimiter::new(LOG_INTERVAL);
    while !stop.requested() {
        match reader.poll(Duration::from_millis(200)) {
            Ok(Some(record)) => match changelog::decode(&record, &from.source_topic) {
                Ok(snapshot) => offer(newest, snapshot),
                Err(reason) => {
                    if let Some(suppressed) = skipped.allow(Instant::now()) {
                        log::warn!(
                            "partition {}: skipped the record at offset {} of the snapshot \
                             topic {:?}: {reason}{}",
                            record.partition,
                            record.offset,
                            from.snapshot_topic,
                            suppressed_note(suppressed)
                        );
                    }
                }
            },
            Ok(None) => {}
            // librdkafka reconnects by itself: told, not fatal.
            Err(TailError::Read { source, .. }) => {
                if let Some(suppressed) = failed.allow(Instant::now()) {
                    log::warn!(
                        "reading the snapshot topic {:?}: {source}{}",
                        from.snapshot_topic,
                        suppressed_note(suppressed)
                    );
                }
            }
            Err(other) => return Err(other.to_string()),
        }
    }
    Ok(())
}

/// Keeps `record` when it is newer than what its partition has: by
/// (epoch, offset), and the later write of the same state (for its writer
/// and time).
fn offer(newest: &Newest, record: SnapshotRecord) {
    let mut newest = newest.lock().unwrap_or_else(PoisonError::into_inner);
    let partition = record.snapshot.partition;
    let keep = newest.get(&partition).is_none_or(|current| {
        (record.order(), record.written_unix_ms) >= (current.order(), current.written_unix_ms)
    });
    if keep {
        newest.insert(partition, record);
    }
}
