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
//! Threads are started with [`spawn`], which counts the thread before the
//! spawn and stops counting it once its start-up has run (or the thread
//! ended).

use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::{Builder, JoinHandle};
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
struct Starting(());

impl Starting {
    /// Taken before the spawn, so that a thread the host has not run yet
    /// is counted.
    fn new() -> Self {
        *COUNT
            .starting
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        Starting(())
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

/// Spawns a thread that runs `start_up` (installing its filter), then
/// `body` with what `start_up` returned; it counts as starting until
/// `start_up` has returned. A spawn that fails counts nothing.
pub fn spawn<S, T, F, B>(builder: Builder, start_up: F, body: B) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> S + Send + 'static,
    B: FnOnce(S) -> T + Send + 'static,
    T: Send + 'static,
{
    let starting = Starting::new();
    builder.spawn(move || {
        let started = start_up();
        drop(starting);
        body(started)
    })
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
    fn waits_for_a_thread_until_its_start_up_returned() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (body_tx, body_rx) = std::sync::mpsc::channel::<()>();
        let t = spawn(
            Builder::new(),
            // Held back, as a thread the host has not scheduled yet.
            move || go_rx.recv().unwrap(),
            // The body runs on: only the start-up is waited for.
            move |()| body_rx.recv().unwrap(),
        )
        .unwrap();
        assert!(!all_started(Duration::from_millis(20)));
        go_tx.send(()).unwrap();
        assert!(all_started(Duration::from_secs(10)));
        body_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_thread_whose_start_up_panics_counts_as_started() {
        let t = spawn(Builder::new(), || panic!("start-up failed"), |()| ());
        assert!(t.unwrap().join().is_err());
        assert!(all_started(Duration::from_secs(10)));
    }
}
