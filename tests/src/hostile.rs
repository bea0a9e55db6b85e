//! For the hardening tests: a process's fd and thread counts, netd's state
//! as a whole (fds, threads, audit log size, interfaces) to compare with a
//! baseline, and the hostile client (`netd_hostile`) run as a given uid.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netd_harness::{Netd, wait_for, world_exec_copy};

/// Entries in /proc/PID/fd.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The fd count once it has stopped changing for 300 ms (at most 5 s): a
/// baseline not caught while a server is still closing a connection that
/// just ended.
pub fn settled_fd_count(pid: u32) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut last = fd_count(pid);
    let mut since = std::time::Instant::now();
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = fd_count(pid);
        if now != last {
            last = now;
            since = std::time::Instant::now();
        } else if since.elapsed() >= std::time::Duration::from_millis(300) {
            break;
        }
    }
    last
}

/// Entries in /proc/PID/task.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What must come back to baseline after an attack on netd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdState {
    pub fds: usize,
    pub threads: usize,
    pub links: Vec<String>,
}

impl NetdState {
    pub fn of(netd: &Netd) -> Self {
        NetdState {
            fds: fd_count(netd.pid()),
            threads: thread_count(netd.pid()),
            links: netd.links(),
        }
    }
}

pub fn audit_bytes(netd: &Netd) -> u64 {
    std::fs::metadata(&netd.audit).map(|m| m.len()).unwrap_or(0)
}

/// Waits (up to 30 s) for netd's fds, threads and interfaces to be what
/// they were, and panics with both states otherwise.
pub fn assert_back_to(netd: &Netd, base: &NetdState) {
    let ok = wait_for(Duration::from_secs(30), || NetdState::of(netd) == *base);
    assert!(
        ok,
        "netd did not return to baseline:\n now {:?}\n was {base:?}\n fds now: {:?}",
        NetdState::of(netd),
        netd.fd_targets()
    );
}

/// The hostile client `exe` (the built `netd_hostile`), copied into `dir`
/// where any uid can run it.
pub fn hostile_bin(exe: &Path, dir: &Path) -> PathBuf {
    world_exec_copy(exe, dir)
}

/// Runs `netd_hostile ARGS` as `uid`:`uid` and returns its JSON report.
pub fn run_hostile(bin: &Path, uid: u32, args: &[&str]) -> serde_json::Value {
    use std::os::unix::process::CommandExt;
    let out = Command::new(bin)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run netd_hostile");
    assert!(
        out.status.success(),
        "netd_hostile {args:?} as {uid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("netd_hostile said {text:?}: {e}"))
}
