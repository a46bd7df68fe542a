//! The consumer's Kafka clients, and what they tell about the brokers.
//!
//! A partition is read in one of two ways ([`Reader`]):
//! - by a client of its own ([`own_client`]), created afresh at an offset
//!   whenever the partition has a backlog to catch up on or the worker
//!   reads again from an offset (after a check, a reset, a re-read): a
//!   client per partition fetches in parallel, and a fresh one carries no
//!   stale metadata or stopped fetch from a topic that was re-created;
//! - by the process's one [`SharedClient`], once it is at the end of its
//!   log. That client fetches every partition it follows in one request per
//!   broker and hands each worker its own records through librdkafka's
//!   per-partition queues, so the requests of idle and paced partitions do
//!   not grow with their number: on Apache Kafka one long-polling request
//!   per broker answered when data arrives; on tansu, which holds every
//!   fetch for the whole `fetch.wait.max.ms`, one request per wait instead
//!   of one per partition per wait.
//!
//! Every client carries an [`ClientObserver`] context: from librdkafka's
//! statistics (every second) it tells the process's [`BrokerLink`] when a
//! broker connection is up, counts the fetch requests the client sent into
//! `weatherstream_fetch_requests_total`, and keeps the count of broker
//! responses that the silence rule of the machine asks for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use prometheus::IntCounter;
use rdkafka::client::ClientContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset as KafkaOffset, TopicPartitionList};

use super::ConsumerConfig;
use crate::kafka::link::{is_outage, BrokerLink};
use crate::kafka::{
    assign, cached_high_watermark, reading_config, Offset, PartitionId, BACKLOG_FETCH_WAIT_MS,
};
use crate::log_limit::{suppressed_note, LogLimiter};
use crate::shutdown::Shutdown;

/// How often a client reports its statistics: the source of "broker
/// reachable again" for a partition that receives nothing, and of the
/// fetch request count.
pub(super) const CLIENT_STATS_INTERVAL_MS: &str = "1000";
/// How often the shared client's own queue (statistics, client-wide
/// errors) is served.
const SHARED_POLL_WAIT: Duration = Duration::from_millis(100);
/// Client-wide errors of the shared client: one line per this.
const SHARED_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The context of every client of the consumer; see the module comment.
pub(crate) struct ClientObserver {
    link: Arc<BrokerLink>,
    fetch_requests: IntCounter,
    /// Fetch requests this client had sent at its last statistics.
    fetches_seen: AtomicU64,
    /// Responses this client had received from brokers at its last
    /// statistics.
    responses_seen: AtomicU64,
}

impl ClientObserver {
    pub(crate) fn new(link: Arc<BrokerLink>, fetch_requests: IntCounter) -> Self {
        ClientObserver {
            link,
            fetch_requests,
            fetches_seen: AtomicU64::new(0),
            responses_seen: AtomicU64::new(0),
        }
    }

    /// Responses received from brokers, as of the last statistics.
    fn broker_responses(&self) -> u64 {
        self.responses_seen.load(Ordering::Relaxed)
    }
}

/// The part of librdkafka's statistics JSON read here (STATISTICS.md).
#[derive(serde::Deserialize)]
struct ClientStats {
    #[serde(default)]
    brokers: HashMap<String, BrokerStats>,
    /// When librdkafka took them: Unix seconds (0 when absent).
    #[serde(default)]
    time: i64,
}

/// Statistics taken this many seconds or more before they are read (a
/// client not polled for a while, a loaded machine) are no evidence of a
/// connection now: a broker connection that was up then may be gone.
const STALE_STATS_SECS: i64 = 3;

/// Whether statistics taken at `taken` (Unix seconds, whole) still tell
/// about the connections at `now`.
fn stats_are_current(taken: i64, now: i64) -> bool {
    taken == 0 || now - taken < STALE_STATS_SECS
}

#[derive(serde::Deserialize)]
struct BrokerStats {
    /// -1 for a bootstrap broker, which is dropped once the cluster's own
    /// brokers are known.
    nodeid: i32,
    state: String,
    /// Responses received.
    #[serde(default)]
    rx: u64,
    /// Requests sent, by request type.
    #[serde(default)]
    req: HashMap<String, u64>,
}

