//! The snapshot topic's records (proto/snapshot.proto): a partition's
//! whole committed state as one Kafka record, keyed by its partition, and
//! the way back, refusing what is not such a record. Also the choice among
//! a partition's snapshots: (epoch, next offset) orders them, so an older
//! snapshot written late (a zombie writer) never wins over a newer one.
//! This module only knows what a record says; the writer is
//! [`crate::publish::snapshots`], the readers the restore, `consumer
//! export --from-kafka` and the dashboard.

use chrono::NaiveDate;
use prost::Message as _;
use thiserror::Error;

use std::time::{Duration, Instant};

use crate::kafka::tail::{TailError, TailReader, TailRecord};
use crate::kafka::{Offset, PartitionId};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::model::aggregate::{Aggregates, MonthStats, MonthYear};
use crate::model::report::{DateText, DATE_FORMAT};
use crate::store::snapshot::{Counters, Fingerprint, Snapshot};

mod proto {
    include!(concat!(env!("OUT_DIR"), "/weatherstream.snapshot.rs"));
}

/// The format this build writes, and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The snapshot topic of `source_topic` when none is named.
pub fn default_topic(source_topic: &str) -> String {
    format!("{source_topic}-snapshots")
}

/// One snapshot record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub source_topic: String,
    /// The partition's state; `anchor` and `last_commit_unix_ms` are not
    /// carried (the anchor is this process's own check; the time is
    /// `written_unix_ms`).
    pub snapshot: Snapshot,
    pub writer: String,
    pub written_unix_ms: i64,
}

impl SnapshotRecord {
    /// Orders snapshots of one partition: a higher epoch (counted again
    /// after a re-creation of the topic), then a higher offset.
    pub fn order(&self) -> (u64, Offset) {
        (self.snapshot.epoch, self.snapshot.next_offset)
    }
}

