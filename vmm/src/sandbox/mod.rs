//! The vmm sandbox, applied in this order (see [`lock_down`]):
//! 1. while still root: the capability bounding set is emptied
//!    ([`caps::drop_bounding_set`], before [`jail::privileges::drop_to`]);
//!    started unprivileged, inside a user namespace of our own instead
//!    (the only way the kernel allows), at lock-down;
//! 2. after the uid drop: every other capability set cleared, no_new_privs;
//! 3. Landlock ([`landlock`]): the filesystem shrinks to the files named on
//!    the command line, no TCP, no abstract sockets, no signals outward;
//! 4. seccomp ([`seccomp`]), after the C allocator is told not to open
//!    files later ([`malloc`]): the `setup` filter on the main thread (which
//!    every later thread inherits), then each thread installs its own
//!    kind's filter first thing ([`enter_thread`]), and the main thread
//!    narrows itself to `main` once everything runs.
//!
//! A panic prints one line without a backtrace: capturing one opens files
//! that the filters forbid (RUST_BACKTRACE may be set by the user).

pub mod landlock;
pub mod seccomp;

use jail::{caps, malloc};

use std::sync::OnceLock;

pub use self::landlock::{FsPlan, LandlockStatus};
pub use self::seccomp::{Filters, SeccompMode, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox: {0}")]
    Caps(#[from] caps::CapsError),
    #[error("sandbox: cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("sandbox: {0}")]
    Landlock(#[from] landlock::LandlockError),
    #[error("sandbox: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("sandbox: set up twice")]
    Twice,
    #[error(
        "sandbox: {0} threads exist at lock-down; Landlock and no_new_privs would miss all but one"
    )]
    Threads(usize),
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

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        eprintln!(
            "vmm: panic in thread {}: {info}",
            thread.name().unwrap_or("?")
        );
    }));
}

/// Steps 2 to 4 on the calling (main) thread, which must be the only thread.
/// After this, threads started by the process call [`enter_thread`].
pub fn lock_down(plan: &Plan) -> Result<Report, SandboxError> {
    // Landlock, no_new_privs and the capability sets are per thread.
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let n = tasks.count();
        if n > 1 {
            return Err(SandboxError::Threads(n));
        }
    }
    if caps::bounding_set_len() > 0 {
        match caps::drop_bounding_set_in_user_namespace() {
            Ok(()) => log::info!("bounding set emptied inside a user namespace of our own"),
            Err(e) => log::info!("capability bounding set kept ({e}); no_new_privs covers execve"),
        }
    }
    caps::clear_all()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    let landlock = landlock::restrict(&plan.fs)?;
    install_panic_hook();
    if !malloc::no_lazy_file_opens() {
        log::warn!("mallopt(M_TRIM_THRESHOLD) refused: freeing memory may open a file");
    }
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
