//! Socket activation, the systemd way (sd_listen_fds(3)): a manager that
//! already listens on the server's socket starts the server with the socket
//! as fd 3 (`SD_LISTEN_FDS_START`), `LISTEN_FDS=<count>` and
//! `LISTEN_PID=<the server's pid>`. Connections made while no server runs
//! wait in the socket's backlog, so a server can be restarted or upgraded
//! without a client seeing a refused connect.
//!
//! [`listener_from_env`] takes that socket when the variables are meant for
//! this process, checks that it is what a server of this project serves on
//! (an AF_UNIX stream socket in listening state), and removes the variables
//! so that no child inherits them.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname};
use nix::sys::socket::{getsockopt, sockopt};

use crate::listener::Listener;

/// The first fd a manager passes (sd_listen_fds(3)).
pub const SD_LISTEN_FDS_START: RawFd = 3;

const VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: LISTEN_FDS={0:?} is not a count of fds")]
    BadCount(String),
    #[error("socket activation: fd {fd} is not open: {source}")]
    NotOpen { fd: RawFd, source: nix::Error },
    #[error(
        "socket activation: fd {fd} is not a listening AF_UNIX stream socket ({what}); refusing it"
    )]
    Unsuitable { fd: RawFd, what: String },
    #[error("socket activation: cannot set FD_CLOEXEC on fd {fd}: {source}")]
    Cloexec { fd: RawFd, source: nix::Error },
}

/// What a manager passed.
#[derive(Debug)]
pub struct Activated {
    /// Fd 3, close-on-exec.
    pub listener: Listener,
    /// Fds after fd 3 that were passed too: left alone (close-on-exec).
    pub ignored_fds: RawFd,
}

/// The listening socket a manager passed to this process, or `None` when
/// the process was not socket-activated (no `LISTEN_PID`/`LISTEN_FDS`, or
/// they name another pid, or a count of 0). Removes the `LISTEN_*`
/// variables in every case.
///
/// Call it once, early, while the process has a single thread: it changes
/// the environment. A later call finds no variables and returns `None`, so
/// fd 3 is owned once.
pub fn listener_from_env() -> Result<Option<Activated>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for v in VARS {
        // SAFETY: the caller runs this before starting any thread (see the
        // doc comment), so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(v) };
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count: RawFd = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| ActivationError::BadCount(fds.clone()))?;
    if count == 0 {
        return Ok(None);
    }
    let fd = SD_LISTEN_FDS_START;
    // Checked on a borrow first: fd 3 is only taken over once it is open
    // and suitable, so a refusal closes nothing that belongs to others.
    // SAFETY: F_GETFD reads the flags of a descriptor number and touches no
    // memory; on a number that is not open it fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ActivationError::NotOpen {
            fd,
            source: nix::Error::last(),
        });
    }
    // SAFETY: fd 3 is open (F_GETFD succeeded) and stays open for the borrow:
    // nothing in this process closes it meanwhile.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    check_listening_unix_stream(borrowed)?;
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|source| ActivationError::Cloexec { fd, source })?;
    for extra in fd + 1..fd.saturating_add(count) {
        // Only fd 3 is served on; the others must not leak into children.
        // SAFETY: F_SETFD only sets the close-on-exec flag of that number
        // (EBADF if it is not open); no memory is involved.
        unsafe { libc::fcntl(extra, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: the manager handed fd 3 to this process (LISTEN_PID is ours)
    // and the variables are gone, so this is its only owner: no other call
    // can take it again.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener =
        Listener::adopt(UnixListener::from(owned)).map_err(|e| ActivationError::Unsuitable {
            fd,
            what: format!("getsockname: {e}"),
        })?;
    Ok(Some(Activated {
        listener,
        ignored_fds: count - 1,
    }))
}

/// SO_TYPE is SOCK_STREAM, SO_ACCEPTCONN is set, and the bound address is
/// AF_UNIX: the three things `accept` on a [`Listener`] relies on.
fn check_listening_unix_stream(fd: BorrowedFd<'_>) -> Result<(), ActivationError> {
    let unsuitable = |what: String| ActivationError::Unsuitable {
        fd: fd.as_raw_fd(),
        what,
    };
    let ty =
        getsockopt(&fd, sockopt::SockType).map_err(|e| unsuitable(format!("not a socket: {e}")))?;
    if ty != SockType::Stream {
        return Err(unsuitable(format!("type {ty:?}")));
    }
    let addr: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| unsuitable(format!("getsockname: {e}")))?;
    match addr.family() {
        Some(AddressFamily::Unix) => {}
        other => return Err(unsuitable(format!("address family {other:?}"))),
    }
    if !getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| unsuitable(format!("SO_ACCEPTCONN: {e}")))?
    {
        return Err(unsuitable("not listening".into()));
    }
    Ok(())
}
