//! The producer: (re-)creates the topic, then sends the weather model's
//! reports, keyed by month name, with the settings that make "exactly once"
//! possible downstream: acks=all and up to 10 retries (nothing lost),
//! idempotence (a retry never reorders, which the consumer's date rule
//! would otherwise turn into a lost report), and murmur2 partitioning (the
//! same month-to-partition placement as the Java client and kafka-python).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::NaiveDate;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::generator::WeatherGenerator;
use crate::kafka::{client_config, TopicAdmin};
use crate::report;
use crate::shutdown::Shutdown;

/// What `producer` is asked to do.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Pause between two reports (duplicates included).
    pub delay: Duration,
    /// Stop after this many distinct days; None: run until shut down.
    pub days: Option<u64>,
    pub seed: Option<u64>,
    /// Delete and re-create the topic first (the assignment's behaviour).
    pub recreate_topic: bool,
    /// Advance the generator by this many days without sending (continue a
    /// seeded stream where an earlier run stopped).
    pub skip_days: u64,
    /// Print the topic list on stdout at start-up, as the assignment does.
    pub print_topics: bool,
}

/// Counts of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerSummary {
    pub days: u64,
    pub sent: u64,
    pub delivered: u64,
    pub failed: u64,
}

/// Delivery outcomes, shared between librdkafka's callback thread and the
/// sending loop.
#[derive(Default)]
pub struct DeliveryCounters {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

struct DeliveryReporter {
    counters: Arc<DeliveryCounters>,
}

impl ClientContext for DeliveryReporter {}

impl ProducerContext for DeliveryReporter {
    // No per-message opaque: a failed report's date is read back from its
    // payload, which saves an allocation per report.
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, message)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                let date = message
                    .payload()
                    .and_then(|p| report::decode(p).ok())
                    .map_or_else(
                        || "an undecodable report".to_string(),
                        |r| format!("report for {}", r.date),
                    );
                eprintln!("producer: {date} was not delivered: {error}");
            }
        }
    }
}

/// The production settings for reports sent `delay` apart: see the module
/// comment for why each is there.
pub fn production_settings(config: &mut ClientConfig, delay: Duration) -> &mut ClientConfig {
    config
        .set("acks", "all")
        .set("message.send.max.retries", "10")
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger_ms(delay))
}

/// How long librdkafka holds a report to batch it with later ones: at full
/// speed, 5 ms fills batches; a paced report has nothing to wait for, and
/// lingering would only make it 5 ms staler on the dashboard.
fn linger_ms(delay: Duration) -> &'static str {
    if delay.is_zero() {
        "5"
    } else {
        "0"
    }
}

/// Sends reports to an existing topic until `days` are sent or shutdown.
pub struct ReportSender {
    producer: ThreadedProducer<DeliveryReporter>,
    counters: Arc<DeliveryCounters>,
    topic: String,
    encoder: report::Encoder,
}

impl ReportSender {
    /// A sender for reports sent `delay` apart (zero: as fast as possible).
    pub fn new(bootstrap_servers: &str, topic: &str, delay: Duration) -> anyhow::Result<Self> {
        let counters = Arc::new(DeliveryCounters::default());
        let producer = production_settings(&mut client_config(bootstrap_servers), delay)
            .create_with_context(DeliveryReporter {
                counters: counters.clone(),
            })
            .context("creating the Kafka producer")?;
        Ok(ReportSender {
            producer,
            counters,
            topic: topic.to_string(),
            encoder: report::Encoder::default(),
        })
    }

    /// Queues one report, waiting while librdkafka's queue is full.
    pub fn send(&mut self, date: NaiveDate, degrees: f64) -> anyhow::Result<()> {
        let key = report::key_for(date);
        // librdkafka copies the value: one buffer serves every report.
        let value = self.encoder.encode(date, degrees);
        let mut record = BaseRecord::to(&self.topic).key(key).payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The queue drains on its own; a report is never dropped,
                    // even during shutdown. At full speed this is hit all
                    // the time: a longer nap leaves the connection idle.
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(error).context(format!("sending report for {date}")),
            }
        }
    }

    /// Waits for every queued report to be acknowledged or to fail.
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        self.producer
            .flush(timeout)
            .with_context(|| format!("reports still unacknowledged after {}s", timeout.as_secs()))
    }
}

/// Runs the producer until `--days` are delivered or shutdown is requested.
pub fn run(config: &ProducerConfig, shutdown: &Shutdown) -> anyhow::Result<ProducerSummary> {
    let admin = TopicAdmin::connect(&config.bootstrap_servers)?;
    if config.recreate_topic {
        admin.recreate_topic(&config.topic, config.partitions, config.replication_factor)?;
    } else if admin.partition_count(&config.topic)?.is_none() {
        admin.create_topic(&config.topic, config.partitions, config.replication_factor)?;
    }
    if config.print_topics {
        let topics = admin.topics()?;
        println!("Topics: {:?}", topics.keys().collect::<Vec<_>>());
    }
    drop(admin);

    let mut sender = ReportSender::new(&config.bootstrap_servers, &config.topic, config.delay)?;
    let mut generator = WeatherGenerator::new(config.seed);
    while generator.days_generated() < config.skip_days {
        generator.next();
    }
    let mut sent = 0u64;
    let mut next_due = Instant::now();
    let mut last_progress = Instant::now();
    while !shutdown.requested() {
        if config
            .days
            .is_some_and(|days| generator.days_generated() >= days)
        {
            break;
        }
        let Some(obs) = generator.next() else { break };
        sender.send(obs.date, obs.degrees)?;
        sent += 1;
        if sent % 1024 == 0 && last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            log::info!(
                "sent {sent} reports ({} days, up to {})",
                generator.days_generated(),
                obs.date
            );
        }
        if !config.delay.is_zero() {
            next_due += config.delay;
            let now = Instant::now();
            if next_due > now {
                shutdown.wait(next_due - now);
            } else {
                next_due = now;
            }
        }
    }
    sender.flush(Duration::from_secs(30))?;
    let summary = ProducerSummary {
        days: generator.days_generated(),
        sent,
        delivered: sender.counters.delivered.load(Ordering::Relaxed),
        failed: sender.counters.failed.load(Ordering::Relaxed),
    };
    log::info!(
        "done: {} days, {} reports sent, {} delivered, {} failed",
        summary.days,
        summary.sent,
        summary.delivered,
        summary.failed
    );
    if summary.failed > 0 {
        bail!(
            "{} of {} reports were not delivered",
            summary.failed,
            summary.sent
        );
    }
    Ok(summary)
}