/// Why a record of the snapshot topic is not a snapshot to use.
#[derive(Debug, Error, PartialEq)]
pub enum SnapshotFormatError {
    #[error("it is not a snapshot record ({0})")]
    Undecodable(String),
    #[error("its format version is {0}; this build reads version {FORMAT_VERSION}")]
    UnknownVersion(u32),
    #[error("it is a snapshot of topic {found:?}, not {expected:?}")]
    ForeignTopic { found: String, expected: String },
    #[error("its key says partition {key:?}, its value partition {value}, and it is in partition {stored}")]
    WrongPartition {
        key: String,
        value: PartitionId,
        stored: PartitionId,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The record key of a snapshot of `partition`.
pub fn key(partition: PartitionId) -> String {
    partition.to_string()
}

/// A snapshot of `snapshot`'s partition, counted from `source_topic`, as
/// a record value.
pub fn encode(source_topic: &str, snapshot: &Snapshot, writer: &str, now_unix_ms: i64) -> Vec<u8> {
    let statistics = snapshot
        .aggregates
        .iter()
        .map(|(key, stats)| proto::MonthYearStats {
            month: key.month,
            year: key.year,
            count: stats.count,
            sum: stats.sum,
            start: DateText::new(stats.start).as_str().to_string(),
            end: DateText::new(stats.end).as_str().to_string(),
        })
        .collect();
    proto::PartitionSnapshot {
        format_version: FORMAT_VERSION,
        source_topic: source_topic.to_string(),
        partition: snapshot.partition,
        next_offset: snapshot.next_offset,
        last_record: snapshot.last_record.map(|fp| proto::RecordFingerprint {
            offset: fp.offset,
            key_hash: fp.key_hash,
            value_hash: fp.value_hash,
        }),
        epoch: snapshot.epoch,
        statistics,
        counted: snapshot.counters.counted,
        duplicates: snapshot.counters.duplicates,
        malformed: snapshot.counters.malformed,
        writer: writer.to_string(),
        written_unix_ms: now_unix_ms,
    }
    .encode_to_vec()
}

/// The snapshot a record of the snapshot topic holds, if it is one of
/// `source_topic`'s, stored where its key says.
pub fn decode(
    record: &TailRecord,
    source_topic: &str,
) -> Result<SnapshotRecord, SnapshotFormatError> {
    let value = record.value.as_deref().unwrap_or_default();
    let message = proto::PartitionSnapshot::decode(value)
        .map_err(|e| SnapshotFormatError::Undecodable(e.to_string()))?;
    if message.format_version != FORMAT_VERSION {
        return Err(SnapshotFormatError::UnknownVersion(message.format_version));
    }
    if message.source_topic != source_topic {
        return Err(SnapshotFormatError::ForeignTopic {
            found: message.source_topic,
            expected: source_topic.to_string(),
        });
    }
    let key_text = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
    if key_text != key(message.partition) || message.partition != record.partition {
        return Err(SnapshotFormatError::WrongPartition {
            key: key_text,
            value: message.partition,
            stored: record.partition,
        });
    }
    if message.next_offset < 0 {
        return Err(invalid(format!(
            "its next offset {} is negative",
            message.next_offset
        )));
    }
    let last_record = message.last_record.map(|fp| Fingerprint {
        offset: fp.offset,
        key_hash: fp.key_hash,
        value_hash: fp.value_hash,
    });
    if let Some(fp) = last_record {
        if fp.offset < 0 || fp.offset >= message.next_offset {
            return Err(invalid(format!(
                "its last record's offset {} is not below its next offset {}",
                fp.offset, message.next_offset
            )));
        }
    }
    let mut aggregates = Aggregates::new();
    for stats in message.statistics {
        let (key, month_stats) = month_year(&stats)?;
        if aggregates.insert(key, month_stats).is_some() {
            return Err(invalid(format!(
                "it holds month {} of {} twice",
                key.month, key.year
            )));
        }
    }
    Ok(SnapshotRecord {
        source_topic: message.source_topic,
        snapshot: Snapshot {
            partition: message.partition,
            epoch: message.epoch,
            next_offset: message.next_offset,
            aggregates,
            counters: Counters {
                counted: message.counted,
                duplicates: message.duplicates,
                malformed: message.malformed,
            },
            last_record,
            anchor: None,
            last_commit_unix_ms: Some(message.written_unix_ms),
        },
        writer: message.writer,
        written_unix_ms: message.written_unix_ms,
    })
}

/// Records read from the end of a snapshot partition at first; the window
/// grows by [`WINDOW_GROWTH`] while it holds no snapshot of the partition.
const FIRST_WINDOW: Offset = 64;
const WINDOW_GROWTH: Offset = 8;
/// At most one warning per this for records that are not snapshots.
const FOREIGN_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The well-formed snapshots of `partition` among the last records of its
/// snapshot partition; each record that is not one is skipped with a
/// warning (one per [`FOREIGN_LOG_INTERVAL`], counting the rest).
pub fn newest(
    reader: &TailReader,
    partition: PartitionId,
    source_topic: &str,
) -> Result<Vec<SnapshotRecord>, TailError> {
    newest_to_end(reader, partition, source_topic).map(|(found, _)| found)
}

/// [`newest`], and the offset after the last record read: where a reader
/// that follows the partition goes on (the end as the fetches told it,
/// which is right where a broker's listed end is not).
pub fn newest_to_end(
    reader: &TailReader,
    partition: PartitionId,
    source_topic: &str,
) -> Result<(Vec<SnapshotRecord>, Offset), TailError> {
    let (low, high) = reader.bounds(partition)?;
    let mut window = FIRST_WINDOW;
    let mut skipped = LogLimiter::new(FOREIGN_LOG_INTERVAL);
    loop {
        let from = high.saturating_sub(window).max(low);
        let records = reader.read_to_end(partition, from)?;
        let mut found = Vec::new();
        for record in &records {
            match decode(record, source_topic) {
                Ok(snapshot) => found.push(snapshot),
                Err(reason) => {
                    if let Some(suppressed) = skipped.allow(Instant::now()) {
                        log::warn!(
                            "partition {partition}: skipped the record at offset {} of the snapshot topic {:?}: {reason}{}",
                            record.offset,
                            reader.topic(),
                            suppressed_note(suppressed)
                        );
                    }
                }
            }
        }
        if !found.is_empty() || from <= low {
            let end = records.last().map_or(from, |record| record.offset + 1);
            return Ok((found, end.max(from)));
        }
        window = window.saturating_mul(WINDOW_GROWTH);
    }
}

/// The newest of `found` by (epoch, next offset).
pub fn newest_of(found: Vec<SnapshotRecord>) -> Option<SnapshotRecord> {
    found.into_iter().max_by_key(SnapshotRecord::order)
}

fn month_year(
    stats: &proto::MonthYearStats,
) -> Result<(MonthYear, MonthStats), SnapshotFormatError> {
    let what = format!("month {} of {}", stats.month, stats.year);
    if !(1..=12).contains(&stats.month) {
        return Err(invalid(format!("{what}: no such month")));
    }
    let date = |text: &str, field: &str| {
        NaiveDate::parse_from_str(text, DATE_FORMAT)
            .map_err(|_| invalid(format!("{what}: its {field} {text:?} is not a date")))
    };
    let (start, end) = (date(&stats.start, "start")?, date(&stats.end, "end")?);
    if stats.count == 0 || !stats.sum.is_finite() || start > end {
        return Err(invalid(format!(
            "{what}: count {}, sum {}, {}..{} are not statistics",
            stats.count, stats.sum, stats.start, stats.end
        )));
    }
    Ok((
        MonthYear {
            month: stats.month,
            year: stats.year,
        },
        MonthStats {
            count: stats.count,
            sum: stats.sum,
            start,
            end,
        },
    ))
}

fn invalid(reason: String) -> SnapshotFormatError {
    SnapshotFormatError::Invalid(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut aggregates = Aggregates::new();
        for (month, year, sum) in [(1, 1990, -3.5), (12, 2024, 1e300), (2, 1990, 0.1)] {
            aggregates.insert(
                MonthYear { month, year },
                MonthStats {
                    count: 3,
                    sum,
                    start: NaiveDate::from_ymd_opt(year, month, 1).unwrap(),
                    end: NaiveDate::from_ymd_opt(year, month, 3).unwrap(),
                },
            );
        }
        Snapshot {
            partition: 2,
            epoch: 1,
            next_offset: 9,
            aggregates,
            counters: Counters {
                counted: 9,
                duplicates: 1,
                malformed: 2,
            },
            last_record: Some(Fingerprint::of(8, Some(b"May"), Some(b"v"))),
            anchor: None,
            last_commit_unix_ms: Some(5),
        }
    }

    fn record(partition: PartitionId, key: &str, value: Vec<u8>) -> TailRecord {
        TailRecord {
            partition,
            offset: 0,
            key: Some(key.as_bytes().to_vec()),
            value: Some(value),
            timestamp_ms: None,
        }
    }

    #[test]
    fn a_snapshot_reads_back_whole() {
        let value = encode("temperatures", &snapshot(), "host/1", 1_700_000_000_000);
        let back = decode(&record(2, "2", value), "temperatures").unwrap();
        let expected = Snapshot {
            anchor: None,
            last_commit_unix_ms: Some(1_700_000_000_000),
            ..snapshot()
        };
        assert_eq!(back.snapshot, expected);
        assert_eq!(back.writer, "host/1");
        assert_eq!(back.order(), (1, 9));
    }

    #[test]
    fn what_is_not_a_snapshot_of_this_topic_is_refused_with_the_reason() {
        let value = encode("temperatures", &snapshot(), "w", 0);
        let refused = |record: TailRecord, topic: &str| decode(&record, topic).unwrap_err();
        assert!(matches!(
            refused(record(2, "2", b"\xff\xff garbage".to_vec()), "temperatures"),
            SnapshotFormatError::Undecodable(_)
        ));
        assert_eq!(
            refused(record(2, "2", value.clone()), "other"),
            SnapshotFormatError::ForeignTopic {
                found: "temperatures".into(),
                expected: "other".into()
            }
        );
        assert!(matches!(
            refused(record(3, "2", value.clone()), "temperatures"),
            SnapshotFormatError::WrongPartition { .. }
        ));
        assert!(matches!(
            refused(record(2, "3", value), "temperatures"),
            SnapshotFormatError::WrongPartition { .. }
        ));
        let mut future = proto::PartitionSnapshot::decode(
            encode("temperatures", &snapshot(), "w", 0).as_slice(),
        )
        .unwrap();
        future.format_version = 2;
        assert_eq!(
            refused(record(2, "2", future.encode_to_vec()), "temperatures"),
            SnapshotFormatError::UnknownVersion(2)
        );
        for broken in [
            |m: &mut proto::PartitionSnapshot| m.statistics[0].sum = f64::NAN,
            |m: &mut proto::PartitionSnapshot| m.statistics[0].month = 13,
            |m: &mut proto::PartitionSnapshot| m.statistics[0].count = 0,
            |m: &mut proto::PartitionSnapshot| m.statistics[0].start = "1990-13-01".into(),
            |m: &mut proto::PartitionSnapshot| m.statistics[1] = m.statistics[0].clone(),
            |m: &mut proto::PartitionSnapshot| m.next_offset = -1,
            |m: &mut proto::PartitionSnapshot| {
                m.last_record.as_mut().unwrap().offset = m.next_offset
            },
        ] {
            let mut message = proto::PartitionSnapshot::decode(
                encode("temperatures", &snapshot(), "w", 0).as_slice(),
            )
            .unwrap();
            broken(&mut message);
            assert!(matches!(
                refused(record(2, "2", message.encode_to_vec()), "temperatures"),
                SnapshotFormatError::Invalid(_)
            ));
        }
    }
}
