//! Threads still starting: spawned, but not yet through their start-up
//! (each installs its seccomp filter first, 0.1-0.25 ms of CPU here).
//!
//! A migration target spawns its vCPU, device, API and migration threads
//! while it builds the machine, and the host may not run them until later.
//! Traced on the 2-core development host, the source's pause often came
//! while four or five of them were still installing their filters, each
//! holding a CPU for ~0.1 ms: the source's kicked vCPU thread waited up
//! to 0.8 ms for one (the "bimodal pause"). So the target waits for
//! [`all_started`] before it says Ready.
//!
//! A spawner takes a [`Starting`] before the spawn and moves it into the
//! thread, which drops it once its start-up is done (or when it ends).

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

struct Count {
    starting: Mutex<usize>,
    done: Condvar,
}

static COUNT: Count = Count {
    starting: Mutex::new(0),
    done: Condvar::new(),
};

/// One thread counted as starting, from before its spawn until dropped.
#[must_use = "dropping it at once counts the thread as started"]
pub struct Starting(());

impl Starting {
    /// Taken by the spawner before the spawn, so that a thread the host
    /// has not run yet is counted.
    pub fn new() -> Self {
        *COUNT
            .starting
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        Starting(())
    }
}

impl Default for Starting {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let mut n = COUNT
            .starting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            COUNT.done.notify_all();
        }
    }
}

/// Waits until no thread is starting, at most `timeout`. Returns whether
/// none was by then.
pub fn all_started(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut n = COUNT
        .starting
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    while *n > 0 {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        n = COUNT
            .done
            .wait_timeout(n, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_thread_that_has_not_run_yet() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let token = Starting::new();
        let t = std::thread::spawn(move || {
            // Held back, as a thread the host has not scheduled yet.
            go_rx.recv().unwrap();
            drop(token);
        });
        assert!(!all_started(Duration::from_millis(20)));
        go_tx.send(()).unwrap();
        assert!(all_started(Duration::from_secs(10)));
        t.join().unwrap();
    }

    #[test]
    fn a_thread_that_ends_counts_as_started() {
        let token = Starting::new();
        std::thread::spawn(move || drop(token)).join().unwrap();
        assert!(all_started(Duration::from_secs(10)));
    }
}
