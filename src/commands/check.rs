//! `consumer check` and `producer check`: the preflight. Before a start,
//! with the same settings, it checks what the command will need: the
//! client settings, the web config, the connection with its TLS and SASL,
//! the topic and its partitions, the topic and group permissions it can
//! probe without changing anything, and the state folder (writable, not
//! held by another process). One line per check and a summary, or JSON;
//! the caller exits 0 when nothing failed, else 1.
//!
//! It changes nothing: it only connects, lists, reads one record (without
//! committing its offset), fetches the group's committed offsets, and
//! tries the state locks for an instant. What cannot be checked without a
//! change (creating a topic, writing a record, joining a group, committing)
//! is said as such, never tried.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::kafka::preflight;
use crate::kafka::{AdminError, ClientSettings, PartitionId, TopicAdmin};
use crate::store::{atomic_file, fence, folders, state};
use crate::web::WebConfig;

/// What `consumer check` checks: the consumer's own settings.
#[derive(Debug, Clone)]
pub struct ConsumerCheck {
    pub client: ClientSettings,
    pub topic: String,
    pub group_id: String,
    /// `--group`: a member of `group_id`, with no partition list.
    pub join_group: bool,
    pub partitions: Vec<PartitionId>,
    /// None: `--no-snapshots`.
    pub snapshot_topic: Option<String>,
    pub files_dir: PathBuf,
    pub state_dir: PathBuf,
    pub web_config_file: Option<PathBuf>,
}

/// What `producer check` checks.
#[derive(Debug, Clone)]
pub struct ProducerCheck {
    pub client: ClientSettings,
    pub topic: String,
    /// `--keep-topic`: the topic is kept (else deleted and created).
    pub keep_topic: bool,
    /// The partitions the topic must have with `--keep-topic`.
    pub partitions: i32,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Failed,
    /// Not checked: an earlier check failed, or it does not apply.
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
}

/// Every check of one command, in order.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: &'static str,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(command: &'static str) -> Self {
        Report {
            command,
            checks: Vec::new(),
        }
    }

    fn add(&mut self, check: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            check,
            status,
            detail: detail.into(),
        });
    }

    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.add(check, Status::Ok, detail);
    }

    fn failed(&mut self, check: &'static str, detail: impl Into<String>) {
        self.add(check, Status::Failed, detail);
    }

    fn skipped(&mut self, check: &'static str, detail: impl Into<String>) {
        self.add(check, Status::Skipped, detail);
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// Nothing failed.
    pub fn passed(&self) -> bool {
        self.count(Status::Failed) == 0
    }

    /// `ok    connection  ...` lines, then the summary.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        let width = self.checks.iter().map(|c| c.check.len()).max().unwrap_or(0);
        for check in &self.checks {
            let status = match check.status {
                Status::Ok => "ok",
                Status::Failed => "FAILED",
                Status::Skipped => "skipped",
            };
            writeln!(out, "{status:<7} {:<width$}  {}", check.check, check.detail)?;
        }
        writeln!(out, "{}", self.summary())
    }

    /// One JSON object: the command, every check, and the counts.
    pub fn write_json(&self, out: &mut impl Write) -> std::io::Result<()> {
        let value = serde_json::json!({
            "command": self.command,
            "passed": self.passed(),
            "ok": self.count(Status::Ok),
            "failed": self.count(Status::Failed),
            "skipped": self.count(Status::Skipped),
            "checks": self.checks,
        });
        writeln!(out, "{value}")
    }

    /// Prints the report on stdout, as lines or as JSON (`--json`); the
    /// exit status: 0 when nothing failed, else 1.
    pub fn print(&self, json: bool) -> std::process::ExitCode {
        let mut out = std::io::stdout().lock();
        let written = if json {
            self.write_json(&mut out)
        } else {
            self.write_text(&mut out)
        };
        if written.is_ok() && self.passed() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} check: {} ({} ok, {} failed, {} skipped)",
            self.command,
            if self.passed() { "passed" } else { "FAILED" },
            self.count(Status::Ok),
            self.count(Status::Failed),
            self.count(Status::Skipped)
        )
    }
}

