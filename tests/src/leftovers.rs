//! What a failed benchmark run must not leave behind. Release builds abort
//! on panic, so the Drop guards (Netd, ScratchDir, VmmProcess, Backend)
//! never run then: a panic hook removes what is registered here instead.
//! One definition for bench_net and bench_migrate.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// Children to kill, namespaces to delete, paths to remove.
pub struct Leftovers {
    pub pids: Vec<u32>,
    pub netns: Vec<String>,
    pub paths: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    pids: Vec::new(),
    netns: Vec::new(),
    paths: Vec::new(),
});

/// The registry. A child leaves `pids` before it is reaped.
pub fn leftovers() -> MutexGuard<'static, Leftovers> {
    LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Installs the hook that removes everything registered, after the usual
/// panic report.
pub fn install_cleanup_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        // try_lock: the panicking thread may hold the lock.
        let Ok(l) = LEFTOVERS.try_lock() else {
            return;
        };
        for pid in &l.pids {
            // SAFETY: kill(2) on a child of ours that was not reaped yet
            // (reaped ones leave the list), so the pid is still its.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        for ns in &l.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for p in &l.paths {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }));
}
