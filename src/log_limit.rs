//! Rate limits for log lines that a fault can repeat many times a second
//! (a failing broker, a stream of malformed messages, a full disk): one
//! line per interval, and the next line says how many were held back.
//! Time comes in as an argument, so the rule is tested without sleeping.

use std::time::{Duration, Instant};

/// Lets one line of a kind through per `interval`, counting the rest.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Some(lines held back since the last one let through) when a line
    /// may be logged at `now`; None when it is to be held back.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// " (N more suppressed)" after a line that held N back, else nothing.
pub(crate) fn suppressed_note(suppressed: u64) -> String {
    if suppressed > 0 {
        format!(" ({suppressed} more suppressed)")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_next_counts_the_rest() {
        let start = Instant::now();
        let mut limiter = LogLimiter::new(Duration::from_secs(1));
        assert_eq!(limiter.allow(start), Some(0));
        assert_eq!(limiter.allow(start + Duration::from_millis(10)), None);
        assert_eq!(limiter.allow(start + Duration::from_millis(999)), None);
        assert_eq!(limiter.allow(start + Duration::from_secs(1)), Some(2));
        assert_eq!(limiter.allow(start + Duration::from_millis(1500)), None);
        assert_eq!(suppressed_note(0), "");
        assert_eq!(suppressed_note(3), " (3 more suppressed)");
    }
}