/// Runs `consumer check`.
pub fn consumer(config: &ConsumerCheck) -> Report {
    let mut report = Report::new("consumer");
    let admin = connect(&mut report, &config.client);
    match &config.web_config_file {
        None => report.skipped("web config", "no --web-config-file: plain HTTP, no auth"),
        Some(path) => match WebConfig::load(path) {
            Ok(web) => report.ok(
                "web config",
                format!(
                    "{}: {}",
                    path.display(),
                    if web.tls() { "TLS" } else { "plain HTTP" }
                ),
            ),
            Err(error) => report.failed("web config", error.to_string()),
        },
    }
    match &admin {
        None => {
            for check in ["topic", "topic access", "group access", "snapshot topic"] {
                report.skipped(check, "needs a connection");
            }
        }
        Some(admin) => {
            match topic(&mut report, admin, config) {
                Some(partitions) => {
                    topic_access(&mut report, config, &partitions);
                    group_access(&mut report, config, &partitions);
                }
                None => {
                    for check in ["topic access", "group access"] {
                        report.skipped(check, "needs the topic");
                    }
                }
            }
            match &config.snapshot_topic {
                None => report.skipped("snapshot topic", "--no-snapshots"),
                Some(snapshots) => snapshot_topic(&mut report, admin, config, snapshots),
            }
        }
    }
    state_folder(&mut report, config);
    files_folder(&mut report, &config.files_dir);
    report
}

/// Runs `producer check`.
pub fn producer(config: &ProducerCheck) -> Report {
    let mut report = Report::new("producer");
    let Some(admin) = connect(&mut report, &config.client) else {
        report.skipped("topic", "needs a connection");
        return report;
    };
    match admin.partition_count(&config.topic) {
        Err(error) => report.failed("topic", error.to_string()),
        Ok(None) if config.keep_topic => report.ok(
            "topic",
            format!(
                "{:?} does not exist: the producer creates it ({} partitions; needs Create on it, not tried)",
                config.topic, config.partitions
            ),
        ),
        Ok(None) => report.ok(
            "topic",
            format!(
                "{:?} does not exist: the producer creates it (needs Create on it, not tried)",
                config.topic
            ),
        ),
        Ok(Some(count)) if config.keep_topic && count != config.partitions as usize => report.failed(
            "topic",
            format!(
                "{:?} has {count} partitions, --keep-topic needs {} (--partitions)",
                config.topic, config.partitions
            ),
        ),
        Ok(Some(count)) if config.keep_topic => report.ok(
            "topic",
            format!(
                "{:?} has {count} partitions and is kept (Write on it is not tried: it would add a record)",
                config.topic
            ),
        ),
        Ok(Some(count)) => report.ok(
            "topic",
            format!(
                "{:?} has {count} partitions; the producer deletes and creates it (Delete and Create on it, not tried: they are changes)",
                config.topic
            ),
        ),
    }
    report
}

/// The settings, the connection, and TLS and SASL; the admin client when
/// the brokers answered.
fn connect(report: &mut Report, client: &ClientSettings) -> Option<TopicAdmin> {
    let servers = client.bootstrap_servers().to_string();
    let protocol = client.security_protocol().to_ascii_uppercase();
    let security = match client.get("sasl.mechanism") {
        Some(mechanism) if protocol.starts_with("SASL") => format!(
            "{protocol}, {mechanism} as {:?}",
            client.get("sasl.username").unwrap_or_default()
        ),
        _ => protocol.clone(),
    };
    // librdkafka checks each setting when a client is made.
    if let Err(error) =
        crate::kafka::client_config(client).create::<rdkafka::consumer::BaseConsumer>()
    {
        report.failed("settings", format!("{error}"));
        report.skipped("connection", "needs valid settings");
        report.skipped("tls and sasl", "needs valid settings");
        return None;
    }
    report.ok(
        "settings",
        format!("bootstrap servers {servers}; security.protocol {protocol}"),
    );
    match TopicAdmin::connect(client) {
        Ok(admin) => {
            report.ok("connection", format!("{servers} answered"));
            report.ok("tls and sasl", format!("{security}: accepted"));
            Some(admin)
        }
        Err(
            error @ (AdminError::AuthenticationRefused { .. }
            | AdminError::TlsHandshake { .. }
            | AdminError::ProtocolMismatch { .. }),
        ) => {
            // The brokers answered, and refused this client.
            report.ok("connection", format!("{servers} answered"));
            report.failed("tls and sasl", format!("{security}: {error}"));
            None
        }
        Err(error) => {
            report.failed("connection", format!("{:#}", anyhow::Error::from(error)));
            report.skipped("tls and sasl", "needs a connection");
            None
        }
    }
}

