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

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// Where a termination signal goes: nowhere yet (the process just exits),
/// or the VM's exit channel.
type Target = Arc<Mutex<Option<ExitSender>>>;

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
        let target: Target = Arc::new(Mutex::new(None));
        let t = target.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .stack_size(64 << 10)
            .spawn(move || watch(&t))?;
        Ok(SignalWatch { target })
    }

    /// From now on a signal stops the VM through `exit` (the main thread
    /// then tears down as for any other reason). Before this, nothing needs
    /// cleaning up and a signal ends the process at once.
    pub fn deliver_to(&self, exit: ExitSender) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(exit);
    }
}

fn watch(target: &Target) {
    // Waiting, sending on a channel, exiting: the main thread's allow-list.
    sandbox::enter_thread_or_exit(ThreadKind::Main);
    let set = termination_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: a valid set and a live out-parameter.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let reason = ExitReason::Signal { signal: sig };
        let g = target.lock().unwrap_or_else(PoisonError::into_inner);
        match g.as_ref() {
            Some(exit) => {
                log::info!("signal {sig}: stopping the VM");
                exit.send(reason);
            }
            None => {
                log::info!("signal {sig} before the VM started: exiting");
                std::process::exit(reason.exit_code());
            }
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
