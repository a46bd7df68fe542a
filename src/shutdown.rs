//! Cooperative shutdown: SIGINT and SIGTERM set one flag that every thread
//! polls between batches, so each finishes and commits what it holds. A
//! second signal exits at once (the state stays consistent: that is what the
//! transactions are for).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

/// How often a wait looks at the flag: a signal is noticed within this.
const WAKE_INTERVAL: Duration = Duration::from_millis(20);

/// A cloneable stop flag.
#[derive(Clone, Default)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
}

impl Shutdown {
    /// A flag that only [`Shutdown::request`] sets (tests, embedded use).
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag set by SIGINT or SIGTERM; a second signal exits with 130.
    pub fn install() -> io::Result<Self> {
        let this = Self::new();
        for signal in [SIGINT, SIGTERM] {
            // Order matters: the conditional exit must see the flag before
            // the first signal sets it.
            signal_hook::flag::register_conditional_shutdown(signal, 130, this.flag.clone())?;
            signal_hook::flag::register(signal, this.flag.clone())?;
        }
        Ok(this)
    }

    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
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
