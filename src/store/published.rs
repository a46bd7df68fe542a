//! The `partition-N.json` format, the assignment's contract with the
//! dashboard: rendering it from statistics, parsing it back (for import,
//! plotting and checks), and writing one atomically. Where it lives, and
//! that its proof goes first, is [`crate::store::folders`]'; when it is written,
//! the exporter's. This module only knows *what* a file says.

use std::path::Path;

use chrono::NaiveDate;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::kafka::{Offset, PartitionId};
use crate::model::aggregate::{Aggregates, MonthStats, MonthYear};
use crate::model::report::{month_name, month_number, DateText, DATE_FORMAT};
use crate::store::atomic_file;
use crate::store::snapshot::Snapshot;

/// The assignment's JSON: partition, offset, then month -> year -> stats,
/// months in calendar order and years ascending. Serialized straight from
/// the statistics (no intermediate JSON tree: this runs on every publish).
/// Every statistic is a finite number (the fold keeps them so):
/// serde_json would write any other as `null`, which readers take for a
/// missing value, so such statistics are refused with the field named.
pub fn partition_json(
    partition: PartitionId,
    next_offset: Offset,
    aggregates: &Aggregates,
) -> Result<String, FormatError> {
    let view = PartitionView {
        partition,
        next_offset,
        aggregates,
    };
    let mut text = serde_json::to_string_pretty(&view).map_err(|e| bad(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

/// [`partition_json`] as a JSON value (the dashboard's API).
pub(crate) fn partition_value(
    partition: PartitionId,
    next_offset: Offset,
    aggregates: &Aggregates,
) -> Result<Value, FormatError> {
    serde_json::to_value(PartitionView {
        partition,
        next_offset,
        aggregates,
    })
    .map_err(|e| bad(e.to_string()))
}

/// The first statistic that is not a finite number, described as
/// `"January"."9001"."sum" is inf, not a finite number`.
pub fn first_non_finite(aggregates: &Aggregates) -> Option<String> {
    aggregates
        .iter()
        .find_map(|(key, stats)| non_finite_field(*key, stats))
}

fn non_finite_field(key: MonthYear, stats: &MonthStats) -> Option<String> {
    [("sum", stats.sum), ("avg", stats.avg())]
        .into_iter()
        .find(|(_, value)| !value.is_finite())
        .map(|(field, value)| {
            format!(
                "\"{}\".\"{}\".\"{field}\" is {value}, not a finite number",
                month_name(key.month),
                key.year
            )
        })
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
            top.serialize_entry(month_name(month), &YearsView(month, &years))?;
        }
        top.end()
    }
}

struct YearsView<'a>(u32, &'a [(i32, MonthStats)]);

impl Serialize for YearsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut years = serializer.serialize_map(Some(self.1.len()))?;
        for (year, stats) in self.1 {
            let key = MonthYear {
                month: self.0,
                year: *year,
            };
            years.serialize_entry(&year.to_string(), &StatsView(key, stats))?;
        }
        years.end()
    }
}

struct StatsView<'a>(MonthYear, &'a MonthStats);

impl Serialize for StatsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let s = self.1;
        if let Some(field) = non_finite_field(self.0, s) {
            return Err(serde::ser::Error::custom(field));
        }
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

/// What a JSON value is, for an error message.
fn kind(value: Option<&Value>) -> String {
    match value {
        None => "missing".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => format!("the string {s:?}"),
        Some(Value::Array(_)) => "an array".into(),
        Some(Value::Object(_)) => "an object".into(),
    }
}

fn parse_date(value: Option<&Value>, what: &str) -> Result<NaiveDate, FormatError> {
    value
        .and_then(Value::as_str)
        .and_then(|s| NaiveDate::parse_from_str(s, DATE_FORMAT).ok())
        .ok_or_else(|| bad(format!("{what} is {}, not a YYYY-MM-DD date", kind(value))))
}

/// serde_json's error, with the line it points at: JSON has no `NaN` or
/// `Infinity`, and a file from a writer that puts them there is refused at
/// that line, which names the field.
fn not_json(text: &str, error: &serde_json::Error) -> FormatError {
    let line = text
        .lines()
        .nth(error.line().saturating_sub(1))
        .map(str::trim)
        .filter(|line| !line.is_empty());
    match line {
        Some(line) => {
            let shown: String = line.chars().take(80).collect();
            bad(format!("not JSON: {error} (`{shown}`)"))
        }
        None => bad(format!("not JSON: {error}")),
    }
}

