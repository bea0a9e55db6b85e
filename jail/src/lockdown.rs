//! The process-wide steps of a lock-down that every unprivileged process
//! takes the same way after its uid drop, on its only thread: capabilities
//! cleared, no_new_privs, a one-line panic report, the allocator's
//! setting. Landlock and the seccomp filters, which differ per process,
//! come after.

use crate::{caps, malloc};

#[derive(Debug, thiserror::Error)]
pub enum LockDownError {
    #[error("sandbox: {0}")]
    Caps(#[from] caps::CapsError),
    #[error("sandbox: cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error(
        "sandbox: {0} threads exist at lock-down; Landlock and no_new_privs would miss all but one"
    )]
    Threads(usize),
}

/// Runs the shared steps; `program` names the process in a panic's line.
/// Landlock, no_new_privs and the capability sets are per thread, so this
/// refuses to run while another thread exists.
pub fn process_steps(program: &'static str) -> Result<(), LockDownError> {
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let n = tasks.count();
        if n > 1 {
            return Err(LockDownError::Threads(n));
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
        return Err(LockDownError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    // A panic prints one line without a backtrace: capturing one opens
    // files that the filters forbid (RUST_BACKTRACE may be set by the user).
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        eprintln!(
            "{program}: panic in thread {}: {info}",
            thread.name().unwrap_or("?")
        );
    }));
    if !malloc::no_lazy_file_opens() {
        log::warn!("mallopt(M_TRIM_THRESHOLD) refused: freeing memory may open a file");
    }
    Ok(())
}
