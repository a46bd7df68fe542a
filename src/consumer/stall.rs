//! Noticing a partition that has stopped making progress while its log
//! goes on (an overloaded broker, an unavailable partition leader): the
//! supervisor feeds each partition's committed offset and lag to a
//! [`StallWatch`], which says when to warn, when to remind and when the
//! partition moves again. Time comes in as an argument, so the rule is
//! tested without sleeping.

use std::time::{Duration, Instant};

use crate::kafka::Offset;

/// Behind, and no record for this long: warn.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(30);
/// While a stall lasts, one reminder per this.
pub(super) const STALL_REMIND: Duration = Duration::from_secs(300);

/// What the supervisor is to say about a partition.
#[derive(Debug, PartialEq)]
pub(super) enum StallNews {
    /// Behind by `lag` records, none read for `since_record`; `first`: the
    /// start of the stall, else a reminder.
    Stalled {
        lag: Offset,
        since_record: Duration,
        first: bool,
    },
    /// Progressing (or caught up) again, `since_record` after the last
    /// record before the stall.
    Moving { since_record: Duration },
}

/// One partition's progress, as the supervisor samples it.
#[derive(Debug)]
pub(super) struct StallWatch {
    offset: Offset,
    /// When the offset last moved (or the watch began).
    progressed_at: Instant,
    /// Since when it has been behind without moving.
    behind_since: Option<Instant>,
    /// When the warning (or its last reminder) was said; Some while a
    /// stall stands.
    warned: Option<Instant>,
}

impl StallWatch {
    pub(super) fn new(next_offset: Offset, now: Instant) -> Self {
        StallWatch {
            offset: next_offset,
            progressed_at: now,
            behind_since: None,
            warned: None,
        }
    }

    /// Whether a stall warning stands.
    pub(super) fn is_stalled(&self) -> bool {
        self.warned.is_some()
    }

    /// Takes a sample: the committed `next_offset` and the lag as last
    /// heard (None: unknown). A partition that is not behind is idle, not
    /// stalled; one that waits on its storage has its own warning, so the
    /// caller passes `lag` None for it.
    pub(super) fn observe(
        &mut self,
        next_offset: Offset,
        lag: Option<Offset>,
        now: Instant,
    ) -> Option<StallNews> {
        let since_record = now.saturating_duration_since(self.progressed_at);
        if next_offset != self.offset {
            self.offset = next_offset;
            self.progressed_at = now;
            self.behind_since = None;
            return self
                .warned
                .take()
                .map(|_| StallNews::Moving { since_record });
        }
        let Some(lag) = lag.filter(|lag| *lag > 0) else {
            self.behind_since = None;
            return self
                .warned
                .take()
                .map(|_| StallNews::Moving { since_record });
        };
        // The clock starts when the partition is behind, not at the last
        // record of a topic that was quiet.
        let behind_since = *self.behind_since.get_or_insert(now);
        let due = match self.warned {
            None => now.saturating_duration_since(behind_since) >= STALL_AFTER,
            Some(said) => now.saturating_duration_since(said) >= STALL_REMIND,
        };
        if !due {
            return None;
        }
        let first = self.warned.replace(now).is_none();
        Some(StallNews::Stalled {
            lag,
            since_record,
            first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_partition_behind_without_progress_warns_after_30_s_reminds_every_5_min_and_says_when_it_moves(
    ) {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(100, t0);
        assert_eq!(watch.observe(100, Some(50), t0), None);
        assert_eq!(watch.observe(100, Some(50), t0 + 29 * SECOND), None);
        assert_eq!(
            watch.observe(100, Some(60), t0 + STALL_AFTER),
            Some(StallNews::Stalled {
                lag: 60,
                since_record: STALL_AFTER,
                first: true
            })
        );
        assert!(watch.is_stalled());
        assert_eq!(watch.observe(100, Some(70), t0 + 5 * STALL_AFTER), None);
        let reminder = t0 + STALL_AFTER + STALL_REMIND;
        assert_eq!(
            watch.observe(100, Some(80), reminder),
            Some(StallNews::Stalled {
                lag: 80,
                since_record: reminder - t0,
                first: false
            })
        );
        assert_eq!(
            watch.observe(101, Some(80), reminder + SECOND),
            Some(StallNews::Moving {
                since_record: reminder + SECOND - t0
            })
        );
        assert!(!watch.is_stalled());
        assert_eq!(watch.observe(102, Some(80), reminder + 2 * SECOND), None);
    }

    #[test]
    fn an_idle_partition_at_the_end_of_its_log_or_with_unknown_lag_never_warns() {
        let t0 = Instant::now();
        let mut watch = StallWatch::new(100, t0);
        for minutes in 1..10 {
            let now = t0 + 60 * minutes * SECOND;
            assert_eq!(watch.observe(100, Some(0), now), None);
            assert_eq!(watch.observe(100, None, now), None);
        }
        // Falling behind starts the clock then, not at the last record; the
        // warning still says how long ago that record was.
        let behind = t0 + 600 * SECOND;
        assert_eq!(watch.observe(100, Some(5), behind), None);
        assert_eq!(watch.observe(100, Some(5), behind + 29 * SECOND), None);
        assert_eq!(
            watch.observe(100, Some(5), behind + STALL_AFTER),
            Some(StallNews::Stalled {
                lag: 5,
                since_record: 600 * SECOND + STALL_AFTER,
                first: true
            })
        );
        // Caught up without moving (the watermark was stale): over.
        assert!(matches!(
            watch.observe(100, Some(0), behind + STALL_AFTER + SECOND),
            Some(StallNews::Moving { .. })
        ));
        assert!(!watch.is_stalled());
    }
}
