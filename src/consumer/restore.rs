//! A partition's start from the snapshot topic, and the check that the
//! log still holds what the statistics need.
//!
//! [`restore_from_snapshots`]: when the state is empty or behind, the
//! partition's newest snapshots are read from the end of its snapshot
//! partition (a window that grows only while it holds no snapshot of this
//! partition at all, so the time depends on the snapshots near the end,
//! not on the topic's age); those ahead of the state are checked against
//! the source topic, newest first, and the first whose last record and the
//! record before its offset are still there is adopted. Snapshots of a
//! deleted and re-created topic fail that check and are ignored.
//!
//! [`check_log_start`]: an offset to resume from below the source
//! partition's log start means records the statistics need were deleted:
//! an error, unless counting from the log start was asked for.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use anyhow::bail;

use super::clients::ClientObserver;
use super::machine::{CheckOutcome, CheckRequest};
use super::{recheck, ConsumerConfig, TOPIC_WAIT_INTERVAL};
use crate::kafka::tail::{TailError, TailReader};
use crate::kafka::{Offset, PartitionId};
use crate::publish::metrics::Metrics;
use crate::publish::snapshots::SnapshotSettings;
use crate::shutdown::Shutdown;
use crate::store::changelog::{self, SnapshotRecord};
use crate::store::snapshot::Fingerprint;
use crate::store::state::PartitionState;

/// The tail readers of the partitions' starts, kept for the process: a
/// client costs a connection and the topic's metadata (about a third of a
/// second on tansu), which every partition's start paid twice otherwise.
/// Partitions start side by side, so each start takes a reader of its own
/// from the pool, made when none is free, and gives it back.
#[derive(Default)]
pub(super) struct StartReaders {
    source: Mutex<Vec<TailReader>>,
    snapshots: Mutex<Vec<TailReader>>,
}

/// Runs `read` with a reader of `topic` from `pool`, made when none is
/// free. While the broker does not answer, the read is tried again (one
/// line says so), as a running partition waits out an outage; `stop` ends
/// the waits early.
fn with_reader<T>(
    pool: &Mutex<Vec<TailReader>>,
    config: &ConsumerConfig,
    topic: &str,
    stop: &Shutdown,
    mut read: impl FnMut(&TailReader) -> Result<T, TailError>,
) -> Result<T, TailError> {
    let free = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut reader = match free {
        Some(reader) => reader,
        None => TailReader::new(&config.client, &config.group_id, topic)?,
    };
    reader.stop_on(Some(stop.clone()));
    let mut told = false;
    let result = loop {
        match read(&reader) {
            Err(error) if error.is_transient() && !stop.requested() => {
                if !told {
                    log::warn!("{error}; trying again until the broker answers");
                    told = true;
                }
                stop.wait(TOPIC_WAIT_INTERVAL);
            }
            result => break result,
        }
    };
    reader.stop_on(None);
    pool.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(reader);
    result
}

/// Adopts the newest snapshot of the state's partition that is ahead of
/// the state and belongs to the source topic as it is now. Returns the
/// snapshots of the partition that were read (none when none could be),
/// for what the start reports of the partition's earlier owners.
pub(super) fn restore_from_snapshots(
    config: &ConsumerConfig,
    settings: &SnapshotSettings,
    readers: &StartReaders,
    state: &mut PartitionState,
    probe_context: ClientObserver,
    shutdown: &Shutdown,
    metrics: &Metrics,
) -> anyhow::Result<Vec<SnapshotRecord>> {
    let started = Instant::now();
    let current = state.snapshot();
    let partition = current.partition;
    let found = match with_reader(
        &readers.snapshots,
        config,
        &settings.topic,
        shutdown,
        |reader| changelog::newest(reader, partition, &config.topic),
    ) {
        Ok(found) => found,
        Err(TailError::Stopped { .. }) => return Ok(Vec::new()),
        // Nothing written there yet: nothing to restore.
        Err(error) if error.is_unknown_partition() => {
            metrics.restored(partition, started.elapsed());
            return Ok(Vec::new());
        }
        Err(error) => {
            log::warn!("partition {partition}: no restore from snapshots: {error}");
            return Ok(Vec::new());
        }
    };
    let mut candidates: Vec<SnapshotRecord> = found
        .iter()
        .filter(|record| record.snapshot.next_offset > current.next_offset)
        .cloned()
        .collect();
    candidates.sort_by_key(|record| std::cmp::Reverse(record.snapshot.next_offset));
    if candidates.is_empty() {
        // The usual start: nothing ahead of the state, no probe client.
        metrics.restored(partition, started.elapsed());
        return Ok(found);
    }
    let probe = recheck::RecordProbe::new(config, partition, probe_context, shutdown)?;
    let mut verdicts: BTreeMap<(Fingerprint, Offset), bool> = BTreeMap::new();
    let mut rejected: Vec<SnapshotRecord> = Vec::new();
    for candidate in candidates {
        let Some(last_record) = candidate.snapshot.last_record else {
            continue;
        };
        let key = (last_record, candidate.snapshot.next_offset);
        let current_topic = match verdicts.get(&key) {
            Some(verdict) => *verdict,
            None => match belongs_to_topic(&probe, last_record, key.1, shutdown)? {
                Some(verdict) => {
                    verdicts.insert(key, verdict);
                    verdict
                }
                // Stopping.
                None => return Ok(Vec::new()),
            },
        };
        if !current_topic {
            rejected.push(candidate);
            continue;
        }
        let age_s = (chrono::Utc::now().timestamp_millis() - candidate.written_unix_ms).max(0)
            as f64
            / 1000.0;
        let epoch = current.epoch.max(candidate.snapshot.epoch);
        state.restore(&candidate.snapshot, epoch)?;
        metrics.restored(partition, started.elapsed());
        log::info!(
            "partition {partition}: restored from the snapshot topic {:?} at offset {} \
             (written {age_s:.1} s ago by {}; the state was at offset {}), in {:.2} s",
            settings.topic,
            candidate.snapshot.next_offset,
            candidate.writer,
            current.next_offset,
            started.elapsed().as_secs_f64()
        );
        warn_rejected(partition, settings, &rejected);
        return Ok(found);
    }
    metrics.restored(partition, started.elapsed());
    warn_rejected(partition, settings, &rejected);
    // Snapshots of an earlier topic of this name: this count is a newer
    // one, and says so by its epoch, so that readers of the snapshot topic
    // order it after them.
    if let Some(newest_gone) = rejected.iter().map(|r| r.snapshot.epoch).max() {
        if current.epoch <= newest_gone {
            state.restore(&current, newest_gone + 1)?;
        }
    }
    Ok(found)
}

