use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weatherstream::config;
use weatherstream::dashboard::{self, DashboardConfig};

/// Serves the live dashboard of the files folder: month.svg, every
/// partition's offset and freshness, a month x year table and a chart of
/// each month's average over the years, updated within a second of a
/// publish. Read-only: it never writes to the folder.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    stop: config::StopArgs,
    /// Folder of partition-N.json and month.svg
    #[arg(long = "files", env = "FILES_DIR", default_value = "files")]
    files_dir: PathBuf,
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
    config::init_logging();
    let config = DashboardConfig {
        files_dir: args.files_dir,
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
