//! Serving local peers on a UNIX stream socket: netd's socket, the vmm API
//! socket and the migration socket all listen through this module.
//!
//! - [`Listener::bind`] creates the socket file with exactly the asked mode
//!   whatever the umask: the socket inode gets the mode (fchmod) before
//!   bind(2), so the file never exists with wider permissions, and a chmod
//!   after bind restores bits the umask took away.
//! - [`Listener::accept`] identifies the peer by SO_PEERCRED (kernel-checked
//!   pid/uid/gid), before a byte is read from it.
//! - [`Connection`] bounds a peer in time: a timeout per read and write, and
//!   an overall deadline that no pacing of bytes can stretch.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, getsockopt, listen, socket,
    sockopt::PeerCredentials,
};
use nix::sys::stat::{Mode, fchmod};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError, Received};

/// Who is at the other end of a connection, as the kernel recorded it at
/// connect(2) (SO_PEERCRED): never what the peer claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl PeerCred {
    /// The peer's credentials.
    pub fn of(stream: &UnixStream) -> io::Result<PeerCred> {
        let c = getsockopt(stream, PeerCredentials)?;
        Ok(PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }

    /// True for `owner` and for root: who may drive a private socket.
    pub fn is_owner_or_root(&self, owner: u32) -> bool {
        self.uid == owner || self.uid == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot create a socket for {path}: {source}")]
    Socket { path: PathBuf, source: nix::Error },
    #[error("cannot set mode {mode:o} on the socket for {path}: {source}")]
    Mode {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("cannot bind {path}: {source}")]
    Bind { path: PathBuf, source: nix::Error },
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: nix::Error },
}

/// A listening UNIX stream socket bound to a path.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (which must not exist) with permission bits `mode`
    /// (0o600 for a private socket, 0o666 for one every local user may
    /// reach), and listens.
    pub fn bind(path: &Path, mode: u32) -> Result<Self, ListenError> {
        let path_buf = || path.to_path_buf();
        let fd: OwnedFd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|source| ListenError::Socket {
            path: path_buf(),
            source,
        })?;
        let mode_err = |source: io::Error| ListenError::Mode {
            path: path_buf(),
            mode,
            source,
        };
        // bind(2) gives the file the socket inode's mode minus the umask.
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(|e| mode_err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|source| ListenError::Bind {
            path: path_buf(),
            source,
        })?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|source| ListenError::Bind {
            path: path_buf(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(mode_err)?;
        listen(&fd, Backlog::MAXCONN).map_err(|source| ListenError::Listen {
            path: path_buf(),
            source,
        })?;
        Ok(Listener {
            inner: UnixListener::from(fd),
            path: path.to_path_buf(),
        })
    }

    /// A listening socket made elsewhere (one a migration source handed
    /// over), at the path it is bound to.
    pub fn adopt(inner: UnixListener) -> io::Result<Self> {
        let path = inner
            .local_addr()?
            .as_pathname()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Listener { inner, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection and identifies its peer. Errors of accept(2)
    /// itself (EMFILE, ...) and of SO_PEERCRED are returned; the caller
    /// decides whether to back off.
    pub fn accept(&self) -> io::Result<(UnixStream, PeerCred)> {
        let (stream, _) = self.inner.accept()?;
        let peer = PeerCred::of(&stream)?;
        Ok((stream, peer))
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.inner.set_nonblocking(on)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

/// Time limits for one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest wait for the peer in one read or write.
    pub io_timeout: Duration,
    /// Longest the whole connection may take to deliver its frames.
    pub lifetime: Duration,
}

/// An accepted, identified connection with its deadline.
#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    pub peer: PeerCred,
    pub deadline: Instant,
}

impl Connection {
    /// Applies `limits` to `stream`; the deadline starts now.
    pub fn new(stream: UnixStream, peer: PeerCred, limits: ConnLimits) -> io::Result<Self> {
        stream.set_read_timeout(Some(limits.io_timeout))?;
        stream.set_write_timeout(Some(limits.io_timeout))?;
        Ok(Connection {
            stream,
            peer,
            deadline: Instant::now() + limits.lifetime,
        })
    }

    /// Receives one raw frame before the deadline, with at most `max_fds` fds.
    pub fn recv_frame(
        &self,
        max_len: usize,
        max_fds: usize,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), CodecError> {
        codec::recv_frame_until(self.stream.as_fd(), max_len, max_fds, self.deadline)
    }

    /// Receives and decodes one message before the deadline.
    pub fn recv<T: DeserializeOwned>(
        &self,
        max_len: usize,
        max_fds: usize,
    ) -> Result<Received<T>, CodecError> {
        codec::recv_until(&self.stream, max_len, max_fds, self.deadline)
    }

    /// Sends one message (bounded by the write timeout).
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), CodecError> {
        codec::send(&self.stream, msg, fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("listener-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn mode_is_exact_and_peer_is_identified() {
        let d = scratch("mode");
        for mode in [0o600, 0o666] {
            let p = d.join(format!("s{mode:o}"));
            let l = Listener::bind(&p, mode).unwrap();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            assert!(meta.file_type().is_socket());
            assert_eq!(meta.permissions().mode() & 0o777, mode);
            let _c = UnixStream::connect(&p).unwrap();
            let (_s, peer) = l.accept().unwrap();
            assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
            assert_eq!(peer.pid, std::process::id() as i32);
            assert!(peer.is_owner_or_root(peer.uid));
        }
        assert!(
            Listener::bind(&d.join("s600"), 0o600).is_err(),
            "path exists"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
