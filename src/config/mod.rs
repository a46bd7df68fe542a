//! What every binary does at its edge: logging set-up and turning a result
//! into an exit code with the error and its cause chain printed once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::kafka::{ClientSettings, Resolved, SettingsSources};
use crate::kafka::{BOOTSTRAP_ENV, DEFAULT_BOOTSTRAP, DEFAULT_TOPIC};
use crate::shutdown::Shutdown;
use crate::web::WebConfig;

/// Environment variable that supplies `--client-config`.
pub const CLIENT_CONFIG_ENV: &str = "KAFKA_CLIENT_CONFIG";

/// How to reach Kafka: the same for every command that talks to it.
/// Precedence: built-in defaults and KAFKA_BOOTSTRAP_SERVERS, then
/// --client-config, then -X, then --bootstrap-servers and the other flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Kafka broker(s), HOST:PORT[,HOST:PORT...]; over bootstrap.servers
    /// of --client-config and -X, which are over KAFKA_BOOTSTRAP_SERVERS
    /// [default: localhost:9092]
    #[arg(long, value_name = "HOST:PORT")]
    pub bootstrap_servers: Option<String>,
    /// Client properties file: librdkafka's key=value lines, or a Java
    /// client.properties (sasl.jaas.config with PLAIN or SCRAM becomes
    /// sasl.username and sasl.password; Java-only keys are ignored, one
    /// line each)
    #[arg(long, env = CLIENT_CONFIG_ENV, value_name = "FILE")]
    pub client_config: Option<PathBuf>,
    /// A librdkafka property, e.g. -X security.protocol=SASL_SSL; repeatable,
    /// over --client-config. Settings that exactly-once depends on (acks,
    /// idempotence, retries, auto commit, auto.offset.reset, ...) are refused
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub property: Vec<String>,
}

impl ClientArgs {
    /// Resolves the settings (a usage error, exit 2, when one is wrong) and
    /// logs the Java-only keys ignored; call it after [`init_logging`].
    pub fn resolve(&self) -> Resolved {
        let sources = SettingsSources {
            bootstrap_flag: self.bootstrap_servers.clone(),
            bootstrap_env: std::env::var(BOOTSTRAP_ENV).ok(),
            client_config: self.client_config.clone(),
            properties: self.property.clone(),
        };
        match sources.resolve() {
            Ok(resolved) => {
                resolved.log_ignored();
                resolved
            }
            Err(error) => usage_error(&error.to_string()),
        }
    }

    /// [`ClientArgs::resolve`] with the default broker where none is named.
    pub fn settings(&self) -> ClientSettings {
        self.resolve().or_bootstrap(DEFAULT_BOOTSTRAP)
    }
}

/// Where the broker is and which topic: shared by every command that talks
/// to Kafka.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Topic of the weather reports
    #[arg(long, default_value = DEFAULT_TOPIC)]
    pub topic: String,
}

/// A flag over the property it owns (`--group-id` over `-X group.id`), over
/// the default: the precedence of [`ClientArgs`] for keys that have a flag.
pub fn flag_over_property(
    flag: Option<String>,
    settings: &mut ClientSettings,
    key: &str,
    default: &str,
) -> String {
    let property = settings.take(key);
    flag.or(property).unwrap_or_else(|| default.to_string())
}

/// How long a stop may take: shared by every command that runs until
/// stopped. The default, 10 s: a stop takes well under a second (a batch,
/// a commit, a publish), and Kubernetes sends SIGKILL 30 s after SIGTERM:
/// ending on our own first says which thread hung.
#[derive(clap::Args, Debug, Clone)]
pub struct StopArgs {
    /// Seconds from the first SIGTERM or SIGINT to exit at the latest:
    /// threads that have not stopped by then are named and the process
    /// exits with status 1, keeping every committed batch (a second signal
    /// exits at once)
    #[arg(long, env = "SHUTDOWN_TIMEOUT", value_name = "SECONDS",
          default_value = "10", value_parser = parse_seconds)]
    pub shutdown_timeout: Duration,
}

impl StopArgs {
    /// SIGINT and SIGTERM handling with this deadline.
    pub fn install(&self, program: &'static str) -> std::io::Result<Shutdown> {
        Shutdown::install(program, self.shutdown_timeout)
    }
}

/// Parses a number of seconds (`--shutdown-timeout`, `--snapshot-interval`):
/// more than 0, at most an hour.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if value.is_finite() && value > 0.0 && value <= MAX_DELAY_SECS {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!(
            "must be more than 0 and at most {MAX_DELAY_SECS} seconds"
        ))
    }
}

/// Environment variable that supplies `--web-config-file`.
pub const WEB_CONFIG_ENV: &str = "WEB_CONFIG_FILE";

