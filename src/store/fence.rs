//! The lock file that fences a partition file shared by processes (the
//! members of a consumer group on one files folder): an exclusive lock
//! held while the file is compared with what is about to replace it and
//! replaced, and the epoch the file was published in. The lock is the
//! kernel's (`flock`): a process that dies releases it, and it is never
//! renamed, so every process locks the same file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use crate::store::atomic_file;

/// A held fence; released when dropped.
pub(crate) struct Fence {
    file: File,
    epoch: u64,
}

impl Fence {
    /// Waits for the fence at `path` (made when missing) and holds it.
    pub(crate) fn lock(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        flock(&file, libc::LOCK_EX)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(Fence {
            epoch: parse_epoch(&text).unwrap_or(0),
            file,
        })
    }

    /// The epoch of the file's last fenced publish (0 before any).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records a newer epoch, durably, before the file of that epoch is
    /// written: a crash in between leaves a fence ahead of its file, which
    /// only the writer of that epoch passes, never one behind it.
    pub(crate) fn set_epoch(&mut self, epoch: u64) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(format!("{epoch}\n").as_bytes())?;
        atomic_file::sync_file(&self.file)?;
        self.epoch = epoch;
        Ok(())
    }
}

/// `flock(2)` (std's `File::lock` is newer than this crate's MSRV).
pub(crate) fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: a valid descriptor, owned by `file` for the call.
        #[allow(unsafe_code)] // std's File::lock is newer than the MSRV.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Whether another process holds an exclusive `flock` on the file at
/// `path` (a sled database's, a member's state folder): the lock is tried
/// and released at once, and the file is opened read-only, never made.
/// False when there is no such file.
pub(crate) fn held_elsewhere(path: &Path) -> io::Result<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        // Closing the file releases it.
        Ok(()) => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(error) => Err(error),
    }
}

/// The epoch a fence holds, read without locking it (a start's import of
/// the file: a torn read is no epoch, as before any fenced publish).
pub(crate) fn read_epoch(path: &Path) -> Option<u64> {
    parse_epoch(&std::fs::read_to_string(path).ok()?)
}

fn parse_epoch(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_is_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".partition-0.lock");
        assert_eq!(read_epoch(&path), None);
        {
            let mut fence = Fence::lock(&path).unwrap();
            assert_eq!(fence.epoch(), 0);
            fence.set_epoch(3).unwrap();
        }
        assert_eq!(read_epoch(&path), Some(3));
        assert_eq!(Fence::lock(&path).unwrap().epoch(), 3);
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(Fence::lock(&path).unwrap().epoch(), 0);
    }

    #[test]
    fn a_held_fence_keeps_another_holder_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".partition-1.lock");
        let held = Fence::lock(&path).unwrap();
        let other = File::open(&path).unwrap();
        let error = flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        drop(held);
        flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    }
}
