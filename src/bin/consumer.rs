use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use weatherstream::consumer::{self, check_partition_list, ConsumerConfig};
use weatherstream::kafka::PartitionId;
use weatherstream::verify::{self, VerifyConfig};
use weatherstream::{check, config, export, inspect};

/// Keeps exactly-once month/year statistics of the given partitions and
/// publishes them as partition-N.json (and month.svg) in the files folder.
///
/// State (statistics and offsets) lives in one sled database per partition
/// under the state folder; any split of partitions over processes works.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    log: config::LogArgs,
    #[command(flatten)]
    generate: config::GenerateArgs,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct Folders {
    /// Folder of partition-N.json and month.svg
    #[arg(
        long = "files",
        env = "FILES_DIR",
        default_value = "files",
        global = true
    )]
    files_dir: PathBuf,
    /// Folder of the sled state [default: <files>/state]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
}

impl Folders {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.files_dir.join("state"))
    }
}

#[derive(Args)]
struct FetchWait {
    /// Longest the broker may hold a fetch that finds nothing new,
    /// milliseconds; over fetch.wait.max.ms of --client-config and -X.
    /// Apache Kafka answers as soon as a report arrives, so the default only
    /// sets how often an idle consumer asks; brokers that hold every fetch
    /// for the whole wait (tansu) need a few milliseconds [default: 500]
    #[arg(long, env = "CONSUMER_FETCH_WAIT_MS",
          value_parser = clap::value_parser!(u64).range(1..=300_000))]
    fetch_wait_ms: Option<u64>,
}

#[derive(Args)]
struct Group {
    /// Consumer group of every client; the consumer commits each batch's
    /// next offset there for Kafka's tools (never read back: the state
    /// decides); over group.id of --client-config and -X [default: weatherstream]
    #[arg(long, value_name = "GROUP")]
    group_id: Option<String>,
}

#[derive(Args)]
struct SnapshotArgs {
    /// Compacted topic of the partitions' snapshots, from which a partition
    /// starting on an empty or older state is restored; created when
    /// missing [default: <topic>-snapshots]
    #[arg(long, env = "SNAPSHOT_TOPIC", value_name = "TOPIC")]
    snapshot_topic: Option<String>,
    /// Seconds between two snapshots of a partition (and always one at a
    /// clean stop)
    #[arg(long, env = "SNAPSHOT_INTERVAL", value_name = "SECONDS",
          default_value = "5", value_parser = config::parse_seconds)]
    snapshot_interval: std::time::Duration,
    /// Write and restore no snapshots
    #[arg(long, conflicts_with = "snapshot_topic")]
    no_snapshots: bool,
}

impl SnapshotArgs {
    fn settings(self, topic: &str) -> Option<consumer::SnapshotSettings> {
        (!self.no_snapshots).then(|| consumer::SnapshotSettings {
            topic: self
                .snapshot_topic
                .unwrap_or_else(|| weatherstream::changelog::default_topic(topic)),
            interval: self.snapshot_interval,
        })
    }
}