/// TLS and basic auth of the HTTP endpoints (metrics, dashboard).
#[derive(clap::Args, Debug, Clone)]
pub struct WebArgs {
    /// TLS and basic auth for the HTTP endpoints, in the YAML of
    /// Prometheus' exporter-toolkit: tls_server_config (cert_file,
    /// key_file) and basic_auth_users (user: bcrypt hash) [default: plain
    /// HTTP, no auth]
    #[arg(long, env = WEB_CONFIG_ENV, value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
}

impl WebArgs {
    /// Loads the file; a wrong one is a usage error (exit 2).
    pub fn load(&self) -> Option<Arc<WebConfig>> {
        let path = self.web_config_file.as_ref()?;
        match WebConfig::load(path) {
            Ok(web) => Some(Arc::new(web)),
            Err(error) => usage_error(&error.to_string()),
        }
    }
}

/// What `--version` prints after the name: this crate's version, then the
/// librdkafka the binary carries and its built-in features (ssl, sasl_scram,
/// zstd ...), as librdkafka itself reports them (`builtin.features`).
pub fn long_version() -> String {
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    let features = rdkafka::ClientConfig::new()
        .create_native_config()
        .and_then(|config| config.get("builtin.features"))
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{}\nlibrdkafka {librdkafka} (builtin.features: {features})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Parses a binary's arguments; `--version` (not `-V`) also names the
/// librdkafka inside, see [`long_version`] (made only when asked for: it
/// creates a librdkafka configuration).
pub fn parse<P: clap::Parser>() -> P {
    let mut command = P::command();
    if std::env::args_os().any(|arg| arg == "--version") {
        command = command.long_version(long_version());
    }
    let matches = command.get_matches();
    if let Some(what) = matches.get_one::<Generate>(GENERATE_ID) {
        generate(*what, P::command());
    }
    P::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// What `--generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    /// The man page (roff), e.g. `consumer --generate man > consumer.1`
    Man,
    CompleteBash,
    CompleteZsh,
    CompleteFish,
    CompleteElvish,
    CompletePowershell,
}

const GENERATE_ID: &str = "generate";

/// `--generate`, shared by every binary: the man page and shell
/// completions, made from the same definitions as `--help`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Print the man page or a shell's completions, made from these very
    /// options, and exit (e.g. `--generate complete-bash >
    /// /etc/bash_completion.d/consumer`)
    #[arg(long, id = GENERATE_ID, value_enum, value_name = "WHAT", exclusive = true)]
    pub generate: Option<Generate>,
}

/// Writes what `--generate` asks for to stdout and exits (0; 1 when
/// stdout cannot take it).
fn generate(what: Generate, mut command: clap::Command) -> ! {
    use clap_complete::Shell;
    // The binary's own name (the derive names every command after the
    // package): what the shell completes and the man page is called.
    let name = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|path| Some(path.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| command.get_name().to_string());
    command = command.name(name.clone()).bin_name(name.clone());
    // Made in memory first: clap_complete panics on a failed write (a
    // closed pipe), and a man page is a few KiB.
    let mut text = Vec::new();
    let shell = match what {
        Generate::Man => None,
        Generate::CompleteBash => Some(Shell::Bash),
        Generate::CompleteZsh => Some(Shell::Zsh),
        Generate::CompleteFish => Some(Shell::Fish),
        Generate::CompleteElvish => Some(Shell::Elvish),
        Generate::CompletePowershell => Some(Shell::PowerShell),
    };
    let made = match shell {
        Some(shell) => {
            clap_complete::generate(shell, &mut command, name, &mut text);
            Ok(())
        }
        None => clap_mangen::Man::new(command).render(&mut text),
    };
    let mut out = std::io::stdout().lock();
    let written = made.and_then(|()| {
        use std::io::Write as _;
        out.write_all(&text)?;
        out.flush()
    });
    std::process::exit(i32::from(written.is_err()))
}

/// Prints `error: MESSAGE` and usage hints as clap does, and exits 2.
pub fn usage_error(message: &str) -> ! {
    clap::Error::raw(
        clap::error::ErrorKind::ValueValidation,
        format!("{message}\n"),
    )
    .exit()
}

/// Longest `--delay` between two reports, in seconds: an hour.
pub(crate) const MAX_DELAY_SECS: f64 = 3600.0;

/// Parses `--delay SECONDS` (producer, demo): a number from 0 to an hour.
pub fn parse_delay(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if value.is_finite() && (0.0..=MAX_DELAY_SECS).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be between 0 and {MAX_DELAY_SECS} seconds"))
    }
}

