//! Where `producer --keep-topic` resumes a stream that a topic already
//! holds. It reads the newest report of each partition and finds the first
//! day that is not in the topic: within a partition dates only grow (an
//! idempotent producer, one partition per month), so day x is in the topic
//! exactly when x is not after the newest date of x's partition. Sending
//! from there leaves no gap; the days after it that did reach the topic
//! are sent again, and consumers drop them by the date rule.
//!
//! Which partition holds a month is the producer's own placement: Kafka's
//! murmur2 of the month name, as the Java client and librdkafka's
//! `murmur2_random` compute it, so it is known even for months the topic
//! does not hold yet.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{Days, NaiveDate};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;

use crate::kafka::{
    assign, reading_config, ClientSettings, Offset, PartitionId, BACKLOG_FETCH_WAIT_MS,
};
use crate::model::generator::first_date;
use crate::model::report::{key_for, Validator};

/// The consumer group of the resume reader (joined by no one: manual
/// assignment) unless the producer's settings name one (`-X group.id`,
/// for a group ACL).
const RESUME_GROUP: &str = "weatherstream-producer";
/// Records read back from the end of a partition at first, for its newest
/// report; the window grows by [`WINDOW_GROWTH`] while it holds none
/// (records of other writers at the end of the log).
const FIRST_WINDOW: Offset = 64;
const WINDOW_GROWTH: Offset = 16;
/// Longest wait for the records of one window.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition the producer's partitioner puts `key` in.
pub fn partition_for(key: &[u8], partitions: usize) -> PartitionId {
    let positive = murmur2(key) & 0x7fff_ffff;
    (positive as usize % partitions.max(1)) as PartitionId
}

/// The date of day `day` of the stream (day 0 is 1990-01-01).
fn date_of(day: u64) -> Option<NaiveDate> {
    first_date().checked_add_days(Days::new(day))
}

/// Where a resumed stream starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumePoint {
    /// The newest report's date in the whole topic; None: it holds none.
    pub newest: Option<NaiveDate>,
    /// The first day (counted from 1990-01-01) that is not in the topic.
    pub first_missing_day: u64,
    /// Days after that which the topic holds, and that are sent again.
    pub resent_days: u64,
}

impl ResumePoint {
    /// From the newest date of each partition (None: no report in it).
    pub fn from_newest(newest_by_partition: &[Option<NaiveDate>]) -> Self {
        let partitions = newest_by_partition.len();
        let present = |day: u64| {
            date_of(day).is_some_and(|date| {
                let partition = partition_for(key_for(date).as_bytes(), partitions) as usize;
                newest_by_partition[partition].is_some_and(|newest| date <= newest)
            })
        };
        let newest = newest_by_partition.iter().flatten().max().copied();
        let Some(last_day) = newest.map(|date| (date - first_date()).num_days().max(0) as u64)
        else {
            return ResumePoint {
                newest,
                first_missing_day: 0,
                resent_days: 0,
            };
        };
        let first_missing_day = (0..=last_day)
            .find(|day| !present(*day))
            .unwrap_or(last_day + 1);
        let resent_days = (first_missing_day..=last_day)
            .filter(|day| present(*day))
            .count() as u64;
        ResumePoint {
            newest,
            first_missing_day,
            resent_days,
        }
    }

    /// The date of the first missing day.
    pub fn first_missing_date(&self) -> Option<NaiveDate> {
        date_of(self.first_missing_day)
    }
}

/// The newest valid report's date in each of `topic`'s `partitions`;
/// records that are not this stream's reports are passed over.
pub fn newest_dates(
    settings: &ClientSettings,
    topic: &str,
    partitions: usize,
) -> anyhow::Result<Vec<Option<NaiveDate>>> {
    let group = settings.get("group.id").unwrap_or(RESUME_GROUP);
    let consumer: BaseConsumer = reading_config(settings, group, BACKLOG_FETCH_WAIT_MS)
        .set("enable.partition.eof", "true")
        .create()
        .context("creating a Kafka consumer to read the topic's newest reports")?;
    (0..partitions as PartitionId)
        .map(|partition| {
            newest_in_partition(&consumer, topic, partition)
                .with_context(|| format!("reading the newest report of partition {partition}"))
        })
        .collect()
}

