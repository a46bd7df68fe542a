//! The pure statistics fold: per month/year count, sum, first and last date,
//! and the duplicate rule of the assignment (a report whose date is <= the
//! last date recorded for its month/year is a retry and is dropped). No I/O:
//! the state module persists what this computes.
//!
//! Every statistic it produces is a finite number: a report whose degrees
//! are finite but would take its month/year's sum past `f64::MAX` (two
//! reports of `1e308`) is refused as [`Outcome::Unrepresentable`], and the
//! month/year stays as it was, its dedup `end` included. The duplicate rule
//! comes first, so a retry is dropped by its date whatever its value (the
//! assignment's retries carry `1000000.0`). Non-finite degrees never get
//! here from the consumer (the report's validation refuses them), but the
//! fold refuses them too rather than trust its caller.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate};

pub use crate::model::report::Unrepresentable;
use crate::model::report::ValidReport;

/// A month of a year. Orders by month first, then year: the order of the
/// published JSON (months in calendar order, years ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MonthYear {
    /// 1 = January.
    pub month: u32,
    pub year: i32,
}

impl MonthYear {
    pub fn of(date: NaiveDate) -> Self {
        MonthYear {
            month: date.month(),
            year: date.year(),
        }
    }
}

/// Statistics of one month/year.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MonthStats {
    pub count: u64,
    /// Sum of degrees; `avg` is derived, never stored.
    pub sum: f64,
    pub start: NaiveDate,
    pub end: NaiveDate,
}

impl MonthStats {
    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// All statistics of one partition.
pub type Aggregates = BTreeMap<MonthYear, MonthStats>;

/// What the fold did with one report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Counted,
    /// Dropped by the date rule.
    Duplicate,
    /// Refused: counting it would make a statistic of its month/year
    /// infinite or NaN (see the module comment).
    Unrepresentable(Unrepresentable),
}

/// What [`fold`] makes of one report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Folded {
    /// The month/year's statistics with the report counted.
    Counted(MonthStats),
    Duplicate,
    Unrepresentable(Unrepresentable),
}

/// Folds one report into `stats` (None: the month/year's first report).
pub fn fold(stats: Option<&MonthStats>, report: &ValidReport) -> Folded {
    if !report.degrees.is_finite() {
        return Folded::Unrepresentable(Unrepresentable::NonFinite(report.degrees));
    }
    match stats {
        None => Folded::Counted(MonthStats {
            count: 1,
            sum: report.degrees,
            start: report.date,
            end: report.date,
        }),
        Some(s) if report.date <= s.end => Folded::Duplicate,
        Some(s) => {
            let sum = s.sum + report.degrees;
            if !sum.is_finite() {
                return Folded::Unrepresentable(Unrepresentable::SumOverflow {
                    degrees: report.degrees,
                    sum: s.sum,
                });
            }
            Folded::Counted(MonthStats {
                count: s.count.saturating_add(1),
                sum,
                start: s.start,
                end: report.date,
            })
        }
    }
}

/// One batch's changes on top of committed aggregates: reads see the batch's
/// own earlier reports, and only touched month/years are kept, so that the
/// commit writes just those.
pub struct BatchFold<'a> {
    committed: &'a Aggregates,
    touched: BTreeMap<MonthYear, MonthStats>,
    /// The month/year being folded, kept out of `touched` until another one
    /// comes: reports arrive in date order, so most need no map lookup.
    open: Option<(MonthYear, MonthStats)>,
    pub counted: u64,
    pub duplicates: u64,
    /// Reports refused as [`Outcome::Unrepresentable`].
    pub unrepresentable: u64,
}

impl<'a> BatchFold<'a> {
    pub fn new(committed: &'a Aggregates) -> Self {
        BatchFold {
            committed,
            touched: BTreeMap::new(),
            open: None,
            counted: 0,
            duplicates: 0,
            unrepresentable: 0,
        }
    }

    /// The statistics a report for `key` would be folded into.
    pub(crate) fn current(&self, key: MonthYear) -> Option<&MonthStats> {
        match &self.open {
            Some((open, stats)) if *open == key => Some(stats),
            _ => self.touched.get(&key).or_else(|| self.committed.get(&key)),
        }
    }

