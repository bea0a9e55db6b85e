//! Serving local peers on a UNIX stream socket: netd's socket, the vmm API
//! socket and the migration socket all listen through this module.
//!
//! - [`Listener::bind`] creates the socket file with exactly the asked mode
//!   whatever the umask: the socket inode gets the mode (fchmod) before
//!   bind(2), so the file never exists with wider permissions, and a chmod
//!   after bind restores bits the umask took away.
//! - [`Listener::bind_replacing_stale`] also replaces a stale socket file (one
//!   a killed process left), never anything else: see there.
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
    #[error("cannot bind {path}: it exists and is not a socket (left as it is)")]
    NotASocket { path: PathBuf },
    #[error("cannot bind {path}: a socket of uid {owner} is there (left as it is)")]
    OtherOwner { path: PathBuf, owner: u32 },
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot take the lock for binding {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
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

    /// Like [`Listener::bind`], but a stale socket at `path` is replaced:
    /// when the path is a socket (lstat: a symlink or any other file is
    /// never followed nor removed) owned by this euid, and connecting to it
    /// is refused (ECONNREFUSED: nobody listens, its process died), it is
    /// unlinked and the bind tried once more. A socket where a listener
    /// answers (even one too busy to accept) stays, and the bind fails with
    /// EADDRINUSE as before.
    ///
    /// Two processes binding one path this way at once are serialized by a
    /// lock named after the path (an abstract socket in this network
    /// namespace, freed by the kernel when its holder exits, SIGKILL
    /// included), held from the first bind to the listen. The second
    /// therefore finds the first one's socket listening, removes nothing,
    /// and fails with EADDRINUSE; a socket one of them has just bound is
    /// never taken for stale. The lock cannot order a process that does not
    /// take it: a plain [`Listener::bind`] between its bind and its listen
    /// refuses connections too, and a process that closes its listener
    /// before unlinking its own path at exit could, in that window, unlink
    /// the new socket (so remove the path before closing the listener).
    pub fn bind_replacing_stale(path: &Path, mode: u32) -> Result<Self, ListenError> {
        let _lock = ReplaceLock::take(path)?;
        let in_use = match Self::bind(path, mode) {
            Err(
                e @ ListenError::Bind {
                    source: nix::errno::Errno::EADDRINUSE,
                    ..
                },
            ) => e,
            r => return r,
        };
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => return Err(in_use),
        };
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(ListenError::OtherOwner {
                path: path.to_path_buf(),
                owner: meta.uid(),
            });
        }
        if !matches!(refuses_connections(path), Ok(true)) {
            return Err(in_use);
        }
        std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
        Self::bind(path, mode)
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

/// True when connecting to the socket at `path` is refused: nobody
/// listens there. The connect does not block (a listener with a full
/// backlog answers EAGAIN: alive); a listener that accepts sees a peer
/// that closes at once.
fn refuses_connections(path: &Path) -> nix::Result<bool> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Err(nix::errno::Errno::ECONNREFUSED) => Ok(true),
        Ok(()) | Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Held while a stale socket path is checked, removed and bound again: an
/// abstract UNIX socket whose name is derived from the path's directory
/// (device, inode) and file name, so two spellings of one path share it.
/// Only one process can bind a name; the kernel frees it when the socket
/// closes, even if its holder is SIGKILLed.
struct ReplaceLock {
    _sock: OwnedFd,
}

/// How long a binder waits for another one to finish with the same path:
/// a holder needs a few system calls, unless it was stopped meanwhile.
const REPLACE_LOCK_WAIT: Duration = Duration::from_secs(2);

impl ReplaceLock {
    fn take(path: &Path) -> Result<Self, ListenError> {
        let lock_err = |source: io::Error| ListenError::Lock {
            path: path.to_path_buf(),
            source,
        };
        let deadline = Instant::now() + REPLACE_LOCK_WAIT;
        loop {
            match Self::try_take(path) {
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                    if Instant::now() >= deadline {
                        return Err(lock_err(e));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                r => return r.map_err(lock_err),
            }
        }
    }

    fn try_take(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let d = std::fs::metadata(dir)?;
        let file = path.file_name().unwrap_or_default();
        // FNV-1a of the file name: abstract names are at most 107 bytes.
        let h = std::os::unix::ffi::OsStrExt::as_bytes(file)
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        let name = format!("vmm-listener-replace/{:x}/{:x}/{h:016x}", d.dev(), d.ino());
        let sock = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = UnixAddr::new_abstract(name.as_bytes())?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr)?;
        Ok(ReplaceLock { _sock: sock })
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

    #[test]
    fn a_stale_socket_is_replaced_and_nothing_else_is() {
        let d = scratch("stale");
        // A socket whose listener is gone: what a SIGKILLed process leaves.
        let p = d.join("api.sock");
        drop(UnixListener::bind(&p).unwrap());
        assert!(std::fs::symlink_metadata(&p).is_ok(), "the file stays");
        assert!(matches!(
            Listener::bind(&p, 0o600),
            Err(ListenError::Bind {
                source: nix::errno::Errno::EADDRINUSE,
                ..
            })
        ));
        let l = Listener::bind_replacing_stale(&p, 0o600).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();

        // A live listener (this one) is not replaced, and keeps its path.
        match Listener::bind_replacing_stale(&p, 0o600) {
            Err(ListenError::Bind {
                source: nix::errno::Errno::EADDRINUSE,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        drop(l);

        // A regular file, and a symlink to a stale socket, stay as they are.
        let f = d.join("file");
        std::fs::write(&f, b"keep").unwrap();
        let e = Listener::bind_replacing_stale(&f, 0o600).unwrap_err();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        let target = d.join("dead.sock");
        drop(UnixListener::bind(&target).unwrap());
        let link = d.join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = Listener::bind_replacing_stale(&link, 0o600).unwrap_err();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_socket()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_busy_replace_lock_is_waited_for() {
        let d = scratch("lock");
        let p = d.join("s");
        let held = ReplaceLock::take(&p).unwrap();
        // Another spelling of the same path names the same lock.
        let other = d.join(".").join("s");
        let t0 = Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let l = Listener::bind_replacing_stale(&other, 0o600).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t0.elapsed()
        );
        release.join().unwrap();
        drop(l);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
