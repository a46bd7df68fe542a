//! The consumer's durable state, one sled database per partition at
//! `<state-dir>/partition-N/`. This module alone knows the sled keys and
//! encodings; everyone else sees [`Snapshot`]s.
//!
//! Keys (values are bincode unless noted):
//! - `meta:next_offset` — i64 big-endian: the offset of the next record to read
//! - `meta:epoch` — u64: bumped whenever the partition is reset (topic re-created)
//! - `meta:last_record` — [`Fingerprint`] of the last record consumed
//! - `meta:anchor` — [`Fingerprint`] of a record verified to still be in the topic
//! - `meta:counters` — [`Counters`]
//! - `meta:last_commit_ms` — i64 big-endian, Unix milliseconds
//! - `stat:` + month (1 byte) + year (4 bytes, big-endian, sign bit flipped) —
//!   one month/year's statistics. The key layout makes a prefix scan iterate
//!   months in calendar order and years ascending, the order of the JSON.
//!
//! Every batch is ONE sled transaction (touched statistics, counters,
//! fingerprint and next offset together), followed by sled's flush and an
//! fsync of the partition's files, so that what is reported as committed
//! survives `kill -9` and a power cut. sled 0.34 alone does not make that
//! true: on Linux its flush ends in `sync_file_range`, which writes no
//! metadata (a grown file's size) and does not flush the device's cache
//! (spacejam/sled#1452), and it never fsyncs its `conf` file or a folder.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionError;
use thiserror::Error;

use crate::kafka::{Offset, PartitionId};
use crate::model::aggregate::{Aggregates, MonthStats, MonthYear};
use crate::store::atomic_file;
use crate::store::folders;
use crate::store::snapshot::{Counters, Fingerprint, Snapshot};

const NEXT_OFFSET: &[u8] = b"meta:next_offset";
const EPOCH: &[u8] = b"meta:epoch";
const LAST_RECORD: &[u8] = b"meta:last_record";
const ANCHOR: &[u8] = b"meta:anchor";
const COUNTERS: &[u8] = b"meta:counters";
const LAST_COMMIT_MS: &[u8] = b"meta:last_commit_ms";
const STAT_PREFIX: &[u8] = b"stat:";

