//! The vmm sandbox, applied in this order (see [`lock_down`]):
//! 1. while still root: the capability bounding set is emptied
//!    ([`caps::drop_bounding_set`], before [`jail::privileges::drop_to`]);
//!    started unprivileged, inside a user namespace of our own instead
//!    (the only way the kernel allows), at lock-down;
//! 2. after the uid drop, the steps every unprivileged process shares
//!    ([`jail::lockdown::process_steps`]): every other capability set
//!    cleared, no_new_privs, a one-line panic report, and the C allocator
//!    told not to open files later;
//! 3. Landlock ([`landlock`]): the filesystem shrinks to the files named on
//!    the command line, no TCP, no abstract sockets, no signals outward;
//! 4. seccomp ([`seccomp`]): the `setup` filter on the main thread (which
//!    every later thread inherits), then each thread installs its own
//!    kind's filter first thing ([`enter_thread`]), and the main thread
//!    narrows itself to `main` once everything runs.

pub mod landlock;
pub mod seccomp;

use jail::caps;

use std::sync::OnceLock;

pub use self::landlock::{FsPlan, LandlockStatus};
pub use self::seccomp::{Filters, SeccompMode, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    LockDown(#[from] jail::lockdown::LockDownError),
    #[error("sandbox: {0}")]
    Landlock(#[from] landlock::LandlockError),
    #[error("sandbox: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("sandbox: set up twice")]
    Twice,
}

/// What to lock down and how.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub seccomp: SeccompMode,
    pub fs: FsPlan,
}

/// What the sandbox achieved, for a log line.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub landlock: LandlockStatus,
    pub seccomp: SeccompMode,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Step 1, while the process may still hold CAP_SETPCAP (before the uid
/// drop). Best effort: started unprivileged, the kernel keeps the set.
pub fn drop_bounding_set() {
    caps::drop_bounding_set();
}

/// Steps 2 to 4 on the calling (main) thread, which must be the only thread.
/// After this, threads started by the process call [`enter_thread`].
pub fn lock_down(plan: &Plan) -> Result<Report, SandboxError> {
    jail::lockdown::process_steps("vmm")?;
    let landlock = landlock::restrict(&plan.fs)?;
    let filters = Filters::compile(plan.seccomp)?;
    if plan.seccomp == SeccompMode::Log {
        log::warn!("seccomp in log mode (debugging): forbidden syscalls are only logged");
    }
    filters.apply(ThreadKind::Setup)?;
    FILTERS.set(filters).map_err(|_| SandboxError::Twice)?;
    Ok(Report {
        landlock,
        seccomp: plan.seccomp,
    })
}

/// Installs `kind`'s filter on the calling thread. Does nothing when the
/// process never locked itself down (unit tests, library users).
pub fn enter_thread(kind: ThreadKind) -> Result<(), SandboxError> {
    match FILTERS.get() {
        Some(f) => Ok(f.apply(kind)?),
        None => Ok(()),
    }
}

/// For threads that cannot report an error to anyone: without its filter
/// the thread must not run, so the process ends with a one-line reason.
pub fn enter_thread_or_exit(kind: ThreadKind) {
    if let Err(e) = enter_thread(kind) {
        eprintln!("vmm: {e}");
        std::process::exit(1);
    }
}

impl Plan {
    /// The sandbox for a VMM started with `cfg`: it reads the kernel (and
    /// the initrd), writes
    /// the serial file, owns the API (and incoming migration) socket.
    pub fn for_config(cfg: &crate::config::VmConfig) -> Self {
        let mut fs = FsPlan::default();
        if cfg.incoming.is_none() {
            fs.read_files.push(cfg.kernel.clone());
            fs.read_files.extend(cfg.initrd.iter().cloned());
        }
        if let crate::config::SerialTarget::File(p) = &cfg.serial {
            fs.write_files.push(p.clone());
        }
        fs.sockets.extend(cfg.api_socket.iter().cloned());
        fs.sockets.extend(cfg.incoming.iter().cloned());
        Plan {
            seccomp: cfg.seccomp,
            fs,
        }
    }
}
