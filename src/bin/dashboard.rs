use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weatherstream::config;
use weatherstream::dashboard::{self, DashboardConfig, DashboardSource};
use weatherstream::export::FromKafka;

/// Serves the live dashboard of the files folder: month.svg, every
/// partition's offset and freshness, a month x year table and a chart of
/// each month's average over the years, updated within a second of a
/// publish. Read-only: it never writes to the folder. With --from-kafka it
/// shows the snapshot topic instead, and needs no folder.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    log: config::LogArgs,
    #[command(flatten)]
    generate: config::GenerateArgs,
    #[command(flatten)]
    stop: config::StopArgs,
    /// Folder of partition-N.json and month.svg (not read with --from-kafka)
    #[arg(long = "files", env = "FILES_DIR", default_value = "files")]
    files_dir: PathBuf,
    /// Show each partition's newest snapshot from the snapshot topic, and
    /// follow it, instead of a files folder
    #[arg(long)]
    from_kafka: bool,
    /// The snapshot topic, with --from-kafka [default: <topic>-snapshots]
    #[arg(
        long,
        env = "SNAPSHOT_TOPIC",
        value_name = "TOPIC",
        requires = "from_kafka"
    )]
    snapshot_topic: Option<String>,
    /// Consumer group the snapshot reader names (for ACLs: it joins no
    /// group and commits nothing); over group.id of --client-config and -X
    /// [default: weatherstream]
    #[arg(long, value_name = "GROUP", requires = "from_kafka")]
    group_id: Option<String>,
    #[command(flatten)]
    connection: config::Connection,
    /// Address to serve on
    #[arg(
        long,
        env = "DASHBOARD_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "HOST:PORT"
    )]
    listen: String,
    #[command(flatten)]
    web: config::WebArgs,
}

fn main() -> ExitCode {
    let args: Args = config::parse();
    config::init_logging(args.log.log_format);
    let source = if args.from_kafka {
        let mut client = args.connection.client.settings();
        let group_id = config::flag_over_property(
            args.group_id,
            &mut client,
            "group.id",
            weatherstream::kafka::DEFAULT_GROUP_ID,
        );
        DashboardSource::Kafka(FromKafka {
            client,
            group_id,
            snapshot_topic: args
                .snapshot_topic
                .unwrap_or_else(|| weatherstream::changelog::default_topic(&args.connection.topic)),
            source_topic: args.connection.topic,
        })
    } else {
        DashboardSource::Files(args.files_dir)
    };
    let config = DashboardConfig {
        source,
        listen: args.listen,
        web: args.web.load(),
    };
    let result = args
        .stop
        .install("dashboard")
        .map_err(anyhow::Error::from)
        .and_then(|shutdown| dashboard::run(&config, &shutdown));
    config::finish("dashboard", result)
}
