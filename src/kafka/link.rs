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
//!
//! A client's statistics are evidence of a connection only when they were
//! taken after the outage began: statistics taken a moment before it, and
//! read after, would end an outage that goes on. And when the brokers
//! refuse the client (a TLS or authentication failure) in an outage first
//! told as "all connections down", the refusal is told once as well: it is
//! the cause an operator can act on.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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

/// What a client reported as an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// Every broker connection is down (librdkafka's `AllBrokersDown`).
    Unreachable,
    /// A broker refused the client: TLS or authentication failed.
    Refused,
}

impl Outage {
    /// The outage a client error reports, if it is one. Credentials
    /// refused or a TLS failure after start-up (start-up checks both first)
    /// is an outage too: the work waits and librdkafka keeps trying.
    fn of(error: &KafkaError) -> Option<Outage> {
        match error.rdkafka_error_code()? {
            RDKafkaErrorCode::AllBrokersDown => Some(Outage::Unreachable),
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL => Some(Outage::Refused),
            _ => None,
        }
    }
}

/// Whether `error` tells of an outage (see [`BrokerLink::report`]).
pub(crate) fn is_outage(error: &KafkaError) -> bool {
    Outage::of(error).is_some()
}

#[derive(Default)]
struct LinkState {
    /// When the outage began; `Some` exactly while `down` is set.
    down_since: Option<Instant>,
    /// The Unix second in which the outage began: statistics taken in it
    /// or before are no evidence that it ended.
    down_since_unix: i64,
    /// The refusal of this outage was told.
    refusal_told: bool,
    /// When a client's statistics last showed a broker connection up.
    connected_at: Option<Instant>,
    /// An outage reported while another client had been connected a
    /// moment ago: it begins when the statistics show no connection for
    /// [`CONNECTED_EVIDENCE`], told with this cause (librdkafka reports a
    /// failure once, not at every reconnect attempt).
    suspected: Option<Suspected>,
}

struct Suspected {
    kind: Outage,
    cause: String,
    /// The Unix second it was reported in.
    at_unix: i64,
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

    /// One client reports an error, which is an outage if
    /// [`Outage::of`] says so: every broker connection is down, or a
    /// broker refused it. Logs the first report of an outage, and the first
    /// refusal in an outage first told otherwise; none while another
    /// client was connected a moment ago.
    pub(crate) fn report(&self, error: &KafkaError, cause: impl Display) {
        if let Some(kind) = Outage::of(error) {
            self.down(kind, cause);
        }
    }

