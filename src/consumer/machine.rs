//! The partition worker's decisions, and nothing else: no Kafka client, no
//! sled, no clock, no threads. [`PartitionMachine`] holds what a worker knows
//! about its partition (the committed snapshot, whether reading is held for
//! a check, a re-read in progress) and turns events into [`Action`]s that
//! the worker's I/O shell carries out; [`BatchReader`] decides, record by
//! record, what a batch counts and why it ends. Time comes in as an
//! argument, so every path is unit-tested below without a broker or a sleep.
//!
//! The rules it keeps:
//! - Records are counted in offset order from the committed next offset;
//!   anything before it was counted already and is skipped.
//! - The stored offset may belong to a topic that has since been deleted and
//!   re-created. Whenever something says so (an offset out of range, an
//!   unknown partition, a report older than the statistics, the last counted
//!   record read again with different bytes), reading is held until the
//!   rechecker has compared stored fingerprints with the topic. "Gone" resets
//!   the partition to offset 0, with one warning; "undecided" asks again and
//!   never resets. A routine check also runs beside reading every
//!   `verify_interval` while records are counted (not while idle: a
//!   re-created topic shows at the next fetch).
//! - A partition at the end of its log is read by the process's shared
//!   client ([`Action::Follow`]), which fetches all such partitions in one
//!   request; a backlog, and every read from a given offset, by a fresh
//!   client of the partition's own ([`Action::ReadFrom`]).
//! - A broker that serves a record past the offset asked for, or nothing at
//!   all while the log goes on, is read again from earlier offsets: see
//!   [`Rereads`], the one place that exists for brokers serving whole record
//!   batches (tansu 0.6's in-memory engine).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::Offset;
use crate::model::aggregate::{BatchFold, MonthYear, Outcome};
use crate::model::report::{Malformed, Validator};
use crate::store::snapshot::{Fingerprint, Snapshot};
use crate::store::state::BatchCommit;

/// How far before an offset a re-read starts, step by step, when the broker
/// does not serve the offset itself; the last step reads from the start of
/// the log. The rechecker's record probe climbs the same ladder.
pub(crate) const READ_BACK_STEPS: [Offset; 4] = [1_000, 10_000, 100_000, Offset::MAX];

/// At most this many re-reads per partition per [`REREAD_WINDOW`] (two
/// climbs of the ladder): a broker that skips or stays silent again and
/// again, as an overloaded one does, is not given ever more to read.
const REREAD_BUDGET: u32 = 8;
const REREAD_WINDOW: Duration = Duration::from_secs(60);
/// Longest pause before a skip is looked at again while the re-read budget
/// is spent: reading past the gap meanwhile would only be skipped again.
const REREAD_DEFER_PAUSE: Duration = Duration::from_secs(5);

/// How long a partition stays with clients of its own after the shared
/// client was in trouble with it (an error, a skip, silence), before it is
/// handed to the shared client again: a shared client that cannot serve a
/// partition is not tried again and again.
const FOLLOW_BACKOFF: Duration = Duration::from_secs(60);

/// How long nothing may arrive, while the broker's high watermark says the
/// log goes on, before the worker reads again from earlier offsets. Long
/// enough that a slow fetch is not mistaken for silence.
const FETCH_STALL: Duration = Duration::from_secs(1);
/// Pause before asking again when a check that holds reading could not
/// decide (broker slow, topic being re-created).
const RECHECK_PAUSE: Duration = Duration::from_millis(500);
/// Pause after a poll error that came before any record, so that a failing
/// broker is not spun on.
const POLL_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Longest the first poll of a batch waits for a record; later polls take
/// only what is already fetched. Bounds how late a routine check or a
/// shutdown is noticed while the partition is idle.
const FIRST_POLL_WAIT: Duration = Duration::from_millis(100);
/// Reading the clock for every record shows in profiles: the batch deadline
/// is looked at every this many records.
const CLOCK_EVERY: usize = 128;

/// A record as the decisions see it: the worker's Kafka messages, and plain
/// values in tests.
pub(crate) trait Record {
    fn offset(&self) -> Offset;
    fn key(&self) -> Option<&[u8]>;
    fn value(&self) -> Option<&[u8]>;
}

fn fingerprint(record: &impl Record) -> Fingerprint {
    Fingerprint::of(record.offset(), record.key(), record.value())
}

/// The settings the decisions depend on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most records in one batch (one transaction).
    pub(crate) max_batch: usize,
    /// Longest a batch keeps collecting once it has a record.
    pub(crate) batch_timeout: Duration,
    /// How often a routine check runs beside reading, while it counts.
    pub(crate) verify_interval: Duration,
}

/// A question for the rechecker: does the topic still hold these records?
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckRequest {
    pub(crate) expected: Vec<Fingerprint>,
    /// With nothing to compare (imported state), the record here only has
    /// to exist, and becomes the anchor.
    pub(crate) adopt_offset: Offset,
    /// Becomes the anchor when every expected record is found.
    pub(crate) last_record: Option<Fingerprint>,
}

/// The rechecker's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CheckOutcome {
    /// Every record is there: the stored offset belongs to this topic.
    Current { anchor: Option<Fingerprint> },
    /// The record at `offset` is missing or different: the topic was
    /// re-created.
    Gone { offset: Offset },
    /// No answer (broker slow, shutting down): ask again later.
    Undecided,
}

/// Why reading is held for a check.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Suspicion {
    pub(crate) reason: String,
    /// The record that raised it, if one did: after the check passes it is
    /// read again and counted like any other.
    pub(crate) at_offset: Option<Offset>,
}

impl Suspicion {
    fn new(reason: impl Into<String>, at_offset: Option<Offset>) -> Self {
        Suspicion {
            reason: reason.into(),
            at_offset,
        }
    }
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BatchEnd {
    /// `max_batch` records were read: more is probably waiting.
    Full,
    /// The batch timed out, or nothing more arrived in time.
    Drained,
    /// The broker served a record past `expected`, the next offset.
    Skipped { expected: Offset },
    /// Something says the stored offset may belong to another topic.
    Suspect(Suspicion),
    /// A poll failed with an error that needs no check.
    PollFailed { read_nothing: bool },
    /// The record batch at `offset` cannot be decoded.
    Undecodable { offset: Offset },
}

/// A poll error, as far as the decisions care.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PollError {
    /// Offset out of range, unknown topic or partition: the stored offset
    /// must be checked against the topic.
    NeedsCheck(String),
    /// Anything else (broker down, timeouts): librdkafka retries by itself.
    Transient,
    /// The record batch at the batch's next offset cannot be decoded (a
    /// codec this build lacks, corrupt data): librdkafka fetches it again.
    Undecodable,
}

/// What happened, for [`PartitionMachine::handle`].
#[derive(Debug)]
pub(crate) enum Event {
    /// The worker's loop comes round (between batches).
    Tick,
    /// A batch ended; `committed` is what its commit made of the state,
    /// `high_watermark` the end of the log as the client last heard it, and
    /// `broker_responses` how many responses the current client has
    /// received from brokers so far (from its statistics; 0 until the
    /// first).
    BatchEnded {
        end: BatchEnd,
        committed: Option<Arc<Snapshot>>,
        high_watermark: Option<Offset>,
        broker_responses: u64,
    },
    /// The rechecker answered.
    Verdict(CheckOutcome),
}

