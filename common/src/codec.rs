//! The one wire codec of the project: length-prefixed RON frames over a UNIX
//! stream socket, with an optional set of file descriptors passed alongside
//! (SCM_RIGHTS).
//!
//! Frame layout: a 4-byte little-endian payload length, then that many bytes of
//! UTF-8 RON. The fds ride on the first byte of the frame. netd requests, the
//! control API (vmctl) and the migration stream are three message enums sent
//! through this codec; each protocol opens with its own version handshake.
//!
//! The receiver never trusts the peer: the length is checked against a cap
//! before any allocation, excess or truncated fd sets are an error (the fds
//! that did arrive are closed), and a socket read timeout surfaces as
//! [`CodecError::Timeout`] so a stuck peer cannot hold a server.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default cap on a frame's payload. Control and netd messages are tiny; the
/// migration stream raises it for device state.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// Most fds one frame may carry (a 16-queue TAP plus its vhost fds fits).
pub const MAX_FDS: usize = 64;

const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame carries more than {max} file descriptors")]
    TooManyFds { max: usize },
    #[error("expected {expected} file descriptors with the message, got {got}")]
    FdCount { expected: usize, got: usize },
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("cannot encode message: {0}")]
    Encode(#[from] ron::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] ron::error::SpannedError),
    #[error("frame is not valid UTF-8")]
    NotUtf8,
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
}

impl CodecError {
    fn from_errno(e: nix::errno::Errno) -> Self {
        match e {
            nix::errno::Errno::EAGAIN => CodecError::Timeout,
            e => CodecError::Io(io::Error::from(e)),
        }
    }

    /// True when the error means the peer is gone or misbehaved, as opposed to
    /// a local failure; servers drop such a connection and carry on.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, CodecError::Encode(_))
    }
}

/// A received message and the fds that came with it, owned (closed on drop).
#[derive(Debug)]
pub struct Received<T> {
    pub msg: T,
    pub fds: Vec<OwnedFd>,
}

impl<T> Received<T> {
    /// Returns the fds, failing unless exactly `n` arrived.
    pub fn take_fds(&mut self, n: usize) -> Result<Vec<OwnedFd>, CodecError> {
        if self.fds.len() != n {
            return Err(CodecError::FdCount {
                expected: n,
                got: self.fds.len(),
            });
        }
        Ok(std::mem::take(&mut self.fds))
    }
}

/// Encodes `msg` as one frame and sends it with `fds` attached.
pub fn send<S: AsFd, T: Serialize>(
    sock: &S,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), CodecError> {
    send_encoded(sock, &encode(msg)?, fds)
}

/// Encodes `msg` as a frame's payload (RON), e.g. to know its size before
/// sending it with [`send_encoded`].
pub fn encode<T: Serialize>(msg: &T) -> Result<String, CodecError> {
    Ok(ron::to_string(msg)?)
}

/// Sends a payload made by [`encode`] as one frame with `fds` attached.
pub fn send_encoded<S: AsFd>(
    sock: &S,
    payload: &str,
    fds: &[BorrowedFd<'_>],
) -> Result<(), CodecError> {
    if fds.len() > MAX_FDS {
        return Err(CodecError::TooManyFds { max: MAX_FDS });
    }
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(payload.as_bytes());
    send_bytes(sock.as_fd(), &frame, fds)
}

fn send_bytes(
    fd: BorrowedFd<'_>,
    mut buf: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), CodecError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut first = true;
    while !buf.is_empty() {
        let iov = [IoSlice::new(buf)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if first && !raw.is_empty() { &cmsg } else { &[] };
        match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(0) => return Err(CodecError::Closed),
            Ok(n) => {
                buf = &buf[n..];
                first = false;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EPIPE) | Err(nix::errno::Errno::ECONNRESET) => {
                return Err(CodecError::Closed);
            }
            Err(e) => return Err(CodecError::from_errno(e)),
        }
    }
    Ok(())
}

/// Receives one frame, rejecting payloads over `max_len` bytes, and decodes it.
pub fn recv<S: AsFd, T: DeserializeOwned>(
    sock: &S,
    max_len: usize,
) -> Result<Received<T>, CodecError> {
    let (payload, fds) = recv_frame(sock.as_fd(), max_len)?;
    let text = std::str::from_utf8(&payload).map_err(|_| CodecError::NotUtf8)?;
    let msg = ron::from_str(text)?;
    Ok(Received { msg, fds })
}

/// Receives one raw frame: its payload bytes and the fds that came with it.
pub fn recv_frame(
    fd: BorrowedFd<'_>,
    max_len: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), CodecError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    recv_exact(fd, &mut header, &mut fds, true)?;
    let len = u32::from_le_bytes(header) as usize;
    if len > max_len {
        return Err(CodecError::TooLarge { len, max: max_len });
    }
    let mut payload = vec![0u8; len];
    recv_exact(fd, &mut payload, &mut fds, false)?;
    Ok((payload, fds))
}

/// Fills `buf` completely, collecting any fds that arrive on the way.
/// `at_boundary` tells whether an EOF before the first byte is a clean close.
fn recv_exact(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    at_boundary: bool,
) -> Result<(), CodecError> {
    let mut filled = 0;
    while filled < buf.len() {
        let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf[filled..])];
        let r = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match r {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => return Err(CodecError::Truncated),
            Err(e) => return Err(CodecError::from_errno(e)),
        };
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        // Take ownership of every fd first, so they are closed on any error.
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for r in raw {
                        // SAFETY: the kernel just installed `r` in our fd table
                        // for us; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                    }
                }
            }
        }
        if truncated || fds.len() > MAX_FDS {
            return Err(CodecError::TooManyFds { max: MAX_FDS });
        }
        if n == 0 {
            return Err(if filled == 0 && at_boundary {
                CodecError::Closed
            } else {
                CodecError::Truncated
            });
        }
        filled += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { version: u32 },
        Data(Vec<u8>),
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send(&a, &Msg::Hello { version: 3 }, &[f.as_fd(), f.as_fd()]).unwrap();
        send(&a, &Msg::Data(vec![1, 2, 3]), &[]).unwrap();
        let mut r: Received<Msg> = recv(&b, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(r.msg, Msg::Hello { version: 3 });
        assert_eq!(r.take_fds(2).unwrap().len(), 2);
        let r: Received<Msg> = recv(&b, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(r.msg, Msg::Data(vec![1, 2, 3]));
        assert!(r.fds.is_empty());
        drop(a);
        assert!(matches!(
            recv::<_, Msg>(&b, DEFAULT_MAX_FRAME),
            Err(CodecError::Closed)
        ));
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, DEFAULT_MAX_FRAME),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_frames() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&10u32.to_le_bytes()).unwrap();
        a.write_all(b"Hel").unwrap();
        drop(a);
        assert!(matches!(
            recv::<_, Msg>(&b, 100),
            Err(CodecError::Truncated)
        ));

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&5u32.to_le_bytes()).unwrap();
        a.write_all(b"Nope(").unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, 100),
            Err(CodecError::Decode(_))
        ));

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&2u32.to_le_bytes()).unwrap();
        a.write_all(&[0xff, 0xfe]).unwrap();
        assert!(matches!(recv::<_, Msg>(&b, 100), Err(CodecError::NotUtf8)));
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let evil = "[".repeat(20_000);
        a.write_all(&(evil.len() as u32).to_le_bytes()).unwrap();
        a.write_all(evil.as_bytes()).unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, 1 << 20),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn read_timeout_is_reported() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        assert!(matches!(recv::<_, Msg>(&b, 100), Err(CodecError::Timeout)));
    }
}