    fn down(&self, kind: Outage, cause: impl Display) {
        if self.down.load(Ordering::Relaxed) && kind == Outage::Unreachable {
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        if state.down_since.is_some() {
            if kind == Outage::Refused && !state.refusal_told {
                state.refusal_told = true;
                log::warn!("the broker refuses this client ({cause}); still waiting");
            }
            return;
        }
        let connected_lately = state
            .connected_at
            .is_some_and(|at| now.saturating_duration_since(at) < CONNECTED_EVIDENCE);
        if connected_lately {
            log::debug!("one client lost its broker connections ({cause}); others are connected");
            // A refusal says more than "all down": it is the one kept.
            if state
                .suspected
                .as_ref()
                .is_none_or(|s| s.kind == Outage::Unreachable)
            {
                state.suspected = Some(Suspected {
                    kind,
                    cause: cause.to_string(),
                    at_unix: unix_now(),
                });
            }
            return;
        }
        Self::begin(&mut state, &self.down, self.waiting, kind, &cause);
    }

    fn begin(
        state: &mut LinkState,
        down: &AtomicBool,
        waiting: &str,
        kind: Outage,
        cause: &dyn Display,
    ) {
        state.down_since = Some(Instant::now());
        state.down_since_unix = unix_now();
        state.refusal_told = kind == Outage::Refused;
        state.suspected = None;
        down.store(true, Ordering::Relaxed);
        log::warn!(
            "broker unreachable ({cause}): {waiting}; librdkafka reconnects with backoff, and one line follows when a broker answers"
        );
    }

    /// A client's statistics, taken at `taken_unix`, show no broker
    /// connection up: a suspected outage begins when no client has shown
    /// one for [`CONNECTED_EVIDENCE`].
    pub(crate) fn not_connected(&self, taken_unix: i64) {
        let mut state = self.lock();
        let Some(suspected) = &state.suspected else {
            return;
        };
        let quiet = state
            .connected_at
            .is_none_or(|at| at.elapsed() >= CONNECTED_EVIDENCE);
        if state.down_since.is_some() || taken_unix <= suspected.at_unix || !quiet {
            return;
        }
        let Some(suspected) = state.suspected.take() else {
            return;
        };
        Self::begin(
            &mut state,
            &self.down,
            self.waiting,
            suspected.kind,
            &suspected.cause,
        );
    }

    /// A client's statistics, taken at `taken_unix` (whole Unix seconds),
    /// show a broker connection up.
    pub(crate) fn connected(&self, taken_unix: i64) {
        let mut state = self.lock();
        if state.down_since.is_some() && taken_unix <= state.down_since_unix {
            // Possibly taken before the outage began.
            return;
        }
        if state
            .suspected
            .as_ref()
            .is_some_and(|s| taken_unix > s.at_unix)
        {
            state.suspected = None;
        }
        state.connected_at = Some(Instant::now());
        drop(state);
        self.up();
    }

    /// A broker answered (a delivery was acknowledged, or a connection is
    /// up). Logs the end of an outage only. Records read are no such
    /// evidence: they may have been fetched before the outage.
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

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNREACHABLE: Outage = Outage::Unreachable;

    #[test]
    fn an_outage_is_one_down_and_one_up_however_often_it_is_reported() {
        let link = BrokerLink::new("test");
        assert!(!link.is_down());
        link.up();
        assert!(!link.is_down(), "up while up changes nothing");
        link.down(UNREACHABLE, "AllBrokersDown");
        link.down(UNREACHABLE, "AllBrokersDown again");
        assert!(link.is_down());
        assert!(link.lock().down_since.is_some());
        link.up();
        assert!(!link.is_down());
        assert!(link.lock().down_since.is_none());
        link.down(UNREACHABLE, "a second outage");
        assert!(link.is_down());
    }

    #[test]
    fn one_client_down_while_another_is_connected_is_no_outage() {
        let link = BrokerLink::new("test");
        link.connected(unix_now());
        link.down(
            UNREACHABLE,
            "AllBrokersDown of a client that cannot connect",
        );
        assert!(!link.is_down());
        // No connection seen for a while: now it is an outage.
        link.lock().connected_at = Some(Instant::now() - CONNECTED_EVIDENCE);
        link.down(UNREACHABLE, "AllBrokersDown");
        assert!(link.is_down());
        // Statistics taken after the outage began end it.
        link.connected(unix_now() + 1);
        assert!(!link.is_down());
    }

    /// Statistics taken a moment before the outage and read after it
    /// began showed a connection up: the outage went on, but was told as
    /// ended (seen in CI, where a TLS failure followed within a second).
    #[test]
    fn statistics_that_may_predate_the_outage_do_not_end_it() {
        let link = BrokerLink::new("test");
        link.down(UNREACHABLE, "AllBrokersDown");
        let began = link.lock().down_since_unix;
        link.connected(began - 1);
        link.connected(began);
        assert!(link.is_down());
        link.connected(0);
        assert!(link.is_down(), "statistics without a time are no evidence");
        link.connected(began + 1);
        assert!(!link.is_down());
    }

    #[test]
    fn a_refusal_in_an_outage_is_told_once_and_ends_nothing() {
        let link = BrokerLink::new("test");
        link.down(UNREACHABLE, "AllBrokersDown");
        assert!(!link.lock().refusal_told);
        link.down(Outage::Refused, "SSL handshake failed");
        assert!(link.lock().refusal_told);
        assert!(link.is_down());
        link.up();
        // A new outage that begins with the refusal tells it in its warning.
        link.down(Outage::Refused, "SSL handshake failed");
        assert!(link.is_down());
        assert!(link.lock().refusal_told);
    }

    #[test]
    fn errors_are_outages_by_their_code() {
        let outage = |code| Outage::of(&KafkaError::Global(code));
        assert_eq!(
            outage(RDKafkaErrorCode::AllBrokersDown),
            Some(Outage::Unreachable)
        );
        assert_eq!(outage(RDKafkaErrorCode::SSL), Some(Outage::Refused));
        assert_eq!(
            outage(RDKafkaErrorCode::Authentication),
            Some(Outage::Refused)
        );
        assert_eq!(outage(RDKafkaErrorCode::BrokerTransportFailure), None);
    }

    /// A failure reported while another client had just been connected is
    /// only suspected; librdkafka reports it once, so the statistics that
    /// follow decide: no connection for a while, and it is told, with its
    /// cause (seen in CI: a TLS refusal right after the connections
    /// dropped was never told).
    #[test]
    fn a_suspected_outage_begins_when_the_statistics_show_no_connection() {
        let link = BrokerLink::new("test");
        link.connected(unix_now());
        link.down(Outage::Unreachable, "AllBrokersDown");
        link.down(Outage::Refused, "SSL handshake failed");
        assert!(!link.is_down());
        let suspected_at = link.lock().suspected.as_ref().unwrap().at_unix;
        // Statistics of the same second may predate it; a connection seen
        // a moment ago still counts.
        link.not_connected(suspected_at);
        link.not_connected(suspected_at + 1);
        assert!(!link.is_down());
        link.lock().connected_at = Some(Instant::now() - CONNECTED_EVIDENCE);
        link.not_connected(suspected_at + 1);
        assert!(link.is_down());
        assert!(
            link.lock().refusal_told,
            "told with the refusal as its cause"
        );

        // A connection seen after the report clears the suspicion.
        let link = BrokerLink::new("test");
        link.connected(unix_now());
        link.down(Outage::Unreachable, "AllBrokersDown of one slow client");
        let suspected_at = link.lock().suspected.as_ref().unwrap().at_unix;
        link.connected(suspected_at + 1);
        link.lock().connected_at = Some(Instant::now() - CONNECTED_EVIDENCE);
        link.not_connected(suspected_at + 2);
        assert!(!link.is_down());
    }
}