impl ClientContext for ClientObserver {
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<ClientStats>(statistics) else {
            log::debug!("unreadable librdkafka statistics");
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if stats_are_current(stats.time, now) {
            if stats
                .brokers
                .values()
                .any(|broker| broker.nodeid >= 0 && broker.state == "UP")
            {
                self.link.connected(stats.time);
            } else {
                self.link.not_connected(stats.time);
            }
        }
        let responses: u64 = stats.brokers.values().map(|broker| broker.rx).sum();
        self.responses_seen.fetch_max(responses, Ordering::Relaxed);
        let fetches: u64 = stats
            .brokers
            .values()
            .filter_map(|broker| broker.req.get("Fetch"))
            .sum();
        // A dropped bootstrap broker takes its count with it: never count
        // backwards.
        let seen = self.fetches_seen.fetch_max(fetches, Ordering::Relaxed);
        self.fetch_requests.inc_by(fetches.saturating_sub(seen));
    }
}

impl ConsumerContext for ClientObserver {}

pub(super) type Client = BaseConsumer<ClientObserver>;

/// Errors after which the stored offset must be checked against the topic.
/// Since librdkafka 2.5 fetches by topic id, a deleted topic can also show
/// as an unknown topic id (Apache Kafka's answer to a fetch for it).
pub(super) fn needs_verification(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopicId
        )
    )
}

/// A record batch the client cannot decode: a codec or message format
/// this build lacks, corrupt compressed data, a corrupt batch. librdkafka
/// fetches the same offset again and fails again, so the partition stops
/// there until the batch can be read; what the cause probably is, for the
/// warning.
pub(super) fn undecodable(error: &KafkaError) -> Option<&'static str> {
    match error.rdkafka_error_code()? {
        RDKafkaErrorCode::NotImplemented | RDKafkaErrorCode::UnsupportedForMessageFormat => {
            Some("a compression codec or message format this build of librdkafka cannot read")
        }
        RDKafkaErrorCode::BadCompression | RDKafkaErrorCode::UnsupportedCompressionType => {
            Some("its compressed data cannot be decompressed")
        }
        RDKafkaErrorCode::BadMessage
        | RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::InvalidRecord => Some("the batch is corrupt"),
        _ => None,
    }
}

/// One connection failed; librdkafka reconnects with backoff.
pub(super) fn is_reconnect(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure)
}

/// A client of the partition's own, reading it from `offset`. It reads a
/// backlog, so it waits at most [`BACKLOG_FETCH_WAIT_MS`] for a fetch.
pub(super) fn own_client(
    config: &ConsumerConfig,
    partition: PartitionId,
    offset: Offset,
    context: ClientObserver,
) -> anyhow::Result<Client> {
    let client: Client = reading_config(
        &config.client,
        &config.group_id,
        config.fetch_wait_ms.min(BACKLOG_FETCH_WAIT_MS),
    )
    .set("statistics.interval.ms", CLIENT_STATS_INTERVAL_MS)
    .create_with_context(context)
    .context("creating a Kafka consumer")?;
    assign(&client, &config.topic, partition, offset).context("assigning the partition")?;
    Ok(client)
}

/// The process's shared client: see the module comment. Its own queue
/// (statistics, client-wide errors) is served by thread `kafka-shared`;
/// each followed partition's records go to that partition's worker.
pub(super) struct SharedClient {
    consumer: Arc<Client>,
    topic: String,
    stop: Shutdown,
    poller: Option<JoinHandle<()>>,
}

impl SharedClient {
    pub(super) fn start(
        config: &ConsumerConfig,
        context: ClientObserver,
    ) -> anyhow::Result<Arc<Self>> {
        let consumer: Arc<Client> = Arc::new(
            reading_config(&config.client, &config.group_id, config.fetch_wait_ms)
                .set("statistics.interval.ms", CLIENT_STATS_INTERVAL_MS)
                .create_with_context(context)
                .context("creating the shared Kafka consumer")?,
        );
        let stop = Shutdown::new();
        let poller = {
            let (consumer, stop) = (consumer.clone(), stop.clone());
            crate::shutdown::spawn("kafka-shared", move || serve_own_queue(&consumer, &stop))
                .context("starting the shared client's thread")?
        };
        Ok(Arc::new(SharedClient {
            consumer,
            topic: config.topic.clone(),
            stop,
            poller: Some(poller),
        }))
    }

