//! The re-creation check: whether the records a partition's state was
//! built from are still in the topic, or the topic was deleted and
//! re-created under it. [`RecordProbe`] reads single records by offset with
//! a client of its own; the [`Rechecker`] thread (`recheck-N`) answers the
//! worker's [`CheckRequest`]s with it, so that routine checks never pause
//! consumption. (`consumer verify`, which recounts a partition, is
//! `crate::commands::verify`.)

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use crossbeam_channel::Sender;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;

use super::clients::{needs_verification, Client, ClientObserver, CLIENT_STATS_INTERVAL_MS};
use super::machine::{CheckOutcome, CheckRequest, READ_BACK_STEPS};
use super::ConsumerConfig;
use crate::kafka::{assign, manual_assign_config, Offset, PartitionId};
use crate::publish::health::Beat;
use crate::shutdown::Shutdown;
use crate::store::snapshot::Fingerprint;

/// Longest one poll of a probe waits: how soon shutdown ends a probe.
const PROBE_POLL_WAIT: Duration = Duration::from_millis(100);
/// Longest a metadata request of the probe waits.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a deleted topic is looked for again while waiting for it.
const ABSENT_TOPIC_RECHECK: Duration = Duration::from_millis(500);

/// What the topic holds at one offset.
#[derive(Debug, PartialEq)]
enum AtOffset {
    Found(Fingerprint),
    /// The log does not hold this offset (any more).
    Missing,
    /// The topic or partition is not listed: deleted, not yet re-created.
    Absent,
    /// No answer in time.
    Unknown,
}

/// Longest one forward read of a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// Silence after records that ends a read without an answer.
const PROBE_QUIET: Duration = Duration::from_secs(2);

/// Reads single records by offset, for verification.
pub(super) struct RecordProbe {
    consumer: Client,
    topic: String,
    partition: PartitionId,
    /// Probes end early on shutdown, so the worker can join its rechecker.
    shutdown: Shutdown,
    /// The heartbeat of the thread that probes (`/healthz`), when it has
    /// one: each read is a step of its own, bounded by [`PROBE_TIMEOUT`].
    beat: Option<Beat>,
}

impl RecordProbe {
    pub(super) fn new(
        config: &ConsumerConfig,
        partition: PartitionId,
        context: ClientObserver,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let topic = config.topic.as_str();
        let consumer = manual_assign_config(&config.client, &config.group_id)
            .set("enable.partition.eof", "true")
            // A probe reads records that exist and then the end of the log:
            // a short wait ends it promptly on brokers that hold an empty
            // fetch for the whole wait (tansu), and costs nothing on Kafka.
            .set("fetch.wait.max.ms", "20")
            // It reads one record at a time: keep its buffers small.
            .set("queued.min.messages", "1000")
            .set("queued.max.messages.kbytes", "256")
            .set("max.partition.fetch.bytes", "65536")
            .set("fetch.max.bytes", "65536")
            .set("message.max.bytes", "65536")
            .set("statistics.interval.ms", CLIENT_STATS_INTERVAL_MS)
            .create_with_context(context)
            .context("creating the verification consumer")?;
        Ok(RecordProbe {
            consumer,
            topic: topic.into(),
            partition,
            shutdown: shutdown.clone(),
            beat: None,
        })
    }

    fn with_beat(mut self, beat: Beat) -> Self {
        self.beat = Some(beat);
        self
    }

    /// A bounded step begins (a metadata request, a forward read).
    fn step(&self) {
        if let Some(beat) = &self.beat {
            beat.busy();
        }
    }

    /// The probe's thread waits for work, for as long as it takes.
    fn idle(&self) {
        if let Some(beat) = &self.beat {
            beat.waiting();
        }
    }

    /// Waits on the stop for `duration`, announced as a wait; true when the
    /// stop came.
    fn wait(&self, duration: Duration) -> bool {
        match &self.beat {
            Some(beat) => beat.wait(&self.shutdown, duration),
            None => self.shutdown.wait(duration),
        }
    }

    fn partition_listed(&self) -> anyhow::Result<Option<bool>> {
        self.step();
        // List all topics: naming the topic can make a broker auto-create it.
        let metadata = match self.consumer.fetch_metadata(None, METADATA_TIMEOUT) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        Ok(Some(metadata.topics().iter().any(|t| {
            t.name() == self.topic
                && t.error().is_none()
                && t.partitions().iter().any(|p| p.id() == self.partition)
        })))
    }

