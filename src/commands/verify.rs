//! `consumer verify`: lets an operator check the exactly-once claim. For
//! each partition it takes the offset N and the statistics that the state
//! holds (or, for a partition a running consumer holds, that its published
//! `partition-N.json` holds: the file is an atomic snapshot, so verification
//! needs no stop), reads the topic from offset 0 to N, recomputes the
//! statistics with the assignment's rules, and lists every difference.
//! Partitions are read in parallel, one client each.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;

use crate::kafka::{
    assign, reading_config, ClientSettings, Offset, PartitionId, TopicAdmin, BACKLOG_FETCH_WAIT_MS,
};
use crate::model::aggregate::{Aggregates, BatchFold, MonthYear};
use crate::model::report::{month_name, DateText, Validator};
use crate::store::folders::{self, partition_file};
use crate::store::published::{parse_partition_json, PublishedPartition};
use crate::store::snapshot::Fingerprint;
use crate::store::state::{PartitionState, StateError};

/// How long a reader waits for the next record before it concludes that
/// the log ends before the offset it must reach.
const LOG_END_QUIET: Duration = Duration::from_secs(5);
/// Progress lines on stderr, per partition, while a read takes longer.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Differences listed per partition; the rest are counted.
const MAX_LISTED: usize = 20;
/// Sums agree when they differ by at most this, relative.
const SUM_TOLERANCE: f64 = 1e-9;

/// What `consumer verify` is asked to do.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub client: ClientSettings,
    /// The consumer group of its readers (they join it not: manual
    /// assignment), the consumer's by default: one group ACL.
    pub group_id: String,
    pub topic: String,
    pub files_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Empty: every partition that has a state or a published file.
    pub partitions: Vec<PartitionId>,
}

/// Where the statistics to check come from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    State,
    /// Held by a running consumer: its published file.
    LiveFile,
    /// No state: the published file.
    File,
}

/// What a partition claims: its offset and statistics.
#[derive(Debug)]
struct Claim {
    partition: PartitionId,
    source: Source,
    next_offset: Offset,
    aggregates: Aggregates,
    /// The fingerprint of the last counted record, if the state has one:
    /// tells a re-created topic from a miscount.
    last_record: Option<Fingerprint>,
    /// Differences found without reading the log (the file against the
    /// state, avg fields against sum/count).
    static_differences: Vec<Difference>,
}

/// One difference between what the log says and what a partition claims.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Difference {
    /// None: about the partition as a whole.
    month_year: Option<MonthYear>,
    field: &'static str,
    expected: String,
    found: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(my) = self.month_year {
            write!(f, "{} {}: ", month_name(my.month), my.year)?;
        }
        write!(
            f,
            "{} expected {}, found {}",
            self.field, self.expected, self.found
        )
    }
}

/// The verdict on one partition.
#[derive(Debug)]
enum Outcome {
    Ok {
        records: u64,
        offset: Offset,
        month_years: usize,
    },
    Differs(Vec<Difference>),
    NotVerified(String),
}

