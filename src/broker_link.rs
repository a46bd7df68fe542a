//! Whether this process reaches its Kafka brokers, as its clients report
//! it. An outage is one fact for the whole process, so it is told once:
//! one warning when every broker connection is down, one line when a broker
//! answers again, instead of a line per client and per librdkafka reconnect
//! attempt. librdkafka itself keeps reconnecting and retrying; the clients'
//! owners (partition workers, the producer) only report what they see.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The process's view of its broker connections.
pub(crate) struct BrokerLink {
    /// Fast path for [`BrokerLink::up`], called for every record.
    down: AtomicBool,
    /// When the outage began; `Some` exactly while `down` is set.
    down_since: Mutex<Option<Instant>>,
    /// What waits during an outage, for the warning.
    waiting: &'static str,
}

impl BrokerLink {
    /// `waiting` says what waits while the brokers are gone, e.g.
    /// "reading waits; the partitions keep their state".
    pub(crate) fn new(waiting: &'static str) -> Self {
        BrokerLink {
            down: AtomicBool::new(false),
            down_since: Mutex::new(None),
            waiting,
        }
    }

    /// Every broker connection is down (librdkafka's `AllBrokersDown`).
    /// Logs the first report of an outage only.
    pub(crate) fn down(&self, cause: impl Display) {
        if self.down.load(Ordering::Relaxed) {
            return;
        }
        let mut since = self.lock();
        if since.is_none() {
            *since = Some(Instant::now());
            self.down.store(true, Ordering::Relaxed);
            log::warn!(
                "broker unreachable ({cause}): {}; librdkafka reconnects with backoff, and one line follows when a broker answers",
                self.waiting
            );
        }
    }

    /// A broker answered (a record arrived, or a client's statistics show a
    /// connection up). Logs the end of an outage only.
    pub(crate) fn up(&self) {
        if !self.down.load(Ordering::Relaxed) {
            return;
        }
        let mut since = self.lock();
        if let Some(began) = since.take() {
            self.down.store(false, Ordering::Relaxed);
            log::warn!(
                "broker reachable again after {:.1} s",
                began.elapsed().as_secs_f64()
            );
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // The guarded value is a plain timestamp: a panic elsewhere cannot
        // leave it half-written.
        self.down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_down_and_one_up_however_often_it_is_reported() {
        let link = BrokerLink::new("test");
        assert!(!link.is_down());
        link.up();
        assert!(!link.is_down(), "up while up changes nothing");
        link.down("AllBrokersDown");
        link.down("AllBrokersDown again");
        assert!(link.is_down());
        assert!(link.down_since.lock().unwrap().is_some());
        link.up();
        assert!(!link.is_down());
        assert!(link.down_since.lock().unwrap().is_none());
        link.down("a second outage");
        assert!(link.is_down());
    }
}
