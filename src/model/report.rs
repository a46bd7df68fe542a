//! The wire format of topic `temperatures`: a message's key is the English
//! name of its date's month, its value a protobuf `Report`
//! (proto/report.proto). Encoding and the checks a consumer applies before
//! trusting a message both live here, so producer and consumer cannot drift.

use chrono::{Datelike, NaiveDate};
use prost::Message;
use thiserror::Error;

mod proto {
    include!(concat!(env!("OUT_DIR"), "/weatherstream.rs"));
}
pub use proto::Report;

/// Month names, index 0 = January: the message keys.
pub const MONTH_NAMES: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Date format of `Report.date` and of the JSON files.
pub(crate) const DATE_FORMAT: &str = "%Y-%m-%d";

/// The English name of a month number (1 = January).
pub fn month_name(month: u32) -> &'static str {
    MONTH_NAMES[(month as usize).saturating_sub(1).min(11)]
}

/// The month number (1..=12) of an English month name.
pub(crate) fn month_number(name: &str) -> Option<u32> {
    MONTH_NAMES
        .iter()
        .position(|m| *m == name)
        .map(|i| i as u32 + 1)
}

/// The message key of a report for `date`.
pub fn key_for(date: NaiveDate) -> &'static str {
    month_name(date.month())
}

/// A date as `YYYY-MM-DD` text, without allocating: chrono's general
/// formatter is measurably slow on the hot paths (encode, publish).
#[derive(Clone, Copy)]
pub(crate) struct DateText([u8; 10]);

impl DateText {
    /// Years 0..=9999 (the format has four digits); others are clamped.
    pub fn new(date: NaiveDate) -> Self {
        let year = date.year().clamp(0, 9999) as u32;
        let mut b = *b"0000-00-00";
        for (i, value) in [
            (0, year / 100),
            (2, year % 100),
            (5, date.month()),
            (8, date.day()),
        ] {
            b[i] = b'0' + (value / 10) as u8;
            b[i + 1] = b'0' + (value % 10) as u8;
        }
        DateText(b)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or("0000-00-00")
    }
}

impl std::fmt::Display for DateText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes a report as the message value.
pub fn encode(date: NaiveDate, degrees: f64) -> Vec<u8> {
    Encoder::default().encode(date, degrees).to_vec()
}

/// [`encode`] for a stream of reports: one reused `Report` and buffer, so a
/// report costs no allocation.
#[derive(Default)]
pub(crate) struct Encoder {
    report: Report,
    buffer: Vec<u8>,
}

impl Encoder {
    /// The value for a report; valid until the next call.
    pub fn encode(&mut self, date: NaiveDate, degrees: f64) -> &[u8] {
        self.report.date.clear();
        self.report.date.push_str(DateText::new(date).as_str());
        self.report.degrees = degrees;
        self.buffer.clear();
        self.report
            .encode(&mut self.buffer)
            .expect("a Vec grows to fit");
        &self.buffer
    }
}

/// Parses exactly `YYYY-MM-DD` (four-digit year, two-digit month and day).
/// Hand-written because it runs once per message: chrono's parser plus a
/// re-format to reject `1990-1-5` cost several times more.
pub(crate) fn parse_date(text: &str) -> Option<NaiveDate> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let number = |digits: &[u8]| {
        digits.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let year = i32::try_from(number(&b[0..4])?).ok()?;
    NaiveDate::from_ymd_opt(year, number(&b[5..7])?, number(&b[8..10])?)
}

/// A report that cannot be counted without destroying a statistic: the
/// fold's verdict ([`crate::model::aggregate::fold`]), after the duplicate rule.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum Unrepresentable {
    #[error("degrees {0} is not a finite number")]
    NonFinite(f64),
    #[error("degrees {degrees:e} would take the sum of its month/year ({sum:e}) past the largest finite number")]
    SumOverflow { degrees: f64, sum: f64 },
}

/// A message that passed every check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidReport {
    pub date: NaiveDate,
    pub degrees: f64,
}

