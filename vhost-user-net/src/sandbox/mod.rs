//! The backend's sandbox, in the vmm's order (see vmm/src/sandbox): the
//! capability bounding set emptied while root, the uid dropped to
//! `--user`, every other capability cleared, no_new_privs, Landlock with
//! no filesystem access at all (everything the backend opens, it opened
//! before: netd's TAP fds, its socket), then per-thread seccomp filters
//! (policy/seccomp/vhost-user-net/*.json, compiled by build.rs).
//!
//! The capability, privilege and malloc steps are the `jail` crate's, the
//! same the vmm takes.
//!
//! Threads: vhost-user-backend starts the vring workers and, per
//! connection, the thread that handles the frontend's messages; neither
//! runs code of ours first thing. Each installs its own filter the first
//! time it calls into the backend ([`enter_thread_or_exit`]), and until
//! then runs under the filter it inherited (`setup` for workers, which
//! wait in epoll until then; `main` for the frontend thread, which is why
//! `main` covers `frontend`).

pub mod landlock;
pub mod seccomp;

use jail::caps;

use std::cell::Cell;
use std::sync::OnceLock;

pub use self::seccomp::{SeccompMode, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    LockDown(#[from] jail::lockdown::LockDownError),
    #[error("sandbox: {0}")]
    Landlock(#[from] ::landlock::RulesetError),
    #[error("sandbox: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("sandbox: set up twice")]
    Twice,
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

thread_local! {
    static INSTALLED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Step 1, while still root (before the uid drop).
pub fn drop_bounding_set() {
    caps::drop_bounding_set();
}

/// Everything after the uid drop, on the main thread while it is the only
/// one. Installs the `setup` filter, which later threads inherit.
pub fn lock_down(mode: SeccompMode) -> Result<(), SandboxError> {
    jail::lockdown::process_steps("vhost-user-net")?;
    landlock::restrict()?;
    if mode == SeccompMode::Log {
        log::warn!("seccomp in log mode (debugging): forbidden syscalls are only logged");
    }
    MODE.set(mode).map_err(|_| SandboxError::Twice)?;
    enter_thread(ThreadKind::Setup)
}

/// Installs `kind`'s filter on the calling thread, once (later calls of
/// the same kind do nothing). Nothing when the process never locked down
/// (unit tests).
pub fn enter_thread(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(&mode) = MODE.get() else {
        return Ok(());
    };
    if INSTALLED.with(Cell::get) == Some(kind) {
        return Ok(());
    }
    seccomp::apply(kind, mode)?;
    INSTALLED.with(|c| c.set(Some(kind)));
    Ok(())
}

/// For threads that cannot report an error to anyone: without its filter
/// the thread must not run on.
pub fn enter_thread_or_exit(kind: ThreadKind) {
    if let Err(e) = enter_thread(kind) {
        eprintln!("vhost-user-net: {e}");
        std::process::exit(1);
    }
}
