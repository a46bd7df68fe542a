//! `demo`: the whole pipeline in one process, for a first look. By default
//! the broker is embedded (librdkafka's MockCluster: in memory, gone when
//! the process ends); the producer, the partition workers and the exporter
//! are the same library code the binaries run. A second run continues from
//! the state the first left: the embedded topic starts empty each time, so
//! the demo replays the same seeded history (the records, and so the
//! consumer's fingerprints, are identical) and then goes on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use serde::{Deserialize, Serialize};

use crate::commands::dashboard;
use crate::consumer::{self, ConsumerConfig};
use crate::kafka::{ClientSettings, DEFAULT_TOPIC};
use crate::model::report::month_name;
use crate::producer::{self, ProducerConfig, TopicStart};
use crate::publish::chart;
use crate::shutdown::Shutdown;
use crate::store::atomic_file;
use crate::store::changelog;
use crate::store::folders::{self, partition_files};
use crate::store::published::parse_partition_json;
use crate::web::WebConfig;

/// Seed used unless `--seed` is given, so demo runs are reproducible.
pub(crate) const DEFAULT_SEED: u64 = 1990;
/// Partitions of the demo topic, as in the assignment.
const PARTITIONS: i32 = 4;
/// The pace of `--follow` after the first `--days`: one day per 0.1 s.
const FOLLOW_DELAY: Duration = Duration::from_millis(100);
/// The embedded broker (librdkafka's mock cluster) holds a fetch that finds
/// nothing for the whole wait, like tansu: a short wait keeps `--follow`
/// live. Against a real Kafka (`--bootstrap-servers`) the default applies.
const EMBEDDED_FETCH_WAIT_MS: u64 = 5;
/// A status line this often while the demo runs.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What `demo` is asked to do.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// An external broker and its client settings; None: the embedded one.
    pub client: Option<ClientSettings>,
    pub files_dir: PathBuf,
    pub days: u64,
    pub delay: Duration,
    pub follow: bool,
    pub fresh: bool,
    pub seed: Option<u64>,
    /// Serve the consumer's metrics here; None: off.
    pub metrics_addr: Option<String>,
    /// Serve the dashboard here, and keep serving after the demo's days
    /// until Ctrl-C; None: off.
    pub dashboard: Option<String>,
    /// TLS and basic auth of the dashboard and the metrics; None: plain.
    pub web: Option<Arc<WebConfig>>,
}

/// librdkafka's in-process mock broker, owned by an idle client of ours so
/// that its logging follows our settings.
struct EmbeddedBroker {
    holder: BaseProducer,
}

impl EmbeddedBroker {
    fn start() -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        config.set("test.mock.num.brokers", "1");
        if !log::log_enabled!(target: "librdkafka", log::Level::Error) {
            // Both: the property silences what librdkafka logs while the
            // client is created, the level what it logs afterwards.
            config
                .set("log_level", "0")
                .set_log_level(RDKafkaLogLevel::Emerg);
        }
        let holder: BaseProducer = config.create().context("starting the embedded broker")?;
        let this = EmbeddedBroker { holder };
        this.cluster()?
            .create_topic(DEFAULT_TOPIC, PARTITIONS, 1)
            .context("creating the demo topic")?;
        // The mock cluster does not answer a CreateTopics with topic
        // configs: its snapshot topic is made here, as its topic is.
        this.cluster()?
            .create_topic(&changelog::default_topic(DEFAULT_TOPIC), PARTITIONS, 1)
            .context("creating the demo's snapshot topic")?;
        Ok(this)
    }

    fn cluster(&self) -> anyhow::Result<MockCluster<'_, DefaultProducerContext>> {
        self.holder
            .client()
            .mock_cluster()
            .ok_or_else(|| anyhow!("librdkafka did not start its mock cluster"))
    }

    fn bootstrap_servers(&self) -> anyhow::Result<String> {
        Ok(self.cluster()?.bootstrap_servers())
    }
}

/// What earlier demo runs produced: enough to continue the same stream.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DemoRecord {
    seed: u64,
    days: u64,
}