/// What the worker is to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Read from this offset on, with a fresh client of the partition's own
    /// (after a re-creation the old one may hold stale metadata or an error
    /// state; a backlog is fetched in parallel with other partitions).
    ReadFrom(Offset),
    /// The partition is at the end of its log: read on from the committed
    /// offset with the process's shared client, which fetches every such
    /// partition in one request (the partition's own client is dropped).
    Follow,
    /// Send this question to the rechecker.
    Ask(CheckRequest),
    /// Wait for the rechecker's answer and hand it back as an event; reading
    /// stays held meanwhile.
    AwaitVerdict,
    Pause(Duration),
    /// Store a fingerprint verified to be in the topic.
    SetAnchor(Fingerprint),
    /// The topic was re-created: warn once, reset the partition's state to
    /// offset 0 and publish that.
    Reset {
        gone_offset: Offset,
        noticed_by: String,
    },
    /// Publish the committed snapshot; `backlog`: more is waiting in the
    /// log, so the publish may be spaced by its cost.
    Publish {
        backlog: bool,
    },
    /// Reading from the start of the log confirmed that offsets from here
    /// are missing (compaction, transaction markers): warn once, go on.
    GapAccepted {
        from: Offset,
    },
    /// The broker did not serve `wanted` (it skipped past it, or stayed
    /// silent while the log goes on): say so and read from `from`, earlier,
    /// with a fresh client, as `ReadFrom` does.
    ReadBack {
        wanted: Offset,
        from: Offset,
    },
    /// A re-read for `wanted` is due but the budget of the last
    /// [`REREAD_WINDOW`] is spent: say so (rate-limited) and pause `wait`
    /// (zero when reading on is harmless).
    ReadBackDeferred {
        wanted: Offset,
        wait: Duration,
    },
}

/// Reading is either going on or held until a check settles.
#[derive(Debug)]
enum Phase {
    Reading,
    Held {
        suspicion: Suspicion,
        /// Our question is with the rechecker.
        asked: bool,
    },
}

/// The offset reached, and since when it has not moved.
#[derive(Debug, Clone, Copy)]
struct Progressed {
    offset: Offset,
    since: Instant,
}

/// Reading again from earlier offsets when the broker does not serve the
/// offset asked for.
///
/// Apache Kafka serves a fetch from the exact offset, so there this runs
/// only for a real gap (compaction, transaction markers), which the last
/// step, a read from the start of the log, confirms: the gap is then
/// accepted with one warning. It exists for brokers that serve whole record
/// batches: tansu 0.6's in-memory engine answers a fetch from inside a batch
/// with the next batch (a skip past the offset), or with nothing at all when
/// no later batch exists yet (silence, see [`PartitionMachine`]'s stall
/// rule). Silence is never taken as a gap: the ladder is climbed, and then
/// the offset is waited for. At most [`REREAD_BUDGET`] re-reads a minute:
/// past that a re-read waits (an overloaded broker skips and stalls more,
/// and reading more from it would only deepen that).
#[derive(Debug, Default)]
struct Rereads {
    /// The offset being re-read for, and the ladder step last taken.
    current: Option<(Offset, usize)>,
    /// A gap confirmed from the start of the log: records after it count.
    accepted_gap: Option<Offset>,
    /// The current budget window: when it began, re-reads taken in it.
    window: Option<(Instant, u32)>,
}

/// Why a re-read is wanted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unserved {
    /// The broker served a later offset: reading on would skip again.
    Skipped,
    /// The broker served nothing while the log goes on.
    Silent,
}

impl Rereads {
    /// The next step for `gap`: read from further back, or, past the last
    /// step, accept the gap; or, with the budget spent, wait.
    fn step_back(&mut self, gap: Offset, why: Unserved, now: Instant) -> Vec<Action> {
        let step = match self.current {
            Some((at, step)) if at == gap => step + 1,
            _ => 0,
        };
        let Some(back) = READ_BACK_STEPS.get(step) else {
            self.accepted_gap = Some(gap);
            return vec![Action::GapAccepted { from: gap }, Action::ReadFrom(gap)];
        };
        if let Some(window_left) = self.spend(now) {
            let wait = match why {
                Unserved::Skipped => window_left.min(REREAD_DEFER_PAUSE),
                Unserved::Silent => Duration::ZERO,
            };
            return vec![Action::ReadBackDeferred { wanted: gap, wait }];
        }
        self.current = Some((gap, step));
        vec![Action::ReadBack {
            wanted: gap,
            from: gap.saturating_sub(*back).max(0),
        }]
    }

    /// Takes one re-read from the budget: None when granted, else how long
    /// the spent window still runs.
    fn spend(&mut self, now: Instant) -> Option<Duration> {
        match &mut self.window {
            Some((began, used)) if now.saturating_duration_since(*began) < REREAD_WINDOW => {
                if *used >= REREAD_BUDGET {
                    return Some(REREAD_WINDOW - now.saturating_duration_since(*began));
                }
                *used += 1;
                None
            }
            window => {
                *window = Some((now, 1));
                None
            }
        }
    }

    /// Whether a re-read for an offset at or after `next_offset` is under
    /// way (it is over once reading has passed it).
    fn pending(&self, next_offset: Offset) -> bool {
        self.current.is_some_and(|(at, _)| at >= next_offset)
    }

    /// Whether every step was taken for `offset` already.
    fn exhausted(&self, offset: Offset) -> bool {
        self.current
            .is_some_and(|(at, step)| at == offset && step + 1 >= READ_BACK_STEPS.len())
    }
}

/// One partition's decisions: see the module comment.
#[derive(Debug)]
pub(crate) struct PartitionMachine {
    limits: Limits,
    committed: Arc<Snapshot>,
    phase: Phase,
    /// A routine check is with the rechecker while reading goes on.
    routine_asked: bool,
    last_check: Instant,
    /// The last counted record as of the last check that found it in the
    /// topic: while it is still the last one, an idle partition is not
    /// checked again (its broker load follows its data, not the clock). A
    /// re-created topic shows at the next fetch (an error, or records that
    /// get counted and so checked).
    verified_last: Option<Fingerprint>,
    /// Records up to here passed a check: an older report there is counted
    /// by the usual rules instead of raising the question again.
    cleared_through: Option<Offset>,
    progressed: Progressed,
    /// The client's broker responses when a silence was first noticed:
    /// a re-read is for a broker that answers without the offset.
    silence_answers: Option<u64>,
    /// Reading is with the shared client (see [`Action::Follow`]).
    following: bool,
    /// No [`Action::Follow`] before this: the shared client was in trouble
    /// with this partition.
    follow_after: Option<Instant>,
    rereads: Rereads,
    /// The offset of a record batch that cannot be decoded, while the
    /// partition stands there: a re-read from earlier cannot get past it.
    undecodable_at: Option<Offset>,
    /// The end of the log as last heard, for [`PartitionMachine::release`].
    high_watermark: Option<Offset>,
    /// Reused protobuf buffer: no allocation per record.
    validator: Validator,
}

impl PartitionMachine {
    /// A machine for a partition whose state is `committed`; it starts with
    /// a check (the topic may have been re-created while we were away).
    pub(crate) fn new(committed: Arc<Snapshot>, limits: Limits, now: Instant) -> Self {
        PartitionMachine {
            limits,
            progressed: Progressed {
                offset: committed.next_offset,
                since: now,
            },
            committed,
            phase: Phase::Held {
                suspicion: Suspicion::new("start-up", None),
                asked: false,
            },
            routine_asked: false,
            last_check: now,
            verified_last: None,
            cleared_through: None,
            silence_answers: None,
            following: false,
            follow_after: None,
            rereads: Rereads::default(),
            undecodable_at: None,
            high_watermark: None,
            validator: Validator::default(),
        }
    }

    /// True while records may be read; false while a check holds reading.
    pub(crate) fn is_reading(&self) -> bool {
        matches!(self.phase, Phase::Reading)
    }

    /// The state changed outside a batch (an anchor stored, a reset).
    pub(crate) fn set_committed(&mut self, snapshot: Arc<Snapshot>) {
        self.committed = snapshot;
    }

    /// The shared client could not take the partition on
    /// ([`Action::Follow`]): reading goes on with the partition's own
    /// client, and following is tried again after [`FOLLOW_BACKOFF`].
    pub(crate) fn follow_refused(&mut self, now: Instant) {
        self.following = false;
        self.follow_after = Some(now + FOLLOW_BACKOFF);
    }

