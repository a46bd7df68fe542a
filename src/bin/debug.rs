use std::process::ExitCode;

use clap::Parser;
use weatherstream::debug::{self, DebugConfig};
use weatherstream::{cli, shutdown::Shutdown};

/// Prints every new message of the topic as a Python-style dict, one per line.
///
/// Joins consumer group `debug` (broker-assigned partitions) and starts at
/// the end of the topic unless the group has committed offsets or
/// --from-beginning is given.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connection: cli::Connection,
    /// Consumer group
    #[arg(long, default_value = "debug")]
    group: String,
    /// Start a new group at the beginning of the topic instead of its end
    #[arg(long)]
    from_beginning: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_logging();
    let config = DebugConfig {
        bootstrap_servers: args.connection.bootstrap_servers,
        topic: args.connection.topic,
        group: args.group,
        from_beginning: args.from_beginning,
    };
    let result = Shutdown::install()
        .map_err(anyhow::Error::from)
        .and_then(|shutdown| debug::run(&config, &shutdown, &mut std::io::stdout().lock()));
    cli::finish("debug", result)
}