fn newest_in_partition(
    consumer: &BaseConsumer,
    topic: &str,
    partition: PartitionId,
) -> anyhow::Result<Option<NaiveDate>> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, READ_TIMEOUT)
        .context("asking for the partition's offsets")?;
    let mut window = FIRST_WINDOW;
    loop {
        let from = high.saturating_sub(window).max(low);
        if from >= high {
            return Ok(None);
        }
        let newest = newest_in_range(consumer, topic, partition, from, high)?;
        if newest.is_some() || from == low {
            return Ok(newest);
        }
        window = window.saturating_mul(WINDOW_GROWTH);
    }
}

/// The newest valid report's date among offsets `from..until`.
fn newest_in_range(
    consumer: &BaseConsumer,
    topic: &str,
    partition: PartitionId,
    from: Offset,
    until: Offset,
) -> anyhow::Result<Option<NaiveDate>> {
    assign(consumer, topic, partition, from).context("assigning the partition")?;
    let mut validator = Validator::default();
    let mut newest = None;
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        if Instant::now() >= deadline {
            bail!(
                "offsets {from} to {} were not all served within {} s",
                until - 1,
                READ_TIMEOUT.as_secs()
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                if let Ok(valid) = validator.validate(message.key(), message.payload()) {
                    newest = newest.max(Some(valid.date));
                }
                if message.offset() >= until - 1 {
                    return Ok(newest);
                }
            }
            // The log ends before `until` (retention, a compacted tail).
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(newest),
            Some(Err(error)) => return Err(error).context("reading the partition"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_kafkas() {
        // The Java client's own test vectors (UtilsTest.testMurmur2).
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, hash, "{key}");
        }
    }

    fn date(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    /// Each partition's newest date, for a stream that reached `through`
    /// in every partition but `lagging`, which reached `lagging_through`.
    fn newest(through: &str, lagging: &[(usize, &str)]) -> Vec<Option<NaiveDate>> {
        let mut newest = vec![Some(date(through)); 4];
        for (partition, at) in lagging {
            newest[*partition] = Some(date(at));
        }
        newest
    }

    #[test]
    fn an_empty_topic_resumes_at_day_0() {
        let point = ResumePoint::from_newest(&[None; 4]);
        assert_eq!(point.first_missing_day, 0);
        assert_eq!(point.newest, None);
        assert_eq!(point.resent_days, 0);
    }

    #[test]
    fn a_topic_that_holds_every_day_resumes_the_day_after_its_newest() {
        let point = ResumePoint::from_newest(&newest("1991-02-05", &[]));
        assert_eq!(point.first_missing_date(), Some(date("1991-02-06")));
        assert_eq!(point.first_missing_day, 365 + 31 + 5);
        assert_eq!(point.resent_days, 0);
    }

    #[test]
    fn a_partition_behind_the_others_sets_the_resume_point_and_what_is_sent_again() {
        // February's partition stopped at Feb 10 while March went on: the
        // stream resumes at Feb 11 and sends Mar 1..5 again.
        let february = partition_for(b"February", 4) as usize;
        let march = partition_for(b"March", 4) as usize;
        assert_ne!(february, march, "the months this test needs apart");
        let mut newest = vec![None; 4];
        newest[february] = Some(date("1990-02-10"));
        newest[march] = Some(date("1990-03-05"));
        let january = partition_for(b"January", 4) as usize;
        newest[january] = newest[january].max(Some(date("1990-01-31")));
        let point = ResumePoint::from_newest(&newest);
        assert_eq!(point.first_missing_date(), Some(date("1990-02-11")));
        assert_eq!(point.newest, Some(date("1990-03-05")));
        assert_eq!(point.resent_days, 5);
    }

    #[test]
    fn a_month_whose_partition_holds_none_of_it_is_missing() {
        // Only January reached its partition, then March's partition holds
        // a day: February is missing from its first day.
        let january = partition_for(b"January", 4) as usize;
        let february = partition_for(b"February", 4) as usize;
        let march = partition_for(b"March", 4) as usize;
        let mut newest = vec![None; 4];
        newest[january] = Some(date("1990-01-31"));
        if march != january && march != february {
            newest[march] = Some(date("1990-03-01"));
        }
        let point = ResumePoint::from_newest(&newest);
        assert_eq!(point.first_missing_date(), Some(date("1990-02-01")));
    }
}
