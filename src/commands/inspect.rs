//! `consumer inspect-state`: what each partition's state holds, as a table
//! or as JSON. A partition held by a running consumer is shown from its
//! last published file, labelled live, never opened behind its back.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use chrono::TimeZone;
use serde_json::{json, Value};

use crate::kafka::PartitionId;
use crate::model::report::month_name;
use crate::store::folders::{partition_file, requested_partitions};
use crate::store::published::parse_partition_json;
use crate::store::snapshot::{Fingerprint, Snapshot};
use crate::store::state::{PartitionState, StateError};

fn fingerprint_json(fp: Option<Fingerprint>) -> Value {
    fp.map_or(Value::Null, |fp| {
        json!({
            "offset": fp.offset,
            "key_hash": format!("{:016x}", fp.key_hash),
            "value_hash": format!("{:016x}", fp.value_hash),
        })
    })
}

fn snapshot_json(state_path: &Path, snapshot: &Snapshot) -> Value {
    let last_commit = snapshot
        .last_commit_unix_ms
        .and_then(|ms| chrono::Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339());
    json!({
        "partition": snapshot.partition,
        "live": false,
        "state_path": state_path.display().to_string(),
        "next_offset": snapshot.next_offset,
        "epoch": snapshot.epoch,
        "last_record": fingerprint_json(snapshot.last_record),
        "anchor": fingerprint_json(snapshot.anchor),
        "reports_counted": snapshot.counters.counted,
        "duplicates_dropped": snapshot.counters.duplicates,
        "malformed_skipped": snapshot.counters.malformed,
        "last_commit": last_commit,
        "months": months_json(&snapshot.aggregates),
    })
}

fn months_json(aggregates: &crate::model::aggregate::Aggregates) -> Value {
    Value::Array(
        aggregates
            .iter()
            .map(|(key, s)| {
                json!({
                    "month": month_name(key.month),
                    "year": key.year,
                    "count": s.count,
                    "sum": s.sum,
                    "avg": s.avg(),
                    "start": s.start.to_string(),
                    "end": s.end.to_string(),
                })
            })
            .collect(),
    )
}

/// Describes one partition: from sled, or (when a consumer holds it) from
/// its last published file, labelled live.
fn describe(files_dir: &Path, state_dir: &Path, partition: PartitionId) -> anyhow::Result<Value> {
    match PartitionState::open_existing(state_dir, partition) {
        Ok(state) => Ok(snapshot_json(state.path(), &state.snapshot())),
        Err(StateError::Locked { path, holder, .. }) => {
            let file = partition_file(files_dir, partition);
            let published = std::fs::read_to_string(&file)
                .map_err(|e| anyhow!("{e}"))
                .and_then(|text| parse_partition_json(&text).map_err(|e| anyhow!("{e}")))
                .with_context(|| {
                    format!(
                        "partition {partition} is live and {} cannot be read",
                        file.display()
                    )
                })?;
            Ok(json!({
                "partition": partition,
                "live": true,
                "holder": holder,
                "state_path": path.display().to_string(),
                "published_file": file.display().to_string(),
                "next_offset": published.offset,
                "months": months_json(&published.aggregates),
            }))
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints what the state holds, as a table or as JSON.
pub fn run(
    files_dir: &Path,
    state_dir: &Path,
    partitions: &[PartitionId],
    as_json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut described = Vec::new();
    for partition in requested_partitions(state_dir, partitions)? {
        described.push(describe(files_dir, state_dir, partition)?);
    }
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&described)?)?;
        return Ok(());
    }
    for d in &described {
        write_table(out, d)?;
    }
    Ok(())
}

fn write_table(out: &mut dyn Write, d: &Value) -> std::io::Result<()> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    writeln!(out, "partition {}", d["partition"])?;
    writeln!(out, "  state            {}", text(&d["state_path"]))?;
    if d["live"] == Value::Bool(true) {
        writeln!(
            out,
            "  LIVE: held by a running consumer ({}); showing its last published snapshot {}",
            text(&d["holder"]),
            text(&d["published_file"])
        )?;
        writeln!(out, "  next offset      {}", d["next_offset"])?;
    } else {
        let fp = |v: &Value| match v {
            Value::Null => "-".to_string(),
            v => format!(
                "offset {}, key {}, value {}",
                v["offset"],
                text(&v["key_hash"]),
                text(&v["value_hash"])
            ),
        };
        writeln!(out, "  next offset      {}", d["next_offset"])?;
        writeln!(out, "  last record      {}", fp(&d["last_record"]))?;
        writeln!(out, "  verified anchor  {}", fp(&d["anchor"]))?;
        writeln!(
            out,
            "  reports counted  {}, duplicates dropped {}, malformed skipped {}",
            d["reports_counted"], d["duplicates_dropped"], d["malformed_skipped"]
        )?;
        writeln!(out, "  last commit      {}", text(&d["last_commit"]))?;
    }
    let months = d["months"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !months.is_empty() {
        writeln!(
            out,
            "  {:<10} {:>5} {:>6} {:>10}  {:<10}  {:<10}",
            "month", "year", "count", "avg", "start", "end"
        )?;
    }
    for m in months {
        writeln!(
            out,
            "  {:<10} {:>5} {:>6} {:>10.4}  {:<10}  {:<10}",
            text(&m["month"]),
            m["year"].as_i64().unwrap_or_default(),
            m["count"].as_u64().unwrap_or_default(),
            m["avg"].as_f64().unwrap_or(f64::NAN),
            text(&m["start"]),
            text(&m["end"])
        )?;
    }
    writeln!(out)
}