#[derive(Args)]
struct RunArgs {
    /// Partitions to consume, e.g. `0 2`
    #[arg(required_unless_present = "join_group", value_name = "PARTITION")]
    partitions: Vec<PartitionId>,
    /// Instead of a partition list: join this Kafka consumer group, which
    /// shares the topic's partitions among its live members on any hosts
    /// and moves a partition (restored from its snapshot) when a member
    /// stops or dies. Each member needs a state folder of its own; members
    /// may share the files folder
    #[arg(long = "group", env = "CONSUMER_GROUP", value_name = "NAME",
          conflicts_with_all = ["partitions", "group_id", "no_group_offsets"])]
    join_group: Option<String>,
    #[command(flatten)]
    connection: config::Connection,
    #[command(flatten)]
    folders: Folders,
    /// Most reports committed in one transaction
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_batch: u64,
    /// Longest a batch collects reports, milliseconds
    #[arg(long, default_value_t = 100)]
    batch_timeout_ms: u64,
    #[command(flatten)]
    fetch: FetchWait,
    #[command(flatten)]
    group: Group,
    /// Commit no offsets to the consumer group
    #[arg(long)]
    no_group_offsets: bool,
    #[command(flatten)]
    snapshots: SnapshotArgs,
    /// When the offset to resume from is below the log start (records the
    /// statistics need were deleted), count from the log start instead of
    /// stopping: the partition's statistics are then PARTIAL
    #[arg(long)]
    count_from_log_start: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics, and /healthz
    /// and /readyz; weatherstream's port is 8797 (0.0.0.0:8797) [default: off]
    #[arg(long, env = "CONSUMER_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// /healthz fails (503) when a worker thread has been busy with one
    /// step for this long, seconds; waits (a broker outage, a failing disk,
    /// an idle topic) never count
    #[arg(long, env = "CONSUMER_WEDGED_AFTER_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    wedged_after_secs: u64,
    #[command(flatten)]
    web: config::WebArgs,
    #[command(flatten)]
    stop: config::StopArgs,
    /// No progress lines
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Rebuild partition-N.json and month.svg from the state, without
    /// Kafka; or, with --from-kafka, from the snapshot topic alone
    Export {
        /// Partitions to export [default: every partition in the state
        /// folder; with --from-kafka, every partition of the snapshot topic]
        #[arg(value_name = "PARTITION")]
        partitions: Vec<PartitionId>,
        #[command(flatten)]
        folders: Folders,
        /// Read each partition's newest snapshot from the snapshot topic
        /// instead of the state folder (which is neither read nor written)
        #[arg(long)]
        from_kafka: bool,
        #[command(flatten)]
        connection: config::Connection,
        #[command(flatten)]
        group: Group,
        /// The snapshot topic [default: <topic>-snapshots]
        #[arg(long, env = "SNAPSHOT_TOPIC", value_name = "TOPIC")]
        snapshot_topic: Option<String>,
    },
    /// Recompute the statistics from the topic and compare them with the
    /// state (or, for a partition a running consumer holds, its published
    /// file); exit 0 when all match, 1 when anything differs or could not
    /// be verified
    Verify {
        /// Partitions to verify [default: every partition with a state or a file]
        #[arg(value_name = "PARTITION")]
        partitions: Vec<PartitionId>,
        #[command(flatten)]
        connection: config::Connection,
        #[command(flatten)]
        group: Group,
        #[command(flatten)]
        folders: Folders,
    },
    /// Check, before a start and with the same settings, what the consumer
    /// will need: settings, web config, connection with TLS and SASL, the
    /// topic and its partitions, the topic and group permissions it can
    /// probe without a change, the snapshot topic, and the state and files
    /// folders (writable, not held by another process). One line per check
    /// and a summary; exit 0 when nothing failed, 1 otherwise. Changes
    /// nothing on the brokers or the disk
    Check {
        /// Partitions the consumer will run, e.g. `0 2`
        #[arg(required_unless_present = "join_group", value_name = "PARTITION")]
        partitions: Vec<PartitionId>,
        /// Check for a member of this consumer group instead of a partition list
        #[arg(long = "group", env = "CONSUMER_GROUP", value_name = "NAME",
              conflicts_with_all = ["partitions", "group_id"])]
        join_group: Option<String>,
        #[command(flatten)]
        connection: config::Connection,
        #[command(flatten)]
        group: Group,
        #[command(flatten)]
        folders: Folders,
        #[command(flatten)]
        snapshots: SnapshotArgs,
        #[command(flatten)]
        web: config::WebArgs,
        /// One JSON object on stdout instead of the lines
        #[arg(long)]
        json: bool,
    },
    /// Show what the state holds, per partition
    InspectState {
        /// Partitions to show [default: every partition in the state folder]
        #[arg(value_name = "PARTITION")]
        partitions: Vec<PartitionId>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        folders: Folders,
    },
}

