//! The published files' proofs, `<state-dir>/partition-N.proof` (the path
//! is [`crate::store::folders`]'): for each of
//! the last two partition files published, its epoch, its offset and the
//! fingerprint of the last record it counted. The exporter writes the proof
//! (fsynced) before it renames the partition file into place; at start-up
//! the consumer reads it to tell, without anything from sled, whether a
//! published file ahead of the state belongs to the topic as it is now.
//! This module alone reads and writes these files. Each write keeps the
//! last [`KEPT`] proofs: the file on disk is always the newest but one (a
//! crash between the proof's write and the file's rename) or the newest,
//! also across a restart of the consumer.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::kafka::{Offset, PartitionId};
use crate::store::atomic_file;
use crate::store::snapshot::{Fingerprint, Snapshot};

/// What one published partition file was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub epoch: u64,
    /// The file's `offset`.
    pub offset: Offset,
    /// The last record counted before that offset (None when the snapshot
    /// had none to name: first start, a reset, a file of another program).
    pub record: Option<Fingerprint>,
}

impl Proof {
    pub fn of(snapshot: &Snapshot) -> Self {
        Proof {
            epoch: snapshot.epoch,
            offset: snapshot.next_offset,
            record: snapshot.last_record,
        }
    }
}

/// Proofs kept per partition.
const KEPT: usize = 3;

#[derive(Debug, Serialize, Deserialize)]
struct ProofFile {
    partition: PartitionId,
    /// Oldest first; at most [`KEPT`].
    published: Vec<Proof>,
}

/// The proofs of `partition` in the proof file at `path` (named by
/// [`crate::store::folders`]), oldest first; none when there is no readable file:
/// a proof only ever adds a way to keep a published file.
pub fn read(path: &Path, partition: PartitionId) -> Vec<Proof> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ProofFile>(&bytes).ok())
        .filter(|file| file.partition == partition)
        .map(|file| file.published)
        .unwrap_or_default()
}

/// The proof of a published file at `offset`, if one was recorded.
pub fn find(path: &Path, partition: PartitionId, offset: Offset) -> Option<Proof> {
    read(path, partition)
        .into_iter()
        .rev()
        .find(|proof| proof.offset == offset)
}

/// Records, durably, the proof of the file about to be published, before
/// it is renamed. `history` is the caller's memory of this partition's
/// proofs, oldest first (loaded from disk when empty).
pub fn record(
    path: &Path,
    partition: PartitionId,
    history: &mut Vec<Proof>,
    next: Proof,
) -> std::io::Result<()> {
    if history.is_empty() {
        *history = read(path, partition);
    }
    if history.last() != Some(&next) {
        history.push(next);
    }
    let excess = history.len().saturating_sub(KEPT);
    history.drain(..excess);
    let file = ProofFile {
        partition,
        published: history.clone(),
    };
    let mut text = serde_json::to_string(&file).expect("plain struct serializes");
    text.push('\n');
    atomic_file::write(path, text.as_bytes())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn path(dir: &Path, partition: PartitionId) -> PathBuf {
        dir.join(format!("partition-{partition}.proof"))
    }

    fn proof(epoch: u64, offset: Offset) -> Proof {
        Proof {
            epoch,
            offset,
            record: Some(Fingerprint::of(offset - 1, Some(b"May"), Some(b"v"))),
        }
    }

    #[test]
    fn keeps_the_last_three_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&path(dir.path(), 2), 2), Vec::new());
        let mut history = Vec::new();
        record(&path(dir.path(), 2), 2, &mut history, proof(0, 10)).unwrap();
        record(&path(dir.path(), 2), 2, &mut history, proof(0, 20)).unwrap();
        // The same publish again (a retry) is one entry, not two.
        record(&path(dir.path(), 2), 2, &mut history, proof(0, 20)).unwrap();
        assert_eq!(
            read(&path(dir.path(), 2), 2),
            vec![proof(0, 10), proof(0, 20)]
        );
        // A new process starts from what is on disk.
        let mut history = Vec::new();
        record(&path(dir.path(), 2), 2, &mut history, proof(0, 30)).unwrap();
        record(&path(dir.path(), 2), 2, &mut history, proof(1, 0)).unwrap();
        assert_eq!(
            read(&path(dir.path(), 2), 2),
            vec![proof(0, 20), proof(0, 30), proof(1, 0)]
        );
        assert_eq!(find(&path(dir.path(), 2), 2, 30), Some(proof(0, 30)));
        assert_eq!(find(&path(dir.path(), 2), 2, 10), None);
    }

    #[test]
    fn another_partitions_or_a_damaged_file_proves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        record(&path(dir.path(), 1), 1, &mut Vec::new(), proof(0, 10)).unwrap();
        std::fs::rename(path(dir.path(), 1), path(dir.path(), 3)).unwrap();
        assert_eq!(read(&path(dir.path(), 3), 3), Vec::new());
        std::fs::write(path(dir.path(), 1), b"{\"partition\": 1, \"publ").unwrap();
        assert_eq!(read(&path(dir.path(), 1), 1), Vec::new());
    }
}