fn warn_rejected(partition: PartitionId, settings: &SnapshotSettings, rejected: &[SnapshotRecord]) {
    if let Some(newest) = rejected.first() {
        log::warn!(
            "partition {partition}: {} snapshots in {:?} (the newest at offset {}) belong to an \
             earlier topic of this name: the records they name are gone or different; ignored",
            rejected.len(),
            settings.topic,
            newest.snapshot.next_offset
        );
    }
}

/// Whether the topic still holds `last_record` and a record at
/// `next_offset - 1`; None when shutdown came first.
fn belongs_to_topic(
    probe: &recheck::RecordProbe,
    last_record: Fingerprint,
    next_offset: Offset,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<bool>> {
    let mut questions = vec![CheckRequest {
        expected: vec![last_record],
        adopt_offset: last_record.offset,
        last_record: None,
    }];
    // Usually the last record is the one before the offset: asked once.
    if last_record.offset != next_offset - 1 {
        questions.push(CheckRequest {
            expected: Vec::new(),
            adopt_offset: next_offset - 1,
            last_record: None,
        });
    }
    for question in &questions {
        loop {
            match recheck::check_records(probe, question)? {
                CheckOutcome::Current { .. } => break,
                CheckOutcome::Gone { .. } => return Ok(Some(false)),
                CheckOutcome::Undecided => {
                    if shutdown.wait(TOPIC_WAIT_INTERVAL) {
                        return Ok(None);
                    }
                }
            }
        }
    }
    Ok(Some(true))
}

/// Fails when `next_offset` is below the source partition's log start,
/// unless `count_from_log_start`: then the state moves to the log start,
/// with one warning that its statistics are partial.
pub(super) fn check_log_start(
    config: &ConsumerConfig,
    readers: &StartReaders,
    state: &mut PartitionState,
    stop: &Shutdown,
) -> anyhow::Result<()> {
    let snapshot = state.snapshot();
    let partition = snapshot.partition;
    let (log_start, first_kept) =
        with_reader(&readers.source, config, &config.topic, stop, |reader| {
            let (log_start, _) = reader.bounds(partition)?;
            if snapshot.next_offset >= log_start || !config.count_from_log_start {
                return Ok((log_start, None));
            }
            Ok((log_start, reader.read_one(partition, log_start)?))
        })?;
    if snapshot.next_offset >= log_start {
        return Ok(());
    }
    if !config.count_from_log_start {
        bail!(
            "partition {partition}: the offset to resume from, {}, is below the log start of \
             topic {:?} partition {partition}, {log_start}: records the statistics need were \
             deleted (retention, or deleted records). Restore a state, a file or a snapshot at \
             offset {log_start} or later, or pass --count-from-log-start to count from offset \
             {log_start} on, knowing the statistics are then partial",
            snapshot.next_offset,
            config.topic
        );
    }
    log::warn!(
        "partition {partition}: counting from the log start, offset {log_start}, instead of \
         offset {} (--count-from-log-start): the records in between were deleted, so this \
         partition's statistics are PARTIAL",
        snapshot.next_offset
    );
    state.restore(
        &crate::store::snapshot::Snapshot {
            next_offset: log_start,
            last_record: None,
            ..(*snapshot).clone()
        },
        snapshot.epoch,
    )?;
    // The start-up check proves the topic is the one counted: the record
    // before the offset is gone by definition here, so the first record
    // kept is the one it checks (the anchor), read now.
    if let Some(first) = first_kept {
        state.set_anchor(Fingerprint::of(
            first.offset,
            first.key.as_deref(),
            first.value.as_deref(),
        ))?;
    }
    Ok(())
}
