//! The one writer of files that other programs read (partition-N.json,
//! month.svg, owner notes): a reader sees the old content or the new,
//! never a mix, and after a crash the new content is either fully there or
//! not at all. Temp file in the same folder, fsync, rename, fsync folder.
//! Every fsync of the process goes through [`sync_file`] and [`sync_dir`]
//! here, so that [`fsyncs_total`] counts them all (the state's sled files
//! included) for `/metrics` and the benchmarks.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static FSYNCS: AtomicU64 = AtomicU64::new(0);

/// fsyncs (of files and folders) this process has made.
pub fn fsyncs_total() -> u64 {
    FSYNCS.load(Ordering::Relaxed)
}

/// fsync of an open file: its data and the metadata needed to read it back
/// (its size included), down to the device.
pub fn sync_file(file: &File) -> io::Result<()> {
    FSYNCS.fetch_add(1, Ordering::Relaxed);
    file.sync_all()
}

/// fsync of a folder: makes the files created, renamed or removed in it
/// survive a power cut (a file's own fsync does not cover its name).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    FSYNCS.fetch_add(1, Ordering::Relaxed);
    File::open(dir)?.sync_all()
}

/// `fs::create_dir_all`, durably: the folder of each component it creates
/// is fsynced, so that the new folders (and what is later made durable in
/// them) are still there after a power cut.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_all(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent.unwrap_or(Path::new("."))),
        // Made meanwhile by another process: its maker syncs it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Atomically replaces `path` with `contents`.
pub fn write(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // Per process and thread: two writers of one file must not share a temp.
    let tmp = dir.join(format!(
        ".{}.{}.{:?}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        std::thread::current().id()
    ));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        sync_file(&file)?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether this process may write in `dir` (`access(2)` with `W_OK`: the
/// permissions, and a read-only mount); nothing is written.
pub(crate) fn can_write(dir: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: a valid NUL-terminated path that lives across the call.
    #[allow(unsafe_code)] // std has no access(2).
    let status = unsafe { libc::access(path.as_ptr(), libc::W_OK) };
    if status == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EACCES | libc::EROFS | libc::EPERM) => Ok(false),
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_nested_folders_and_counts_a_sync_per_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        let before = fsyncs_total();
        create_dir_all(&nested).unwrap();
        assert!(nested.is_dir());
        assert!(fsyncs_total() - before >= 3);
        create_dir_all(&nested).unwrap();
    }

    #[test]
    fn replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partition-0.json");
        write(&path, b"old").unwrap();
        write(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write(&dir.path().join("nope/x.json"), b"x").is_err());
    }
}
