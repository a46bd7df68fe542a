//! The files folder and the state folder beside it: the one place that
//! names what lives in them (`partition-N.json`, `month.svg`,
//! `partition-N.proof`, each partition's sled folder, its owner note and a
//! damaged copy moved aside), lists them, and keeps the rule that ties the
//! two folders: a partition file is published only after its proof is on
//! disk ([`Folders::publish`]). Every other module asks here for a path.

use std::io;
use std::path::{Path, PathBuf};

use crate::kafka::{Offset, PartitionId};
use crate::store::fence;
use crate::store::proof::{self, Proof};
use crate::store::published;
use crate::store::snapshot::Snapshot;

/// The chart's file name in the files folder.
pub(crate) const CHART_FILE: &str = "month.svg";

/// A files folder and its state folder (by default `<files>/state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folders {
    files_dir: PathBuf,
    state_dir: PathBuf,
    /// Publishes go through the partition's fence (see [`Folders::fenced`]).
    fenced: bool,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    Written,
    /// The file was newer (another process's): nothing was written. Its
    /// offset; None when it is of a newer epoch.
    Fenced {
        file_offset: Option<Offset>,
    },
}

impl Folders {
    pub fn new(files_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Folders {
            fenced: false,
            files_dir: files_dir.into(),
            state_dir: state_dir.into(),
        }
    }

    /// The files folder with the default state folder inside it.
    pub fn with_state_inside(files_dir: impl Into<PathBuf>) -> Self {
        let files_dir = files_dir.into();
        let state_dir = files_dir.join("state");
        Folders::new(files_dir, state_dir)
    }

