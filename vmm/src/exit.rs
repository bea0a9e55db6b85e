//! How a running VM ends. Every way funnels into one [`ExitReason`] that the
//! main thread receives, then [`teardown`] runs under the main thread's
//! `main` seccomp filter and the process exits with the reason's code:
//!
//! | how                                   | reason                      | exit code |
//! |---------------------------------------|-----------------------------|-----------|
//! | guest writes port 0x501               | [`ExitReason::PowerOff`]    | 0 |
//! | guest sends the i8042 reset (0xFE→0x64) | [`ExitReason::Reset`]     | 0 |
//! | `vmctl shutdown`                      | [`ExitReason::ApiShutdown`] | 0 |
//! | SIGTERM or SIGINT                     | [`ExitReason::Signal`]      | 0 |
//! | vCPU failure (triple fault, KVM internal error) | [`ExitReason::VcpuFailed`] | 1 |
//!
//! SIGTERM and SIGINT are blocked in every thread and taken by one small
//! thread with `sigwait` ([`SignalWatch`]), so a signal never interrupts
//! a vCPU, device or the API thread, and no async-signal-safety rules apply.
//!
//! Before a guest runs here, a signal ends the process at once (exit 0)
//! after removing the sockets it created. A migration target that has not
//! taken the guest declines it first ([`common::ownership`]), so the source
//! takes it back and runs on; once the target owns the guest, a signal is
//! an ordinary shutdown of its owner.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::ownership::{Owner, OwnerPage};

use crate::control::RunControl;
use crate::sandbox::{self, ThreadKind};
use crate::vm::{ExitReason, ExitSender};

/// The signals that stop the VM cleanly.
pub const TERMINATION_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// How long teardown waits for the vCPU threads to leave KVM_RUN.
pub const VCPU_STOP_WAIT: Duration = Duration::from_millis(200);

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset with valid signal
    // numbers on that initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Where a termination signal goes.
#[derive(Default)]
struct Route {
    /// Sockets this process created, removed when it exits before a VM
    /// runs (a stale one would block a restart on the same path).
    remove: Vec<PathBuf>,
    /// An incoming migration's ownership page, until the guest is ours.
    page: Option<Arc<OwnerPage>>,
    /// The VM's exit channel, once a guest runs here.
    exit: Option<ExitSender>,
}

type Target = Arc<Mutex<Route>>;

/// The thread that turns SIGTERM/SIGINT into [`ExitReason::Signal`].
pub struct SignalWatch {
    target: Target,
}

impl SignalWatch {
    /// Blocks the termination signals in the calling thread (and so in
    /// every thread it creates afterwards) and starts the thread that waits
    /// for them. Call it on the main thread after [`sandbox::lock_down`]
    /// and before any other thread is created.
    pub fn start() -> std::io::Result<Self> {
        let set = termination_set();
        // SAFETY: a valid, initialised set; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let target: Target = Arc::new(Mutex::new(Route::default()));
        let t = target.clone();
        crate::thread_start::spawn(
            std::thread::Builder::new()
                .name("signals".into())
                .stack_size(64 << 10),
            // Waiting, sending on a channel, exiting: the main thread's
            // allow-list.
            || sandbox::enter_thread_or_exit(ThreadKind::Main),
            move |()| watch(&t),
        )?;
        Ok(SignalWatch { target })
    }

    fn route(&self) -> std::sync::MutexGuard<'_, Route> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A socket this process created: removed if a signal ends the process
    /// before a VM runs (afterwards teardown removes what it must).
    pub fn remove_on_early_exit(&self, path: &Path) {
        self.route().remove.push(path.to_path_buf());
    }

    /// The socket at `path` is gone (or another process's now).
    pub fn forget_on_early_exit(&self, path: &Path) {
        self.route().remove.retain(|p| p != path);
    }

    /// From now on a signal stops the VM through `exit` (the main thread
    /// then tears down as for any other reason). Before this, a signal
    /// ends the process at once.
    pub fn deliver_to(&self, exit: ExitSender) {
        self.route().exit = Some(exit);
    }

    /// An incoming migration got its ownership page: a signal from now on
    /// declines the guest before the process exits.
    pub fn incoming(&self, page: Arc<OwnerPage>) {
        self.route().page = Some(page);
    }

    /// Takes the incoming guest (the ownership word's compare-and-swap) and,
    /// if that wins, routes signals to `exit`; atomically with respect to a
    /// signal, which otherwise declines the guest.
    pub fn take_guest(&self, page: &OwnerPage, exit: ExitSender) -> Result<(), Owner> {
        let mut r = self.route();
        page.take()?;
        r.page = None;
        r.exit = Some(exit);
        Ok(())
    }
}

/// A signal before a guest runs here: remove what this process created,
/// and exit 0.
fn early_exit(route: &Route, sig: libc::c_int) -> ! {
    for p in &route.remove {
        let _ = std::fs::remove_file(p);
    }
    log::info!("signal {sig} before the VM started: exiting");
    std::process::exit(ExitReason::Signal { signal: sig }.exit_code());
}

fn watch(target: &Target) {
    let set = termination_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: a valid set and a live out-parameter.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let reason = ExitReason::Signal { signal: sig };
        let route = target.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(page) = &route.page {
            // Not ours yet: make sure it never is, so the source runs on.
            match page.decline() {
                Ok(()) => log::info!("signal {sig}: incoming migration declined"),
                Err(owner) => log::info!("signal {sig}: the incoming guest is {owner}"),
            }
            early_exit(&route, sig);
        }
        match &route.exit {
            Some(exit) => {
                log::info!("signal {sig}: stopping the VM");
                exit.send(reason);
            }
            None => early_exit(&route, sig),
        }
    }
}

/// The main thread's work once the first exit reason is in, under its
/// `main` filter: remove the API socket (a stale one would block the next
/// start on the same path), then get the vCPU threads out of KVM_RUN
/// (process exit is much slower here with a vCPU inside it), waiting at
/// most [`VCPU_STOP_WAIT`].
///
/// The devices are deliberately not paused: their threads and fds end with
/// the process (the TAPs go with their last fd; netd holds none), and
/// pausing a vhost-net device would issue VHOST ioctls that the `main`
/// filter does not allow.
pub fn teardown(api_socket: Option<&Path>, ctl: &RunControl, vcpu_threads: &[JoinHandle<()>]) {
    if let Some(path) = api_socket
        && let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("cannot remove the API socket {}: {e}", path.display());
    }
    ctl.stop();
    let deadline = Instant::now() + VCPU_STOP_WAIT;
    while vcpu_threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_reason_has_its_documented_code() {
        assert_eq!(ExitReason::PowerOff { code: 0 }.exit_code(), 0);
        assert_eq!(ExitReason::PowerOff { code: 7 }.exit_code(), 0);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_eq!(ExitReason::ApiShutdown.exit_code(), 0);
        assert_eq!(
            ExitReason::Signal {
                signal: libc::SIGTERM
            }
            .exit_code(),
            0
        );
        let failed = ExitReason::VcpuFailed {
            vcpu: 0,
            message: "x".into(),
        };
        assert_eq!(failed.exit_code(), 1);
    }
}