/// The topic exists and has the partitions asked for; those to probe.
fn topic(
    report: &mut Report,
    admin: &TopicAdmin,
    config: &ConsumerCheck,
) -> Option<Vec<PartitionId>> {
    let count = match admin.partition_count(&config.topic) {
        Err(error) => {
            report.failed("topic", error.to_string());
            return None;
        }
        Ok(None) => {
            report.failed(
                "topic",
                format!(
                    "{:?} does not exist (the producer creates it; the consumer would wait for it)",
                    config.topic
                ),
            );
            return None;
        }
        Ok(Some(count)) => count,
    };
    let all: Vec<PartitionId> = (0..count)
        .filter_map(|p| PartitionId::try_from(p).ok())
        .collect();
    if config.join_group {
        report.ok(
            "topic",
            format!(
                "{:?} has {count} partitions, for group {:?} to share",
                config.topic, config.group_id
            ),
        );
        return Some(all);
    }
    let missing: Vec<String> = config
        .partitions
        .iter()
        .filter(|p| !all.contains(p))
        .map(|p| p.to_string())
        .collect();
    if !missing.is_empty() {
        report.failed(
            "topic",
            format!(
                "{:?} has {count} partitions, no partition {}",
                config.topic,
                missing.join(", ")
            ),
        );
        return None;
    }
    report.ok(
        "topic",
        format!("{:?} has {count} partitions", config.topic),
    );
    Some(config.partitions.clone())
}

/// Describe (offsets listed) and Read (one record read) on the topic, and
/// Describe on the snapshot topic.
fn topic_access(report: &mut Report, config: &ConsumerCheck, partitions: &[PartitionId]) {
    let (client, group, topic) = (&config.client, &config.group_id, &config.topic);
    let ranges = match preflight::watermarks(client, group, topic, partitions) {
        Ok(ranges) => ranges,
        Err(error) => {
            report.failed("topic access", format!("Describe on {topic:?}: {error}"));
            return;
        }
    };
    let with_records = ranges.iter().find(|(_, (low, high))| high > low);
    let detail = match with_records {
        None => format!(
            "offsets of {} partitions listed (Describe); no record to read yet, so Read is not tried",
            ranges.len()
        ),
        Some((&partition, &(low, _))) => {
            match preflight::read_one(client, group, topic, partition, low) {
                Ok(offset) => format!(
                    "offsets of {} partitions listed (Describe); the record at offset {offset} of partition {partition} read (Read)",
                    ranges.len()
                ),
                Err(error) => {
                    report.failed("topic access", format!("Read on {topic:?}: {error}"));
                    return;
                }
            }
        }
    };
    report.ok("topic access", detail);
}

/// Describe on the group (its committed offsets fetched); the rest of
/// what the group needs is said, not tried.
fn group_access(report: &mut Report, config: &ConsumerCheck, partitions: &[PartitionId]) {
    let group = &config.group_id;
    match preflight::committed_offsets(&config.client, group, &config.topic, partitions) {
        Ok(with_offset) => {
            let untried = if config.join_group {
                "joining it needs Read on it, not tried: a join would make the group rebalance"
            } else {
                "committing needs Read on it, not tried: a commit is a change"
            };
            report.ok(
                "group access",
                format!(
                    "group {group:?}: committed offsets of {} partitions fetched, {with_offset} with one (Describe); {untried}",
                    partitions.len()
                ),
            );
        }
        Err(error) => report.failed(
            "group access",
            format!("Describe on group {group:?}: {error}"),
        ),
    }
}

/// The snapshot topic: there and listable (Describe), or made at start.
fn snapshot_topic(
    report: &mut Report,
    admin: &TopicAdmin,
    config: &ConsumerCheck,
    snapshots: &str,
) {
    match admin.partition_count(snapshots) {
        Err(error) => report.failed("snapshot topic", error.to_string()),
        Ok(None) => report.ok(
            "snapshot topic",
            format!("{snapshots:?} does not exist: the consumer creates it at start (Create, not tried)"),
        ),
        Ok(Some(count)) => {
            let partitions: Vec<PartitionId> =
                (0..count).filter_map(|p| PartitionId::try_from(p).ok()).collect();
            match preflight::watermarks(&config.client, &config.group_id, snapshots, &partitions) {
                Ok(_) => report.ok(
                    "snapshot topic",
                    format!("{snapshots:?} has {count} partitions; offsets listed (Describe); Write is not tried"),
                ),
                Err(error) => report.failed(
                    "snapshot topic",
                    format!("Describe on {snapshots:?}: {error}"),
                ),
            }
        }
    }
}