/// Parses a partition file as the assignment defines it (Python solutions'
/// files included: `sum` may be an integer, `avg` is recomputed).
pub fn parse_partition_json(text: &str) -> Result<PublishedPartition, FormatError> {
    let value: Value = serde_json::from_str(text).map_err(|e| not_json(text, &e))?;
    let Value::Object(top) = value else {
        return Err(bad("not a JSON object"));
    };
    let partition = top
        .get("partition")
        .and_then(Value::as_i64)
        .and_then(|p| PartitionId::try_from(p).ok())
        .ok_or_else(|| {
            bad(format!(
                "\"partition\" is {}, not a partition number",
                kind(top.get("partition"))
            ))
        })?;
    let offset = top
        .get("offset")
        .and_then(Value::as_i64)
        .filter(|o| *o >= 0)
        .ok_or_else(|| {
            bad(format!(
                "\"offset\" is {}, not a non-negative integer",
                kind(top.get("offset"))
            ))
        })?;
    let mut aggregates = Aggregates::new();
    for (name, years) in &top {
        if name == "partition" || name == "offset" {
            continue;
        }
        let month = month_number(name).ok_or_else(|| bad(format!("unknown key {name:?}")))?;
        let years = years
            .as_object()
            .ok_or_else(|| bad(format!("{name:?} is not an object")))?;
        for (year_text, stats) in years {
            let field = |field: &str| format!("\"{name}\".\"{year_text}\".\"{field}\"");
            let year: i32 = year_text.parse().map_err(|_| {
                bad(format!(
                    "\"{name}\".\"{year_text}\": the year is not a number"
                ))
            })?;
            let count = stats
                .get("count")
                .and_then(Value::as_u64)
                .filter(|c| *c > 0)
                .ok_or_else(|| {
                    bad(format!(
                        "{} is {}, not a positive integer",
                        field("count"),
                        kind(stats.get("count"))
                    ))
                })?;
            // serde_json refuses numbers past f64's range, so a number
            // here is finite.
            let sum = stats.get("sum").and_then(Value::as_f64).ok_or_else(|| {
                bad(format!(
                    "{} is {}, not a finite number",
                    field("sum"),
                    kind(stats.get("sum"))
                ))
            })?;
            let start = parse_date(stats.get("start"), &field("start"))?;
            let end = parse_date(stats.get("end"), &field("end"))?;
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

/// Writes a snapshot as the partition file at `path`, atomically, without
/// its proof: the consumer and `export` publish through
/// [`crate::store::folders::Folders::publish`], which proves it first; the bench
/// measures the write alone.
pub fn write(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let text = partition_json(
        snapshot.partition,
        snapshot.next_offset,
        &snapshot.aggregates,
    )
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    atomic_file::write(path, text.as_bytes())
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
        let text = partition_json(2, 4117, &sample()).unwrap();
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
        let text = partition_json(0, 0, &Aggregates::new()).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, serde_json::json!({"partition": 0, "offset": 0}));
    }

    #[test]
    fn parse_round_trips_and_accepts_python_files() {
        let parsed = parse_partition_json(&partition_json(2, 4117, &sample()).unwrap()).unwrap();
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

    /// Files from writers that put non-finite numbers in (serde_json writes
    /// them as null; Python's json as NaN and Infinity) are refused with
    /// the field named.
    #[test]
    fn a_statistic_that_is_not_a_finite_number_is_refused_with_its_field() {
        let file = |sum: &str| {
            format!(
                "{{\n  \"partition\": 0,\n  \"offset\": 3,\n  \"January\": {{\n    \"9001\": {{\n      \"count\": 2,\n      \"sum\": {sum},\n      \"avg\": {sum},\n      \"start\": \"9001-01-01\",\n      \"end\": \"9001-01-02\"\n    }}\n  }}\n}}\n"
            )
        };
        for (sum, says) in [
            ("null", "\"January\".\"9001\".\"sum\" is null"),
            ("NaN", "`\"sum\": NaN,`"),
            ("Infinity", "`\"sum\": Infinity,`"),
            ("-Infinity", "`\"sum\": -Infinity,`"),
            ("1e400", "`\"sum\": 1e400,`"),
            (
                "\"12\"",
                "\"January\".\"9001\".\"sum\" is the string \"12\"",
            ),
        ] {
            let error = parse_partition_json(&file(sum)).unwrap_err().to_string();
            assert!(error.contains(says), "{sum}: {error}");
        }
        let max = parse_partition_json(&file("1.7976931348623157e308")).unwrap();
        assert_eq!(
            max.aggregates.values().next().unwrap().sum,
            f64::MAX,
            "the largest finite number is a number"
        );
    }

    #[test]
    fn a_non_finite_statistic_is_never_written() {
        let mut aggregates = sample();
        aggregates
            .get_mut(&MonthYear {
                month: 4,
                year: 1990,
            })
            .unwrap()
            .sum = f64::INFINITY;
        let error = partition_json(2, 4117, &aggregates).unwrap_err();
        assert_eq!(
            error.to_string(),
            "\"April\".\"1990\".\"sum\" is inf, not a finite number"
        );
    }
}
