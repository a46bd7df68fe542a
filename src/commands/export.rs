//! `consumer export`: re-publishes partition files and month.svg from the
//! sled state, without Kafka, through the files folder's
//! [`Folders::publish`] (proof first). A partition held by a running
//! consumer is never opened behind its back: it is skipped, naming the
//! holder.

use std::path::Path;

use anyhow::{bail, Context as _};

use crate::kafka::PartitionId;
use crate::publish::chart;
use crate::store::folders::{requested_partitions, Folders};
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
                eprintln!(
                    "partition {partition}: skipped, a running consumer holds it{} and publishes it itself",
                    holder.map(|h| format!(" ({h})")).unwrap_or_default()
                );
                refused.push(partition);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let report = chart::render_files(files_dir)?;
    for (path, reason) in &report.skipped {
        eprintln!("skipped {} in month.svg: {reason}", path.display());
    }
    println!(
        "wrote {} ({} bars)",
        report.path.display(),
        report.bars.len()
    );
    if explicit && !refused.is_empty() {
        bail!("partitions {refused:?} are held by a running consumer and were not exported");
    }
    Ok(())
}