/// The state folder: there or makeable, writable, and not held by another
/// process (a partition's state, or a group member's folder).
fn state_folder(report: &mut Report, config: &ConsumerCheck) {
    let dir = &config.state_dir;
    let usable = match writable(dir) {
        Ok(usable) => usable,
        Err(detail) => {
            report.failed("state folder", detail);
            return;
        }
    };
    let held = if config.join_group {
        fence::held_elsewhere(&folders::member_lock_file(dir)).map(|held| {
            held.then(|| {
                format!(
                    "{} is held by another consumer process (group member): each member needs a state folder of its own",
                    dir.display()
                )
            })
        })
    } else {
        config
            .partitions
            .iter()
            .map(|&partition| {
                state::held_by(dir, partition).map(|holder| {
                    holder.map(|holder| {
                        let holder = if holder.is_empty() {
                            String::new()
                        } else {
                            format!(" ({holder})")
                        };
                        format!("partition {partition} is held by another consumer process{holder}")
                    })
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map(|all| {
                let held: Vec<String> = all.into_iter().flatten().collect();
                (!held.is_empty()).then(|| format!("{}: {}", dir.display(), held.join("; ")))
            })
    };
    match held {
        Err(error) => report.failed("state folder", format!("{}: {error}", dir.display())),
        Ok(Some(held)) => report.failed("state folder", held),
        Ok(None) => report.ok(
            "state folder",
            format!("{}: {usable}, not held by another process", dir.display()),
        ),
    }
}

fn files_folder(report: &mut Report, dir: &Path) {
    match writable(dir) {
        Ok(usable) => report.ok("files folder", format!("{}: {usable}", dir.display())),
        Err(detail) => report.failed("files folder", detail),
    }
}

/// A folder this process can write in, or create (its nearest existing
/// ancestor writable), said as such; the check writes nothing.
fn writable(dir: &Path) -> Result<String, String> {
    let existing = dir
        .ancestors()
        .find(|path| path.as_os_str().is_empty() || path.exists())
        .filter(|path| !path.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !existing.is_dir() {
        return Err(format!("{} is not a folder", existing.display()));
    }
    match atomic_file::can_write(existing) {
        Ok(true) if existing == dir => Ok("writable".into()),
        Ok(true) => Ok(format!(
            "does not exist yet; made at start in {} (writable)",
            existing.display()
        )),
        Ok(false) if existing == dir => {
            Err(format!("{} is not writable by this process", dir.display()))
        }
        Ok(false) => Err(format!(
            "{} does not exist, and {} is not writable by this process to make it",
            dir.display(),
            existing.display()
        )),
        Err(error) => Err(format!("{}: {error}", existing.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_one_line_per_check_and_a_summary() {
        let mut report = Report::new("consumer");
        report.ok("connection", "b:9092 answered");
        report.failed("topic", "\"t\" does not exist");
        report.skipped("topic access", "needs the topic");
        let mut text = Vec::new();
        report.write_text(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("ok      connection"), "{text}");
        assert!(lines[1].starts_with("FAILED  topic"), "{text}");
        assert!(lines[2].starts_with("skipped topic access"), "{text}");
        assert_eq!(
            lines[3],
            "consumer check: FAILED (1 ok, 1 failed, 1 skipped)"
        );
        assert!(!report.passed());

        let mut json = Vec::new();
        report.write_json(&mut json).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["passed"], false);
        assert_eq!(value["failed"], 1);
        assert_eq!(value["checks"][1]["status"], "failed");
        assert_eq!(value["checks"][1]["check"], "topic");
    }

    #[test]
    fn a_folder_is_writable_when_it_or_its_nearest_ancestor_is() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(writable(dir.path()), Ok("writable".to_string()));
        assert!(writable(&dir.path().join("a/b"))
            .unwrap()
            .starts_with("does not exist yet; made at start in"));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(writable(&file.join("below"))
            .unwrap_err()
            .contains("not a folder"));
    }

    #[test]
    fn a_held_lock_is_seen_and_a_free_one_left_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("member.lock");
        assert!(!fence::held_elsewhere(&path).unwrap(), "no file, not held");
        assert!(!path.exists(), "the check makes no file");
        let file = std::fs::File::create(&path).unwrap();
        assert!(!fence::held_elsewhere(&path).unwrap());
        fence::flock(&file, libc::LOCK_EX | libc::LOCK_NB).unwrap();
        assert!(fence::held_elsewhere(&path).unwrap());
        drop(file);
        assert!(!fence::held_elsewhere(&path).unwrap());
        let again = std::fs::File::open(&path).unwrap();
        fence::flock(&again, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    }
}
