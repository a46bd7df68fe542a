//! The `partition-N.json` format, the assignment's contract with the
//! dashboard: where a partition's file lives, rendering it from statistics,
//! parsing it back (for import, plotting and checks), and writing one
//! atomically. The exporter thread decides *when* to write; this module
//! only knows *what* a file says.

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::aggregate::{Aggregates, MonthStats, MonthYear};
use crate::atomic_file;
use crate::kafka::{Offset, PartitionId};
use crate::report::{month_name, month_number, DateText, DATE_FORMAT};
use crate::state::Snapshot;

/// Path of a partition's published file.
pub(crate) fn partition_file(files_dir: &Path, partition: PartitionId) -> PathBuf {
    files_dir.join(format!("partition-{partition}.json"))
}

/// The assignment's JSON: partition, offset, then month -> year -> stats,
/// months in calendar order and years ascending. Serialized straight from
/// the statistics (no intermediate JSON tree: this runs on every publish).
pub fn partition_json(
    partition: PartitionId,
    next_offset: Offset,
    aggregates: &Aggregates,
) -> String {
    let view = PartitionView {
        partition,
        next_offset,
        aggregates,
    };
    let mut text = serde_json::to_string_pretty(&view).expect("statistics serialize");
    text.push('\n');
    text
}

struct PartitionView<'a> {
    partition: PartitionId,
    next_offset: Offset,
    aggregates: &'a Aggregates,
}

impl Serialize for PartitionView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut top = serializer.serialize_map(None)?;
        top.serialize_entry("partition", &self.partition)?;
        top.serialize_entry("offset", &self.next_offset)?;
        let mut entries = self.aggregates.iter().peekable();
        while let Some((key, _)) = entries.peek() {
            let month = key.month;
            let mut years = Vec::new();
            while let Some((key, stats)) = entries.next_if(|(k, _)| k.month == month) {
                years.push((key.year, *stats));
            }
            top.serialize_entry(month_name(month), &YearsView(&years))?;
        }
        top.end()
    }
}

struct YearsView<'a>(&'a [(i32, MonthStats)]);

impl Serialize for YearsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut years = serializer.serialize_map(Some(self.0.len()))?;
        for (year, stats) in self.0 {
            years.serialize_entry(&year.to_string(), &StatsView(stats))?;
        }
        years.end()
    }
}

struct StatsView<'a>(&'a MonthStats);

impl Serialize for StatsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("count", &s.count)?;
        map.serialize_entry("sum", &s.sum)?;
        map.serialize_entry("avg", &s.avg())?;
        map.serialize_entry("start", DateText::new(s.start).as_str())?;
        map.serialize_entry("end", DateText::new(s.end).as_str())?;
        map.end()
    }
}

/// A parsed partition-N.json.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedPartition {
    pub partition: PartitionId,
    pub offset: Offset,
    pub aggregates: Aggregates,
}

#[derive(Debug, Error, PartialEq)]
#[error("{0}")]
pub struct FormatError(String);

fn bad(what: impl Into<String>) -> FormatError {
    FormatError(what.into())
}

fn parse_date(value: Option<&Value>, what: &str) -> Result<NaiveDate, FormatError> {
    value
        .and_then(Value::as_str)
        .and_then(|s| NaiveDate::parse_from_str(s, DATE_FORMAT).ok())
        .ok_or_else(|| bad(format!("{what} is not a YYYY-MM-DD date")))
}

