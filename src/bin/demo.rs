use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use weatherstream::config;
use weatherstream::demo::{self, DemoConfig};

/// The whole pipeline in one process: an embedded in-memory Kafka broker,
/// the producer, consumers for all 4 partitions and the exporter, writing
/// partition-N.json and month.svg. A second run continues where the first
/// stopped.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    log: config::LogArgs,
    #[command(flatten)]
    generate: config::GenerateArgs,
    #[command(flatten)]
    stop: config::StopArgs,
    /// Use this Kafka instead of the embedded broker: --bootstrap-servers
    /// (or KAFKA_BOOTSTRAP_SERVERS, or bootstrap.servers of
    /// --client-config or -X) names it
    #[command(flatten)]
    client: config::ClientArgs,
    /// Folder of partition-N.json, month.svg and the state
    #[arg(long = "files", env = "FILES_DIR", default_value = "files")]
    files_dir: PathBuf,
    /// Simulated days to add in this run (default: 20 years)
    #[arg(long, default_value_t = 7300, value_parser = clap::value_parser!(u64).range(1..))]
    days: u64,
    /// Seconds between reports (0: as fast as possible)
    #[arg(long, default_value_t = 0.0, value_parser = config::parse_delay)]
    delay: f64,
    /// After --days, go on at one day per 0.1 s until Ctrl-C
    #[arg(long)]
    follow: bool,
    /// Forget earlier runs' state and files first
    #[arg(long)]
    fresh: bool,
    /// Seed of the weather stream [default: 1990, or the earlier runs' seed]
    #[arg(long)]
    seed: Option<u64>,
    /// Serve the consumer's Prometheus metrics at http://HOST:PORT/metrics
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Serve the live dashboard at http://HOST:PORT/, and keep serving after
    /// the demo's days until Ctrl-C
    #[arg(long, value_name = "HOST:PORT")]
    dashboard: Option<String>,
    #[command(flatten)]
    web: config::WebArgs,
}

fn main() -> ExitCode {
    config::limit_malloc_arenas();
    let args: Args = config::parse();
    config::init_logging(args.log.log_format);
    let config = DemoConfig {
        client: args.client.resolve().named_broker(),
        files_dir: args.files_dir,
        days: args.days,
        delay: Duration::from_secs_f64(args.delay),
        follow: args.follow,
        fresh: args.fresh,
        seed: args.seed,
        metrics_addr: args.metrics_addr,
        dashboard: args.dashboard,
        web: args.web.load(),
    };
    let result = args
        .stop
        .install("demo")
        .map_err(anyhow::Error::from)
        .and_then(|shutdown| demo::run(&config, &shutdown));
    config::finish("demo", result)
}
