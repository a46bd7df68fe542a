//! `debug`: prints the stream as the assignment's Python dicts, one line per
//! message, as a member of a consumer group with broker-assigned partitions.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;

use crate::commands::python_repr::{bytes_repr, float_repr, str_repr};
use crate::kafka::{check_connection, client_config, ClientSettings, SetDefault};
use crate::model::report;
use crate::shutdown::Shutdown;

/// Longest one poll waits: how soon shutdown is noticed.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// What `debug` is asked to do.
#[derive(Debug, Clone)]
pub struct DebugConfig {
    pub client: ClientSettings,
    pub topic: String,
    pub group: String,
    pub from_beginning: bool,
}

/// Logs assignments so a user (and a test) can see when printing starts.
struct AssignmentLogger;

impl ClientContext for AssignmentLogger {}

impl ConsumerContext for AssignmentLogger {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                log::info!("debug: assigned partitions {partitions:?}");
            }
            Rebalance::Revoke(_) => log::info!("debug: partitions revoked"),
            Rebalance::Error(e) => log::warn!("debug: rebalance error: {e}"),
        }
    }
}

/// Formats one message as the assignment prints it.
pub(crate) fn format_line(partition: i32, key: Option<&[u8]>, date: &str, degrees: f64) -> String {
    let key = match key {
        None => "None".to_string(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => str_repr(text),
            Err(_) => bytes_repr(bytes),
        },
    };
    format!(
        "{{'partition': {partition}, 'key': {key}, 'date': {}, 'degrees': {}}}",
        str_repr(date),
        float_repr(degrees)
    )
}

/// Prints messages to `out` until shutdown.
pub fn run(config: &DebugConfig, shutdown: &Shutdown, out: &mut dyn Write) -> anyhow::Result<()> {
    check_connection(&config.client)?;
    let consumer: BaseConsumer<AssignmentLogger> = client_config(&config.client)
        .set("group.id", &config.group)
        .set(
            "auto.offset.reset",
            if config.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        )
        // A short session makes a new group's first assignment come quickly.
        .set_default("session.timeout.ms", "6000")
        .set_default("heartbeat.interval.ms", "1000")
        .set("enable.partition.eof", "false")
        .create_with_context(AssignmentLogger)
        .context("creating the Kafka consumer")?;
    consumer
        .subscribe(&[&config.topic])
        .with_context(|| format!("subscribing to {:?}", config.topic))?;
    while !shutdown.requested() {
        let Some(result) = consumer.poll(POLL_WAIT) else {
            continue;
        };
        let message = match result {
            Ok(message) => message,
            Err(error) => {
                log::warn!("debug: {error}");
                continue;
            }
        };
        match report::decode(message.payload().unwrap_or_default()) {
            Ok(r) => {
                let line = format_line(message.partition(), message.key(), &r.date, r.degrees);
                writeln!(out, "{line}").context("writing to stdout")?;
                out.flush().context("writing to stdout")?;
            }
            Err(error) => log::warn!(
                "debug: partition {} offset {}: {error}",
                message.partition(),
                message.offset()
            ),
        }
    }
    consumer.unsubscribe();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_the_assignment() {
        assert_eq!(
            format_line(2, Some(b"December"), "2000-12-26", 31.5235),
            "{'partition': 2, 'key': 'December', 'date': '2000-12-26', 'degrees': 31.5235}"
        );
        assert_eq!(
            format_line(0, Some(b"January"), "2001-01-01", 1000000.0),
            "{'partition': 0, 'key': 'January', 'date': '2001-01-01', 'degrees': 1000000.0}"
        );
        assert_eq!(
            format_line(1, None, "2001-01-01", 35.0),
            "{'partition': 1, 'key': None, 'date': '2001-01-01', 'degrees': 35.0}"
        );
    }
}
