//! `consumer export`: re-publishes partition files and month.svg from the
//! sled state, without Kafka, through the files folder's
//! [`Folders::publish`] (proof first). A partition held by a running
//! consumer is never opened behind its back: it is skipped, naming the
//! holder. With `--from-kafka` ([`run_from_kafka`]) it builds them from
//! the snapshot topic instead: a view of every partition without the
//! consumers' folders.

use std::path::Path;

use anyhow::{bail, Context as _};

use crate::kafka::tail::TailReader;
use crate::kafka::{ClientSettings, PartitionId, TopicAdmin};
use crate::publish::chart;
use crate::store::changelog;
use crate::store::folders::{partition_file, requested_partitions, Folders};
use crate::store::published;
use crate::store::state::{PartitionState, StateError};

/// Re-publishes partition files from state; returns an error if an
/// explicitly named partition could not be exported.
pub fn run(files_dir: &Path, state_dir: &Path, partitions: &[PartitionId]) -> anyhow::Result<()> {
    let explicit = !partitions.is_empty();
    let mut refused = Vec::new();
    crate::store::atomic_file::create_dir_all(files_dir)
        .with_context(|| format!("creating {}", files_dir.display()))?;
    for partition in requested_partitions(state_dir, partitions)? {
        match PartitionState::open_existing(state_dir, partition) {
            Ok(state) => {
                let snapshot = state.snapshot();
                let folders = Folders::new(files_dir, state_dir);
                let path = folders.partition_file(partition);
                folders
                    .publish(&snapshot, &mut Vec::new())
                    .with_context(|| format!("writing {} and its proof", path.display()))?;
                println!(
                    "partition {partition}: wrote {} (offset {})",
                    path.display(),
                    snapshot.next_offset
                );
            }
            Err(StateError::Locked { holder, .. }) => {
                log::warn!(
                    "partition {partition}: skipped, a running consumer holds it{} and publishes it itself",
                    holder.map(|h| format!(" ({h})")).unwrap_or_default()
                );
                refused.push(partition);
            }
            Err(e) => return Err(e.into()),
        }
    }
    render_chart(files_dir)?;
    if explicit && !refused.is_empty() {
        bail!("partitions {refused:?} are held by a running consumer and were not exported");
    }
    Ok(())
}

/// Where `consumer export --from-kafka` reads.
#[derive(Debug, Clone)]
pub struct FromKafka {
    pub client: ClientSettings,
    pub group_id: String,
    /// The topic the statistics were counted from.
    pub source_topic: String,
    pub snapshot_topic: String,
}

/// Builds partition files and month.svg from the snapshot topic alone: for
/// each partition, its newest snapshot (by epoch, then offset) among the
/// last records of its snapshot partition. No state folder is read or
/// written; a file of a partition without snapshots is left as it is, and
/// is an error when that partition was named.
pub fn run_from_kafka(
    from: &FromKafka,
    files_dir: &Path,
    partitions: &[PartitionId],
) -> anyhow::Result<()> {
    let admin = TopicAdmin::connect(&from.client)?;
    let Some(count) = admin.partition_count(&from.snapshot_topic)? else {
        bail!(
            "the snapshot topic {:?} does not exist: no consumer of {:?} wrote snapshots there",
            from.snapshot_topic,
            from.source_topic
        );
    };
    let explicit = !partitions.is_empty();
    let wanted: Vec<PartitionId> = if explicit {
        partitions.to_vec()
    } else {
        (0..PartitionId::try_from(count).unwrap_or(PartitionId::MAX)).collect()
    };
    crate::store::atomic_file::create_dir_all(files_dir)
        .with_context(|| format!("creating {}", files_dir.display()))?;
    let reader = TailReader::new(&from.client, &from.group_id, &from.snapshot_topic)?;
    let mut missing = Vec::new();
    for partition in wanted {
        let found = changelog::newest(&reader, partition, &from.source_topic)?;
        let Some(newest) = changelog::newest_of(found) else {
            log::warn!(
                "partition {partition}: no snapshot of {:?} in {:?}",
                from.source_topic,
                from.snapshot_topic
            );
            missing.push(partition);
            continue;
        };
        let path = partition_file(files_dir, partition);
        published::write(&path, &newest.snapshot)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "partition {partition}: wrote {} (offset {}, snapshot by {} at {} ms since 1970)",
            path.display(),
            newest.snapshot.next_offset,
            newest.writer,
            newest.written_unix_ms
        );
    }
    render_chart(files_dir)?;
    if explicit && !missing.is_empty() {
        bail!(
            "partitions {missing:?} have no snapshot in {:?}",
            from.snapshot_topic
        );
    }
    Ok(())
}

/// month.svg from the partition files in `files_dir`, telling what it
/// skipped.
fn render_chart(files_dir: &Path) -> anyhow::Result<()> {
    let report = chart::render_files(files_dir)?;
    for (path, reason) in &report.skipped {
        log::warn!("skipped {} in month.svg: {reason}", path.display());
    }
    println!(
        "wrote {} ({} bars)",
        report.path.display(),
        report.bars.len()
    );
    Ok(())
}
