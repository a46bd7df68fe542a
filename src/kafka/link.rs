//! Whether this process reaches its Kafka brokers, as its clients report
//! it. An outage is one fact for the whole process, so it is told once:
//! one warning when every broker connection is down, one line when a broker
//! answers again, instead of a line per client and per librdkafka reconnect
//! attempt. librdkafka itself keeps reconnecting and retrying; the clients'
//! owners (partition workers, the producer) only report what they see.
//!
//! One client's "all brokers down" is not an outage while another client
//! of the process is connected: a slow broker refuses a new connection
//! (librdkafka gives its set-up 5 s) while the old ones still work.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A client's statistics (every second) that showed a broker connection
/// up this recently mean the brokers are there.
const CONNECTED_EVIDENCE: Duration = Duration::from_secs(3);

/// The process's view of its broker connections.
pub(crate) struct BrokerLink {
    /// Fast path for [`BrokerLink::up`], called for every batch.
    down: AtomicBool,
    state: Mutex<LinkState>,
    /// What waits during an outage, for the warning.
    waiting: &'static str,
}

#[derive(Default)]
struct LinkState {
    /// When the outage began; `Some` exactly while `down` is set.
    down_since: Option<Instant>,
    /// When a client's statistics last showed a broker connection up.
    connected_at: Option<Instant>,
}

impl BrokerLink {
    /// `waiting` says what waits while the brokers are gone, e.g.
    /// "reading waits; the partitions keep their state".
    pub(crate) fn new(waiting: &'static str) -> Self {
        BrokerLink {
            down: AtomicBool::new(false),
            state: Mutex::new(LinkState::default()),
            waiting,
        }
    }

    /// Every broker connection of one client is down (librdkafka's
    /// `AllBrokersDown`). Logs the first report of an outage only, and
    /// none while another client was connected a moment ago.
    pub(crate) fn down(&self, cause: impl Display) {
        if self.down.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        let connected_lately = state
            .connected_at
            .is_some_and(|at| now.saturating_duration_since(at) < CONNECTED_EVIDENCE);
        if connected_lately {
            log::debug!("one client lost its broker connections ({cause}); others are connected");
            return;
        }
        if state.down_since.is_none() {
            state.down_since = Some(now);
            self.down.store(true, Ordering::Relaxed);
            log::warn!(
                "broker unreachable ({cause}): {}; librdkafka reconnects with backoff, and one line follows when a broker answers",
                self.waiting
            );
        }
    }

    /// A client's statistics show a broker connection up.
    pub(crate) fn connected(&self) {
        self.lock().connected_at = Some(Instant::now());
        self.up();
    }

    /// A broker answered (records arrived, a delivery was acknowledged, or
    /// a connection is up). Logs the end of an outage only.
    pub(crate) fn up(&self) {
        if !self.down.load(Ordering::Relaxed) {
            return;
        }
        let mut state = self.lock();
        if let Some(began) = state.down_since.take() {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // The guarded values are plain timestamps: a panic elsewhere cannot
        // leave them half-written.
        self.state
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
        assert!(link.lock().down_since.is_some());
        link.up();
        assert!(!link.is_down());
        assert!(link.lock().down_since.is_none());
        link.down("a second outage");
        assert!(link.is_down());
    }

    #[test]
    fn one_client_down_while_another_is_connected_is_no_outage() {
        let link = BrokerLink::new("test");
        link.connected();
        link.down("AllBrokersDown of a client that cannot connect");
        assert!(!link.is_down());
        // No connection seen for a while: now it is an outage.
        link.lock().connected_at = Some(Instant::now() - CONNECTED_EVIDENCE);
        link.down("AllBrokersDown");
        assert!(link.is_down());
        link.connected();
        assert!(!link.is_down());
    }
}
