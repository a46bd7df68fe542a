//! Faults under a running pipeline: a full disk under the consumer's files
//! and state. The consumer must keep running, keep its last committed state,
//! never publish an older offset, and count every report exactly once when
//! space returns.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const ALL: [i32; 4] = [0, 1, 2, 3];

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None (with the reason) where this process may not mount.
    fn mount(size_mib: u32) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root, so no tmpfs can be mounted".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes 1 MiB blocks into `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 1 << 20];
    while file.write_all(&block).and_then(|_| file.sync_all()).is_ok() {}
}

#[test]
fn a_full_disk_stalls_the_consumer_which_recovers_without_losing_or_double_counting() {
    let tmpfs = match Tmpfs::mount(32) {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!(
                "skipped: {why}; run the tests as root (CI does) to fill a tmpfs under the consumer"
            );
            return;
        }
    };
    let files = tmpfs.path().join("files");
    let broker = Broker::start();
    let topic = unique_topic("fulldisk");
    let (days, seed) = (3000, 41);
    let mut producer = start_paced_producer(&broker, &topic, days, seed, "0.002");
    let mut consumer = start_consumer(&broker, &topic, &files, &ALL);
    wait_until("some progress", Duration::from_secs(60), || {
        published_offsets(&files)
            .iter()
            .all(|o| o.is_some_and(|o| o > 20))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_offsets(files.clone(), published_offsets(&files), stop.clone());

    // Full: commits fail; the consumer says so and keeps running.
    let filler = tmpfs.path().join("filler");
    fill(&filler);
    wait_until("a failed commit", Duration::from_secs(30), || {
        consumer.stderr_text().contains("cannot commit")
    });
    let exited = wait_until_or_timeout(Duration::from_secs(3), || {
        consumer.child.try_wait().unwrap().is_some()
    });
    assert!(!exited, "the consumer exited: {}", consumer.stderr_text());

    // Space returns: everything is counted, once.
    std::fs::remove_file(&filler).unwrap();
    let records = finish_and_read(&broker, &topic, &mut producer, &files, days, seed);
    stop.store(true, Ordering::SeqCst);
    let went_back = sampler.join().unwrap();
    assert!(
        went_back.is_empty(),
        "published offsets went back: {went_back:?}"
    );
    let stderr = consumer.stderr_text();
    assert!(stderr.contains("storage works again"), "{stderr}");
    assert!(
        !stderr.contains("failed to flush") && !stderr.contains("hit error"),
        "sled's own lines repeat the fault: {stderr}"
    );
    assert!(consumer.terminate().success(), "{stderr}");
    assert_files_match(&files, &recompute(&records), 4);
}