    pub fn add(&mut self, report: &ValidReport) -> Outcome {
        let key = MonthYear::of(report.date);
        if self.open.is_none_or(|(open, _)| open != key) {
            if let Some((open, stats)) = self.open.take() {
                self.touched.insert(open, stats);
            }
            let current = self.touched.get(&key).or_else(|| self.committed.get(&key));
            match fold(current, report) {
                Folded::Counted(next) => self.open = Some((key, next)),
                other => return self.not_counted(other),
            }
        } else if let Some((_, stats)) = &mut self.open {
            match fold(Some(stats), report) {
                Folded::Counted(next) => *stats = next,
                other => return self.not_counted(other),
            }
        }
        self.counted += 1;
        Outcome::Counted
    }

    fn not_counted(&mut self, folded: Folded) -> Outcome {
        match folded {
            Folded::Unrepresentable(why) => {
                self.unrepresentable += 1;
                Outcome::Unrepresentable(why)
            }
            _ => {
                self.duplicates += 1;
                Outcome::Duplicate
            }
        }
    }

    /// The month/years this batch changed, with their new statistics.
    pub fn into_touched(mut self) -> BTreeMap<MonthYear, MonthStats> {
        if let Some((open, stats)) = self.open.take() {
            self.touched.insert(open, stats);
        }
        self.touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(y: i32, m: u32, d: u32, degrees: f64) -> ValidReport {
        ValidReport {
            date: NaiveDate::from_ymd_opt(y, m, d).unwrap(),
            degrees,
        }
    }

    fn run(reports: &[ValidReport]) -> (Aggregates, u64) {
        let committed = Aggregates::new();
        let mut batch = BatchFold::new(&committed);
        for report in reports {
            batch.add(report);
        }
        let dups = batch.duplicates;
        (batch.into_touched(), dups)
    }

    #[test]
    fn duplicate_of_the_very_first_report_is_dropped() {
        let (agg, dups) = run(&[r(1990, 1, 1, 20.0), r(1990, 1, 1, 1e6)]);
        let jan = agg[&MonthYear {
            month: 1,
            year: 1990,
        }];
        assert_eq!((jan.count, jan.sum, dups), (1, 20.0, 1));
        assert_eq!(jan.start, jan.end);
    }

    #[test]
    fn duplicate_at_a_month_boundary_stays_in_its_month() {
        let (agg, dups) = run(&[
            r(1990, 1, 30, 10.0),
            r(1990, 1, 31, 11.0),
            r(1990, 1, 31, 1e6),
            r(1990, 2, 1, 12.0),
            r(1990, 2, 1, 1e6),
        ]);
        assert_eq!(dups, 2);
        let jan = agg[&MonthYear {
            month: 1,
            year: 1990,
        }];
        let feb = agg[&MonthYear {
            month: 2,
            year: 1990,
        }];
        assert_eq!((jan.count, jan.sum), (2, 21.0));
        assert_eq!(jan.end, NaiveDate::from_ymd_opt(1990, 1, 31).unwrap());
        assert_eq!((feb.count, feb.sum), (1, 12.0));
    }

    #[test]
    fn first_day_of_a_year_opens_a_new_year() {
        let (agg, _) = run(&[r(1990, 12, 31, 5.0), r(1991, 1, 1, 6.0), r(1990, 1, 1, 7.0)]);
        assert_eq!(
            agg[&MonthYear {
                month: 12,
                year: 1990
            }]
                .count,
            1
        );
        assert_eq!(
            agg[&MonthYear {
                month: 1,
                year: 1991
            }]
                .count,
            1
        );
        // An earlier year's month is its own bucket, not a duplicate.
        assert_eq!(
            agg[&MonthYear {
                month: 1,
                year: 1990
            }]
                .count,
            1
        );
    }

    #[test]
    fn leap_day_is_counted_once() {
        let (agg, dups) = run(&[
            r(1992, 2, 28, 1.0),
            r(1992, 2, 29, 2.0),
            r(1992, 2, 29, 1e6),
            r(1992, 3, 1, 3.0),
        ]);
        let feb = agg[&MonthYear {
            month: 2,
            year: 1992,
        }];
        assert_eq!((feb.count, feb.sum, dups), (2, 3.0, 1));
        assert_eq!(feb.end, NaiveDate::from_ymd_opt(1992, 2, 29).unwrap());
        assert_eq!(feb.avg(), 1.5);
    }

    /// CommittedSnapshot statistics of March 2000 only, from day `first` to `last`.
    fn march_2000(count: u64, sum: f64, first: u32, last: u32) -> Aggregates {
        let day = |d| NaiveDate::from_ymd_opt(2000, 3, d).unwrap();
        Aggregates::from([(
            MonthYear {
                month: 3,
                year: 2000,
            },
            MonthStats {
                count,
                sum,
                start: day(first),
                end: day(last),
            },
        )])
    }

    #[test]
    fn batch_reads_committed_state() {
        let committed = march_2000(2, 10.0, 1, 2);
        let mut batch = BatchFold::new(&committed);
        assert_eq!(batch.add(&r(2000, 3, 2, 1e6)), Outcome::Duplicate);
        assert_eq!(batch.add(&r(2000, 3, 3, 5.0)), Outcome::Counted);
        let touched = batch.into_touched();
        assert_eq!(touched.len(), 1);
        let march = touched[&MonthYear {
            month: 3,
            year: 2000,
        }];
        assert_eq!((march.count, march.sum), (3, 15.0));
        assert_eq!(march.start, NaiveDate::from_ymd_opt(2000, 3, 1).unwrap());
    }

    #[test]
    fn batch_matches_the_plain_fold_when_months_interleave() {
        // Out of order on purpose: the batch must not lose a month/year it
        // left and came back to, nor fold into the wrong one.
        let reports = [
            r(2000, 3, 30, 1.0),
            r(2000, 3, 31, 2.0),
            r(2000, 4, 1, 3.0),
            r(2000, 3, 31, 9.0),
            r(2000, 4, 2, 4.0),
            r(1999, 4, 5, 5.0),
            r(2000, 4, 2, 9.0),
            r(2000, 4, 3, 6.0),
        ];
        let committed = march_2000(1, 7.0, 29, 29);
        let mut expected = committed.clone();
        let (mut expected_counted, mut expected_dups) = (0, 0);
        for report in &reports {
            let key = MonthYear::of(report.date);
            match fold(expected.get(&key), report) {
                Folded::Counted(next) => {
                    expected.insert(key, next);
                    expected_counted += 1;
                }
                _ => expected_dups += 1,
            }
        }
        assert_eq!((expected_counted, expected_dups), (6, 2));
        let mut batch = BatchFold::new(&committed);
        for (i, report) in reports.iter().enumerate() {
            let key = MonthYear::of(report.date);
            let before = batch.current(key).copied();
            let outcome = batch.add(report);
            assert_eq!(
                outcome == Outcome::Duplicate,
                before.is_some_and(|s| report.date <= s.end),
                "report {i}"
            );
        }
        assert_eq!((batch.counted, batch.duplicates), (6, 2));
        let mut result = committed.clone();
        result.extend(batch.into_touched());
        assert_eq!(result, expected);
    }

    #[test]
    fn a_sum_that_would_overflow_is_refused_and_leaves_the_month_as_it_was() {
        let committed = Aggregates::new();
        let mut batch = BatchFold::new(&committed);
        assert_eq!(batch.add(&r(9001, 1, 1, 1e308)), Outcome::Counted);
        assert!(matches!(
            batch.add(&r(9001, 1, 2, 1e308)),
            Outcome::Unrepresentable(Unrepresentable::SumOverflow { .. })
        ));
        // The refused report did not move `end`: the next day still counts,
        // and a retry of day 1 is still a duplicate, whatever its value.
        assert_eq!(batch.add(&r(9001, 1, 2, -1e308)), Outcome::Counted);
        assert_eq!(batch.add(&r(9001, 1, 2, 1e6)), Outcome::Duplicate);
        assert!(matches!(
            batch.add(&r(9001, 1, 3, f64::NAN)),
            Outcome::Unrepresentable(Unrepresentable::NonFinite(_))
        ));
        assert_eq!(
            (batch.counted, batch.duplicates, batch.unrepresentable),
            (2, 1, 2)
        );
        let jan = batch.into_touched()[&MonthYear {
            month: 1,
            year: 9001,
        }];
        assert_eq!((jan.count, jan.sum), (2, 0.0));
        assert_eq!(jan.end, NaiveDate::from_ymd_opt(9001, 1, 2).unwrap());
    }

    #[test]
    fn json_order_is_months_then_years() {
        let mut keys = [
            MonthYear {
                month: 4,
                year: 1990,
            },
            MonthYear {
                month: 1,
                year: 1991,
            },
            MonthYear {
                month: 1,
                year: 1990,
            },
        ];
        keys.sort();
        assert_eq!(
            keys[0],
            MonthYear {
                month: 1,
                year: 1990
            }
        );
        assert_eq!(
            keys[2],
            MonthYear {
                month: 4,
                year: 1990
            }
        );
    }
}