    pub fn files_dir(&self) -> &Path {
        &self.files_dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `<files>/partition-N.json`.
    pub fn partition_file(&self, partition: PartitionId) -> PathBuf {
        partition_file(&self.files_dir, partition)
    }

    /// `<files>/month.svg`.
    pub fn chart_file(&self) -> PathBuf {
        chart_file(&self.files_dir)
    }

    /// The partition files in the files folder, by partition, ascending.
    pub fn partition_files(&self) -> io::Result<Vec<(PartitionId, PathBuf)>> {
        partition_files(&self.files_dir)
    }

    /// The partitions with a state folder, ascending.
    pub fn state_partitions(&self) -> io::Result<Vec<PartitionId>> {
        state_partitions(&self.state_dir)
    }

    /// Publishes through each partition's fence, for a files folder that
    /// processes share as they take turns owning the partitions (the
    /// members of a consumer group): a partition file is then never
    /// replaced by an older one, whoever writes it. The fence is a lock
    /// file beside it (`.partition-N.lock`), held while the file is
    /// compared and replaced, which holds the epoch the file was published
    /// in: a file of a newer epoch (a re-created topic counted again) wins
    /// whatever its offset, one of an older epoch never does.
    pub(crate) fn fenced(mut self) -> Self {
        self.fenced = true;
        self
    }

    /// Publishes a snapshot as its partition file: its proof first
    /// (durably, in the state folder), then the file (atomically).
    /// `proofs` is the caller's memory of the partition's recent proofs
    /// (read from disk when empty).
    pub(crate) fn publish(
        &self,
        snapshot: &Snapshot,
        proofs: &mut Vec<Proof>,
    ) -> io::Result<Published> {
        if !self.fenced {
            self.publish_unfenced(snapshot, proofs)?;
            return Ok(Published::Written);
        }
        let mut fence = fence::Fence::lock(&fence_file(&self.files_dir, snapshot.partition))?;
        // A file that is not there (or not readable as one) fences nothing.
        let current = std::fs::read_to_string(self.partition_file(snapshot.partition))
            .ok()
            .and_then(|text| published::parse_partition_json(&text).ok());
        let file_epoch = fence.epoch();
        match &current {
            Some(_) if snapshot.epoch < file_epoch => {
                return Ok(Published::Fenced { file_offset: None });
            }
            Some(current)
                if snapshot.epoch == file_epoch && current.offset > snapshot.next_offset =>
            {
                return Ok(Published::Fenced {
                    file_offset: Some(current.offset),
                });
            }
            _ if snapshot.epoch != file_epoch => fence.set_epoch(snapshot.epoch)?,
            _ => {}
        }
        self.publish_unfenced(snapshot, proofs)?;
        Ok(Published::Written)
    }

    fn publish_unfenced(&self, snapshot: &Snapshot, proofs: &mut Vec<Proof>) -> io::Result<()> {
        proof::record(
            &proof_file(&self.state_dir, snapshot.partition),
            snapshot.partition,
            proofs,
            Proof::of(snapshot),
        )?;
        published::write(&self.partition_file(snapshot.partition), snapshot)
    }
}

/// `<files>/.partition-N.lock`: the fence of a partition file shared by
/// group members (see [`Folders::fenced`]).
fn fence_file(files_dir: &Path, partition: PartitionId) -> PathBuf {
    files_dir.join(format!(".partition-{partition}.lock"))
}

/// The epoch a shared partition file was published in, as its fence
/// holds it; None where no fenced publish happened.
pub(crate) fn published_epoch(files_dir: &Path, partition: PartitionId) -> Option<u64> {
    fence::read_epoch(&fence_file(files_dir, partition))
}

/// `<files>/partition-N.json`.
pub(crate) fn partition_file(files_dir: &Path, partition: PartitionId) -> PathBuf {
    files_dir.join(format!("partition-{partition}.json"))
}

/// `<files>/month.svg`.
pub(crate) fn chart_file(files_dir: &Path) -> PathBuf {
    files_dir.join(CHART_FILE)
}

/// The partition files in `files_dir`, by partition, ascending.
pub(crate) fn partition_files(files_dir: &Path) -> io::Result<Vec<(PartitionId, PathBuf)>> {
    numbered(files_dir, "partition-", ".json", Kind::File)
}

/// `partitions`, or, when none are named, every partition with a state
/// folder in `state_dir` (an error when there is none).
pub(crate) fn requested_partitions(
    state_dir: &Path,
    partitions: &[PartitionId],
) -> anyhow::Result<Vec<PartitionId>> {
    if !partitions.is_empty() {
        return Ok(partitions.to_vec());
    }
    let found = state_partitions(state_dir)
        .map_err(|e| anyhow::anyhow!("listing {}: {e}", state_dir.display()))?;
    if found.is_empty() {
        anyhow::bail!("no partition state in {}", state_dir.display());
    }
    Ok(found)
}

/// The partitions with a state folder in `state_dir`, ascending.
pub(crate) fn state_partitions(state_dir: &Path) -> io::Result<Vec<PartitionId>> {
    Ok(numbered(state_dir, "partition-", "", Kind::Folder)?
        .into_iter()
        .map(|(partition, _)| partition)
        .collect())
}

/// The proof of the partition file published at `offset`, if one was
/// recorded.
pub(crate) fn find_proof(
    state_dir: &Path,
    partition: PartitionId,
    offset: Offset,
) -> Option<Proof> {
    proof::find(&proof_file(state_dir, partition), partition, offset)
}

/// `<state>/partition-N.proof`.
pub(crate) fn proof_file(state_dir: &Path, partition: PartitionId) -> PathBuf {
    state_dir.join(format!("partition-{partition}.proof"))
}

/// `<state>/partition-N/`: the partition's sled database.
pub(crate) fn state_folder(state_dir: &Path, partition: PartitionId) -> PathBuf {
    state_dir.join(format!("partition-{partition}"))
}

/// `<state>/member.lock`: a group member's hold on its state folder.
pub(crate) fn member_lock_file(state_dir: &Path) -> PathBuf {
    state_dir.join("member.lock")
}

/// `<state>/partition-N.owner`: who last claimed the partition.
pub(crate) fn owner_file(state_dir: &Path, partition: PartitionId) -> PathBuf {
    state_dir.join(format!("partition-{partition}.owner"))
}

/// `<state>/partition-N.damaged-STAMP`: a state sled could not open.
pub(crate) fn damaged_folder(state_dir: &Path, partition: PartitionId, stamp: &str) -> PathBuf {
    state_dir.join(format!("partition-{partition}.damaged-{stamp}"))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    File,
    Folder,
}

/// Entries of `dir` named `<prefix>N<suffix>`, of the given kind, with their
/// numbers, ascending; none when the folder does not exist.
fn numbered(
    dir: &Path,
    prefix: &str,
    suffix: &str,
    kind: Kind,
) -> io::Result<Vec<(PartitionId, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<PartitionId>().ok());
        let Some(number) = number else {
            continue;
        };
        if (kind == Kind::Folder) == path.is_dir() {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_take_only_their_own_names_in_partition_order() {
        let folders = Folders::with_state_inside(tempfile::tempdir().unwrap().keep());
        std::fs::create_dir_all(folders.state_dir()).unwrap();
        for name in [
            "partition-10.json",
            "partition-2.json",
            "partition-x.json",
            "partition-3.json.tmp",
            "month.svg",
        ] {
            std::fs::write(folders.files_dir().join(name), "{}").unwrap();
        }
        for partition in [7, 1] {
            std::fs::create_dir(state_folder(folders.state_dir(), partition)).unwrap();
        }
        std::fs::write(proof_file(folders.state_dir(), 4), "{}").unwrap();
        std::fs::create_dir(damaged_folder(folders.state_dir(), 5, "20261205T000000Z")).unwrap();
        let files: Vec<PartitionId> = folders
            .partition_files()
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(files, [2, 10]);
        assert_eq!(folders.state_partitions().unwrap(), [1, 7]);
        assert_eq!(
            folders.partition_file(2),
            folders.files_dir().join("partition-2.json")
        );
        let missing = Folders::with_state_inside(folders.files_dir().join("nothing"));
        assert!(missing.partition_files().unwrap().is_empty());
        assert!(missing.state_partitions().unwrap().is_empty());
        std::fs::remove_dir_all(folders.files_dir()).unwrap();
    }

    #[test]
    fn a_partition_file_is_published_after_its_proof() {
        let dir = tempfile::tempdir().unwrap();
        let folders = Folders::with_state_inside(dir.path());
        std::fs::create_dir_all(folders.state_dir()).unwrap();
        let mut snapshot = Snapshot::empty(3);
        snapshot.next_offset = 42;
        folders.publish(&snapshot, &mut Vec::new()).unwrap();
        assert_eq!(
            find_proof(folders.state_dir(), 3, 42).map(|p| p.offset),
            Some(42)
        );
        let text = std::fs::read_to_string(folders.partition_file(3)).unwrap();
        assert_eq!(published::parse_partition_json(&text).unwrap().offset, 42);
        // No state folder to prove in: nothing is published.
        let unproven = Folders::new(dir.path(), dir.path().join("missing"));
        snapshot.next_offset = 43;
        assert!(unproven.publish(&snapshot, &mut Vec::new()).is_err());
        let text = std::fs::read_to_string(folders.partition_file(3)).unwrap();
        assert_eq!(published::parse_partition_json(&text).unwrap().offset, 42);
    }

    fn at(epoch: u64, next_offset: Offset) -> Snapshot {
        let mut snapshot = Snapshot::empty(1);
        snapshot.epoch = epoch;
        snapshot.next_offset = next_offset;
        snapshot
    }

    fn file_offset(folders: &Folders) -> Option<Offset> {
        let text = std::fs::read_to_string(folders.partition_file(1)).ok()?;
        Some(published::parse_partition_json(&text).unwrap().offset)
    }

    #[test]
    fn a_fenced_file_never_goes_back_within_its_epoch_and_a_newer_epoch_wins() {
        let dir = tempfile::tempdir().unwrap();
        // Two members: one files folder, a state folder each.
        let one = Folders::new(dir.path(), dir.path().join("one")).fenced();
        let other = Folders::new(dir.path(), dir.path().join("other")).fenced();
        std::fs::create_dir_all(one.state_dir()).unwrap();
        std::fs::create_dir_all(other.state_dir()).unwrap();
        let publish = |folders: &Folders, snapshot| folders.publish(&snapshot, &mut Vec::new());

        assert_eq!(publish(&one, at(0, 50)).unwrap(), Published::Written);
        assert_eq!(publish(&other, at(0, 80)).unwrap(), Published::Written);
        // The member that lost the partition, late: left out.
        assert_eq!(
            publish(&one, at(0, 60)).unwrap(),
            Published::Fenced {
                file_offset: Some(80)
            }
        );
        assert_eq!(file_offset(&one), Some(80));
        // The same offset again (a deterministic count) is no harm.
        assert_eq!(publish(&one, at(0, 80)).unwrap(), Published::Written);
        // A re-created topic counted again: the newer epoch wins from 0 on,
        // and the old epoch never comes back, however far it got.
        assert_eq!(publish(&other, at(1, 5)).unwrap(), Published::Written);
        assert_eq!(published_epoch(dir.path(), 1), Some(1));
        assert_eq!(
            publish(&one, at(0, 90)).unwrap(),
            Published::Fenced { file_offset: None }
        );
        assert_eq!(file_offset(&one), Some(5));
        // A file removed by hand fences nothing.
        std::fs::remove_file(one.partition_file(1)).unwrap();
        assert_eq!(publish(&one, at(0, 3)).unwrap(), Published::Written);
        assert_eq!(published_epoch(dir.path(), 1), Some(0));
        // The manual mode is not fenced: its own rules decide.
        let manual = Folders::new(dir.path(), dir.path().join("one"));
        assert_eq!(publish(&manual, at(0, 1)).unwrap(), Published::Written);
        assert_eq!(file_offset(&one), Some(1));
    }

    /// Two writers racing, each publishing its own rising offsets, as two
    /// members would around a hand-off (or a zombie beside the new owner):
    /// a reader never sees the file's offset go back.
    #[test]
    fn racing_fenced_writers_never_take_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = [0, 1]
            .into_iter()
            .map(|member| {
                let folders =
                    Folders::new(dir.path(), dir.path().join(format!("m{member}"))).fenced();
                std::fs::create_dir_all(folders.state_dir()).unwrap();
                std::thread::spawn(move || {
                    // Interleaved offsets: each writer is behind the other
                    // half of the time.
                    for step in 0..300 {
                        let offset = step * 2 + member;
                        folders.publish(&at(0, offset), &mut Vec::new()).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let folders = Folders::new(dir.path(), dir.path().join("m0"));
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut last = -1;
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(offset) = file_offset(&folders) {
                        assert!(offset >= last, "went back from {last} to {offset}");
                        last = offset;
                        reads += 1;
                    }
                }
                (last, reads)
            })
        };
        for writer in writers {
            writer.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (last, reads) = reader.join().unwrap();
        assert_eq!(
            file_offset(&Folders::with_state_inside(dir.path())),
            Some(599)
        );
        assert!(last <= 599 && reads > 0);
    }
}