fn main() -> ExitCode {
    config::limit_malloc_arenas();
    let args: Cli = config::parse();
    config::init_logging(args.log.log_format);
    let result = match args.command {
        None => run(args.run),
        Some(Command::Export {
            partitions,
            folders,
            from_kafka: false,
            ..
        }) => export::run(&folders.files_dir, &folders.state_dir(), &partitions),
        Some(Command::Export {
            partitions,
            folders,
            from_kafka: true,
            connection,
            group,
            snapshot_topic,
        }) => {
            let mut client = connection.client.settings();
            let group_id = group.resolve(&mut client);
            let from = export::FromKafka {
                client,
                group_id,
                snapshot_topic: snapshot_topic
                    .unwrap_or_else(|| weatherstream::changelog::default_topic(&connection.topic)),
                source_topic: connection.topic,
            };
            export::run_from_kafka(&from, &folders.files_dir, &partitions)
        }
        Some(Command::Verify {
            partitions,
            connection,
            group,
            folders,
        }) => {
            let mut client = connection.client.settings();
            let group_id = group.resolve(&mut client);
            let config = VerifyConfig {
                client,
                group_id,
                topic: connection.topic,
                files_dir: folders.files_dir.clone(),
                state_dir: folders.state_dir(),
                partitions,
            };
            match verify::run(&config, &mut std::io::stdout().lock()) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(error) => Err(error),
            }
        }
        Some(Command::Check {
            partitions,
            join_group,
            connection,
            group,
            folders,
            snapshots,
            web,
            json,
        }) => {
            if join_group.is_none() {
                if let Err(message) = check_partition_list(&partitions) {
                    config::usage_error(&message);
                }
            }
            let mut client = connection.client.settings();
            let group_id = match &join_group {
                Some(name) => name.clone(),
                None => group.resolve(&mut client),
            };
            let report = check::consumer(&check::ConsumerCheck {
                client,
                group_id,
                join_group: join_group.is_some(),
                partitions,
                snapshot_topic: snapshots.settings(&connection.topic).map(|s| s.topic),
                topic: connection.topic,
                files_dir: folders.files_dir.clone(),
                state_dir: folders.state_dir(),
                web_config_file: web.web_config_file,
            });
            return report.print(json);
        }
        Some(Command::InspectState {
            partitions,
            json,
            folders,
        }) => inspect::run(
            &folders.files_dir,
            &folders.state_dir(),
            &partitions,
            json,
            &mut std::io::stdout().lock(),
        ),
    };
    config::finish("consumer", result)
}

impl Group {
    fn resolve(&self, client: &mut weatherstream::kafka::ClientSettings) -> String {
        config::flag_over_property(
            self.group_id.clone(),
            client,
            "group.id",
            weatherstream::kafka::DEFAULT_GROUP_ID,
        )
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.join_group.is_none() {
        if let Err(message) = check_partition_list(&args.partitions) {
            config::usage_error(&message);
        }
    }
    // `new` resolves the properties (group.id, fetch.wait.max.ms) over
    // their defaults; the flags go over those.
    let resolved = ConsumerConfig::new(
        args.connection.client.settings(),
        args.connection.topic,
        args.folders.files_dir.clone(),
        args.folders.state_dir(),
        args.partitions,
    );
    let config = ConsumerConfig {
        max_batch: args.max_batch as usize,
        batch_timeout_ms: args.batch_timeout_ms,
        fetch_wait_ms: args.fetch.fetch_wait_ms.unwrap_or(resolved.fetch_wait_ms),
        // A member's group is the group of all its clients; its offsets
        // belong to the group's members, not to a committer beside them.
        join_group: args.join_group.is_some(),
        commit_group_offsets: !args.no_group_offsets && args.join_group.is_none(),
        group_id: args
            .join_group
            .or(args.group.group_id)
            .unwrap_or(resolved.group_id),
        snapshots: args.snapshots.settings(&resolved.topic),
        count_from_log_start: args.count_from_log_start,
        metrics_addr: args.metrics_addr,
        wedged_after: std::time::Duration::from_secs(args.wedged_after_secs),
        web: args.web.load(),
        progress_interval: if args.quiet {
            None
        } else {
            ConsumerConfig::DEFAULT_PROGRESS_INTERVAL
        },
        ..resolved
    };
    let shutdown = args.stop.install("consumer")?;
    consumer::run(&config, &shutdown)
}
