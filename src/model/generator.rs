//! The weather model (shared/spec/weather-model.md): an endless, seedable
//! iterator of daily maximum temperatures for one location, starting at
//! 1990-01-01, with the original generator's quirks kept on purpose: a 5%
//! chance of re-sending the previous date with 1000000.0 (a producer retry
//! whose ack was lost) and a `year = 1990 + day_count / 365` that drifts from
//! the calendar by one day per leap year.

use chrono::{Days, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Degrees sent with a duplicate: absurd, so a double count shows at once.
pub(crate) const DUPLICATE_DEGREES: f64 = 1_000_000.0;

/// Share of steps that re-send the previous date.
pub(crate) const DUPLICATE_PROBABILITY: f64 = 0.05;

/// Base temperature (°F) of each day of a common year, Jan 1 .. Dec 31.
const TREND: [u8; 365] = [
    28, 37, 42, 36, 32, 26, 38, 41, 40, 39, 42, 28, 29, 38, 50, 49, 49, 35, 37, 32, //
    31, 42, 39, 41, 30, 33, 43, 39, 42, 43, 42, 44, 24, 28, 36, 48, 40, 41, 53, 47, //
    38, 35, 53, 50, 23, 29, 31, 20, 40, 27, 32, 43, 35, 38, 30, 15, 30, 34, 36, 44, //
    52, 29, 36, 30, 35, 39, 38, 43, 44, 58, 75, 71, 69, 64, 58, 40, 42, 33, 48, 55, //
    47, 31, 37, 45, 41, 50, 54, 43, 45, 55, 57, 39, 55, 60, 43, 36, 46, 66, 59, 50, //
    39, 45, 54, 61, 56, 54, 46, 57, 55, 66, 69, 72, 82, 85, 85, 84, 82, 64, 68, 61, //
    57, 64, 62, 48, 65, 68, 77, 77, 63, 49, 64, 53, 69, 65, 55, 69, 56, 69, 53, 51, //
    62, 69, 67, 69, 60, 69, 74, 76, 66, 71, 75, 83, 76, 62, 65, 62, 76, 77, 78, 79, //
    80, 75, 90, 84, 83, 84, 76, 85, 82, 74, 84, 79, 70, 76, 81, 84, 86, 83, 83, 79, //
    89, 79, 82, 91, 94, 83, 74, 77, 90, 82, 83, 79, 74, 74, 72, 75, 81, 86, 84, 79, //
    81, 80, 80, 78, 82, 84, 83, 78, 86, 82, 77, 76, 77, 80, 85, 84, 75, 72, 80, 81, //
    80, 82, 80, 77, 75, 82, 86, 82, 79, 91, 73, 66, 68, 78, 78, 83, 86, 81, 92, 88, //
    81, 82, 80, 87, 83, 78, 92, 85, 93, 79, 80, 82, 84, 80, 84, 84, 73, 74, 62, 63, //
    63, 68, 70, 69, 57, 58, 71, 79, 79, 83, 68, 56, 60, 67, 72, 73, 67, 81, 79, 55, //
    45, 47, 43, 58, 59, 60, 62, 57, 67, 74, 46, 50, 62, 52, 53, 59, 55, 49, 56, 58, //
    50, 63, 68, 67, 72, 67, 60, 39, 36, 40, 36, 36, 37, 48, 49, 43, 45, 67, 68, 61, //
    52, 52, 57, 56, 64, 53, 49, 51, 49, 65, 65, 42, 37, 49, 49, 37, 32, 24, 35, 33, //
    36, 43, 47, 39, 42, 45, 34, 32, 35, 31, 34, 33, 33, 38, 35, 14, 1, 17, 20, 7, //
    27, 35, 34, 7, 15,
];

/// One generated report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub date: NaiveDate,
    /// Rounded to 4 decimals, as the original generator does.
    pub degrees: f64,
    /// True for a re-send of the previous date (degrees = [`DUPLICATE_DEGREES`]).
    pub duplicate: bool,
}

/// The model's start date.
pub(crate) fn first_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(1990, 1, 1).expect("1990-01-01 is a valid date")
}

