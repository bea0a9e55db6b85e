//! Pausing and resuming vCPU threads. A pause sets the wish, then kicks each
//! vCPU thread with a signal that interrupts KVM_RUN (EINTR); the thread sees
//! the wish and parks on a condition variable. A kick that lands just before
//! the thread enters KVM_RUN is lost, so the pauser kicks again until every
//! thread has reported itself parked.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

const KICK_INTERVAL: Duration = Duration::from_millis(2);
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the kick handler (a no-op: its only job is to make KVM_RUN return
/// EINTR). Without SA_RESTART, so the ioctl is not transparently restarted.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting value; the handler is an
    // async-signal-safe no-op and the struct outlives the call.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("vCPUs did not park within {0:?}")]
    PauseTimeout(Duration),
    #[error("the VM is stopping")]
    Stopping,
}

struct Inner {
    threads: Vec<libc::pthread_t>,
    parked: usize,
}

pub struct RunControl {
    want: AtomicU8,
    inner: Mutex<Inner>,
    /// Parked vCPU threads wait here for a resume or a stop.
    cv: Condvar,
    /// The pauser waits here, woken once: by the thread that completes
    /// the count of parked ones (not by each, and the parked ones are not
    /// woken by each other's arrival).
    all_parked: Condvar,
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}

impl RunControl {
    pub fn new() -> Self {
        Self::with_state(RUN)
    }

    /// vCPUs park as soon as they start (a migrated guest that was paused,
    /// or one that waits for the migration's commit).
    pub fn new_paused() -> Self {
        Self::with_state(PAUSE)
    }

