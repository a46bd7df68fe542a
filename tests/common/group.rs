//! Group members (`consumer --group`) for the tests and the bench: start
//! one, and read from its log which partitions it runs.

use std::collections::BTreeSet;
use std::path::Path;

use super::{Broker, Running};

/// The members' session timeout: how long a dead member keeps its
/// partitions.
pub const SESSION_MS: u64 = 6000;
/// The members' largest batch: what a restore may replay at most.
pub const MAX_BATCH: i64 = 200;

/// A member of `group` with its own state folder, publishing to `files`.
pub fn start_member(
    broker: &Broker,
    topic: &str,
    group: &str,
    files: &Path,
    state: &Path,
) -> Running {
    let mut cmd = broker.consumer_cmd(topic);
    cmd.args(["--group", group, "--snapshot-interval", "1"])
        .args(["--max-batch", &MAX_BATCH.to_string()])
        .args(["-X", &format!("session.timeout.ms={SESSION_MS}")])
        .args(["-X", "heartbeat.interval.ms=1000"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--files")
        .arg(files)
        .arg("--state-dir")
        .arg(state);
    Running::spawn(cmd)
}

/// The partition a log line names before `what`.
pub fn partition_in(line: &str, what: &str) -> Option<i32> {
    let (head, _) = line.split_once(what)?;
    head.rsplit_once("partition ")?.1.parse().ok()
}

/// The offset a log line names after `what`.
pub fn offset_after(line: &str, what: &str) -> Option<i64> {
    let (_, tail) = line.split_once(what)?;
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The partitions a member runs now, as its log tells.
pub fn owned(member: &Running) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for line in member.stderr_text().lines() {
        if let Some(p) = partition_in(line, ": assigned to this member") {
            owned.insert(p);
        } else if let Some(p) = partition_in(line, ": handed off at offset")
            .or_else(|| partition_in(line, ": lost (this member's session expired)"))
        {
            owned.remove(&p);
        }
    }
    owned
}

pub fn owned_by<'a>(members: impl IntoIterator<Item = &'a Running>) -> BTreeSet<i32> {
    members.into_iter().flat_map(owned).collect()
}