    /// Starts following `partition` from `offset`. Its queue is split off
    /// before the partition is assigned, so that none of its records can
    /// reach the client's own queue (librdkafka keeps a queue split by the
    /// application split across assignments).
    pub(super) fn follow(
        self: &Arc<Self>,
        partition: PartitionId,
        offset: Offset,
    ) -> anyhow::Result<SharedQueue> {
        let queue = self
            .consumer
            .split_partition_queue(&self.topic, partition)
            .ok_or_else(|| anyhow!("no queue for partition {partition}"))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, KafkaOffset::Offset(offset))?;
        self.consumer
            .incremental_assign(&list)
            .context("assigning the partition to the shared client")?;
        Ok(SharedQueue {
            queue,
            shared: self.clone(),
            partition,
        })
    }
}

impl Drop for SharedClient {
    fn drop(&mut self) {
        self.stop.request();
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}

/// Serves the shared client's own queue until `stop`: statistics arrive
/// through it, and errors that concern no one partition.
fn serve_own_queue(consumer: &Client, stop: &Shutdown) {
    let mut errors = LogLimiter::new(SHARED_ERROR_LOG_INTERVAL);
    while !stop.requested() {
        match consumer.poll(SHARED_POLL_WAIT) {
            None => {}
            // Only a queue that was not split yet can end up here; the
            // worker reads its partition from its committed offset anyway.
            Some(Ok(_)) => log::debug!("shared client: a record outside any partition queue"),
            Some(Err(error)) if is_outage(&error) => consumer.context().link.report(&error, &error),
            Some(Err(error)) if is_reconnect(&error) => log::debug!("shared client: {error}"),
            Some(Err(error)) => {
                if let Some(suppressed) = errors.allow(Instant::now()) {
                    log::warn!("shared client: {error}{}", suppressed_note(suppressed));
                }
            }
        }
    }
}

/// A partition followed by the shared client; dropping it unassigns the
/// partition there.
pub(super) struct SharedQueue {
    queue: PartitionQueue<ClientObserver>,
    shared: Arc<SharedClient>,
    partition: PartitionId,
}

impl Drop for SharedQueue {
    fn drop(&mut self) {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.shared.topic, self.partition);
        if let Err(error) = self.shared.consumer.incremental_unassign(&list) {
            log::debug!(
                "partition {}: unassigning it from the shared client: {error}",
                self.partition
            );
        }
    }
}

/// Where a worker reads its partition from: see the module comment.
pub(super) enum Reader {
    Own(Client),
    Shared(SharedQueue),
}

impl Reader {
    pub(super) fn poll(&self, timeout: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        match self {
            Reader::Own(client) => client.poll(timeout),
            Reader::Shared(followed) => followed.queue.poll(timeout),
        }
    }

    fn client(&self) -> &Client {
        match self {
            Reader::Own(client) => client,
            Reader::Shared(followed) => &followed.shared.consumer,
        }
    }

    /// The end of the partition's log, as the client last heard it.
    pub(super) fn high_watermark(&self, topic: &str, partition: PartitionId) -> Option<Offset> {
        cached_high_watermark(self.client(), topic, partition)
    }

    /// Responses the client has received from brokers (0 until its first
    /// statistics).
    pub(super) fn broker_responses(&self) -> u64 {
        self.client().context().broker_responses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_read_late_are_no_evidence_of_a_connection() {
        assert!(stats_are_current(100, 100));
        assert!(stats_are_current(100, 102));
        assert!(!stats_are_current(100, 103));
        assert!(!stats_are_current(100, 160));
        // A librdkafka without the field: as before, current.
        assert!(stats_are_current(0, 1_700_000_000));
    }
}
