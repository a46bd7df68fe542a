//! The path from record bytes to published files, in one function for the
//! property test (below) and the fuzz target (`fuzz/`): decode and
//! validate, the duplicate rule, the fold, the partition file and the
//! chart, with the same code the consumer runs. It asserts what must hold
//! for any input: every statistic finite, a partition file that parses
//! back to the same statistics with no `null` in it, and a chart that
//! renders. The caller checks the SVG with an XML parser of its own, so
//! that none ships in the binaries.

use serde_json::Value;

use crate::model::aggregate::{Aggregates, BatchFold, Outcome};
use crate::model::report::{Validator, MONTH_NAMES};
use crate::publish::chart::{bars_of, chart_input, render_svg};
use crate::store::published::{parse_partition_json, partition_json};

/// What a run of [`bytes_to_files`] published.
#[derive(Debug)]
pub struct Published {
    pub json: String,
    pub svg: String,
    pub counted: u64,
    /// Records skipped as malformed: undecodable, or not countable.
    pub skipped: u64,
}

/// Runs `records` (key, value) through the pipeline as one partition, in
/// order, and checks the properties of the module comment (panics when
/// one fails).
pub fn bytes_to_files(records: &[(Vec<u8>, Vec<u8>)]) -> Published {
    let committed = Aggregates::new();
    let mut validator = Validator::default();
    let mut fold = BatchFold::new(&committed);
    let mut skipped = 0;
    for (key, value) in records {
        match validator.validate(Some(key), Some(value)) {
            // The consumer holds an older date for a check first (a
            // re-created topic); after the check it is folded like this.
            Ok(report) => {
                if let Outcome::Unrepresentable(_) = fold.add(&report) {
                    skipped += 1;
                }
            }
            Err(_) => skipped += 1,
        }
    }
    let counted = fold.counted;
    let aggregates: Aggregates = fold.into_touched();
    for (key, stats) in &aggregates {
        assert!(
            stats.sum.is_finite() && stats.avg().is_finite(),
            "{key:?}: {stats:?}"
        );
    }
    let json = partition_json(0, records.len() as i64, &aggregates)
        .expect("finite statistics always serialize");
    let value: Value = serde_json::from_str(&json).expect("the partition file is JSON");
    for (month, years) in value.as_object().into_iter().flatten() {
        if !MONTH_NAMES.contains(&month.as_str()) {
            continue;
        }
        for (year, stats) in years.as_object().expect("months hold years") {
            for (field, stat) in stats.as_object().expect("years hold statistics") {
                assert!(!stat.is_null(), "{month} {year} {field} is null in {json}");
            }
        }
    }
    let parsed = parse_partition_json(&json).expect("the partition file parses back");
    assert_eq!(parsed.aggregates, aggregates, "the file round-trips");
    let svg = render_svg(&bars_of([&chart_input(&aggregates)])).expect("the chart renders");
    Published {
        json,
        svg,
        counted,
        skipped,
    }
}

/// [`bytes_to_files`] on records cut from arbitrary bytes (the fuzz
/// target's input). Each record starts with a tag byte: even tags make a
/// well-formed report from the next 12 bytes (year, month, day, degrees'
/// bits), so that the fuzzer reaches the fold; odd tags take a raw key and
/// value of the lengths in the next bytes.
pub fn records_from_bytes(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut records = Vec::new();
    while let Some((&tag, rest)) = data.split_first() {
        data = rest;
        if tag % 2 == 0 {
            let Some((head, rest)) = data.split_first_chunk::<12>() else {
                break;
            };
            data = rest;
            let year = 1990 + i32::from(u16::from_le_bytes([head[0], head[1]]) % 8);
            let month = u32::from(head[2] % 12) + 1;
            let day = u32::from(head[3] % 28) + 1;
            let mut bits = [0u8; 8];
            bits.copy_from_slice(&head[4..12]);
            let degrees = f64::from_le_bytes(bits);
            let Some(date) = chrono::NaiveDate::from_ymd_opt(year, month, day) else {
                continue;
            };
            records.push((
                crate::model::report::key_for(date).as_bytes().to_vec(),
                crate::model::report::encode(date, degrees),
            ));
        } else {
            let Some((&[key_len, value_len], rest)) = data.split_first_chunk::<2>() else {
                break;
            };
            let (key_len, value_len) = (usize::from(key_len % 16), usize::from(value_len));
            if rest.len() < key_len + value_len {
                break;
            }
            records.push((
                rest[..key_len].to_vec(),
                rest[key_len..key_len + value_len].to_vec(),
            ));
            data = &rest[key_len + value_len..];
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::NaiveDate;
    use proptest::prelude::*;

    use super::*;
    use crate::model::report::{encode, key_for};

    /// Degrees that break naive code: the edges of f64, its subnormals,
    /// infinities and NaN, and plain temperatures.
    fn degrees() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::MAX),
            Just(-f64::MAX),
            Just(1e308),
            Just(-1e308),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            Just(-5e-324),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::NAN),
            Just(0.0),
            Just(-0.0),
            Just(1e6),
            any::<f64>(),
            -80.0..140.0f64,
        ]
    }

    /// A record: a report of a few years (so that month/years collide and
    /// duplicates happen), one with a wrong key, or bytes.
    fn record() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let report = (9997..=9999i32, 1..=12u32, 1..=3u32, degrees()).prop_map(
            |(year, month, day, degrees)| {
                let date = NaiveDate::from_ymd_opt(year, month, day).unwrap();
                (key_for(date).as_bytes().to_vec(), encode(date, degrees))
            },
        );
        let mismatched = (any::<u8>(), 1..=3u32, degrees()).prop_map(|(key, day, degrees)| {
            let date = NaiveDate::from_ymd_opt(2000, 1, day).unwrap();
            (vec![key], encode(date, degrees))
        });
        let bytes = (
            proptest::collection::vec(any::<u8>(), 0..12),
            proptest::collection::vec(any::<u8>(), 0..40),
        );
        prop_oneof![6 => report, 1 => mismatched, 1 => bytes]
    }

    /// Runs the pipeline on a thread of its own: a case that does not end
    /// within the limit fails instead of hanging the suite.
    fn within_limit(records: Vec<(Vec<u8>, Vec<u8>)>) -> Published {
        crate::shutdown::within("the pipeline", Duration::from_secs(20), move || {
            bytes_to_files(&records)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn any_records_give_finite_statistics_strict_json_and_valid_svg(
            records in proptest::collection::vec(record(), 0..40)
        ) {
            let published = within_limit(records);
            roxmltree::Document::parse(&published.svg).expect("the SVG is XML");
            prop_assert!(!published.json.contains("null"));
        }

        #[test]
        fn any_bytes_cut_into_records_go_through(
            data in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            let published = within_limit(records_from_bytes(&data));
            roxmltree::Document::parse(&published.svg).expect("the SVG is XML");
        }
    }

    #[test]
    fn the_issue_s_reports_are_refused_or_counted_finitely() {
        let date = |d| NaiveDate::from_ymd_opt(9001, 1, d).unwrap();
        let records: Vec<(Vec<u8>, Vec<u8>)> = [
            (1, 1e308),
            (2, 1e308),
            (3, f64::INFINITY),
            (4, f64::NAN),
            (5, -f64::MAX),
            (6, 5e-324),
        ]
        .into_iter()
        .map(|(d, degrees)| (b"January".to_vec(), encode(date(d), degrees)))
        .collect();
        let published = within_limit(records);
        assert_eq!((published.counted, published.skipped), (3, 3));
        roxmltree::Document::parse(&published.svg).unwrap();
    }
}