/// Runs the verification and writes its report to `out`; Ok(true) when
/// every partition matches.
pub fn run(config: &VerifyConfig, out: &mut dyn Write) -> anyhow::Result<bool> {
    let partitions = partitions_to_verify(config)?;
    let admin = TopicAdmin::connect(&config.client)?;
    let partition_count = admin.partition_count(&config.topic)?;
    drop(admin);
    let mut outcomes: BTreeMap<PartitionId, (Option<Source>, Outcome)> = BTreeMap::new();
    let mut readers = Vec::new();
    for partition in partitions {
        let claim = match claim(config, partition) {
            Ok(claim) => claim,
            Err(reason) => {
                outcomes.insert(partition, (None, Outcome::NotVerified(reason)));
                continue;
            }
        };
        let missing = match partition_count {
            None => Some(format!("topic {:?} does not exist", config.topic)),
            Some(count) if usize::try_from(partition).map_or(true, |p| p >= count) => Some(
                format!("topic {:?} has no partition {partition}", config.topic),
            ),
            Some(_) => None,
        };
        if let Some(reason) = missing {
            outcomes.insert(
                partition,
                (Some(claim.source), Outcome::NotVerified(reason)),
            );
            continue;
        }
        let config = config.clone();
        let reader = crate::shutdown::spawn(format!("verify-{partition}"), move || {
            let outcome = verify_claim(&config, &claim);
            (claim.partition, claim.source, outcome)
        })
        .context("starting a reader thread")?;
        readers.push(reader);
    }
    for reader in readers {
        let (partition, source, outcome) = reader
            .join()
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?;
        outcomes.insert(partition, (Some(source), outcome));
    }
    let (mut ok, mut differ, mut unverified) = (0, 0, 0);
    for (partition, (source, outcome)) in &outcomes {
        let from = match source {
            Some(Source::LiveFile) => format!(
                " (live: {} of a running consumer)",
                partition_file(&config.files_dir, *partition).display()
            ),
            Some(Source::File) => format!(
                " (no state: {})",
                partition_file(&config.files_dir, *partition).display()
            ),
            _ => String::new(),
        };
        match outcome {
            Outcome::Ok {
                records,
                offset,
                month_years,
            } => {
                ok += 1;
                writeln!(
                    out,
                    "partition {partition}: OK, {records} records to offset {offset}, {month_years} month/years{from}"
                )?;
            }
            Outcome::Differs(differences) => {
                differ += 1;
                writeln!(out, "partition {partition}: DIFFERS{from}")?;
                for difference in differences.iter().take(MAX_LISTED) {
                    writeln!(out, "  {difference}")?;
                }
                if differences.len() > MAX_LISTED {
                    writeln!(
                        out,
                        "  ... and {} more differences",
                        differences.len() - MAX_LISTED
                    )?;
                }
            }
            Outcome::NotVerified(reason) => {
                unverified += 1;
                writeln!(out, "partition {partition}: NOT VERIFIED, {reason}{from}")?;
            }
        }
    }
    writeln!(
        out,
        "verify: {} partitions: {ok} OK, {differ} differ, {unverified} not verified",
        outcomes.len()
    )?;
    Ok(differ == 0 && unverified == 0)
}

fn partitions_to_verify(config: &VerifyConfig) -> anyhow::Result<Vec<PartitionId>> {
    if !config.partitions.is_empty() {
        return Ok(config.partitions.clone());
    }
    let mut found = folders::state_partitions(&config.state_dir)
        .with_context(|| format!("listing {}", config.state_dir.display()))?;
    for (partition, _) in folders::partition_files(&config.files_dir)
        .with_context(|| format!("listing {}", config.files_dir.display()))?
    {
        found.push(partition);
    }
    found.sort_unstable();
    found.dedup();
    if found.is_empty() {
        anyhow::bail!(
            "no partition state in {} and no partition file in {}",
            config.state_dir.display(),
            config.files_dir.display()
        );
    }
    Ok(found)
}

fn read_published(
    files_dir: &Path,
    partition: PartitionId,
) -> Result<(PublishedPartition, String), String> {
    let path = partition_file(files_dir, partition);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let published = parse_partition_json(&text)
        .map_err(|e| format!("{} does not parse: {e}", path.display()))?;
    Ok((published, text))
}

/// What a partition claims, and the differences visible without the log.
fn claim(config: &VerifyConfig, partition: PartitionId) -> Result<Claim, String> {
    match PartitionState::open_existing(&config.state_dir, partition) {
        Ok(state) => {
            let snapshot = state.snapshot();
            drop(state);
            let mut static_differences = Vec::new();
            // Not live: the published file must show the state.
            let path = partition_file(&config.files_dir, partition);
            let read = read_published(&config.files_dir, partition);
            if let (Err(reason), true) = (&read, path.exists()) {
                static_differences.push(Difference {
                    month_year: None,
                    field: "published file (run `consumer export`)",
                    expected: "a valid partition file".into(),
                    found: reason.clone(),
                });
            }
            if let Ok((published, text)) = read {
                static_differences.extend(avg_differences(&text));
                if published.offset != snapshot.next_offset {
                    static_differences.push(Difference {
                        month_year: None,
                        field: "published offset (run `consumer export`)",
                        expected: snapshot.next_offset.to_string(),
                        found: published.offset.to_string(),
                    });
                } else {
                    for mut d in compare(&snapshot.aggregates, &published.aggregates) {
                        d.field = published_field(d.field);
                        static_differences.push(d);
                    }
                }
            }
            Ok(Claim {
                partition,
                source: Source::State,
                next_offset: snapshot.next_offset,
                aggregates: snapshot.aggregates.clone(),
                last_record: snapshot.last_record,
                static_differences,
            })
        }
        Err(error @ (StateError::Locked { .. } | StateError::NoState { .. })) => {
            let source = if matches!(error, StateError::Locked { .. }) {
                Source::LiveFile
            } else {
                Source::File
            };
            let (published, text) = read_published(&config.files_dir, partition).map_err(|e| {
                if source == Source::File {
                    format!("no state and no readable partition file ({e})")
                } else {
                    e
                }
            })?;
            if published.partition != partition {
                return Err(format!(
                    "{} says it is partition {}",
                    partition_file(&config.files_dir, partition).display(),
                    published.partition
                ));
            }
            Ok(Claim {
                partition,
                source,
                next_offset: published.offset,
                aggregates: published.aggregates,
                last_record: None,
                static_differences: avg_differences(&text),
            })
        }
        Err(error) => Err(format!("{error:#}")),
    }
}