    fn with_state(want: u8) -> Self {
        RunControl {
            want: AtomicU8::new(want),
            inner: Mutex::new(Inner {
                threads: Vec::new(),
                parked: 0,
            }),
            cv: Condvar::new(),
            all_parked: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `thread`, a vCPU thread just spawned, among those a pause
    /// kicks and waits for. Its spawner calls this, not the thread itself:
    /// a pause (or a migration target's wait for its paused vCPUs) that
    /// comes before the new thread first runs must still wait for it to
    /// park, where it would otherwise count it out and then find its vCPU
    /// locked by the thread's start. A thread that parks or ends before it
    /// is registered is counted all the same.
    pub fn register(&self, thread: libc::pthread_t) {
        let mut g = self.lock();
        g.threads.push(thread);
        self.count_parked(&g);
    }

    /// Stops every registered vCPU and returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.request_pause()?;
        self.wait_parked()
    }

    /// Asks every vCPU to park and kicks each out of KVM_RUN, without
    /// waiting: the caller can stop other things meanwhile, then
    /// [`RunControl::wait_parked`].
    pub fn request_pause(&self) -> Result<(), ControlError> {
        if self.want.load(Ordering::SeqCst) == STOP {
            return Err(ControlError::Stopping);
        }
        self.want.store(PAUSE, Ordering::SeqCst);
        self.kick_all(&self.lock());
        Ok(())
    }

    fn kick_all(&self, g: &Inner) {
        for t in &g.threads {
            // SAFETY: registered threads are vCPU threads that live until
            // the process exits (they are never joined or detached early).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Returns once every vCPU asked to pause is parked, kicking again
    /// those a kick missed (it landed just before their KVM_RUN). It
    /// sleeps: spinning here (and in the other waits of a switch-over) took
    /// 50 us off a quiet host's median but, with another process keeping
    /// one of the 2 cores busy, let that process take the CPU the parking
    /// threads needed (p90 0.8 ms → 3 to 4 ms).
    pub fn wait_parked(&self) -> Result<(), ControlError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut g = self.lock();
        while g.parked < g.threads.len() {
            if Instant::now() > deadline {
                return Err(ControlError::PauseTimeout(PAUSE_TIMEOUT));
            }
            g = self
                .all_parked
                .wait_timeout(g, KICK_INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if g.parked < g.threads.len() {
                self.kick_all(&g);
            }
        }
        Ok(())
    }

    pub fn resume(&self) {
        let _g = self.lock();
        if self.want.load(Ordering::SeqCst) == PAUSE {
            self.want.store(RUN, Ordering::SeqCst);
        }
        self.cv.notify_all();
    }

    /// Ends the vCPU threads (process exit follows): running ones are kicked
    /// out of KVM_RUN, parked ones woken. Leaving a thread inside KVM_RUN
    /// makes the process exit far slower on this nested KVM.
    pub fn stop(&self) {
        let g = self.lock();
        self.want.store(STOP, Ordering::SeqCst);
        self.cv.notify_all();
        for t in &g.threads {
            // SAFETY: as in pause(): registered vCPU threads are never
            // detached; one that has already returned is still joinable, so
            // its pthread_t stays valid.
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    pub fn is_paused(&self) -> bool {
        self.want.load(Ordering::SeqCst) == PAUSE
    }

    /// vCPU side: cheap check before each KVM_RUN.
    pub fn pending(&self) -> bool {
        self.want.load(Ordering::Relaxed) != RUN
    }

    /// vCPU side: the thread is leaving for good; a later pause must not
    /// wait for it.
    pub fn thread_exited(&self) {
        let mut g = self.lock();
        g.parked += 1;
        self.count_parked(&g);
    }

    /// One more thread parked (or gone): the last one wakes the pauser.
    fn count_parked(&self, g: &Inner) {
        if g.parked >= g.threads.len() {
            self.all_parked.notify_all();
        }
    }

    /// vCPU side: parks while paused. Returns false when the thread must end.
    pub fn park(&self) -> bool {
        let mut g = self.lock();
        g.parked += 1;
        self.count_parked(&g);
        loop {
            match self.want.load(Ordering::SeqCst) {
                RUN => break,
                STOP => {
                    // The thread exits and reports that by thread_exited().
                    g.parked -= 1;
                    return false;
                }
                _ => g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
            }
        }
        g.parked -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn pause_parks_a_spinning_thread() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(RunControl::new());
        let count = Arc::new(AtomicU64::new(0));
        let (c2, n2) = (ctl.clone(), count.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(()).unwrap();
            loop {
                if c2.pending() && !c2.park() {
                    return;
                }
                n2.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        ctl.register(t.as_pthread_t());
        rx.recv().unwrap();
        ctl.pause().unwrap();
        let a = count.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::Relaxed), a);
        assert!(ctl.is_paused());
        ctl.resume();
        let t = Instant::now();
        while count.load(Ordering::Relaxed) == a {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(1));
        }
        ctl.stop();
    }

    #[test]
    fn a_pause_before_a_new_thread_runs_waits_for_it_to_park() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(RunControl::new_paused());
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let c2 = ctl.clone();
        let t = std::thread::spawn(move || {
            // Held back, as a vCPU thread the host has not scheduled yet.
            go_rx.recv().unwrap();
            while c2.pending() && c2.park() {}
        });
        ctl.register(t.as_pthread_t());
        let waiter = {
            let c3 = ctl.clone();
            std::thread::spawn(move || c3.wait_parked())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !waiter.is_finished(),
            "the wait counted out a thread that never parked"
        );
        go_tx.send(()).unwrap();
        waiter.join().unwrap().unwrap();
        ctl.stop();
        t.join().unwrap();
    }

    #[test]
    fn pause_does_not_wait_for_an_exited_thread() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(RunControl::new());
        let c2 = ctl.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            c2.thread_exited();
            tx.send(()).unwrap();
            // Stay joinable (as vCPU threads do) until the test is done.
            std::thread::sleep(Duration::from_millis(200));
        });
        // Gone before it was registered: counted all the same.
        rx.recv().unwrap();
        ctl.register(t.as_pthread_t());
        let start = Instant::now();
        ctl.pause().unwrap();
        assert!(start.elapsed() < PAUSE_TIMEOUT);
        t.join().unwrap();
    }
}