    /// What the topic holds at `offset`. "Missing" needs proof: records
    /// before the offset were read, and then the log passed the offset or
    /// ended without it. Brokers differ in where a fetch starts (Kafka: at
    /// the record; tansu's in-memory engine: at the next batch boundary), so
    /// reads start ever further back until one gives an answer.
    fn record_at(&self, offset: Offset) -> anyhow::Result<AtOffset> {
        match self.partition_listed()? {
            None => return Ok(AtOffset::Unknown),
            Some(false) => return Ok(AtOffset::Absent),
            Some(true) => {}
        }
        let mut result = AtOffset::Unknown;
        let mut tried: Vec<Offset> = Vec::new();
        for back in std::iter::once(0).chain(READ_BACK_STEPS) {
            let from = offset.saturating_sub(back).max(0);
            if tried.contains(&from) {
                continue;
            }
            tried.push(from);
            match self.read_from(from, offset)? {
                ForwardRead::Found(fp) => result = AtOffset::Found(fp),
                ForwardRead::Absent => result = AtOffset::Absent,
                ForwardRead::Passed { saw_before: true }
                | ForwardRead::Ended { saw_before: true } => result = AtOffset::Missing,
                // An empty partition, or one whose records up to here are gone.
                ForwardRead::Ended { saw_before: false }
                | ForwardRead::Passed { saw_before: false }
                    if from == 0 =>
                {
                    result = AtOffset::Missing
                }
                // The read started after the offset, or saw nothing: go back.
                ForwardRead::Passed { saw_before: false }
                | ForwardRead::Ended { saw_before: false } => continue,
                // Nothing at all: some brokers say nothing for an offset in
                // the middle of their last batch; earlier starts tell.
                ForwardRead::Stalled if from > 0 => continue,
                ForwardRead::Stalled | ForwardRead::Interrupted => result = AtOffset::Unknown,
            }
            break;
        }
        log::debug!(
            "probe of partition {} offset {offset}: {result:?}",
            self.partition
        );
        Ok(result)
    }