fn published_field(field: &'static str) -> &'static str {
    match field {
        "count" => "published count",
        "sum" => "published sum",
        "start" => "published start",
        "end" => "published end",
        _ => "published month/year",
    }
}

/// Every `avg` in a partition file that is not sum / count.
fn avg_differences(text: &str) -> Vec<Difference> {
    let mut out = Vec::new();
    let Ok(serde_json::Value::Object(top)) = serde_json::from_str::<serde_json::Value>(text) else {
        return out;
    };
    for (month_name_text, years) in &top {
        let Some(month) = crate::model::report::month_number(month_name_text) else {
            continue;
        };
        let Some(years) = years.as_object() else {
            continue;
        };
        for (year, stats) in years {
            let (Ok(year), Some(count), Some(sum), Some(avg)) = (
                year.parse::<i32>(),
                stats.get("count").and_then(serde_json::Value::as_f64),
                stats.get("sum").and_then(serde_json::Value::as_f64),
                stats.get("avg").and_then(serde_json::Value::as_f64),
            ) else {
                continue;
            };
            let expected = sum / count;
            if !close(expected, avg) {
                out.push(Difference {
                    month_year: Some(MonthYear { month, year }),
                    field: "published avg (sum/count)",
                    expected: expected.to_string(),
                    found: avg.to_string(),
                });
            }
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= SUM_TOLERANCE * a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

/// Differences between recomputed (`expected`) and claimed (`found`)
/// statistics: count, start and end exactly, sum to 1e-9 relative, and no
/// missing or extra month/year.
pub(crate) fn compare(expected: &Aggregates, found: &Aggregates) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut push = |my: MonthYear, field, expected: String, found: String| {
        out.push(Difference {
            month_year: Some(my),
            field,
            expected,
            found,
        })
    };
    let keys: std::collections::BTreeSet<&MonthYear> =
        expected.keys().chain(found.keys()).collect();
    for key in keys {
        match (expected.get(key), found.get(key)) {
            (Some(e), Some(f)) => {
                if e.count != f.count {
                    push(*key, "count", e.count.to_string(), f.count.to_string());
                }
                if !close(e.sum, f.sum) {
                    push(*key, "sum", e.sum.to_string(), f.sum.to_string());
                }
                if e.start != f.start {
                    push(*key, "start", date_text(e.start), date_text(f.start));
                }
                if e.end != f.end {
                    push(*key, "end", date_text(e.end), date_text(f.end));
                }
            }
            (Some(e), None) => push(
                *key,
                "month/year",
                format!("{} reports", e.count),
                "missing".into(),
            ),
            (None, Some(f)) => push(
                *key,
                "month/year",
                "absent".into(),
                format!("{} reports", f.count),
            ),
            (None, None) => {}
        }
    }
    out
}

fn date_text(date: chrono::NaiveDate) -> String {
    DateText::new(date).as_str().to_string()
}

/// Reads the partition and compares.
fn verify_claim(config: &VerifyConfig, claim: &Claim) -> Outcome {
    match recount(config, claim) {
        Err(reason) => Outcome::NotVerified(reason),
        Ok((aggregates, records)) => {
            let mut differences = compare(&aggregates, &claim.aggregates);
            differences.extend(claim.static_differences.iter().cloned());
            if differences.is_empty() {
                Outcome::Ok {
                    records,
                    offset: claim.next_offset,
                    month_years: aggregates.len(),
                }
            } else {
                Outcome::Differs(differences)
            }
        }
    }
}

/// The statistics of offsets `0..claim.next_offset` by the assignment's
/// rules (malformed records skipped, a date at or before the last one
/// recorded for its month/year dropped), and how many records were read.
fn recount(config: &VerifyConfig, claim: &Claim) -> Result<(Aggregates, u64), String> {
    let until = claim.next_offset;
    let nothing = Aggregates::new();
    let mut fold = BatchFold::new(&nothing);
    if until == 0 {
        return Ok((Aggregates::new(), 0));
    }
    let partition = claim.partition;
    // It reads records that are there (up to the state's offset).
    let consumer: BaseConsumer =
        reading_config(&config.client, &config.group_id, BACKLOG_FETCH_WAIT_MS)
            .create()
            .map_err(|e| format!("creating a Kafka consumer: {e}"))?;
    assign(&consumer, &config.topic, partition, 0)
        .map_err(|e| format!("assigning the partition: {e}"))?;
    let mut validator = Validator::default();
    let started = Instant::now();
    let mut last_line = started;
    let mut quiet_since: Option<Instant> = None;
    let mut records = 0u64;
    let mut last_offset: Offset = -1;
    while last_offset < until - 1 {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                quiet_since = None;
                let offset = message.offset();
                if offset >= until {
                    // A gap up to the end: nothing more below the offset.
                    break;
                }
                if let Some(counted) = claim.last_record.filter(|fp| fp.offset == offset) {
                    if Fingerprint::of(offset, message.key(), message.payload()) != counted {
                        return Err(format!(
                            "the topic was re-created since it was counted (the record at offset {offset} differs from the one counted)"
                        ));
                    }
                }
                if let Ok(valid) = validator.validate(message.key(), message.payload()) {
                    fold.add(&valid);
                }
                records += 1;
                last_offset = offset;
            }
            Some(Err(KafkaError::PartitionEOF(_))) | None => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= LOG_END_QUIET {
                    return Err(format!(
                        "offset {until} is past the end of the log, which ends at offset {} (was the topic re-created since?)",
                        last_offset + 1
                    ));
                }
            }
            Some(Err(error)) => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= LOG_END_QUIET {
                    return Err(format!("reading partition {partition} failed: {error}"));
                }
            }
        }
        if records % 1024 == 0 && last_line.elapsed() >= PROGRESS_INTERVAL {
            last_line = Instant::now();
            let rate = records as f64 / started.elapsed().as_secs_f64();
            log::info!(
                "verify: partition {partition}: {records} of {until} records read ({rate:.0}/s)"
            );
        }
    }
    Ok((fold.into_touched(), records))
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;
    use crate::model::aggregate::MonthStats;

    fn stats(count: u64, sum: f64, start: u32, end: u32) -> MonthStats {
        let d = |day| NaiveDate::from_ymd_opt(1990, 1, day).unwrap();
        MonthStats {
            count,
            sum,
            start: d(start),
            end: d(end),
        }
    }

    const JAN: MonthYear = MonthYear {
        month: 1,
        year: 1990,
    };
    const FEB: MonthYear = MonthYear {
        month: 2,
        year: 1990,
    };

    #[test]
    fn compare_names_each_field_that_differs_and_tolerates_rounding_of_sums() {
        let expected = Aggregates::from([(JAN, stats(3, 60.0, 1, 3))]);
        assert_eq!(compare(&expected, &expected), []);
        let rounded = Aggregates::from([(JAN, stats(3, 60.0 + 1e-12, 1, 3))]);
        assert_eq!(compare(&expected, &rounded), []);
        let wrong = Aggregates::from([(JAN, stats(4, 61.0, 2, 3)), (FEB, stats(1, 1.0, 1, 1))]);
        let lines: Vec<String> = compare(&expected, &wrong)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "January 1990: count expected 3, found 4",
                "January 1990: sum expected 60, found 61",
                "January 1990: start expected 1990-01-01, found 1990-01-02",
                "February 1990: month/year expected absent, found 1 reports",
            ]
        );
        let missing = compare(&wrong, &expected);
        assert!(missing.iter().any(
            |d| d.to_string() == "February 1990: month/year expected 1 reports, found missing"
        ));
    }

    #[test]
    fn an_avg_that_is_not_sum_over_count_is_a_difference() {
        let good = r#"{"partition": 0, "offset": 2, "January": {"1990": {"count": 2, "sum": 3.0, "avg": 1.5, "start": "1990-01-01", "end": "1990-01-02"}}}"#;
        assert_eq!(avg_differences(good), []);
        let bad = good.replace("1.5", "1.4");
        let found = avg_differences(&bad);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].month_year, Some(JAN));
    }
}
