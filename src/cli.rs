//! What every binary does at its edge: logging set-up and turning a result
//! into an exit code with the error and its cause chain printed once.

use std::process::ExitCode;

use crate::kafka::{BOOTSTRAP_ENV, DEFAULT_BOOTSTRAP, DEFAULT_TOPIC};

/// Where the broker is and which topic: shared by every command that talks
/// to Kafka.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Kafka broker(s), HOST:PORT[,HOST:PORT...]
    #[arg(long, env = BOOTSTRAP_ENV, default_value = DEFAULT_BOOTSTRAP)]
    pub bootstrap_servers: String,
    /// Topic of the weather reports
    #[arg(long, default_value = DEFAULT_TOPIC)]
    pub topic: String,
}

/// Logs to stderr; `RUST_LOG` overrides. librdkafka's own connection chatter
/// is off by default: our errors say what matters once.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info,librdkafka=off,rdkafka=off");
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .format_target(false)
        .init();
}

/// Prints `error: ...: cause: cause` on one line and exits 1 on error.
pub fn finish(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