    /// Starts a batch on top of the committed snapshot.
    pub(crate) fn batch<R: Record>(&mut self) -> BatchReader<'_, R> {
        BatchReader {
            committed: &self.committed,
            validator: &mut self.validator,
            fold: BatchFold::new(&self.committed.aggregates),
            accepted_gap: self.rereads.accepted_gap,
            cleared_through: self.cleared_through,
            limits: self.limits,
            next_offset: self.committed.next_offset,
            malformed: 0,
            seen: 0,
            deadline: None,
            last: None,
            end: None,
        }
    }

    /// Decides what an event calls for.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let actions = match event {
            Event::Tick => self.on_tick(now),
            Event::Verdict(outcome) => self.on_verdict(outcome, now),
            Event::BatchEnded {
                end,
                committed,
                high_watermark,
                broker_responses,
            } => self.on_batch_end(end, committed, high_watermark, broker_responses, now),
        };
        for action in &actions {
            let following = match action {
                Action::ReadFrom(_) | Action::ReadBack { .. } => false,
                Action::Follow => true,
                _ => continue,
            };
            self.following = following;
            // Another client counts its responses anew.
            self.silence_answers = None;
        }
        actions
    }

    /// What to check: the verified anchor and the last record, or for
    /// imported state (no fingerprints) the record before the offset.
    fn check_request(&self) -> Option<CheckRequest> {
        let snapshot = &self.committed;
        if snapshot.next_offset == 0 {
            return None;
        }
        let mut expected: Vec<Fingerprint> = snapshot.anchor.into_iter().collect();
        expected.extend(snapshot.last_record.filter(|r| Some(*r) != snapshot.anchor));
        Some(CheckRequest {
            expected,
            adopt_offset: snapshot.next_offset - 1,
            last_record: snapshot.last_record,
        })
    }

    fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        match &self.phase {
            Phase::Held { asked: true, .. } => vec![Action::AwaitVerdict],
            // A routine check under way answers first; its answer counts.
            Phase::Held { asked: false, .. } if self.routine_asked => vec![Action::AwaitVerdict],
            Phase::Held { .. } => match self.check_request() {
                Some(request) => {
                    if let Phase::Held { asked, .. } = &mut self.phase {
                        *asked = true;
                    }
                    vec![Action::Ask(request), Action::AwaitVerdict]
                }
                // Nothing counted yet: nothing a re-creation could spoil.
                None => self.release(now),
            },
            Phase::Reading => {
                if self.routine_asked
                    || now.saturating_duration_since(self.last_check) < self.limits.verify_interval
                    || (self.committed.last_record.is_some()
                        && self.committed.last_record == self.verified_last)
                {
                    return Vec::new();
                }
                self.last_check = now;
                match self.check_request() {
                    Some(request) => {
                        self.routine_asked = true;
                        vec![Action::Ask(request)]
                    }
                    None => Vec::new(),
                }
            }
        }
    }

    fn on_verdict(&mut self, outcome: CheckOutcome, now: Instant) -> Vec<Action> {
        let (ours, noticed_by) = match &self.phase {
            Phase::Held {
                suspicion,
                asked: true,
            } => (true, suspicion.reason.clone()),
            Phase::Held { suspicion, .. } => (false, suspicion.reason.clone()),
            Phase::Reading => (false, "periodic check".to_string()),
        };
        if !ours {
            self.routine_asked = false;
        }
        match outcome {
            CheckOutcome::Gone { offset } => {
                // A reset clears everything learnt about the old topic.
                self.cleared_through = None;
                self.verified_last = None;
                self.rereads = Rereads::default();
                self.phase = Phase::Reading;
                self.last_check = now;
                vec![
                    Action::Reset {
                        gone_offset: offset,
                        noticed_by,
                    },
                    Action::ReadFrom(0),
                ]
            }
            CheckOutcome::Current { anchor } => {
                if anchor.is_some() {
                    self.verified_last = anchor;
                }
                let mut actions: Vec<Action> = anchor.map(Action::SetAnchor).into_iter().collect();
                if ours {
                    actions.extend(self.release(now));
                }
                actions
            }
            CheckOutcome::Undecided if ours => {
                if let Phase::Held { asked, .. } = &mut self.phase {
                    *asked = false;
                }
                vec![Action::Pause(RECHECK_PAUSE)]
            }
            CheckOutcome::Undecided => Vec::new(),
        }
    }

    /// A check passed (or there was nothing to check): read on from the
    /// committed offset, the suspicious record included. After an older
    /// report, the check proved that the log holding the counted records is
    /// the one they were counted from, so every record already in it (up
    /// to the end of the log as last heard) is of the same topic: its older
    /// reports are re-sends (a producer resumed with `--keep-topic` sends
    /// days again) and are dropped by the date rule, not checked one by
    /// one. A re-creation after this shows at the next periodic check.
    fn release(&mut self, now: Instant) -> Vec<Action> {
        if let Phase::Held { suspicion, .. } = &self.phase {
            if let Some(at) = suspicion.at_offset {
                let through = self.high_watermark.map_or(at, |high| at.max(high - 1));
                self.cleared_through =
                    Some(self.cleared_through.map_or(through, |c| c.max(through)));
            }
        }
        self.phase = Phase::Reading;
        self.last_check = now;
        vec![Action::ReadFrom(self.committed.next_offset)]
    }

    fn on_batch_end(
        &mut self,
        end: BatchEnd,
        committed: Option<Arc<Snapshot>>,
        high_watermark: Option<Offset>,
        broker_responses: u64,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if high_watermark.is_some() {
            self.high_watermark = high_watermark;
        }
        if let Some(snapshot) = committed {
            self.committed = snapshot;
            let behind = high_watermark.is_some_and(|high| high > self.committed.next_offset);
            actions.push(Action::Publish {
                backlog: behind || end == BatchEnd::Full,
            });
        }
        let next_offset = self.committed.next_offset;
        if next_offset != self.progressed.offset {
            self.progressed = Progressed {
                offset: next_offset,
                since: now,
            };
            self.silence_answers = None;
            self.undecodable_at = None;
        }
        let (full, drained) = (end == BatchEnd::Full, end == BatchEnd::Drained);
        match end {
            BatchEnd::Suspect(suspicion) => {
                self.phase = Phase::Held {
                    suspicion,
                    asked: false,
                };
            }
            BatchEnd::Skipped { expected } => {
                actions.extend(self.rereads.step_back(expected, Unserved::Skipped, now))
            }
            BatchEnd::PollFailed { read_nothing } => {
                if read_nothing {
                    actions.push(Action::Pause(POLL_ERROR_BACKOFF));
                }
                actions.extend(self.on_silence(high_watermark, broker_responses, now));
            }
            BatchEnd::Undecodable { offset } => {
                self.undecodable_at = Some(offset);
                actions.push(Action::Pause(POLL_ERROR_BACKOFF));
            }
            BatchEnd::Full | BatchEnd::Drained => {
                actions.extend(self.on_silence(high_watermark, broker_responses, now))
            }
        }
        let moves = actions
            .iter()
            .any(|a| matches!(a, Action::ReadFrom(_) | Action::ReadBack { .. }));
        if self.following && (moves || !(full || drained)) {
            // An error, a skip or silence on the shared client.
            self.follow_after = Some(now + FOLLOW_BACKOFF);
        }
        if moves || !self.is_reading() {
            return actions;
        }
        if self.following && full {
            // A backlog: a client of its own fetches it, in parallel with
            // the other partitions.
            actions.push(Action::ReadFrom(next_offset));
        } else if !self.following && drained && self.may_follow(high_watermark, now) {
            actions.push(Action::Follow);
        }
        actions
    }

    /// Whether the partition is at the end of its log (as far as the
    /// client heard: tansu's in-memory engine reports the last batch's base
    /// offset + 1, so a high watermark at or before the next offset), with
    /// no re-read under way and no recent trouble with the shared client.
    fn may_follow(&self, high_watermark: Option<Offset>, now: Instant) -> bool {
        high_watermark.is_some_and(|high| high <= self.committed.next_offset)
            && !self.rereads.pending(self.committed.next_offset)
            && self.follow_after.is_none_or(|after| now >= after)
    }

    /// Exists for tansu 0.6's in-memory engine, which answers nothing for
    /// an offset inside a record batch when no later batch exists: when
    /// nothing has arrived for [`FETCH_STALL`] although the high watermark
    /// says the log goes on, and the broker did answer meanwhile, read from
    /// earlier, like after a skip, but never give up on the offset for it.
    /// A broker that answers nothing at all (slow, overloaded: Apache
    /// Kafka's way of being silent) is waited for: a re-read would only add
    /// a connection and a fetch to its load.
    fn on_silence(
        &mut self,
        high_watermark: Option<Offset>,
        broker_responses: u64,
        now: Instant,
    ) -> Vec<Action> {
        let next_offset = self.committed.next_offset;
        let silent = now.saturating_duration_since(self.progressed.since) >= FETCH_STALL;
        let log_goes_on = high_watermark.is_some_and(|high| high > next_offset);
        let undecodable = self.undecodable_at == Some(next_offset);
        if next_offset == 0 || !silent || !log_goes_on || undecodable {
            return Vec::new();
        }
        self.progressed.since = now;
        let answered = self
            .silence_answers
            .replace(broker_responses)
            .is_some_and(|before| broker_responses > before);
        if !answered {
            return Vec::new();
        }
        if self.rereads.exhausted(next_offset) {
            return Vec::new();
        }
        self.rereads.step_back(next_offset, Unserved::Silent, now)
    }
}