fn record_path(files_dir: &Path) -> PathBuf {
    files_dir.join("demo.json")
}

fn read_record(files_dir: &Path) -> anyhow::Result<Option<DemoRecord>> {
    let path = record_path(files_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).with_context(|| {
            format!(
                "{} is not a demo record; use --fresh to start over",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Removes what earlier runs left: state, partition files, chart, record.
fn clear(files_dir: &Path) -> anyhow::Result<()> {
    let state = files_dir.join("state");
    if state.exists() {
        std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let mut leftovers: Vec<PathBuf> = partition_files(files_dir)?
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    leftovers.push(folders::chart_file(files_dir));
    leftovers.push(record_path(files_dir));
    for path in leftovers {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// Days counted so far across every partition file (each day once: this is
/// the exactly-once check a user can see).
fn days_published(files_dir: &Path) -> (u64, i64) {
    let mut days = 0;
    let mut offsets = 0;
    for (_, path) in partition_files(files_dir).unwrap_or_default() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(partition) = parse_partition_json(&text) else {
            continue;
        };
        days += partition.aggregates.values().map(|s| s.count).sum::<u64>();
        offsets += partition.offset;
    }
    (days, offsets)
}

/// Runs the demo until its days are published (or Ctrl-C with --follow).
pub fn run(config: &DemoConfig, shutdown: &Shutdown) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.files_dir)
        .with_context(|| format!("creating {}", config.files_dir.display()))?;
    if config.fresh {
        clear(&config.files_dir)?;
    }
    let previous = read_record(&config.files_dir)?.unwrap_or_default();
    if previous.days > 0 && config.seed.is_some_and(|s| s != previous.seed) {
        return Err(anyhow!(
            "the state in {} was made with --seed {}; use that seed, or --fresh",
            config.files_dir.display(),
            previous.seed
        ));
    }
    let seed = config.seed.unwrap_or(if previous.days > 0 {
        previous.seed
    } else {
        DEFAULT_SEED
    });

    let dashboard = match &config.dashboard {
        Some(listen) => {
            let server = dashboard::start(&config.files_dir, listen, config.web.clone())?;
            println!("demo: dashboard at {}/", server.url());
            Some(server)
        }
        None => None,
    };
    // Kept alive for the whole run: dropping it stops the embedded broker.
    let mut embedded = None;
    let client = match &config.client {
        Some(client) => client.clone(),
        None => {
            let broker = EmbeddedBroker::start()?;
            let servers = broker.bootstrap_servers()?;
            log::info!(
                "embedded in-memory Kafka broker (librdkafka MockCluster) at {servers}; its data lives only as long as this process"
            );
            embedded = Some(broker);
            ClientSettings::plaintext(servers)
        }
    };
    // The embedded topic is empty: replay the earlier days (same seed, same
    // records) so the stored offsets mean the same. An external topic still
    // holds them: continue after them.
    let replay = embedded.is_some() || previous.days == 0;
    let target_days = previous.days + config.days;
    let producer_config = ProducerConfig {
        client: client.clone(),
        topic: DEFAULT_TOPIC.into(),
        partitions: PARTITIONS,
        replication_factor: 1,
        delay: config.delay,
        days: Some(target_days),
        seed: Some(seed),
        start: if embedded.is_none() && previous.days == 0 {
            TopicStart::Recreate
        } else {
            TopicStart::FromDay(if replay { 0 } else { previous.days })
        },
        print_topics: false,
    };
    let defaults = ConsumerConfig::new(
        client,
        DEFAULT_TOPIC,
        config.files_dir.clone(),
        config.files_dir.join("state"),
        (0..PARTITIONS).collect(),
    );
    let consumer_config = ConsumerConfig {
        progress_interval: None,
        metrics_addr: config.metrics_addr.clone(),
        web: config.web.clone(),
        fetch_wait_ms: match embedded {
            Some(_) => EMBEDDED_FETCH_WAIT_MS,
            None => defaults.fetch_wait_ms,
        },
        ..defaults
    };
    println!(
        "demo: {} days from 1990-01-01 (seed {seed}){}; files in {}",
        target_days,
        if previous.days > 0 {
            format!(", continuing after {} days", previous.days)
        } else {
            String::new()
        },
        config.files_dir.display()
    );

    let stop_consumer = Shutdown::new();
    let consumer_thread = {
        let (config, stop) = (consumer_config.clone(), stop_consumer.clone());
        crate::shutdown::spawn("consumer", move || consumer::run(&config, &stop))?
    };
    let producer_thread = {
        let (config, stop, follow) = (producer_config.clone(), shutdown.clone(), config.follow);
        crate::shutdown::spawn("producer", move || -> anyhow::Result<u64> {
            let summary = producer::run(&config, &stop)?;
            if !follow || stop.requested() {
                return Ok(summary.days);
            }
            log::info!("following at one day per {:?} until Ctrl-C", FOLLOW_DELAY);
            let more = ProducerConfig {
                delay: FOLLOW_DELAY,
                days: None,
                start: TopicStart::FromDay(summary.days),
                ..config
            };
            Ok(producer::run(&more, &stop)?.days)
        })?
    };

    let started = Instant::now();
    let mut producer_thread = Some(producer_thread);
    let mut last = (Instant::now(), days_published(&config.files_dir).1);
    let mut produced_days = None;
    let result = loop {
        shutdown.wait(STATUS_INTERVAL);
        if consumer_thread.is_finished() {
            break Err(anyhow!("the consumer stopped"));
        }
        if let Some(thread) = producer_thread.take_if(|t| t.is_finished()) {
            let days = match thread.join() {
                Ok(Ok(days)) => days,
                Ok(Err(e)) => break Err(e.context("the producer failed")),
                Err(_) => break Err(anyhow!("the producer panicked")),
            };
            if let Err(e) = record(&config.files_dir, seed, days) {
                break Err(e);
            }
            produced_days = Some(days);
        }
        let (days, offsets) = days_published(&config.files_dir);
        let rate = (offsets - last.1).max(0) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
        last = (Instant::now(), offsets);
        println!(
            "demo: {days} days published ({offsets} reports read, {rate:.0} reports/s, {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        match produced_days {
            Some(total) if days >= total => break Ok(()),
            Some(_) if shutdown.requested() => break Ok(()),
            _ => {}
        }
    };
    stop_consumer.request();
    let consumed = consumer_thread
        .join()
        .map_err(|_| anyhow!("consumer panicked"))?;
    drop(embedded);
    result?;
    consumed?;
    summarize(&config.files_dir)?;
    if let Some(server) = dashboard {
        log::info!(
            "the dashboard keeps serving at http://{}/ until Ctrl-C",
            server.address()
        );
        while !shutdown.wait(STATUS_INTERVAL) {}
    }
    Ok(())
}

fn record(files_dir: &Path, seed: u64, days: u64) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&DemoRecord { seed, days })?;
    atomic_file::write(&record_path(files_dir), text.as_bytes())
        .with_context(|| format!("writing {}", record_path(files_dir).display()))
}

fn summarize(files_dir: &Path) -> anyhow::Result<()> {
    println!("demo: done. The dashboard's files:");
    for (_, path) in partition_files(files_dir)? {
        let text = std::fs::read_to_string(&path)?;
        let p = parse_partition_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let days: u64 = p.aggregates.values().map(|s| s.count).sum();
        let mut months: Vec<&str> = p.aggregates.keys().map(|k| month_name(k.month)).collect();
        months.dedup();
        let detail = if months.is_empty() {
            "no data yet".to_string()
        } else {
            format!(
                "{days} days in {} month/years ({})",
                p.aggregates.len(),
                months.join(", ")
            )
        };
        println!("  {}: offset {}, {detail}", path.display(), p.offset);
    }
    let report = chart::render_files(files_dir)?;
    let bars: Vec<String> = report.bars.iter().map(|b| b.to_string()).collect();
    println!("  {}: {}", report.path.display(), bars.join(", "));
    Ok(())
}
