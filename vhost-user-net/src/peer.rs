//! Who may drive the backend: a frontend of our own uid, or root
//! (SO_PEERCRED, recorded by the kernel at connect). The socket's mode
//! (0600) already keeps other users out; this is the check behind it.
//!
//! vhost-user-backend 0.24 accepts the connection itself and offers no way
//! to hand it an accepted stream, so the check runs right after its accept:
//! the connection is the one connected UNIX socket in our fd table that
//! was not there before ([`new_peers`]). Until the main thread has decided,
//! the [`PeerGate`] holds back everything that would let a frontend reach
//! the TAP (its memory table: `update_memory`, and every datapath event),
//! so a refused peer never moves a frame.

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use common::listener::PeerCred;

/// How long a frontend's memory table waits for the verdict (the main
/// thread decides within microseconds of the accept).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pending,
    Allowed,
    Refused,
}

/// The current connection's verdict.
#[derive(Debug)]
pub struct PeerGate {
    verdict: Mutex<Verdict>,
    cv: Condvar,
}

impl Default for PeerGate {
    fn default() -> Self {
        PeerGate {
            verdict: Mutex::new(Verdict::Pending),
            cv: Condvar::new(),
        }
    }
}

impl PeerGate {
    /// A new connection is about to be accepted.
    pub fn reset(&self) {
        self.set(Verdict::Pending);
    }

    pub fn decide(&self, allowed: bool) {
        self.set(if allowed {
            Verdict::Allowed
        } else {
            Verdict::Refused
        });
    }

    fn set(&self, v: Verdict) {
        let mut g = self.verdict.lock().unwrap_or_else(|p| p.into_inner());
        *g = v;
        self.cv.notify_all();
    }

    /// Whether the connection is allowed, now (a datapath event).
    pub fn allowed(&self) -> bool {
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) == Verdict::Allowed
    }

    /// Waits for the verdict (a memory table arriving); false when refused
    /// or when no verdict came in time.
    pub fn wait_allowed(&self) -> bool {
        let g = self.verdict.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, VERDICT_TIMEOUT, |v| *v == Verdict::Pending)
            .unwrap_or_else(|p| p.into_inner());
        *g == Verdict::Allowed
    }
}

/// The highest fd number looked at: the soft RLIMIT_NOFILE, at most 65536.
fn fd_limit() -> RawFd {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the local we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    RawFd::try_from(rl.rlim_cur.min(65536)).unwrap_or(1024)
}

/// `getsockopt(fd, SOL_SOCKET, opt)` into `v`; false when `fd` is not an
/// open socket (or the option does not apply to it).
fn sockopt<T>(fd: RawFd, opt: libc::c_int, v: &mut T) -> bool {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `v`, a live value
    // of that size; an fd number that is not (or no longer) an open socket
    // only makes the call fail: no memory of ours depends on which it is.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (v as *mut T).cast(), &mut len) };
    r == 0 && len as usize == std::mem::size_of::<T>()
}

/// The connected stream sockets with a peer in our fd table (listening
/// sockets excluded), with their peers.
pub fn connected_sockets() -> BTreeSet<(RawFd, i32, u32, u32)> {
    let mut out = BTreeSet::new();
    for fd in 0..fd_limit() {
        let mut listening: libc::c_int = 0;
        if !sockopt(fd, libc::SO_ACCEPTCONN, &mut listening) || listening != 0 {
            continue;
        }
        let mut c = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        if sockopt(fd, libc::SO_PEERCRED, &mut c) && c.pid != 0 {
            out.insert((fd, c.pid, c.uid, c.gid));
        }
    }
    out
}

/// The peers of sockets in `after` but not in `before`: the frontend the
/// daemon has just accepted (its stream and the daemon's clone of it).
pub fn new_peers(
    before: &BTreeSet<(RawFd, i32, u32, u32)>,
    after: &BTreeSet<(RawFd, i32, u32, u32)>,
) -> Vec<PeerCred> {
    after
        .difference(before)
        .map(|&(_, pid, uid, gid)| PeerCred { pid, uid, gid })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_new_connection_is_found_with_its_peer() {
        let before = connected_sockets();
        let (a, _b) = UnixStream::pair().unwrap();
        let peers = new_peers(&before, &connected_sockets());
        // Both ends are ours: two sockets, our own pid and uid.
        assert_eq!(peers.len(), 2);
        // SAFETY: getpid/getuid cannot fail.
        let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
        assert!(peers.iter().all(|p| p.pid == pid && p.uid == uid));
        drop(a);
    }

    #[test]
    fn gate_waits_and_decides() {
        let g = std::sync::Arc::new(PeerGate::default());
        assert!(!g.allowed());
        let g2 = g.clone();
        let t = std::thread::spawn(move || g2.wait_allowed());
        std::thread::sleep(Duration::from_millis(20));
        g.decide(true);
        assert!(t.join().unwrap());
        g.reset();
        g.decide(false);
        assert!(!g.wait_allowed());
    }
}