    /// Reads forward from `from` until the record at `offset`, a record past
    /// it, or the end of the log.
    fn read_from(&self, from: Offset, offset: Offset) -> anyhow::Result<ForwardRead> {
        self.step();
        assign(&self.consumer, &self.topic, self.partition, from).context("assigning the probe")?;
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut saw_before = false;
        let result = loop {
            // Silence is no proof that the log ends: an overloaded broker
            // goes quiet in the middle of a log too (seen with tansu under a
            // producer at full speed), and taking that for the end reset
            // partitions of a topic that was never re-created. Only the end
            // of the partition or an offset out of range prove it; silence
            // leaves the question open, to be asked again later.
            let quiet = last_progress.elapsed();
            if self.shutdown.requested() {
                break ForwardRead::Stalled;
            }
            if quiet >= PROBE_QUIET || started.elapsed() >= PROBE_TIMEOUT {
                break if saw_before {
                    ForwardRead::Interrupted
                } else {
                    ForwardRead::Stalled
                };
            }
            match self.consumer.poll(PROBE_POLL_WAIT) {
                None => {}
                Some(Ok(message)) if message.offset() == offset => {
                    break ForwardRead::Found(Fingerprint::of(
                        offset,
                        message.key(),
                        message.payload(),
                    ))
                }
                Some(Ok(message)) if message.offset() > offset => {
                    break ForwardRead::Passed { saw_before }
                }
                Some(Ok(_)) => {
                    saw_before = true;
                    last_progress = Instant::now();
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break ForwardRead::Ended { saw_before },
                Some(Err(e)) if needs_verification(&e) => {
                    break match e.rdkafka_error_code() {
                        Some(
                            RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                        ) => ForwardRead::Ended { saw_before },
                        _ => ForwardRead::Absent,
                    }
                }
                Some(Err(e)) => {
                    log::debug!("probe of partition {} offset {offset}: {e}", self.partition)
                }
            }
        };
        self.consumer.unassign().context("unassigning the probe")?;
        Ok(result)
    }
}

/// What one forward read from some offset showed.
#[derive(Debug)]
enum ForwardRead {
    Found(Fingerprint),
    /// A record past the offset came before the offset did.
    Passed {
        saw_before: bool,
    },
    /// The log ended (end of partition, or out of range).
    Ended {
        saw_before: bool,
    },
    /// The topic or partition is not there.
    Absent,
    /// Nothing at all arrived for a while.
    Stalled,
    /// Records before the offset came, then nothing for a while.
    Interrupted,
}

/// Probes the topic for a request's records; waits while the topic is
/// absent (deleted, not yet re-created), until the probe's stop.
pub(super) fn check_records(
    probe: &RecordProbe,
    request: &CheckRequest,
) -> anyhow::Result<CheckOutcome> {
    let mut told_absent = false;
    let mut probe_until_settled = |offset: Offset| -> anyhow::Result<Option<AtOffset>> {
        loop {
            match probe.record_at(offset)? {
                AtOffset::Absent => {
                    if !told_absent {
                        log::warn!(
                            "partition {}: topic {:?} is not there (deleted?); waiting for it",
                            probe.partition,
                            probe.topic
                        );
                        told_absent = true;
                    }
                    if probe.wait(ABSENT_TOPIC_RECHECK) {
                        return Ok(None);
                    }
                }
                AtOffset::Unknown => return Ok(None),
                settled => return Ok(Some(settled)),
            }
        }
    };
    if request.expected.is_empty() {
        return Ok(match probe_until_settled(request.adopt_offset)? {
            Some(AtOffset::Found(fp)) => CheckOutcome::Current { anchor: Some(fp) },
            Some(_) => CheckOutcome::Gone {
                offset: request.adopt_offset,
            },
            None => CheckOutcome::Undecided,
        });
    }
    for expected in &request.expected {
        match probe_until_settled(expected.offset)? {
            Some(AtOffset::Found(fp)) if fp == *expected => {}
            Some(_) => {
                return Ok(CheckOutcome::Gone {
                    offset: expected.offset,
                })
            }
            None => return Ok(CheckOutcome::Undecided),
        }
    }
    Ok(CheckOutcome::Current {
        anchor: request.last_record,
    })
}

/// A partition's re-check thread (`recheck-N`): answers check requests with
/// its own Kafka client, so that routine checks never pause consumption.
pub(super) struct Rechecker {
    requests: Option<Sender<CheckRequest>>,
    answers: crossbeam_channel::Receiver<anyhow::Result<CheckOutcome>>,
    thread: Option<JoinHandle<()>>,
}

impl Rechecker {
    /// `beat` is the thread's heartbeat (`/healthz`): busy while it
    /// probes, waiting between requests and while the topic is absent.
    pub(super) fn spawn(
        config: &ConsumerConfig,
        partition: PartitionId,
        context: ClientObserver,
        shutdown: &Shutdown,
        beat: Beat,
    ) -> anyhow::Result<Self> {
        let probe = RecordProbe::new(config, partition, context, shutdown)?;
        let (requests, inbox) = crossbeam_channel::bounded::<CheckRequest>(1);
        let (outbox, answers) = crossbeam_channel::bounded(1);
        let thread = crate::shutdown::spawn(format!("recheck-{partition}"), move || {
            let probe = probe.with_beat(beat);
            probe.idle();
            while let Ok(request) = inbox.recv() {
                probe.step();
                let outcome = check_records(&probe, &request);
                // Handing the answer over (the worker takes it when it
                // looks) and the next request are waits.
                probe.idle();
                if outbox.send(outcome).is_err() {
                    break;
                }
            }
        })
        .context("starting a rechecker thread")?;
        Ok(Rechecker {
            requests: Some(requests),
            answers,
            thread: Some(thread),
        })
    }

    pub(super) fn ask(&self, request: CheckRequest) -> anyhow::Result<()> {
        self.requests
            .as_ref()
            .and_then(|r| r.send(request).ok())
            .ok_or_else(|| anyhow!("the rechecker thread stopped"))
    }

    /// The answer, if one is ready.
    pub(super) fn poll(&self) -> Option<anyhow::Result<CheckOutcome>> {
        self.answers.try_recv().ok()
    }

    /// Waits for the answer; None if the thread is gone.
    pub(super) fn wait(&self) -> Option<anyhow::Result<CheckOutcome>> {
        self.answers.recv().ok()
    }
}

impl Drop for Rechecker {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