/// Parses a partition file as the assignment defines it (Python solutions'
/// files included: `sum` may be an integer, `avg` is recomputed).
pub fn parse_partition_json(text: &str) -> Result<PublishedPartition, FormatError> {
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(bad("not a JSON object"));
    };
    let partition = top
        .get("partition")
        .and_then(Value::as_i64)
        .and_then(|p| PartitionId::try_from(p).ok())
        .ok_or_else(|| bad("\"partition\" is missing or not an integer"))?;
    let offset = top
        .get("offset")
        .and_then(Value::as_i64)
        .filter(|o| *o >= 0)
        .ok_or_else(|| bad("\"offset\" is missing or not a non-negative integer"))?;
    let mut aggregates = Aggregates::new();
    for (name, years) in &top {
        if name == "partition" || name == "offset" {
            continue;
        }
        let month = month_number(name).ok_or_else(|| bad(format!("unknown key {name:?}")))?;
        let years = years
            .as_object()
            .ok_or_else(|| bad(format!("{name:?} is not an object")))?;
        for (year, stats) in years {
            let what = format!("{name} {year}");
            let year: i32 = year
                .parse()
                .map_err(|_| bad(format!("{what}: year is not a number")))?;
            let count = stats
                .get("count")
                .and_then(Value::as_u64)
                .filter(|c| *c > 0)
                .ok_or_else(|| bad(format!("{what}: count is not a positive integer")))?;
            let sum = stats
                .get("sum")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(format!("{what}: sum is not a number")))?;
            let start = parse_date(stats.get("start"), &format!("{what}: start"))?;
            let end = parse_date(stats.get("end"), &format!("{what}: end"))?;
            aggregates.insert(
                MonthYear { month, year },
                MonthStats {
                    count,
                    sum,
                    start,
                    end,
                },
            );
        }
    }
    Ok(PublishedPartition {
        partition,
        offset,
        aggregates,
    })
}

/// Writes a snapshot's partition file atomically.
pub fn publish(files_dir: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let text = partition_json(
        snapshot.partition,
        snapshot.next_offset,
        &snapshot.aggregates,
    );
    atomic_file::write(
        &partition_file(files_dir, snapshot.partition),
        text.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    fn sample() -> Aggregates {
        let mut agg = Aggregates::new();
        agg.insert(
            MonthYear {
                month: 4,
                year: 1990,
            },
            MonthStats {
                count: 30,
                sum: 1113.0,
                start: d(1990, 4, 1),
                end: d(1990, 4, 30),
            },
        );
        agg.insert(
            MonthYear {
                month: 1,
                year: 1991,
            },
            MonthStats {
                count: 31,
                sum: 178.0,
                start: d(1991, 1, 1),
                end: d(1991, 1, 31),
            },
        );
        agg.insert(
            MonthYear {
                month: 1,
                year: 1990,
            },
            MonthStats {
                count: 31,
                sum: 599.0,
                start: d(1990, 1, 1),
                end: d(1990, 1, 31),
            },
        );
        agg
    }

    #[test]
    fn json_matches_the_assignment_layout() {
        let text = partition_json(2, 4117, &sample());
        let expected = r#"{
  "partition": 2,
  "offset": 4117,
  "January": {
    "1990": {
      "count": 31,
      "sum": 599.0,
      "avg": 19.322580645161292,
      "start": "1990-01-01",
      "end": "1990-01-31"
    },
    "1991": {
      "count": 31,
      "sum": 178.0,
      "avg": 5.741935483870968,
      "start": "1991-01-01",
      "end": "1991-01-31"
    }
  },
  "April": {
    "1990": {
      "count": 30,
      "sum": 1113.0,
      "avg": 37.1,
      "start": "1990-04-01",
      "end": "1990-04-30"
    }
  }
}
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_partition_is_partition_and_offset_only() {
        let text = partition_json(0, 0, &Aggregates::new());
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, serde_json::json!({"partition": 0, "offset": 0}));
    }

    #[test]
    fn parse_round_trips_and_accepts_python_files() {
        let parsed = parse_partition_json(&partition_json(2, 4117, &sample())).unwrap();
        assert_eq!(
            parsed,
            PublishedPartition {
                partition: 2,
                offset: 4117,
                aggregates: sample()
            }
        );
        let python = r#"{"partition": 1, "offset": 3, "March": {"1990": {"count": 2, "sum": 60, "avg": 30.0, "end": "1990-03-02", "start": "1990-03-01"}}}"#;
        let parsed = parse_partition_json(python).unwrap();
        assert_eq!(
            parsed.aggregates[&MonthYear {
                month: 3,
                year: 1990
            }]
                .sum,
            60.0
        );
    }

    #[test]
    fn parse_rejects_what_is_not_a_partition_file() {
        for text in [
            "",
            "[]",
            r#"{"offset": 1}"#,
            r#"{"partition": 1, "offset": -1}"#,
            r#"{"partition": 1, "offset": 1, "Smarch": {}}"#,
            r#"{"partition": 1, "offset": 1, "May": {"1990": {"count": 1, "sum": 1}}}"#,
        ] {
            assert!(parse_partition_json(text).is_err(), "{text}");
        }
    }
}
