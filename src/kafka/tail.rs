//! Reading the end of a partition: its log bounds, and its records from an
//! offset to the end of the log as the broker's fetch answers tell it
//! (never as a ListOffsets request for the end does: some brokers answer
//! that one wrong, tansu 0.6 among them, while their fetch answers are
//! right). The snapshot topic's readers use it: the restore of a
//! partition, `consumer export --from-kafka` and the dashboard.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::TopicPartitionList;
use thiserror::Error;

use crate::shutdown::Shutdown;

use super::{manual_assign_config, ClientSettings, Offset, PartitionId, SetDefault};

/// One record as read: where it is, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRecord {
    pub partition: PartitionId,
    pub offset: Offset,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The record's timestamp, milliseconds since 1970, when it has one.
    pub timestamp_ms: Option<i64>,
}

/// What stopped a read.
#[derive(Debug, Error)]
pub enum TailError {
    #[error("creating a Kafka client to read {topic:?}: {source}")]
    Client { topic: String, source: KafkaError },
    #[error("asking for the offsets of {topic:?} partition {partition}: {source}")]
    Bounds {
        topic: String,
        partition: PartitionId,
        source: KafkaError,
    },
    #[error("reading {topic:?} partition {partition}: {source}")]
    Read {
        topic: String,
        partition: PartitionId,
        source: KafkaError,
    },
    #[error("reading {topic:?}: stopped")]
    Stopped { topic: String },
    #[error("reading {topic:?} partition {partition} from offset {from}: the end of the log was not reached within {} s", timeout.as_secs())]
    Timeout {
        topic: String,
        partition: PartitionId,
        from: Offset,
        timeout: Duration,
    },
}

impl TailError {
    /// The broker did not answer (unreachable, or slow past the timeout):
    /// the same read may succeed later.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            TailError::Timeout { .. } => return true,
            TailError::Bounds { source, .. } | TailError::Read { source, .. } => source,
            _ => return false,
        };
        matches!(
            source.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::NotLeaderForPartition
            )
        )
    }

    /// The topic or the partition does not exist (a snapshot topic nobody
    /// has written yet).
    pub fn is_unknown_partition(&self) -> bool {
        let source = match self {
            TailError::Bounds { source, .. } | TailError::Read { source, .. } => source,
            _ => return false,
        };
        matches!(
            source.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::UnknownPartition
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicOrPartition
            )
        )
    }
}

/// Longest a read of one partition's tail may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one request for a partition's bounds may wait before the stop
/// is looked at again.
const BOUNDS_WAIT_STEP: Duration = Duration::from_millis(500);
/// Fetch wait of a tail reader: the records are there (see
/// [`super::BACKLOG_FETCH_WAIT_MS`]), and the end of the log comes back as
/// an answer without records.
const TAIL_FETCH_WAIT_MS: &str = "5";

/// A client that reads partitions' tails; one per reader thread.
pub struct TailReader {
    consumer: BaseConsumer,
    topic: String,
    /// Ends a wait for the broker early (a partition stopped while it
    /// starts); None: only the timeouts do.
    stop: Option<Shutdown>,
}

impl TailReader {
    /// A reader of `topic`, in consumer group `group` (for ACLs: it joins
    /// no group and commits nothing).
    pub fn new(settings: &ClientSettings, group: &str, topic: &str) -> Result<Self, TailError> {
        let consumer: BaseConsumer = manual_assign_config(settings, group)
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", TAIL_FETCH_WAIT_MS)
            .set_default("fetch.max.bytes", "8388608")
            .create()
            .map_err(|source| TailError::Client {
                topic: topic.to_string(),
                source,
            })?;
        Ok(TailReader {
            consumer,
            topic: topic.to_string(),
            stop: None,
        })
    }

    /// Makes the reads that follow end with [`TailError::Stopped`] soon
    /// after `stop` is requested, instead of waiting out their timeouts.
    pub fn stop_on(&mut self, stop: Option<Shutdown>) {
        self.stop = stop;
    }