/// Why a message was not accepted as a report.
#[derive(Debug, Error, PartialEq)]
pub enum Malformed {
    #[error("message has no value")]
    NoValue,
    #[error("value is not a Report protobuf: {0}")]
    NotAReport(String),
    #[error("date {0:?} is not YYYY-MM-DD")]
    BadDate(String),
    #[error("key {key:?} is not the month of date {date}")]
    KeyMismatch { key: String, date: NaiveDate },
    #[error("degrees {0} is not a finite number")]
    NonFinite(f64),
    /// Finite, but counting it would make a statistic of its month/year
    /// infinite: decided by the fold, after the duplicate rule.
    #[error(transparent)]
    Unrepresentable(#[from] Unrepresentable),
}

/// Decodes a value into a protobuf `Report` without further checks (for
/// `debug`, which prints whatever is in the stream).
pub fn decode(value: &[u8]) -> Result<Report, Malformed> {
    Report::decode(value).map_err(|e| Malformed::NotAReport(e.to_string()))
}

/// Decodes and validates a message: the value is a `Report`, its date
/// parses, the key names that date's month, and degrees are finite.
pub fn validate(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<ValidReport, Malformed> {
    Validator::default().validate(key, value)
}

/// [`validate`] for a stream of messages: decodes into one reused `Report`,
/// so a message costs no allocation.
#[derive(Debug, Default)]
pub(crate) struct Validator {
    scratch: Report,
}

impl Validator {
    pub fn validate(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<ValidReport, Malformed> {
        let value = value.ok_or(Malformed::NoValue)?;
        let report = &mut self.scratch;
        // `merge` into a cleared message is `decode`, reusing the date's buffer.
        report.clear();
        report
            .merge(value)
            .map_err(|e| Malformed::NotAReport(e.to_string()))?;
        let date =
            parse_date(&report.date).ok_or_else(|| Malformed::BadDate(report.date.clone()))?;
        let expected = key_for(date).as_bytes();
        if key != Some(expected) {
            return Err(Malformed::KeyMismatch {
                key: String::from_utf8_lossy(key.unwrap_or_default()).into_owned(),
                date,
            });
        }
        if !report.degrees.is_finite() {
            return Err(Malformed::NonFinite(report.degrees));
        }
        Ok(ValidReport {
            date,
            degrees: report.degrees,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn a_reused_validator_keeps_nothing_from_earlier_messages() {
        let mut validator = Validator::default();
        let first = encode(d(2000, 12, 26), 31.5);
        assert!(validator.validate(Some(b"December"), Some(&first)).is_ok());
        // Field 2 only: a date left over from the message before would pass.
        let degrees_only = Report {
            date: String::new(),
            degrees: 40.0,
        }
        .encode_to_vec();
        assert_eq!(
            validator.validate(Some(b"December"), Some(&degrees_only)),
            Err(Malformed::BadDate(String::new()))
        );
        let second = encode(d(2001, 1, 2), -3.25);
        let r = validator.validate(Some(b"January"), Some(&second)).unwrap();
        assert_eq!((r.date, r.degrees), (d(2001, 1, 2), -3.25));
    }

    #[test]
    fn a_reused_encoder_matches_a_fresh_one() {
        let mut encoder = Encoder::default();
        for (date, degrees) in [
            (d(2000, 12, 26), 31.5235),
            (d(1, 1, 1), 0.0),
            (d(9999, 12, 31), -0.0),
            (d(1990, 2, 3), -40.125),
        ] {
            let fresh = Report {
                date: date.format(DATE_FORMAT).to_string(),
                degrees,
            }
            .encode_to_vec();
            assert_eq!(encoder.encode(date, degrees), fresh.as_slice());
            assert_eq!(encode(date, degrees), fresh);
        }
    }

    #[test]
    fn round_trip() {
        let value = encode(d(2000, 12, 26), 31.5235);
        let r = validate(Some(b"December"), Some(&value)).unwrap();
        assert_eq!(r.date, d(2000, 12, 26));
        assert_eq!(r.degrees, 31.5235);
    }

    #[test]
    fn date_text_matches_chrono() {
        let mut date = d(1, 1, 1);
        while date < d(9999, 12, 31) {
            assert_eq!(
                DateText::new(date).to_string(),
                date.format(DATE_FORMAT).to_string()
            );
            date = date + chrono::Days::new(997);
        }
        assert_eq!(DateText::new(d(2000, 12, 26)).as_str(), "2000-12-26");
    }

    #[test]
    fn dates_parse_strictly() {
        assert_eq!(parse_date("2000-02-29"), Some(d(2000, 2, 29)));
        assert_eq!(parse_date("0001-01-01"), Some(d(1, 1, 1)));
        for bad in [
            "1990-1-5",
            "1990-01-5",
            "1990/01/05",
            "1990-02-30",
            "1990-00-10",
            "+990-01-01",
            "19900-1-01",
            "",
            "1990-01-05 ",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn month_names_and_numbers_agree() {
        for m in 1..=12 {
            assert_eq!(month_number(month_name(m)), Some(m));
        }
        assert_eq!(key_for(d(1990, 2, 28)), "February");
        assert_eq!(month_number("june"), None);
    }

    #[test]
    fn rejects_what_is_not_a_good_report() {
        let good = encode(d(1990, 1, 5), 3.0);
        assert_eq!(validate(Some(b"January"), None), Err(Malformed::NoValue));
        assert!(matches!(
            validate(Some(b"January"), Some(&[0xff, 0xff, 0xff])),
            Err(Malformed::NotAReport(_))
        ));
        assert!(matches!(
            validate(Some(b"February"), Some(&good)),
            Err(Malformed::KeyMismatch { .. })
        ));
        assert!(matches!(
            validate(None, Some(&good)),
            Err(Malformed::KeyMismatch { .. })
        ));
        let bad_date = Report {
            date: "1990-13-01".into(),
            degrees: 1.0,
        }
        .encode_to_vec();
        assert!(matches!(
            validate(Some(b"January"), Some(&bad_date)),
            Err(Malformed::BadDate(_))
        ));
        let short_date = Report {
            date: "1990-1-5".into(),
            degrees: 1.0,
        }
        .encode_to_vec();
        assert!(matches!(
            validate(Some(b"January"), Some(&short_date)),
            Err(Malformed::BadDate(_))
        ));
        let nan = encode(d(1990, 1, 5), f64::NAN);
        assert!(matches!(
            validate(Some(b"January"), Some(&nan)),
            Err(Malformed::NonFinite(_))
        ));
        let inf = encode(d(1990, 1, 5), f64::INFINITY);
        assert!(matches!(
            validate(Some(b"January"), Some(&inf)),
            Err(Malformed::NonFinite(_))
        ));
    }
}