fn is_leap_year(year: u64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// The base temperature of the model's `day_of_year` (1-based) in the model's
/// `year`, with the original's leap-year rule: in a leap year day 60 repeats
/// day 59's value and every later day reads one entry earlier.
pub(crate) fn base_temperature(year: u64, day_of_year: u64) -> f64 {
    let index = if is_leap_year(year) && day_of_year >= 60 {
        if day_of_year == 60 {
            58
        } else {
            day_of_year - 2
        }
    } else {
        day_of_year - 1
    };
    f64::from(TREND[index as usize])
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Endless generator of reports; deterministic for a given seed.
pub struct WeatherGenerator {
    day_count: u64,
    /// The date of day `day_count` (None past chrono's last date): stepped
    /// a day at a time, which is cheaper than adding `day_count` days to
    /// 1990-01-01 for every report.
    next_date: Option<NaiveDate>,
    rng: ChaCha8Rng,
}

impl WeatherGenerator {
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        WeatherGenerator {
            day_count: 0,
            next_date: Some(first_date()),
            rng,
        }
    }

    /// Distinct days generated so far (duplicates not counted).
    pub fn days_generated(&self) -> u64 {
        self.day_count
    }
}

impl Iterator for WeatherGenerator {
    type Item = Observation;

    fn next(&mut self) -> Option<Observation> {
        if self.day_count > 0 && self.rng.random::<f64>() < DUPLICATE_PROBABILITY {
            let date = match self.next_date {
                Some(next) => next.pred_opt()?,
                None => first_date().checked_add_days(Days::new(self.day_count - 1))?,
            };
            return Some(Observation {
                date,
                degrees: DUPLICATE_DEGREES,
                duplicate: true,
            });
        }
        let year = model_year(self.day_count);
        let day_of_year = self.day_count % 365 + 1;
        let base = base_temperature(year, day_of_year);
        let trend = (year - 1990) as f64 * self.rng.random_range(0.02..0.1);
        let noise = self.rng.random_range(-5.0..5.0);
        let date = self.next_date?;
        self.next_date = date.succ_opt();
        self.day_count += 1;
        Some(Observation {
            date,
            degrees: round4(base + trend + noise),
            duplicate: false,
        })
    }
}

/// The model's year for a day count (`1990 + day_count / 365`), which
/// drifts from the calendar year by one day per leap year, on purpose.
pub(crate) fn model_year(day_count: u64) -> u64 {
    1990 + day_count / 365
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;

    #[test]
    fn first_report_is_1990_01_01_and_never_a_duplicate() {
        for seed in 0..200 {
            let first = WeatherGenerator::new(Some(seed)).next().unwrap();
            assert_eq!(first.date, first_date());
            assert!(!first.duplicate);
            assert!(first.degrees < 100.0);
        }
    }

    #[test]
    fn dates_advance_one_day_per_fresh_step_and_duplicates_repeat_the_last() {
        let mut previous: Option<NaiveDate> = None;
        for obs in WeatherGenerator::new(Some(1)).take(20_000) {
            match (previous, obs.duplicate) {
                (None, _) => assert!(!obs.duplicate),
                (Some(p), true) => {
                    assert_eq!(obs.date, p);
                    assert_eq!(obs.degrees, DUPLICATE_DEGREES);
                }
                (Some(p), false) => assert_eq!(obs.date, p.succ_opt().unwrap()),
            }
            previous = Some(obs.date);
        }
    }

    #[test]
    fn a_fresh_report_is_dated_day_count_days_after_the_start() {
        let mut generator = WeatherGenerator::new(Some(2));
        for _ in 0..400_000 {
            let before = generator.days_generated();
            let obs = generator.next().unwrap();
            let day = if obs.duplicate { before - 1 } else { before };
            assert_eq!(
                Some(obs.date),
                first_date().checked_add_days(Days::new(day)),
                "day {day}"
            );
        }
    }

    #[test]
    fn duplicate_share_is_about_five_percent() {
        let n = 100_000;
        let dups = WeatherGenerator::new(Some(42))
            .take(n)
            .filter(|o| o.duplicate)
            .count();
        let share = dups as f64 / n as f64;
        assert!((0.045..=0.055).contains(&share), "share {share}");
    }

    #[test]
    fn degrees_have_at_most_four_decimals() {
        for obs in WeatherGenerator::new(Some(3)).take(10_000) {
            let text = obs.degrees.to_string();
            let decimals = text.split('.').nth(1).map_or(0, str::len);
            assert!(decimals <= 4, "{text}");
        }
    }

    #[test]
    fn degrees_stay_within_trend_plus_warming_plus_noise() {
        let mut gen = WeatherGenerator::new(Some(5));
        for _ in 0..(365 * 30) {
            let before = gen.days_generated();
            let obs = gen.next().unwrap();
            if obs.duplicate {
                continue;
            }
            let year = model_year(before);
            let base = base_temperature(year, before % 365 + 1);
            let low = base - 5.0;
            let high = base + (year - 1990) as f64 * 0.1 + 5.0;
            assert!(obs.degrees >= low - 1e-4 && obs.degrees <= high + 1e-4);
        }
    }

    #[test]
    fn leap_year_day_60_repeats_day_59_and_later_days_shift() {
        // 1992 is a leap year, 1990 is not.
        assert_eq!(base_temperature(1992, 60), base_temperature(1992, 59));
        assert_eq!(base_temperature(1992, 60), f64::from(TREND[58]));
        assert_eq!(base_temperature(1992, 61), f64::from(TREND[59]));
        assert_eq!(base_temperature(1992, 365), f64::from(TREND[363]));
        assert_eq!(base_temperature(1990, 60), f64::from(TREND[59]));
        assert_eq!(base_temperature(1990, 365), f64::from(TREND[364]));
        // Gregorian rule: 1900 is not a leap year, 2000 is.
        assert!(!is_leap_year(1900));
        assert!(is_leap_year(2000));
    }

    #[test]
    fn model_year_drifts_from_the_calendar_by_one_day_per_leap_year() {
        // Day 730 is 1992-01-01 in both reckonings; by day 1095 (1992 has 366
        // days) the model already says 1993 while the calendar says 1992-12-31.
        assert_eq!(model_year(730), 1992);
        let date_1095 = first_date().checked_add_days(Days::new(1095)).unwrap();
        assert_eq!(date_1095, NaiveDate::from_ymd_opt(1992, 12, 31).unwrap());
        assert_eq!(model_year(1095), 1993);
        assert_eq!(date_1095.year(), 1992);
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<_> = WeatherGenerator::new(Some(9)).take(1000).collect();
        let b: Vec<_> = WeatherGenerator::new(Some(9)).take(1000).collect();
        assert_eq!(a, b);
    }
}