    fn stopped(&self) -> Result<(), TailError> {
        match &self.stop {
            Some(stop) if stop.requested() => Err(TailError::Stopped {
                topic: self.topic.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition's log start and end offsets, as the broker lists
    /// them (the end may be wrong on some brokers: it is only where a read
    /// starts, and a read goes to the end its fetches report).
    pub fn bounds(&self, partition: PartitionId) -> Result<(Offset, Offset), TailError> {
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            self.stopped()?;
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(BOUNDS_WAIT_STEP);
            match self.consumer.fetch_watermarks(&self.topic, partition, wait) {
                Err(source)
                    if source.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut)
                        && Instant::now() < deadline => {}
                result => {
                    return result.map_err(|source| TailError::Bounds {
                        topic: self.topic.clone(),
                        partition,
                        source,
                    })
                }
            }
        }
    }

    /// Every record of `partition` from `from` to the end of the log. An
    /// offset past the end (a wrong listed end) reads nothing.
    pub fn read_to_end(
        &self,
        partition: PartitionId,
        from: Offset,
    ) -> Result<Vec<TailRecord>, TailError> {
        self.read(partition, from, usize::MAX)
    }

    /// The first record of `partition` at `offset` or after it; None at
    /// the end of the log.
    pub fn read_one(
        &self,
        partition: PartitionId,
        offset: Offset,
    ) -> Result<Option<TailRecord>, TailError> {
        Ok(self.read(partition, offset, 1)?.into_iter().next())
    }

    /// At most `limit` records of `partition` from `from`, up to the end.
    fn read(
        &self,
        partition: PartitionId,
        from: Offset,
        limit: usize,
    ) -> Result<Vec<TailRecord>, TailError> {
        self.assign(&[(partition, from)])?;
        let mut records = Vec::new();
        let deadline = Instant::now() + READ_TIMEOUT;
        while records.len() < limit {
            self.stopped()?;
            if Instant::now() >= deadline {
                return Err(TailError::Timeout {
                    topic: self.topic.clone(),
                    partition,
                    from,
                    timeout: READ_TIMEOUT,
                });
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) if message.offset() >= from => {
                    records.push(record_of(&message));
                }
                Some(Ok(_)) | None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                ))) => break,
                // librdkafka reconnects by itself; the deadline decides.
                // (The client queues one such error per failed attempt:
                // ending the read at each would take them one read apiece.)
                Some(Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure,
                ))) => {}
                Some(Err(source)) => {
                    return Err(TailError::Read {
                        topic: self.topic.clone(),
                        partition,
                        source,
                    })
                }
            }
        }
        Ok(records)
    }

    /// Reads `partitions` from their offsets on and keeps reading: the
    /// records come through [`TailReader::poll`].
    pub fn follow(&self, from: &[(PartitionId, Offset)]) -> Result<(), TailError> {
        self.assign(from)
    }

    /// The next record of a followed partition, waiting at most `timeout`;
    /// None when none came (the end of a partition is not an error).
    pub fn poll(&self, timeout: Duration) -> Result<Option<TailRecord>, TailError> {
        match self.consumer.poll(timeout) {
            Some(Ok(message)) => Ok(Some(record_of(&message))),
            Some(Err(KafkaError::PartitionEOF(_))) | None => Ok(None),
            Some(Err(source)) => Err(TailError::Read {
                topic: self.topic.clone(),
                partition: -1,
                source,
            }),
        }
    }

    fn assign(&self, from: &[(PartitionId, Offset)]) -> Result<(), TailError> {
        let mut list = TopicPartitionList::new();
        let failed = |partition, source| TailError::Read {
            topic: self.topic.clone(),
            partition,
            source,
        };
        for (partition, offset) in from {
            list.add_partition_offset(&self.topic, *partition, rdkafka::Offset::Offset(*offset))
                .map_err(|e| failed(*partition, e))?;
        }
        self.consumer.assign(&list).map_err(|e| failed(-1, e))
    }
}

fn record_of(message: &rdkafka::message::BorrowedMessage<'_>) -> TailRecord {
    TailRecord {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        timestamp_ms: message.timestamp().to_millis(),
    }
}
