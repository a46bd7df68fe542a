//! Cooperative shutdown with a deadline: SIGINT and SIGTERM set one flag
//! that every thread polls between batches, so each finishes and commits
//! what it holds. A second signal exits at once (the state stays
//! consistent: that is what the transactions are for). And whatever any
//! thread is doing, the process ends by the deadline after the first
//! signal: the watchdog names the threads that had not stopped and exits
//! with status 1. Every committed batch was fsynced before its commit
//! returned, so that exit loses nothing a stop would keep.
//!
//! This module also owns the list of the process's named threads
//! ([`spawn`]): that is how the watchdog can name the one that hung.

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

/// How often a wait looks at the flag: a signal is noticed within this.
const WAKE_INTERVAL: Duration = Duration::from_millis(20);

/// The exit status when the deadline passed with threads still running.
const DEADLINE_EXIT_STATUS: i32 = 1;

/// A cloneable stop flag; a [`Shutdown::child`] also stops when its parent
/// does.
#[derive(Clone, Default)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    /// The parents' flags: requested when any of them is.
    parents: Arc<[Arc<AtomicBool>]>,
}

impl Shutdown {
    /// A flag that only [`Shutdown::request`] sets (tests, embedded use).
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag of its own (one partition's stop) that is also requested
    /// whenever this one is (the process's stop); requesting it leaves
    /// this one alone.
    pub fn child(&self) -> Self {
        let parents: Vec<Arc<AtomicBool>> = self
            .parents
            .iter()
            .cloned()
            .chain([self.flag.clone()])
            .collect();
        Shutdown {
            flag: Arc::default(),
            parents: parents.into(),
        }
    }

    /// A flag set by SIGINT or SIGTERM; a second signal exits with 130,
    /// and the process exits with status 1 `timeout` after the first one
    /// if it has not ended by then (see the module comment). `program`
    /// starts the line that says so.
    pub fn install(program: &'static str, timeout: Duration) -> io::Result<Self> {
        let this = Self::new();
        for signal in [SIGINT, SIGTERM] {
            // Order matters: the conditional exit must see the flag before
            // the first signal sets it.
            signal_hook::flag::register_conditional_shutdown(signal, 130, this.flag.clone())?;
            signal_hook::flag::register(signal, this.flag.clone())?;
        }
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        // Not in the list of threads: it is the one that reads the list.
        std::thread::Builder::new()
            .name("shutdown-deadline".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    std::thread::sleep(timeout);
                    expire(program, timeout);
                }
            })?;
        Ok(this)
    }

    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst) || self.parents.iter().any(|p| p.load(Ordering::SeqCst))
    }

    /// Waits up to `duration`, waking early on shutdown; true if requested.
    pub fn wait(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        loop {
            if self.requested() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(WAKE_INTERVAL));
        }
    }
}

/// The line the watchdog prints: which threads had not stopped.
fn deadline_message(program: &str, timeout: Duration, running: &[String]) -> String {
    let running = if running.is_empty() {
        // Every thread of ours ended: the main thread is closing clients.
        "main".to_string()
    } else {
        running.join(", ")
    };
    format!(
        "{program}: error: did not stop within {:.1} s of the signal (--shutdown-timeout); \
         still running: {running}; exiting, every committed batch is kept",
        timeout.as_secs_f64()
    )
}

fn expire(program: &str, timeout: Duration) -> ! {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{}", deadline_message(program, timeout, &running()));
    let _ = stderr.flush();
    // _exit: no atexit handlers, which could wait on a lock a hung
    // thread holds.
    signal_hook::low_level::exit(DEADLINE_EXIT_STATUS)
}

/// The named threads of this process that are running, by name.
static THREADS: Mutex<BTreeMap<u64, String>> = Mutex::new(BTreeMap::new());
static NEXT_THREAD: AtomicU64 = AtomicU64::new(0);

/// Removes its thread from [`THREADS`] when the thread ends, by return or
/// by panic.
struct Listed(u64);

impl Drop for Listed {
    fn drop(&mut self) {
        if let Ok(mut threads) = THREADS.lock() {
            threads.remove(&self.0);
        }
    }
}

/// Starts a named thread that the deadline can name if it hangs: every
/// long-lived thread of the process is started through here.
pub(crate) fn spawn<T: Send + 'static>(
    name: impl Into<String>,
    body: impl FnOnce() -> T + Send + 'static,
) -> io::Result<JoinHandle<T>> {
    let name = name.into();
    let id = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut threads) = THREADS.lock() {
        threads.insert(id, name.clone());
    }
    let listed = Listed(id);
    // A thread that does not start drops the closure, and with it `listed`.
    std::thread::Builder::new().name(name).spawn(move || {
        let _listed = listed;
        body()
    })
}

/// The names of the threads started by [`spawn`] that are still running.
pub(crate) fn running() -> Vec<String> {
    THREADS
        .lock()
        .map(|threads| threads.values().cloned().collect())
        .unwrap_or_default()
}

/// Runs `work` on a thread of its own and returns its result, or panics
/// naming `what` when it has not ended within `limit`: a test of code that
/// must finish then fails instead of hanging the suite (a panic in `work`
/// shows above as well).
#[cfg(test)]
pub(crate) fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    result
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} did not end within {limit:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_threads_leave_the_list_when_they_end_even_by_panic() {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let waiting = spawn("listed-waiting", move || rx.recv().is_ok()).unwrap();
        let panicking = spawn("listed-panicking", || panic!("on purpose")).unwrap();
        assert!(panicking.join().is_err());
        let names = running();
        assert!(names.contains(&"listed-waiting".to_string()), "{names:?}");
        assert!(
            !names.contains(&"listed-panicking".to_string()),
            "{names:?}"
        );
        drop(tx);
        assert!(!waiting.join().unwrap());
        assert!(!running().contains(&"listed-waiting".to_string()));
    }

    #[test]
    fn a_child_stops_with_its_parent_and_alone() {
        let process = Shutdown::new();
        let (one, two) = (process.child(), process.child());
        let grandchild = one.child();
        one.request();
        assert!(one.requested() && grandchild.requested());
        assert!(!process.requested() && !two.requested());
        process.request();
        assert!(two.requested());
    }

    #[test]
    fn the_deadline_line_names_what_still_runs() {
        let line = deadline_message(
            "consumer",
            Duration::from_secs(10),
            &["exporter".into(), "partition-0".into()],
        );
        assert_eq!(
            line,
            "consumer: error: did not stop within 10.0 s of the signal (--shutdown-timeout); \
             still running: exporter, partition-0; exiting, every committed batch is kept"
        );
        assert!(deadline_message("consumer", Duration::from_secs(1), &[]).contains("running: main"));
    }
}