/// Backoff between attempts to commit while storage fails (a full disk):
/// 100 ms, doubling up to 5 s. Pure, so the rule is tested without time.
#[derive(Debug)]
pub(crate) struct StorageRetry {
    next: Duration,
}

/// First and longest wait between two commit attempts.
const STORAGE_RETRY_FIRST: Duration = Duration::from_millis(100);
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(5);

impl StorageRetry {
    pub(crate) fn new() -> Self {
        StorageRetry {
            next: STORAGE_RETRY_FIRST,
        }
    }

    /// How long to wait after one more failed attempt.
    pub(crate) fn after_failure(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(STORAGE_RETRY_MAX);
        wait
    }
}

/// What the worker does after offering a record or an error.
#[derive(Debug, PartialEq)]
pub(crate) enum Flow {
    Continue,
    /// The record was skipped as malformed (and counted as such); go on.
    Malformed(Malformed),
    /// The batch is over: call [`BatchReader::finish`].
    Stop,
}

/// One batch: the records offered, folded on top of the committed
/// statistics, and why it ended.
pub(crate) struct BatchReader<'m, R> {
    committed: &'m Snapshot,
    validator: &'m mut Validator,
    fold: BatchFold<'m>,
    accepted_gap: Option<Offset>,
    cleared_through: Option<Offset>,
    limits: Limits,
    next_offset: Offset,
    malformed: u64,
    /// Records taken (counted, dropped as duplicates, or malformed).
    seen: usize,
    deadline: Option<Instant>,
    /// The last record taken: only its fingerprint is stored, computed once
    /// at the end of the batch.
    last: Option<R>,
    end: Option<BatchEnd>,
}