/// How log lines look: text for people (the default), or one JSON object
/// per line for log shippers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `--log-format`, shared by every binary.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log lines as text, or as one JSON object per line (time, level,
    /// message, and partition and offset where the message names them)
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// The format chosen by [`init_logging`], for [`finish`]'s last line.
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Logs to stderr; `RUST_LOG` overrides. librdkafka's own connection chatter
/// is off by default: our errors say what matters once.
pub fn init_logging(format: LogFormat) {
    let _ = LOG_FORMAT.set(format);
    // sled logs every failed write of a full disk itself; the workers
    // report such a fault once (and every 30 s while it lasts).
    let env =
        env_logger::Env::default().default_filter_or("info,librdkafka=off,rdkafka=off,sled=off");
    let mut builder = env_logger::Builder::from_env(env);
    match format {
        LogFormat::Text => {
            builder.format_timestamp_millis().format_target(false);
        }
        LogFormat::Json => {
            builder.format(|out, record| {
                use std::io::Write as _;
                let line = json_line(record.level().as_str(), &record.args().to_string());
                writeln!(out, "{line}")
            });
        }
    }
    builder.init();
}

/// One log line as a JSON object: `time` (RFC 3339, UTC, milliseconds),
/// `level`, `message`, and `partition` and `offset` when the message names
/// them the way every partition's line does ("partition 2: ... offset
/// 5033 ...").
fn json_line(level: &str, message: &str) -> String {
    let mut line = serde_json::Map::new();
    line.insert(
        "time".into(),
        chrono::Utc::now()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .into(),
    );
    line.insert("level".into(), level.into());
    line.insert("message".into(), message.into());
    if let Some(partition) = number_after(message, "partition ") {
        line.insert("partition".into(), partition.into());
    }
    if let Some(offset) = number_after(message, "offset ") {
        line.insert("offset".into(), offset.into());
    }
    serde_json::Value::Object(line).to_string()
}

/// The number right after the first `word` in `text` that a number follows.
fn number_after(text: &str, word: &str) -> Option<i64> {
    text.match_indices(word).find_map(|(at, _)| {
        let digits: String = text[at + word.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

/// Arenas glibc's malloc may use; see [`limit_malloc_arenas`].
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 8;

/// glibc's malloc gives every thread that meets contention an arena of its
/// own, up to 8 per core, and each arena keeps what its threads freed. A
/// consumer runs dozens of threads (librdkafka's among them), so on a large
/// machine that is memory held for nothing. Measured on 2 cores (1M-report
/// catch-up, alternating rounds): glibc's 16 arenas peaked at 57-62 MiB,
/// 8 at 57-60 MiB at the same speed, 4 at 53-58 MiB but 12% slower, so 8.
/// `MALLOC_ARENA_MAX` in the environment still decides. Call it first
/// thing in `main`, before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets one of malloc's tuning parameters; it
        // is called before any other thread exists, touches no memory of
        // ours, and an unsupported value only makes it return 0.
        #[allow(unsafe_code)] // No safe wrapper exists for mallopt.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Prints `error: ...: cause: cause` on one line and exits 1 on error.
pub fn finish(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = format!("{program}: error: {error:#}");
            match LOG_FORMAT.get() {
                Some(LogFormat::Json) => eprintln!("{}", json_line("ERROR", &message)),
                _ => eprintln!("{message}"),
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_log_line_names_the_partition_and_offset_its_message_does() {
        let line: serde_json::Value = serde_json::from_str(&json_line(
            "INFO",
            "partition 2: restored from the snapshot topic \"t\" at offset 5033 (the state was at offset 0)",
        ))
        .unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["partition"], 2);
        assert_eq!(line["offset"], 5033);
        assert!(line["message"]
            .as_str()
            .unwrap()
            .starts_with("partition 2: restored"));
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        let plain: serde_json::Value =
            serde_json::from_str(&json_line("WARN", "no partition here, offset none")).unwrap();
        assert!(plain.get("partition").is_none() && plain.get("offset").is_none());
        // Quotes, newlines and control characters stay one valid line.
        let odd = json_line("ERROR", "a \"quoted\"\nsecond line\u{7}");
        assert_eq!(odd.lines().count(), 1);
        assert!(serde_json::from_str::<serde_json::Value>(&odd).is_ok());
    }

    #[test]
    fn delay_is_a_number_of_seconds_up_to_an_hour() {
        assert_eq!(parse_delay("0"), Ok(0.0));
        assert_eq!(parse_delay("0.01"), Ok(0.01));
        assert_eq!(parse_delay("3600"), Ok(3600.0));
        assert!(parse_delay("3600.5").is_err());
        assert!(parse_delay("-1").is_err());
        assert!(parse_delay("NaN").is_err());
        assert!(parse_delay("soon").unwrap_err().contains("not a number"));
    }

    #[test]
    fn shutdown_timeout_is_a_positive_number_of_seconds() {
        assert_eq!(parse_seconds("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "NaN", "inf", "3601", "soon"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