/// sled releases a database's file lock a moment after its last handle is
/// dropped (its threads hold one briefly). A lock held by this very process
/// (a worker re-opening its partition, a test) is retried this often, this
/// far apart: up to a second in all, far more than the release takes.
const OWN_LOCK_ATTEMPTS: u32 = 50;
const OWN_LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// One batch's effect, committed atomically.
#[derive(Debug, Clone, Default)]
pub struct BatchCommit {
    pub touched: BTreeMap<MonthYear, MonthStats>,
    pub counted: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub next_offset: Offset,
    pub last_record: Option<Fingerprint>,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("partition {partition} is held by another consumer process{} (state {path:?} is locked)", holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Locked {
        partition: PartitionId,
        path: PathBuf,
        holder: Option<String>,
    },
    #[error("partition {partition} has no state at {path:?}")]
    NoState {
        partition: PartitionId,
        path: PathBuf,
    },
    #[error("state {path:?}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("state {path:?}: {what}")]
    Corrupt { path: PathBuf, what: String },
    /// sled cannot open the database, or what it recovers cannot be read:
    /// damaged beyond sled's own recovery. Retrying does not help.
    #[error("partition {partition}: the state {path:?} cannot be opened: {cause}")]
    Unopenable {
        partition: PartitionId,
        path: PathBuf,
        cause: String,
    },
    #[error("making state {path:?} durable (fsync)")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state {path:?} is closed (a re-open after an I/O error failed)")]
    Closed { path: PathBuf },
    #[error("writing {path:?}")]
    Owner {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who last claimed a partition (the lock is the authority; this only names
/// the holder in messages).
pub fn holder(state_dir: &Path, partition: PartitionId) -> Option<String> {
    fs::read_to_string(folders::owner_file(state_dir, partition))
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
}

/// Whether another process holds the partition's state now (sled's lock,
/// tried and released at once: nothing is opened as a database or
/// written); Some with the holder as recorded (`pid N since T`, or empty)
/// when it does.
pub(crate) fn held_by(state_dir: &Path, partition: PartitionId) -> io::Result<Option<String>> {
    let db = folders::state_folder(state_dir, partition).join("db");
    Ok(crate::store::fence::held_elsewhere(&db)?
        .then(|| holder(state_dir, partition).unwrap_or_default()))
}

/// Moves a partition's state folder that sled cannot open out of the way,
/// to `partition-N.damaged-<UTC time>` beside it (kept for a post-mortem,
/// never read again), so that the partition starts afresh. Returns where
/// it went.
pub(crate) fn move_aside(state_dir: &Path, partition: PartitionId) -> std::io::Result<PathBuf> {
    let from = folders::state_folder(state_dir, partition);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let to = folders::damaged_folder(state_dir, partition, &stamp.to_string());
    fs::rename(&from, &to)?;
    atomic_file::sync_dir(state_dir)?;
    Ok(to)
}

fn stat_key(key: MonthYear) -> [u8; 10] {
    let mut out = [0u8; 10];
    out[..5].copy_from_slice(STAT_PREFIX);
    out[5] = key.month as u8;
    out[6..].copy_from_slice(&((key.year as u32) ^ 0x8000_0000).to_be_bytes());
    out
}

fn parse_stat_key(bytes: &[u8]) -> Option<MonthYear> {
    let rest = bytes.strip_prefix(STAT_PREFIX)?;
    let (&month, year) = rest.split_first()?;
    let year = u32::from_be_bytes(year.try_into().ok()?) ^ 0x8000_0000;
    Some(MonthYear {
        month: u32::from(month),
        year: year as i32,
    })
}

#[derive(Serialize, Deserialize)]
struct StoredStats {
    count: u64,
    sum: f64,
    start_days_from_ce: i32,
    end_days_from_ce: i32,
}

fn encode_stats(stats: &MonthStats) -> Vec<u8> {
    let stored = StoredStats {
        count: stats.count,
        sum: stats.sum,
        start_days_from_ce: stats.start.num_days_from_ce(),
        end_days_from_ce: stats.end.num_days_from_ce(),
    };
    bincode::serialize(&stored).expect("plain struct always serializes")
}

fn decode_stats(bytes: &[u8]) -> Option<MonthStats> {
    let stored: StoredStats = bincode::deserialize(bytes).ok()?;
    Some(MonthStats {
        count: stored.count,
        sum: stored.sum,
        start: NaiveDate::from_num_days_from_ce_opt(stored.start_days_from_ce)?,
        end: NaiveDate::from_num_days_from_ce_opt(stored.end_days_from_ce)?,
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("plain struct always serializes")
}

fn now_unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One partition's open sled database and its committed snapshot.
pub struct PartitionState {
    /// None only between the two steps of [`PartitionState::reopen`] (or
    /// after a reopen that failed): sled holds a lock per database, so the
    /// old handle must be gone before a new one opens.
    db: Option<sled::Db>,
    state_dir: PathBuf,
    path: PathBuf,
    initialized: bool,
    snapshot: Arc<Snapshot>,
    /// sled's log file, kept open to be fsynced after every flush, and the
    /// folder's names when it was last fsynced.
    db_file: Option<File>,
    listing: Vec<OsString>,
}

/// The names in a folder, sorted: a change means a file was created,
/// renamed or removed there since.
fn listing(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort_unstable();
    Ok(names)
}

impl PartitionState {
    /// Opens (creating if needed) and locks a partition's state; records
    /// this process as its holder.
    pub fn open(state_dir: &Path, partition: PartitionId) -> Result<Self, StateError> {
        let this = Self::open_dir(state_dir, partition)?;
        let owner = folders::owner_file(state_dir, partition);
        let text = format!(
            "pid {} since {}\n",
            std::process::id(),
            chrono::Utc::now().to_rfc3339()
        );
        atomic_file::write(&owner, text.as_bytes()).map_err(|source| StateError::Owner {
            path: owner,
            source,
        })?;
        Ok(this)
    }

    /// Opens a partition's state only if it exists (export, inspect-state).
    pub(crate) fn open_existing(
        state_dir: &Path,
        partition: PartitionId,
    ) -> Result<Self, StateError> {
        let path = folders::state_folder(state_dir, partition);
        if !path.join("db").exists() {
            return Err(StateError::NoState { partition, path });
        }
        let this = Self::open_dir(state_dir, partition)?;
        if !this.initialized {
            return Err(StateError::NoState { partition, path });
        }
        Ok(this)
    }

    fn open_dir(state_dir: &Path, partition: PartitionId) -> Result<Self, StateError> {
        let path = folders::state_folder(state_dir, partition);
        let ours = format!("pid {} ", std::process::id());
        let mut attempts = 0;
        let db = loop {
            let opened = sled::Config::new()
                .path(&path)
                .cache_capacity(8 * 1024 * 1024)
                // We flush after every commit; no background flusher needed.
                .flush_every_ms(None)
                .open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(ref e)) if e.to_string().contains("could not acquire lock") => {
                    let holder = holder(state_dir, partition);
                    if attempts < OWN_LOCK_ATTEMPTS
                        && holder.as_deref().is_some_and(|h| h.starts_with(&ours))
                    {
                        attempts += 1;
                        std::thread::sleep(OWN_LOCK_RETRY);
                        continue;
                    }
                    return Err(StateError::Locked {
                        partition,
                        path,
                        holder,
                    });
                }
                Err(
                    source @ (sled::Error::Corruption { .. }
                    | sled::Error::ReportableBug(_)
                    | sled::Error::Unsupported(_)),
                ) => {
                    return Err(StateError::Unopenable {
                        partition,
                        path,
                        cause: source.to_string(),
                    })
                }
                Err(source) => return Err(StateError::Sled { path, source }),
            }
        };
        let mut this = PartitionState {
            db: Some(db),
            state_dir: state_dir.to_path_buf(),
            path,
            initialized: false,
            snapshot: Arc::new(Snapshot::empty(partition)),
            db_file: None,
            listing: Vec::new(),
        };
        match this.load() {
            Ok(()) => {}
            Err(StateError::Corrupt { path, what }) => {
                return Err(StateError::Unopenable {
                    partition,
                    path,
                    cause: what,
                })
            }
            Err(other) => return Err(other),
        }
        this.sync_at_open().map_err(|source| StateError::Sync {
            path: this.path.clone(),
            source,
        })?;
        Ok(this)
    }

    /// What sled wrote at open without an fsync (its `conf` file, the
    /// files' names in the new folder, the folder's own name) is made
    /// durable before anything is committed on top of it.
    fn sync_at_open(&mut self) -> std::io::Result<()> {
        atomic_file::sync_file(&File::open(self.path.join("conf"))?)?;
        let db_file = File::open(self.path.join("db"))?;
        atomic_file::sync_file(&db_file)?;
        self.db_file = Some(db_file);
        self.listing = listing(&self.path)?;
        atomic_file::sync_dir(&self.path)?;
        atomic_file::sync_dir(&self.state_dir)
    }

    /// After sled's flush: fsync of its log file, and of the folder when a
    /// file appeared, was renamed or went in it (sled's snapshots). Values
    /// here are far below sled's blob threshold, so `blobs/` stays empty.
    fn sync(&mut self) -> std::io::Result<()> {
        let Some(db_file) = &self.db_file else {
            return Err(std::io::Error::other("sled's log file is not open"));
        };
        atomic_file::sync_file(db_file)?;
        let names = listing(&self.path)?;
        if names != self.listing {
            atomic_file::sync_dir(&self.path)?;
            self.listing = names;
        }
        Ok(())
    }

    fn db(&self) -> Result<&sled::Db, StateError> {
        self.db.as_ref().ok_or_else(|| StateError::Closed {
            path: self.path.clone(),
        })
    }

    /// Closes and re-opens the database and reloads what is durable. After
    /// an I/O error (a full disk) sled's handle keeps failing even once
    /// space is back; a fresh one recovers from what reached the disk,
    /// which is at least the last committed snapshot (every commit is
    /// flushed before it counts).
    pub(crate) fn reopen(&mut self) -> Result<(), StateError> {
        let partition = self.snapshot.partition;
        // The lock goes with the last handle: drop ours first.
        self.db = None;
        let fresh = Self::open_dir(&self.state_dir, partition)?;
        *self = fresh;
        Ok(())
    }

    fn sled_error(&self, source: sled::Error) -> StateError {
        StateError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    fn get_i64(&self, key: &[u8]) -> Result<Option<i64>, StateError> {
        match self.db()?.get(key).map_err(|e| self.sled_error(e))? {
            None => Ok(None),
            Some(bytes) => {
                let array: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    self.corrupt(format!("{} is not 8 bytes", String::from_utf8_lossy(key)))
                })?;
                Ok(Some(i64::from_be_bytes(array)))
            }
        }
    }

    fn get_bincode<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StateError> {
        match self.db()?.get(key).map_err(|e| self.sled_error(e))? {
            None => Ok(None),
            Some(bytes) => bincode::deserialize(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(format!("{}: {e}", String::from_utf8_lossy(key)))),
        }
    }

    fn load(&mut self) -> Result<(), StateError> {
        let partition = self.snapshot.partition;
        let Some(next_offset) = self.get_i64(NEXT_OFFSET)? else {
            return Ok(());
        };
        let mut aggregates = Aggregates::new();
        for item in self.db()?.scan_prefix(STAT_PREFIX) {
            let (key, value) = item.map_err(|e| self.sled_error(e))?;
            let month_year =
                parse_stat_key(&key).ok_or_else(|| self.corrupt("bad statistics key"))?;
            let stats = decode_stats(&value).ok_or_else(|| self.corrupt("bad statistics value"))?;
            aggregates.insert(month_year, stats);
        }
        self.snapshot = Arc::new(Snapshot {
            partition,
            epoch: self.get_bincode(EPOCH)?.unwrap_or(0),
            next_offset,
            aggregates,
            counters: self.get_bincode(COUNTERS)?.unwrap_or_default(),
            last_record: self.get_bincode(LAST_RECORD)?,
            anchor: self.get_bincode(ANCHOR)?,
            last_commit_unix_ms: self.get_i64(LAST_COMMIT_MS)?,
        });
        self.initialized = true;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once the partition has a committed offset.
    pub(crate) fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// The last committed snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    /// Writes `inserts` and `removes` in one transaction, then flushes and
    /// fsyncs: when this returns Ok, the transaction survives a power cut.
    fn apply(
        &mut self,
        inserts: &[(Vec<u8>, Vec<u8>)],
        removes: &[Vec<u8>],
    ) -> Result<(), StateError> {
        let result: Result<(), TransactionError<()>> = self.db()?.transaction(|tx| {
            for key in removes {
                tx.remove(key.as_slice())?;
            }
            for (key, value) in inserts {
                tx.insert(key.as_slice(), value.as_slice())?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Storage(e)) => return Err(self.sled_error(e)),
            Err(TransactionError::Abort(())) => return Err(self.corrupt("transaction aborted")),
        }
        self.db()?.flush().map_err(|e| self.sled_error(e))?;
        self.sync().map_err(|source| StateError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// Replaces the whole state (first start, import, or reset after a topic
    /// re-creation) in one transaction.
    pub fn initialize(
        &mut self,
        next_offset: Offset,
        aggregates: Aggregates,
        epoch: u64,
    ) -> Result<Arc<Snapshot>, StateError> {
        self.initialize_from(next_offset, aggregates, epoch, None)
    }

    /// [`Self::initialize`] from a published file whose proof names the
    /// record before its offset: that record becomes the state's last
    /// record, which the re-creation checks compare with the topic (and
    /// the next proof carries on).
    pub(crate) fn initialize_from(
        &mut self,
        next_offset: Offset,
        aggregates: Aggregates,
        epoch: u64,
        last_record: Option<Fingerprint>,
    ) -> Result<Arc<Snapshot>, StateError> {
        self.replace(
            next_offset,
            aggregates,
            epoch,
            last_record,
            Counters::default(),
        )
    }

    /// Replaces the whole state with `snapshot`'s offset, statistics, last
    /// record and counters, at `epoch`, in one transaction: a snapshot
    /// restored from the snapshot topic, or the state moved to the log start.
    pub(crate) fn restore(
        &mut self,
        snapshot: &Snapshot,
        epoch: u64,
    ) -> Result<Arc<Snapshot>, StateError> {
        self.replace(
            snapshot.next_offset,
            snapshot.aggregates.clone(),
            epoch,
            snapshot.last_record,
            snapshot.counters,
        )
    }

    fn replace(
        &mut self,
        next_offset: Offset,
        aggregates: Aggregates,
        epoch: u64,
        last_record: Option<Fingerprint>,
        counters: Counters,
    ) -> Result<Arc<Snapshot>, StateError> {
        let removes: Vec<Vec<u8>> = self
            .snapshot
            .aggregates
            .keys()
            .filter(|k| !aggregates.contains_key(k))
            .map(|k| stat_key(*k).to_vec())
            .chain([ANCHOR.to_vec()])
            .chain(last_record.is_none().then(|| LAST_RECORD.to_vec()))
            .collect();
        let now = now_unix_ms();
        let mut inserts: Vec<(Vec<u8>, Vec<u8>)> = aggregates
            .iter()
            .map(|(k, v)| (stat_key(*k).to_vec(), encode_stats(v)))
            .collect();
        inserts.extend([
            (NEXT_OFFSET.to_vec(), next_offset.to_be_bytes().to_vec()),
            (EPOCH.to_vec(), encode(&epoch)),
            (COUNTERS.to_vec(), encode(&counters)),
            (LAST_COMMIT_MS.to_vec(), now.to_be_bytes().to_vec()),
        ]);
        if let Some(fp) = &last_record {
            inserts.push((LAST_RECORD.to_vec(), encode(fp)));
        }
        self.apply(&inserts, &removes)?;
        self.initialized = true;
        self.snapshot = Arc::new(Snapshot {
            partition: self.snapshot.partition,
            epoch,
            next_offset,
            aggregates,
            counters,
            last_record,
            anchor: None,
            last_commit_unix_ms: Some(now),
        });
        Ok(self.snapshot.clone())
    }

    /// Forgets everything after a topic re-creation: offset 0, no statistics,
    /// a new epoch (so the exporter accepts the lower offset).
    pub(crate) fn reset(&mut self) -> Result<Arc<Snapshot>, StateError> {
        let epoch = self.snapshot.epoch + 1;
        self.initialize(0, Aggregates::new(), epoch)
    }

    /// Commits one batch atomically and durably.
    pub fn commit(&mut self, batch: BatchCommit) -> Result<Arc<Snapshot>, StateError> {
        let old = self.snapshot.clone();
        let counters = Counters {
            counted: old.counters.counted + batch.counted,
            duplicates: old.counters.duplicates + batch.duplicates,
            malformed: old.counters.malformed + batch.malformed,
        };
        let now = now_unix_ms();
        let mut inserts: Vec<(Vec<u8>, Vec<u8>)> = batch
            .touched
            .iter()
            .map(|(k, v)| (stat_key(*k).to_vec(), encode_stats(v)))
            .collect();
        inserts.extend([
            (
                NEXT_OFFSET.to_vec(),
                batch.next_offset.to_be_bytes().to_vec(),
            ),
            (COUNTERS.to_vec(), encode(&counters)),
            (LAST_COMMIT_MS.to_vec(), now.to_be_bytes().to_vec()),
        ]);
        let last_record = batch.last_record.or(old.last_record);
        if let Some(fp) = &last_record {
            inserts.push((LAST_RECORD.to_vec(), encode(fp)));
        }
        self.apply(&inserts, &[])?;
        let mut aggregates = old.aggregates.clone();
        aggregates.extend(batch.touched);
        self.snapshot = Arc::new(Snapshot {
            partition: old.partition,
            epoch: old.epoch,
            next_offset: batch.next_offset,
            aggregates,
            counters,
            last_record,
            anchor: old.anchor,
            last_commit_unix_ms: Some(now),
        });
        Ok(self.snapshot.clone())
    }

    /// Records a fingerprint verified to be in the current topic.
    pub(crate) fn set_anchor(&mut self, anchor: Fingerprint) -> Result<(), StateError> {
        if self.snapshot.anchor == Some(anchor) {
            return Ok(());
        }
        self.apply(&[(ANCHOR.to_vec(), encode(&anchor))], &[])?;
        let mut next = (*self.snapshot).clone();
        next.anchor = Some(anchor);
        self.snapshot = Arc::new(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn stats(count: u64, sum: f64) -> MonthStats {
        MonthStats {
            count,
            sum,
            start: date(1990, 1, 1),
            end: date(1990, 1, count as u32),
        }
    }

    #[test]
    fn stat_keys_iterate_months_then_years() {
        let keys = [
            MonthYear {
                month: 2,
                year: 1990,
            },
            MonthYear {
                month: 1,
                year: 2001,
            },
            MonthYear {
                month: 1,
                year: 1999,
            },
            MonthYear {
                month: 12,
                year: -5,
            },
        ];
        let mut encoded: Vec<_> = keys.iter().map(|k| stat_key(*k)).collect();
        encoded.sort();
        let decoded: Vec<_> = encoded.iter().map(|k| parse_stat_key(k).unwrap()).collect();
        let mut expected = keys.to_vec();
        expected.sort();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn commits_survive_reopen_and_reset_clears() {
        let dir = tempfile::tempdir().unwrap();
        let jan = MonthYear {
            month: 1,
            year: 1990,
        };
        {
            let mut state = PartitionState::open(dir.path(), 3).unwrap();
            assert!(!state.is_initialized());
            state.initialize(0, Aggregates::new(), 0).unwrap();
            let mut touched = BTreeMap::new();
            touched.insert(jan, stats(2, 40.5));
            let fp = Fingerprint::of(6, Some(b"January"), Some(b"x"));
            state
                .commit(BatchCommit {
                    touched,
                    counted: 2,
                    duplicates: 1,
                    malformed: 4,
                    next_offset: 7,
                    last_record: Some(fp),
                })
                .unwrap();
            state.set_anchor(fp).unwrap();
        }
        let mut state = PartitionState::open_existing(dir.path(), 3).unwrap();
        let snap = state.snapshot();
        assert_eq!(snap.next_offset, 7);
        assert_eq!(snap.aggregates[&jan], stats(2, 40.5));
        assert_eq!(
            snap.counters,
            Counters {
                counted: 2,
                duplicates: 1,
                malformed: 4
            }
        );
        assert_eq!(snap.last_record.unwrap().offset, 6);
        assert_eq!(snap.anchor, snap.last_record);
        let reset = state.reset().unwrap();
        assert_eq!(
            (reset.next_offset, reset.epoch, reset.aggregates.len()),
            (0, 1, 0)
        );
        drop(state);
        let state = PartitionState::open_existing(dir.path(), 3).unwrap();
        assert_eq!(*state.snapshot(), *reset);
        assert!(state.snapshot().last_record.is_none());
    }

    #[test]
    fn a_second_open_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = PartitionState::open(dir.path(), 1).unwrap();
        let err = PartitionState::open(dir.path(), 1).err().unwrap();
        assert!(
            matches!(err, StateError::Locked { partition: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
    }

    #[test]
    fn missing_state_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = PartitionState::open_existing(dir.path(), 0).err().unwrap();
        assert!(matches!(err, StateError::NoState { partition: 0, .. }));
        assert_eq!(
            folders::state_partitions(dir.path()).unwrap(),
            Vec::<PartitionId>::new()
        );
        PartitionState::open(dir.path(), 2)
            .unwrap()
            .initialize(0, Aggregates::new(), 0)
            .unwrap();
        assert_eq!(folders::state_partitions(dir.path()).unwrap(), vec![2]);
    }

    fn committed_state(dir: &Path, partition: PartitionId) {
        let mut state = PartitionState::open(dir, partition).unwrap();
        state.initialize(0, Aggregates::new(), 0).unwrap();
        let mut touched = BTreeMap::new();
        touched.insert(
            MonthYear {
                month: 1,
                year: 1990,
            },
            stats(2, 40.5),
        );
        state
            .commit(BatchCommit {
                touched,
                counted: 2,
                next_offset: 2,
                last_record: Some(Fingerprint::of(1, Some(b"January"), Some(b"x"))),
                ..BatchCommit::default()
            })
            .unwrap();
    }

    #[test]
    fn a_state_sled_cannot_open_is_unopenable_and_moves_aside() {
        let dir = tempfile::tempdir().unwrap();
        committed_state(dir.path(), 0);
        let conf = folders::state_folder(dir.path(), 0).join("conf");
        let mut bytes = fs::read(&conf).unwrap();
        for b in bytes.iter_mut() {
            *b ^= 0x5a;
        }
        fs::write(&conf, bytes).unwrap();
        let err = PartitionState::open(dir.path(), 0).err().unwrap();
        assert!(
            matches!(err, StateError::Unopenable { partition: 0, .. }),
            "{err:?}"
        );
        let aside = move_aside(dir.path(), 0).unwrap();
        assert!(aside.join("db").exists());
        assert!(!folders::state_folder(dir.path(), 0).exists());
        assert_eq!(
            folders::state_partitions(dir.path()).unwrap(),
            Vec::<PartitionId>::new()
        );
        let fresh = PartitionState::open(dir.path(), 0).unwrap();
        assert!(!fresh.is_initialized());
    }

    /// Random bytes over a stopped state's log, as a failing disk or a
    /// stray write would leave it: whatever sled makes of it, opening
    /// returns (a state, or an error the consumer acts on) and never
    /// panics, which would take every partition of the process down.
    #[test]
    fn random_damage_to_the_log_never_panics_the_open() {
        use rand::{Rng, SeedableRng};
        let source = tempfile::tempdir().unwrap();
        {
            let mut state = PartitionState::open(source.path(), 0).unwrap();
            state.initialize(0, Aggregates::new(), 0).unwrap();
            for offset in 0..200i64 {
                let mut touched = BTreeMap::new();
                touched.insert(
                    MonthYear {
                        month: 1 + (offset % 12) as u32,
                        year: 1990 + (offset / 12) as i32,
                    },
                    stats(1, offset as f64),
                );
                state
                    .commit(BatchCommit {
                        touched,
                        counted: 1,
                        next_offset: offset + 1,
                        last_record: Some(Fingerprint::of(offset, Some(b"January"), None)),
                        ..BatchCommit::default()
                    })
                    .unwrap();
            }
        }
        let db = fs::read(folders::state_folder(source.path(), 0).join("db")).unwrap();
        let conf = fs::read(folders::state_folder(source.path(), 0).join("conf")).unwrap();
        let (mut opened, mut refused) = (0, 0);
        for seed in 0..32u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut damaged = db.clone();
            for _ in 0..16 {
                let at = rng.random_range(0..damaged.len().saturating_sub(64));
                rng.fill(&mut damaged[at..at + 64]);
            }
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(folders::state_folder(dir.path(), 0)).unwrap();
            fs::write(folders::state_folder(dir.path(), 0).join("db"), &damaged).unwrap();
            fs::write(folders::state_folder(dir.path(), 0).join("conf"), &conf).unwrap();
            let path = dir.path().to_path_buf();
            let result = std::panic::catch_unwind(move || {
                PartitionState::open(&path, 0).map(|state| state.snapshot().next_offset)
            });
            match result {
                Err(_) => panic!("seed {seed}: opening a damaged state panicked"),
                Ok(Ok(next_offset)) => {
                    assert!(
                        (0..=200).contains(&next_offset),
                        "seed {seed}: {next_offset}"
                    );
                    opened += 1;
                }
                Ok(Err(_)) => refused += 1,
            }
        }
        eprintln!("32 damaged logs: {opened} opened, {refused} refused with an error");
    }

    #[test]
    fn commits_count_their_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let before = atomic_file::fsyncs_total();
        committed_state(dir.path(), 1);
        // At open: conf, db, the folder, the state folder; then one per
        // commit at least (two commits here), plus the owner note's two.
        assert!(atomic_file::fsyncs_total() - before >= 8);
    }
}