impl<R: Record> BatchReader<'_, R> {
    /// False once the batch is full or has ended.
    pub(crate) fn wants_more(&self) -> bool {
        self.end.is_none() && self.seen < self.limits.max_batch
    }

    /// How long the next poll may wait: the first record is waited for, the
    /// rest of a batch is what has already arrived.
    pub(crate) fn poll_wait(&self) -> Duration {
        if self.seen == 0 {
            FIRST_POLL_WAIT
        } else {
            Duration::ZERO
        }
    }

    /// Whether [`BatchReader::clock`] wants the time before the next poll.
    pub(crate) fn clock_due(&self) -> bool {
        self.seen > 0 && (self.deadline.is_none() || self.seen % CLOCK_EVERY == 0)
    }

    /// Starts the batch's deadline at its first record, and ends the batch
    /// once the deadline has passed.
    pub(crate) fn clock(&mut self, now: Instant) -> Flow {
        match self.deadline {
            None => {
                self.deadline = Some(now + self.limits.batch_timeout);
                Flow::Continue
            }
            Some(deadline) if now >= deadline => self.stop(BatchEnd::Drained),
            Some(_) => Flow::Continue,
        }
    }

    fn stop(&mut self, end: BatchEnd) -> Flow {
        self.end = Some(end);
        Flow::Stop
    }

    /// The offset the batch reads next.
    pub(crate) fn next_offset(&self) -> Offset {
        self.next_offset
    }

    /// Takes one record.
    pub(crate) fn offer(&mut self, record: R) -> Flow {
        let offset = record.offset();
        if offset < self.next_offset {
            // Counted already (read again from earlier): skip. But the last
            // counted record must still be the one counted.
            let counted = self.committed.last_record.filter(|fp| fp.offset == offset);
            if counted.is_some_and(|fp| fp != fingerprint(&record)) {
                return self.stop(BatchEnd::Suspect(Suspicion::new(
                    format!("the record at offset {offset} differs from the one counted"),
                    None,
                )));
            }
            return Flow::Continue;
        }
        if offset > self.next_offset && self.accepted_gap != Some(self.next_offset) {
            return self.stop(BatchEnd::Skipped {
                expected: self.next_offset,
            });
        }
        let flow = match self.validator.validate(record.key(), record.value()) {
            Ok(valid) => {
                let recorded_end = self.fold.current(MonthYear::of(valid.date)).map(|s| s.end);
                let cleared = self.cleared_through.is_some_and(|c| offset <= c);
                if recorded_end.is_some_and(|end| valid.date < end) && !cleared {
                    // Retries repeat the last date, never an older one: this
                    // smells of a re-created topic. Stop before the record.
                    return self.stop(BatchEnd::Suspect(Suspicion::new(
                        format!(
                            "report for {} at offset {offset} is older than recorded statistics",
                            valid.date
                        ),
                        Some(offset),
                    )));
                }
                match self.fold.add(&valid) {
                    Outcome::Unrepresentable(why) => {
                        self.malformed += 1;
                        Flow::Malformed(Malformed::Unrepresentable(why))
                    }
                    Outcome::Counted | Outcome::Duplicate => Flow::Continue,
                }
            }
            Err(reason) => {
                self.malformed += 1;
                Flow::Malformed(reason)
            }
        };
        self.next_offset = offset + 1;
        self.last = Some(record);
        self.seen += 1;
        flow
    }

    /// Takes a poll error.
    pub(crate) fn poll_error(&mut self, error: PollError) -> Flow {
        match error {
            PollError::NeedsCheck(reason) => {
                self.stop(BatchEnd::Suspect(Suspicion::new(reason, None)))
            }
            PollError::Transient => self.stop(BatchEnd::PollFailed {
                read_nothing: self.seen == 0,
            }),
            PollError::Undecodable => self.stop(BatchEnd::Undecodable {
                offset: self.next_offset,
            }),
        }
    }

    /// What to commit (None: nothing was read) and how the batch ended.
    pub(crate) fn finish(self) -> (Option<BatchCommit>, BatchEnd) {
        let end = self.end.unwrap_or(if self.seen >= self.limits.max_batch {
            BatchEnd::Full
        } else {
            BatchEnd::Drained
        });
        if self.next_offset == self.committed.next_offset {
            return (None, end);
        }
        let counted = self.fold.counted;
        let duplicates = self.fold.duplicates;
        let commit = BatchCommit {
            touched: self.fold.into_touched(),
            counted,
            duplicates,
            malformed: self.malformed,
            next_offset: self.next_offset,
            last_record: self.last.as_ref().map(fingerprint),
        };
        (Some(commit), end)
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;
    use crate::model::aggregate::Aggregates;
    use crate::model::report::{encode, key_for};
    use crate::store::state::PartitionState;

    /// A record as a test writes it.
    #[derive(Debug, Clone)]
    struct Rec {
        offset: Offset,
        key: Vec<u8>,
        value: Vec<u8>,
    }

    impl Record for Rec {
        fn offset(&self) -> Offset {
            self.offset
        }
        fn key(&self) -> Option<&[u8]> {
            Some(&self.key)
        }
        fn value(&self) -> Option<&[u8]> {
            Some(&self.value)
        }
    }

    /// A valid report for day `day` of 1990 (1 = January 1st).
    fn report(offset: Offset, day: u64, degrees: f64) -> Rec {
        let date = NaiveDate::from_ymd_opt(1990, 1, 1).unwrap() + chrono::Days::new(day - 1);
        Rec {
            offset,
            key: key_for(date).as_bytes().to_vec(),
            value: encode(date, degrees),
        }
    }

    /// Reports for days 1.. at offsets `from..to`.
    fn reports(from: Offset, to: Offset) -> Vec<Rec> {
        (from..to)
            .map(|o| report(o, o as u64 + 1, 20.0 + o as f64))
            .collect()
    }

    fn junk(offset: Offset) -> Rec {
        Rec {
            offset,
            key: b"January".to_vec(),
            value: vec![0xff, 0xff, 0xff],
        }
    }

    const LIMITS: Limits = Limits {
        max_batch: 1_000,
        batch_timeout: Duration::from_millis(100),
        verify_interval: Duration::from_secs(5),
    };

    /// A machine over a real sled state in a temporary folder, and a clock
    /// the test moves.
    struct Harness {
        _dir: tempfile::TempDir,
        state: PartitionState,
        machine: PartitionMachine,
        now: Instant,
        broker_responses: u64,
        broker_mute: bool,
    }

    impl Harness {
        /// A partition whose state starts at `next_offset` with no records
        /// counted (as after an import), past its start-up check.
        fn at(next_offset: Offset) -> Harness {
            Self::with(next_offset, LIMITS)
        }

        fn with(next_offset: Offset, limits: Limits) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let mut state = PartitionState::open(dir.path(), 0).unwrap();
            state.initialize(next_offset, Aggregates::new(), 0).unwrap();
            let now = Instant::now();
            let machine = PartitionMachine::new(state.snapshot(), limits, now);
            let mut harness = Harness {
                _dir: dir,
                state,
                machine,
                now,
                broker_responses: 0,
                broker_mute: false,
            };
            harness.pass_start_up();
            harness
        }

        /// A partition that counted `count` reports (offsets 0..count).
        fn counted(count: Offset) -> Harness {
            let mut harness = Self::at(0);
            let (_, end) = harness.read(reports(0, count), Some(count));
            assert_eq!(end, BatchEnd::Drained);
            harness
        }

        fn pass_start_up(&mut self) {
            let next_offset = self.state.snapshot().next_offset;
            let actions = self.tick();
            if next_offset == 0 {
                assert_eq!(actions, [Action::ReadFrom(0)]);
            } else {
                assert!(matches!(
                    actions[..],
                    [Action::Ask(_), Action::AwaitVerdict]
                ));
                let actions = self.verdict(CheckOutcome::Current { anchor: None });
                assert_eq!(actions, [Action::ReadFrom(next_offset)]);
            }
            assert!(self.machine.is_reading());
        }

        fn later(&mut self, by: Duration) {
            self.now += by;
        }

        fn tick(&mut self) -> Vec<Action> {
            self.machine.handle(Event::Tick, self.now)
        }

        fn verdict(&mut self, outcome: CheckOutcome) -> Vec<Action> {
            let actions = self.machine.handle(Event::Verdict(outcome), self.now);
            self.apply_state_actions(&actions);
            actions
        }

        /// Does to the state what the worker does for these actions.
        fn apply_state_actions(&mut self, actions: &[Action]) {
            for action in actions {
                match action {
                    Action::SetAnchor(anchor) => {
                        self.state.set_anchor(*anchor).unwrap();
                        self.machine.set_committed(self.state.snapshot());
                    }
                    Action::Reset { .. } => {
                        let snapshot = self.state.reset().unwrap();
                        self.machine.set_committed(snapshot);
                    }
                    _ => {}
                }
            }
        }

        /// Offers `records` as one batch (the poll loop of the worker), then
        /// commits it and reports its end. Returns the actions and the end.
        fn read(
            &mut self,
            records: Vec<Rec>,
            high_watermark: Option<Offset>,
        ) -> (Vec<Action>, BatchEnd) {
            self.read_with(records.into_iter().map(Ok), high_watermark)
        }

        fn read_with(
            &mut self,
            polled: impl IntoIterator<Item = Result<Rec, PollError>>,
            high_watermark: Option<Offset>,
        ) -> (Vec<Action>, BatchEnd) {
            let mut batch = self.machine.batch();
            for item in polled {
                if !batch.wants_more() {
                    break;
                }
                let flow = match item {
                    Ok(record) => batch.offer(record),
                    Err(error) => batch.poll_error(error),
                };
                if flow == Flow::Stop {
                    break;
                }
            }
            let (commit, end) = batch.finish();
            let committed = commit.map(|c| self.state.commit(c).unwrap());
            // A broker that answers every fetch, unless a test says not.
            if !self.broker_mute {
                self.broker_responses += 1;
            }
            let event = Event::BatchEnded {
                end: end.clone(),
                committed,
                high_watermark,
                broker_responses: self.broker_responses,
            };
            let actions = self.machine.handle(event, self.now);
            self.apply_state_actions(&actions);
            (actions, end)
        }

        fn snapshot(&self) -> Arc<Snapshot> {
            self.state.snapshot()
        }
    }

    fn resets(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Reset { .. }))
            .count()
    }

    #[test]
    fn storage_retries_back_off_from_100_ms_doubling_to_5_s() {
        let mut retry = StorageRetry::new();
        let waits: Vec<u64> = (0..9)
            .map(|_| retry.after_failure().as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn nothing_counted_means_nothing_to_check_at_start_up() {
        let harness = Harness::at(0);
        assert!(harness.machine.is_reading());
    }

    #[test]
    fn stored_state_holds_reading_until_the_start_up_check_answers() {
        let counted = Harness::counted(3);
        let last = counted.snapshot().last_record.unwrap();
        assert_eq!(last.offset, 2);
        let mut machine = PartitionMachine::new(counted.snapshot(), LIMITS, counted.now);
        assert!(!machine.is_reading());
        let actions = machine.handle(Event::Tick, counted.now);
        let expected = CheckRequest {
            expected: vec![last],
            adopt_offset: 2,
            last_record: Some(last),
        };
        assert_eq!(actions, [Action::Ask(expected), Action::AwaitVerdict]);
        // Asked once: the next tick only waits for the answer.
        assert_eq!(
            machine.handle(Event::Tick, counted.now),
            [Action::AwaitVerdict]
        );
        let actions = machine.handle(
            Event::Verdict(CheckOutcome::Current { anchor: Some(last) }),
            counted.now,
        );
        assert_eq!(actions, [Action::SetAnchor(last), Action::ReadFrom(3)]);
        assert!(machine.is_reading());
    }

    #[test]
    fn a_normal_batch_is_counted_and_committed_with_its_last_fingerprint() {
        let mut harness = Harness::at(0);
        let records = reports(0, 3);
        let last = Fingerprint::of(2, records[2].key(), records[2].value());
        let (actions, end) = harness.read(records, Some(3));
        assert_eq!(end, BatchEnd::Drained);
        // At the end of the log: the shared client takes over.
        assert_eq!(
            actions,
            [Action::Publish { backlog: false }, Action::Follow]
        );
        let snapshot = harness.snapshot();
        assert_eq!(snapshot.next_offset, 3);
        assert_eq!(snapshot.counters.counted, 3);
        assert_eq!(snapshot.last_record, Some(last));
        let january = snapshot.aggregates[&MonthYear {
            month: 1,
            year: 1990,
        }];
        assert_eq!((january.count, january.sum), (3, 63.0));
        // Behind the end of the log: the publish may wait for the next one.
        let (actions, _) = harness.read(reports(3, 4), Some(10));
        assert_eq!(actions, [Action::Publish { backlog: true }]);
        // Nothing read: nothing committed, nothing published.
        let (actions, end) = harness.read(Vec::new(), Some(4));
        assert_eq!((actions, end), (Vec::new(), BatchEnd::Drained));
    }

    #[test]
    fn a_full_batch_ends_there_and_publishes_as_backlog() {
        let limits = Limits {
            max_batch: 2,
            ..LIMITS
        };
        let mut harness = Harness::with(0, limits);
        let (actions, end) = harness.read(reports(0, 5), None);
        assert_eq!(end, BatchEnd::Full);
        assert_eq!(actions, [Action::Publish { backlog: true }]);
        assert_eq!(harness.snapshot().next_offset, 2);
    }

    #[test]
    fn a_batch_ends_at_its_deadline_counted_from_its_first_record() {
        let mut harness = Harness::at(0);
        let start = harness.now;
        let mut batch = harness.machine.batch();
        assert_eq!(batch.poll_wait(), FIRST_POLL_WAIT);
        assert!(!batch.clock_due(), "no deadline before the first record");
        assert_eq!(batch.offer(report(0, 1, 1.0)), Flow::Continue);
        assert_eq!(batch.poll_wait(), Duration::ZERO);
        assert!(batch.clock_due());
        assert_eq!(batch.clock(start), Flow::Continue);
        assert!(!batch.clock_due(), "the clock is read every 128 records");
        assert_eq!(
            batch.clock(start + LIMITS.batch_timeout - Duration::from_millis(1)),
            Flow::Continue
        );
        assert_eq!(batch.clock(start + LIMITS.batch_timeout), Flow::Stop);
        assert!(!batch.wants_more());
        let (commit, end) = batch.finish();
        assert_eq!(end, BatchEnd::Drained);
        assert_eq!(commit.unwrap().next_offset, 1);
    }

    #[test]
    fn duplicate_dates_are_dropped_and_counted_as_duplicates() {
        let mut harness = Harness::at(0);
        let records = vec![
            report(0, 1, 10.0),
            report(1, 2, 11.0),
            // A producer retry: the same date again, and its repeat.
            report(2, 2, 1_000_000.0),
            report(3, 2, 11.0),
            report(4, 3, 12.0),
        ];
        harness.read(records, None);
        let snapshot = harness.snapshot();
        assert_eq!(snapshot.next_offset, 5);
        assert_eq!(snapshot.counters.counted, 3);
        assert_eq!(snapshot.counters.duplicates, 2);
        let january = snapshot.aggregates[&MonthYear {
            month: 1,
            year: 1990,
        }];
        assert_eq!(january.sum, 33.0);
    }

    #[test]
    fn malformed_messages_are_skipped_counted_and_never_stop_the_batch() {
        let mut harness = Harness::at(0);
        let mut batch = harness.machine.batch();
        assert_eq!(batch.offer(report(0, 1, 10.0)), Flow::Continue);
        assert!(matches!(
            batch.offer(junk(1)),
            Flow::Malformed(Malformed::NotAReport(_))
        ));
        let mismatched = Rec {
            key: b"March".to_vec(),
            ..report(2, 2, 10.0)
        };
        assert!(matches!(
            batch.offer(mismatched),
            Flow::Malformed(Malformed::KeyMismatch { .. })
        ));
        assert_eq!(batch.offer(report(3, 3, 10.0)), Flow::Continue);
        let (commit, end) = batch.finish();
        assert_eq!(end, BatchEnd::Drained);
        let commit = commit.unwrap();
        assert_eq!(
            (commit.counted, commit.malformed, commit.next_offset),
            (2, 2, 4)
        );
    }

    #[test]
    fn reports_that_would_make_a_statistic_infinite_are_skipped_as_malformed() {
        let mut harness = Harness::at(0);
        let mut batch = harness.machine.batch();
        assert_eq!(batch.offer(report(0, 1, 1e308)), Flow::Continue);
        assert!(matches!(
            batch.offer(report(1, 2, 1e308)),
            Flow::Malformed(Malformed::Unrepresentable(
                crate::model::aggregate::Unrepresentable::SumOverflow { .. }
            ))
        ));
        assert!(matches!(
            batch.offer(report(2, 3, f64::INFINITY)),
            Flow::Malformed(Malformed::NonFinite(_))
        ));
        // Day 2 was not counted: it is no duplicate now.
        assert_eq!(batch.offer(report(3, 2, -1e308)), Flow::Continue);
        let (commit, _) = batch.finish();
        let commit = commit.unwrap();
        assert_eq!(
            (commit.counted, commit.malformed, commit.next_offset),
            (2, 2, 4)
        );
        let january = commit.touched[&MonthYear {
            month: 1,
            year: 1990,
        }];
        assert_eq!((january.count, january.sum), (2, 0.0));
    }

    #[test]
    fn a_skip_past_the_offset_reads_again_from_earlier_and_skips_what_was_counted() {
        let mut harness = Harness::counted(3);
        // Asked for offset 3, the broker starts at 5 (its next batch).
        let (actions, end) = harness.read(reports(5, 7), Some(7));
        assert_eq!(end, BatchEnd::Skipped { expected: 3 });
        assert_eq!(actions, [Action::ReadBack { wanted: 3, from: 0 }]);
        assert_eq!(harness.snapshot().next_offset, 3, "nothing was counted");
        // Read from 0: what was counted is skipped, the rest is counted once.
        let (actions, end) = harness.read(reports(0, 7), Some(7));
        assert_eq!(end, BatchEnd::Drained);
        assert_eq!(actions, [Action::Publish { backlog: false }]);
        let snapshot = harness.snapshot();
        assert_eq!(snapshot.next_offset, 7);
        assert_eq!(snapshot.counters.counted, 7);
    }

    #[test]
    fn repeated_skips_climb_the_ladder_and_a_gap_confirmed_from_the_start_is_accepted_once() {
        let mut harness = Harness::at(250_000);
        let mut froms = Vec::new();
        for _ in 0..READ_BACK_STEPS.len() {
            let (actions, end) = harness.read(vec![report(250_005, 1, 1.0)], None);
            assert_eq!(end, BatchEnd::Skipped { expected: 250_000 });
            let [Action::ReadBack {
                wanted: 250_000,
                from,
            }] = actions[..]
            else {
                panic!("{actions:?}")
            };
            froms.push(from);
        }
        assert_eq!(froms, [249_000, 240_000, 150_000, 0]);
        // Read from the start and still skipped: the gap is real.
        let (actions, _) = harness.read(vec![report(250_005, 1, 1.0)], None);
        assert_eq!(
            actions,
            [
                Action::GapAccepted { from: 250_000 },
                Action::ReadFrom(250_000)
            ]
        );
        // The record after the gap is counted, and the gap is not reported
        // again.
        let (actions, end) = harness.read(vec![report(250_005, 1, 1.0)], None);
        assert_eq!(end, BatchEnd::Drained);
        assert_eq!(actions, [Action::Publish { backlog: false }]);
        assert_eq!(harness.snapshot().next_offset, 250_006);
    }

    #[test]
    fn silence_inside_the_log_climbs_the_same_ladder_but_never_gives_up_on_the_offset() {
        let mut harness = Harness::at(250_000);
        let high = Some(250_010);
        // Silence shorter than the stall time, or at the end of the log: wait.
        harness.later(FETCH_STALL / 2);
        assert_eq!(harness.read(Vec::new(), high).0, []);
        harness.later(FETCH_STALL);
        assert_eq!(harness.read(Vec::new(), Some(250_000)).0, [Action::Follow]);
        let mut froms = Vec::new();
        for _ in 0..READ_BACK_STEPS.len() {
            // The first silent stretch of a client only notes how many
            // answers it has had; the next, with more, re-reads.
            harness.later(FETCH_STALL);
            assert_eq!(harness.read(Vec::new(), high).0, []);
            harness.later(FETCH_STALL);
            let actions = harness.read(Vec::new(), high).0;
            let [Action::ReadBack {
                wanted: 250_000,
                from,
            }] = actions[..]
            else {
                panic!("{actions:?}")
            };
            froms.push(from);
        }
        assert_eq!(froms, [249_000, 240_000, 150_000, 0]);
        for _ in 0..10 {
            harness.later(FETCH_STALL);
            assert_eq!(harness.read(Vec::new(), high).0, [], "never a gap");
        }
        // When the records come, they are counted from the offset.
        let (_, end) = harness.read(vec![report(250_000, 1, 1.0)], high);
        assert_eq!(end, BatchEnd::Drained);
        assert_eq!(harness.snapshot().next_offset, 250_001);
    }

    #[test]
    fn an_undecodable_batch_is_fetched_again_where_it_is_never_read_around_or_from_earlier() {
        let mut harness = Harness::at(0);
        harness.read(reports(0, 5), Some(8));
        let high = Some(8);
        for _ in 0..5 {
            harness.later(FETCH_STALL);
            let polled = [Ok(report(5, 6, 1.0)), Err(PollError::Undecodable)];
            let (actions, end) = harness.read_with(polled, high);
            assert_eq!(end, BatchEnd::Undecodable { offset: 6 });
            assert!(
                actions
                    .iter()
                    .all(|a| matches!(a, Action::Pause(_) | Action::Publish { .. })),
                "{actions:?}"
            );
            // Silence after it is no reason to read from earlier either.
            harness.later(FETCH_STALL);
            let (actions, _) = harness.read(Vec::new(), high);
            assert_eq!(actions, [], "no re-read");
        }
        assert_eq!(harness.snapshot().next_offset, 6, "nothing skipped");
        // Once the batch can be read, counting goes on from it.
        let (_, end) = harness.read(reports(6, 8), high);
        assert_eq!(end, BatchEnd::Drained);
        assert_eq!(harness.snapshot().next_offset, 8);
    }

    #[test]
    fn the_end_of_the_log_is_followed_by_the_shared_client_and_a_backlog_gets_its_own() {
        let mut harness = Harness::at(0);
        // Behind the log, or not yet told where it ends: own client.
        let (actions, _) = harness.read(reports(0, 3), Some(10));
        assert_eq!(actions, [Action::Publish { backlog: true }]);
        let (actions, _) = harness.read(reports(3, 5), None);
        assert_eq!(actions, [Action::Publish { backlog: false }]);
        // Caught up (tansu's watermark may even lag behind): follow.
        let (actions, _) = harness.read(reports(5, 10), Some(9));
        assert_eq!(
            actions,
            [Action::Publish { backlog: false }, Action::Follow]
        );
        // Following: a paced record at a time stays with the shared client.
        let (actions, _) = harness.read(reports(10, 11), Some(11));
        assert_eq!(actions, [Action::Publish { backlog: false }]);
        // A full batch is a backlog: a client of its own fetches it.
        let full = LIMITS.max_batch as Offset;
        let end_of_log = 11 + full + 500;
        let (actions, end) = harness.read(reports(11, 11 + full), Some(end_of_log));
        assert_eq!(end, BatchEnd::Full);
        assert_eq!(
            actions,
            [
                Action::Publish { backlog: true },
                Action::ReadFrom(11 + full)
            ]
        );
        // Caught up again: back to the shared client, at once.
        let (actions, _) = harness.read(reports(11 + full, end_of_log), Some(end_of_log));
        assert_eq!(
            actions,
            [Action::Publish { backlog: false }, Action::Follow]
        );
        assert_eq!(harness.snapshot().next_offset, end_of_log);
    }

    #[test]
    fn trouble_on_the_shared_client_keeps_the_partition_on_its_own_for_a_while() {
        let mut harness = Harness::at(0);
        let (actions, _) = harness.read(reports(0, 3), Some(3));
        assert_eq!(
            actions,
            [Action::Publish { backlog: false }, Action::Follow]
        );
        // The shared client serves a record past the offset: re-read with a
        // client of its own.
        let (actions, _) = harness.read(reports(5, 6), Some(6));
        assert_eq!(actions, [Action::ReadBack { wanted: 3, from: 0 }]);
        let (actions, _) = harness.read(reports(0, 6), Some(6));
        assert_eq!(
            actions,
            [Action::Publish { backlog: false }],
            "no follow yet"
        );
        harness.later(FOLLOW_BACKOFF / 2);
        let (actions, _) = harness.read(Vec::new(), Some(6));
        assert_eq!(actions, [], "no follow yet");
        harness.later(FOLLOW_BACKOFF / 2);
        let (actions, _) = harness.read(Vec::new(), Some(6));
        assert_eq!(actions, [Action::Follow]);

        // The shared client refuses the partition: the same wait.
        harness.machine.follow_refused(harness.now);
        let (actions, _) = harness.read(reports(6, 7), Some(7));
        assert_eq!(
            actions,
            [Action::Publish { backlog: false }],
            "no follow yet"
        );
        harness.later(FOLLOW_BACKOFF);
        let (actions, _) = harness.read(Vec::new(), Some(7));
        assert_eq!(actions, [Action::Follow]);
    }

    #[test]
    fn a_broker_that_answers_nothing_is_waited_for_and_never_read_from_again() {
        let mut harness = Harness::at(250_000);
        let high = Some(250_010);
        // A slow or overloaded broker: no answer at all, for a long time.
        harness.broker_mute = true;
        for _ in 0..60 {
            harness.later(FETCH_STALL);
            assert_eq!(harness.read(Vec::new(), high).0, [], "no re-read");
        }
        // It answers again (without the offset): now the ladder applies.
        harness.broker_mute = false;
        harness.later(FETCH_STALL);
        let actions = harness.read(Vec::new(), high).0;
        assert!(
            matches!(
                actions[..],
                [Action::ReadBack {
                    wanted: 250_000,
                    ..
                }]
            ),
            "{actions:?}"
        );
    }

    #[test]
    fn rereads_are_bounded_per_minute_and_deferred_not_dropped() {
        let mut harness = Harness::at(250_000);
        let high = Some(260_000);
        let skip_at = |wanted: Offset| vec![report(wanted + 5, 900, 1.0)];
        // A broker that skips past offset after offset: each re-read is
        // granted until the budget of the minute is spent.
        for round in 0..Offset::from(REREAD_BUDGET) {
            let wanted = 250_000 + round;
            let (actions, _) = harness.read(skip_at(wanted), high);
            assert!(
                matches!(actions[..], [Action::ReadBack { wanted: w, .. }] if w == wanted),
                "{actions:?}"
            );
            let day = u64::try_from(round).unwrap() + 1;
            harness.read(vec![report(wanted, day, 1.0)], high);
            assert_eq!(harness.snapshot().next_offset, wanted + 1);
        }
        // Spent: a skip pauses, silence only waits; no re-read, no gap.
        let wanted = 250_000 + Offset::from(REREAD_BUDGET);
        let (actions, _) = harness.read(skip_at(wanted), high);
        assert_eq!(
            actions,
            [Action::ReadBackDeferred {
                wanted,
                wait: REREAD_DEFER_PAUSE
            }]
        );
        harness.later(FETCH_STALL);
        assert_eq!(harness.read(Vec::new(), high).0, []);
        harness.later(FETCH_STALL);
        let (actions, _) = harness.read(Vec::new(), high);
        assert_eq!(
            actions,
            [Action::ReadBackDeferred {
                wanted,
                wait: Duration::ZERO
            }]
        );
        assert_eq!(harness.snapshot().next_offset, wanted, "nothing skipped");
        // A new minute: re-reading resumes.
        harness.later(REREAD_WINDOW);
        let (actions, _) = harness.read(skip_at(wanted), high);
        assert!(
            matches!(actions[..], [Action::ReadBack { wanted: w, .. }] if w == wanted),
            "{actions:?}"
        );
    }

    #[test]
    fn the_last_counted_record_read_again_with_other_bytes_holds_reading_for_a_check() {
        let mut harness = Harness::counted(3);
        // The same bytes again: skipped quietly.
        let (actions, end) = harness.read(reports(0, 3), Some(3));
        assert_eq!((actions, end), (Vec::new(), BatchEnd::Drained));
        // Other bytes at the last counted offset: the topic may be new.
        let (actions, end) = harness.read(vec![report(2, 3, -5.0)], Some(3));
        let BatchEnd::Suspect(suspicion) = end else {
            panic!("{end:?}")
        };
        assert!(suspicion.reason.contains("differs"), "{suspicion:?}");
        assert_eq!(actions, []);
        assert!(!harness.machine.is_reading());
        let actions = harness.tick();
        assert!(
            matches!(actions[..], [Action::Ask(_), Action::AwaitVerdict]),
            "{actions:?}"
        );
    }

    #[test]
    fn an_offset_out_of_range_or_unknown_partition_holds_reading_for_a_check() {
        for reason in ["offset out of range", "unknown partition"] {
            let mut harness = Harness::counted(3);
            let polled = [
                Ok(report(3, 4, 1.0)),
                Err(PollError::NeedsCheck(reason.into())),
            ];
            let (actions, end) = harness.read_with(polled, None);
            assert_eq!(end, BatchEnd::Suspect(Suspicion::new(reason, None)));
            // What was read before the error is committed.
            assert_eq!(actions, [Action::Publish { backlog: false }]);
            assert_eq!(harness.snapshot().next_offset, 4);
            assert!(!harness.machine.is_reading());
            let actions = harness.tick();
            assert!(matches!(
                actions[..],
                [Action::Ask(_), Action::AwaitVerdict]
            ));
            assert!(!harness.machine.is_reading(), "held until the answer");
        }
    }

    #[test]
    fn a_report_older_than_the_statistics_is_checked_then_counted_by_the_usual_rules() {
        let mut harness = Harness::counted(5);
        // Day 2 at offset 5: older than the statistics' last day (5).
        let (actions, end) = harness.read(vec![report(5, 2, 1.0)], Some(6));
        assert_eq!(actions, []);
        let BatchEnd::Suspect(suspicion) = end else {
            panic!("{end:?}")
        };
        assert_eq!(suspicion.at_offset, Some(5));
        harness.tick();
        let actions = harness.verdict(CheckOutcome::Current { anchor: None });
        assert_eq!(actions, [Action::ReadFrom(5)]);
        // Read again: now it is a plain duplicate.
        let (actions, end) = harness.read(vec![report(5, 2, 1.0)], Some(6));
        assert_eq!(end, BatchEnd::Drained);
        assert_eq!(actions, [Action::Publish { backlog: false }]);
        let snapshot = harness.snapshot();
        assert_eq!(snapshot.next_offset, 6);
        assert_eq!(snapshot.counters.duplicates, 1);
    }

    #[test]
    fn after_one_check_the_older_reports_already_in_the_log_are_dropped_without_another() {
        // A resumed producer sent days 3..5 again after day 6: one check,
        // then every re-sent day in the log is a plain duplicate.
        let mut harness = Harness::counted(6);
        let resent = vec![report(6, 3, 1.0), report(7, 4, 1.0), report(8, 5, 1.0)];
        let (_, end) = harness.read(resent.clone(), Some(10));
        assert!(matches!(end, BatchEnd::Suspect(_)), "{end:?}");
        harness.tick();
        let actions = harness.verdict(CheckOutcome::Current { anchor: None });
        assert_eq!(actions, [Action::ReadFrom(6)]);
        let mut rest = resent;
        rest.push(report(9, 7, 2.0));
        let (_, end) = harness.read(rest, Some(10));
        assert_eq!(end, BatchEnd::Drained);
        let snapshot = harness.snapshot();
        assert_eq!(snapshot.next_offset, 10);
        assert_eq!(snapshot.counters.duplicates, 3);
        // A report older still, past the log's end at the check: checked.
        let (_, end) = harness.read(vec![report(10, 2, 1.0)], Some(11));
        assert!(matches!(end, BatchEnd::Suspect(_)), "{end:?}");
    }

    #[test]
    fn verdict_same_goes_on_from_the_committed_offset_and_keeps_the_anchor() {
        let mut harness = Harness::counted(3);
        harness.read_with([Err(PollError::NeedsCheck("unknown topic".into()))], None);
        harness.tick();
        let anchor = harness.snapshot().last_record.unwrap();
        let actions = harness.verdict(CheckOutcome::Current {
            anchor: Some(anchor),
        });
        assert_eq!(actions, [Action::SetAnchor(anchor), Action::ReadFrom(3)]);
        assert_eq!(harness.snapshot().anchor, Some(anchor));
        assert!(harness.machine.is_reading());
    }

    #[test]
    fn verdict_missing_or_different_resets_to_zero_once() {
        let mut harness = Harness::counted(3);
        harness.read(vec![report(2, 3, -5.0)], Some(3));
        harness.tick();
        let actions = harness.verdict(CheckOutcome::Gone { offset: 2 });
        assert_eq!(resets(&actions), 1);
        assert_eq!(actions.last(), Some(&Action::ReadFrom(0)));
        let Action::Reset { noticed_by, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert!(noticed_by.contains("differs"), "{noticed_by}");
        assert!(harness.machine.is_reading());
        // The new topic is counted from 0; nothing asks for another reset.
        let (actions, _) = harness.read(reports(0, 2), Some(2));
        assert_eq!(actions, [Action::Publish { backlog: false }]);
        let snapshot = harness.snapshot();
        assert_eq!((snapshot.epoch, snapshot.next_offset), (1, 2));
        assert_eq!(snapshot.counters.counted, 2);
    }

    #[test]
    fn verdict_undecided_asks_again_after_a_pause_and_never_resets() {
        let mut harness = Harness::counted(3);
        harness.read_with([Err(PollError::NeedsCheck("unknown topic".into()))], None);
        for _ in 0..5 {
            let actions = harness.tick();
            assert!(matches!(
                actions[..],
                [Action::Ask(_), Action::AwaitVerdict]
            ));
            let actions = harness.verdict(CheckOutcome::Undecided);
            assert_eq!(actions, [Action::Pause(RECHECK_PAUSE)]);
            assert!(!harness.machine.is_reading());
            harness.later(RECHECK_PAUSE);
        }
        assert_eq!(harness.snapshot().next_offset, 3, "never reset");
    }

    #[test]
    fn routine_checks_run_beside_reading_and_a_gone_answer_resets() {
        let mut harness = Harness::counted(3);
        assert_eq!(harness.tick(), [], "not due yet");
        harness.later(LIMITS.verify_interval);
        let actions = harness.tick();
        assert!(matches!(actions[..], [Action::Ask(_)]), "{actions:?}");
        assert!(harness.machine.is_reading(), "reading goes on");
        assert_eq!(harness.tick(), [], "one question at a time");
        let anchor = harness.snapshot().last_record.unwrap();
        let actions = harness.verdict(CheckOutcome::Current {
            anchor: Some(anchor),
        });
        assert_eq!(actions, [Action::SetAnchor(anchor)]);
        harness.later(LIMITS.verify_interval);
        assert_eq!(harness.tick(), [], "nothing counted since: no check");
        harness.read(reports(3, 5), Some(5));
        assert!(matches!(harness.tick()[..], [Action::Ask(_)]));
        assert_eq!(harness.verdict(CheckOutcome::Undecided), []);
        harness.later(LIMITS.verify_interval);
        assert!(
            matches!(harness.tick()[..], [Action::Ask(_)]),
            "not verified yet"
        );
        let actions = harness.verdict(CheckOutcome::Gone { offset: 2 });
        assert_eq!(resets(&actions), 1);
        let Action::Reset { noticed_by, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(noticed_by, "periodic check");
        assert_eq!(harness.snapshot().next_offset, 0);
    }

    #[test]
    fn a_routine_answer_under_way_comes_before_a_held_question_is_asked() {
        let mut harness = Harness::counted(3);
        harness.later(LIMITS.verify_interval);
        assert!(matches!(harness.tick()[..], [Action::Ask(_)]));
        harness.read_with([Err(PollError::NeedsCheck("unknown topic".into()))], None);
        assert_eq!(harness.tick(), [Action::AwaitVerdict]);
        // The routine answer settles nothing for the held question...
        assert_eq!(harness.verdict(CheckOutcome::Undecided), []);
        // ...which is asked next.
        let actions = harness.tick();
        assert!(matches!(
            actions[..],
            [Action::Ask(_), Action::AwaitVerdict]
        ));
    }

    #[test]
    fn a_poll_error_before_any_record_backs_off() {
        let mut harness = Harness::counted(3);
        let (actions, end) = harness.read_with([Err(PollError::Transient)], None);
        assert_eq!(end, BatchEnd::PollFailed { read_nothing: true });
        assert_eq!(actions, [Action::Pause(POLL_ERROR_BACKOFF)]);
        let polled = [Ok(report(3, 4, 1.0)), Err(PollError::Transient)];
        let (actions, end) = harness.read_with(polled, None);
        assert_eq!(
            end,
            BatchEnd::PollFailed {
                read_nothing: false
            }
        );
        assert_eq!(actions, [Action::Publish { backlog: false }]);
    }
}
