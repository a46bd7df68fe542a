use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use weatherstream::producer::{self, Compression, ProducerConfig, TopicStart};
use weatherstream::{check, config};

/// Generates daily weather reports and writes them to a Kafka topic.
///
/// On start the topic is deleted (if present) and created afresh, as the
/// original assignment asks: that needs the right to delete and create
/// topics. With --keep-topic nothing is deleted, and the stream resumes
/// after the days the topic holds. Keys are month names, values `Report`
/// protobufs.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    log: config::LogArgs,
    #[command(flatten)]
    generate: config::GenerateArgs,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    stop: config::StopArgs,
    #[command(flatten)]
    connection: config::Connection,
    #[command(flatten)]
    topic: TopicArgs,
    /// Replication factor of the created topic
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=100))]
    replication_factor: i32,
    /// Seconds between two reports (one simulated day per 0.1 s by default); 0 = as fast as possible
    #[arg(long, default_value_t = 0.1, value_parser = config::parse_delay)]
    delay: f64,
    /// Stop after this many days (duplicates not counted) once all are delivered; default: forever
    #[arg(long)]
    days: Option<u64>,
    /// Seed for a reproducible stream; default: random
    #[arg(long)]
    seed: Option<u64>,
    /// Record batch compression; over compression.type of --client-config
    /// and -X [default: none]
    #[arg(long, value_enum)]
    compression: Option<Compression>,
}

/// What the producer does with its topic.
#[derive(Args)]
struct TopicArgs {
    /// Keep the topic and resume the stream after the days it holds: no day
    /// is skipped, and the days sent again are dropped by the consumers.
    /// Creates the topic only if it is missing; an existing one needs only
    /// Describe, Read and Write
    #[arg(long)]
    keep_topic: bool,
    /// Partitions of the created topic (with --keep-topic, the count an
    /// existing topic must have)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=1000))]
    partitions: i32,
}

#[derive(Subcommand)]
enum Command {
    /// Check, before a start and with the same settings, what the producer
    /// will need: settings, connection with TLS and SASL, and the topic.
    /// One line per check and a summary; exit 0 when nothing failed, 1
    /// otherwise. Changes nothing on the brokers
    Check {
        #[command(flatten)]
        connection: config::Connection,
        #[command(flatten)]
        topic: TopicArgs,
        /// One JSON object on stdout instead of the lines
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args: Cli = config::parse();
    config::init_logging(args.log.log_format);
    if let Some(Command::Check {
        connection,
        topic,
        json,
    }) = args.command
    {
        let report = check::producer(&check::ProducerCheck {
            client: connection.client.settings(),
            topic: connection.topic,
            keep_topic: topic.keep_topic,
            partitions: topic.partitions,
        });
        return report.print(json);
    }
    let mut client = args.connection.client.settings();
    let compression = config::flag_over_property(
        args.compression.map(|codec| codec.name().to_string()),
        &mut client,
        "compression.type",
        Compression::None.name(),
    );
    client.set_owned("compression.type", compression);
    let config = ProducerConfig {
        client,
        topic: args.connection.topic,
        partitions: args.topic.partitions,
        replication_factor: args.replication_factor,
        delay: Duration::from_secs_f64(args.delay),
        days: args.days,
        seed: args.seed,
        start: if args.topic.keep_topic {
            TopicStart::Resume
        } else {
            TopicStart::Recreate
        },
        print_topics: true,
    };
    let result = args
        .stop
        .install("producer")
        .map_err(anyhow::Error::from)
        .and_then(|shutdown| producer::run(&config, &shutdown).map(|_| ()));
    config::finish("producer", result)
}
