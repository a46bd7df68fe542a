//! Read-only probes of what a command will need of the brokers, for the
//! preflight (`consumer check`, `producer check`): the topic's partitions,
//! Describe and Read on it, and Describe on the group. Each probe only
//! asks: it lists offsets, reads a record (never commits its offset), and
//! fetches the group's committed offsets. Nothing is created, written,
//! joined or committed, so a probe changes nothing on the cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;

use super::{assign, manual_assign_config, ClientSettings, Offset, PartitionId};

/// Longest one probe request may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the probes found, or why one failed (librdkafka's words: an
/// authorization failure names itself).
pub(crate) type Probe<T> = Result<T, String>;

fn probe_client(settings: &ClientSettings, group: &str) -> Probe<BaseConsumer> {
    manual_assign_config(settings, group)
        .create()
        .map_err(|error: KafkaError| format!("cannot create a client: {error}"))
}

/// Each partition's log start and end (ListOffsets: Describe on the
/// topic).
pub(crate) fn watermarks(
    settings: &ClientSettings,
    group: &str,
    topic: &str,
    partitions: &[PartitionId],
) -> Probe<BTreeMap<PartitionId, (Offset, Offset)>> {
    let client = probe_client(settings, group)?;
    partitions
        .iter()
        .map(|&partition| {
            client
                .fetch_watermarks(topic, partition, PROBE_TIMEOUT)
                .map(|range| (partition, range))
                .map_err(|error| format!("listing the offsets of partition {partition}: {error}"))
        })
        .collect()
}

/// Reads the first record of `partition` from `offset` (Fetch: Read on
/// the topic); its offset. The record is only looked at.
pub(crate) fn read_one(
    settings: &ClientSettings,
    group: &str,
    topic: &str,
    partition: PartitionId,
    offset: Offset,
) -> Probe<Offset> {
    let client = probe_client(settings, group)?;
    assign(&client, topic, partition, offset)
        .map_err(|error| format!("assigning partition {partition}: {error}"))?;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match client.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => return Ok(message.offset()),
            Some(Err(error)) => {
                return Err(format!(
                    "reading partition {partition} at offset {offset}: {error}"
                ))
            }
            None => {}
        }
    }
    Err(format!(
        "reading partition {partition} at offset {offset}: no record within {} s",
        PROBE_TIMEOUT.as_secs()
    ))
}

/// The offsets `group` has committed for `partitions` of `topic`
/// (OffsetFetch: Describe on the group); how many have one.
pub(crate) fn committed_offsets(
    settings: &ClientSettings,
    group: &str,
    topic: &str,
    partitions: &[PartitionId],
) -> Probe<usize> {
    let client = probe_client(settings, group)?;
    let mut list = TopicPartitionList::new();
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    let committed = client
        .committed_offsets(list, PROBE_TIMEOUT)
        .map_err(|error| format!("fetching the offsets of group {group:?}: {error}"))?;
    let mut with_offset = 0;
    for element in committed.elements() {
        if let Err(error) = element.error() {
            return Err(format!(
                "fetching the offsets of group {group:?}, partition {}: {error}",
                element.partition()
            ));
        }
        if matches!(element.offset(), rdkafka::Offset::Offset(_)) {
            with_offset += 1;
        }
    }
    Ok(with_offset)
}
