use std::process::ExitCode;

use clap::Parser;
use weatherstream::config;
use weatherstream::debug::{self, DebugConfig};

/// Prints every new message of the topic as a Python-style dict, one per line.
///
/// Joins consumer group `debug` (broker-assigned partitions) and starts at
/// the end of the topic unless the group has committed offsets or
/// --from-beginning is given.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    log: config::LogArgs,
    #[command(flatten)]
    generate: config::GenerateArgs,
    #[command(flatten)]
    stop: config::StopArgs,
    #[command(flatten)]
    connection: config::Connection,
    /// Consumer group; over group.id of --client-config and -X [default: debug]
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Start a new group at the beginning of the topic instead of its end
    #[arg(long)]
    from_beginning: bool,
}

fn main() -> ExitCode {
    let args: Args = config::parse();
    config::init_logging(args.log.log_format);
    let mut client = args.connection.client.settings();
    let group = config::flag_over_property(args.group, &mut client, "group.id", "debug");
    let config = DebugConfig {
        client,
        topic: args.connection.topic,
        group,
        from_beginning: args.from_beginning,
    };
    let result = args
        .stop
        .install("debug")
        .map_err(anyhow::Error::from)
        .and_then(|shutdown| debug::run(&config, &shutdown, &mut std::io::stdout().lock()));
    config::finish("debug", result)
}
