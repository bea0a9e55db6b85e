//! The one wire codec of the project: length-prefixed RON frames over a UNIX
//! stream socket, with an optional set of file descriptors passed alongside
//! (SCM_RIGHTS).
//!
//! Frame layout: a 4-byte little-endian payload length, then that many bytes of
//! UTF-8 RON. The fds ride on the first byte of the frame. netd requests, the
//! control API (vmctl) and the migration stream are three message enums sent
//! through this codec; each protocol opens with its own version handshake.
//!
//! The receiver never trusts the peer:
//! - the length is checked against a cap before any allocation;
//! - every receiver says how many fds it accepts per frame. Each `recvmsg`
//!   has room for the most fds the kernel passes with one message
//!   ([`SCM_MAX_FD`]), so the kernel never has to truncate; every fd it
//!   installs is owned at once and closed unless the caller asked for it (a
//!   frame over the allowance, or a truncated one, is an error after all its
//!   fds were closed);
//! - a socket read timeout surfaces as [`CodecError::Timeout`], and the
//!   `*_until` variants bound the whole frame by a deadline, so a peer that
//!   trickles bytes cannot hold a server;
//! - well-formed RON that is not a message of the protocol is
//!   [`CodecError::Unexpected`] (servers answer it), text that is not RON is
//!   [`CodecError::Decode`].

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, getsockopt, sendmsg, sockopt};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod compact;

/// Default cap on a frame's payload. Control and netd messages are tiny; the
/// migration stream raises it for device state.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// Most fds one frame may carry (a 16-queue TAP plus its vhost fds fits).
pub const MAX_FDS: usize = 64;
/// Most fds the kernel passes with one `sendmsg` (`SCM_MAX_FD` in
/// include/net/scm.h); the receive buffer has room for that many.
pub const SCM_MAX_FD: usize = 253;

const HEADER_LEN: usize = 4;
/// Control buffer for one `recvmsg`, in u64 words (for cmsghdr alignment):
/// CMSG_SPACE(SCM_MAX_FD * 4) is 16 + 1012 rounded up to 8 = 1032 bytes.
const CMSG_WORDS: usize = (16 + SCM_MAX_FD * size_of::<RawFd>()).div_ceil(8);

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame carries {got} file descriptors, this receiver accepts at most {max}")]
    TooManyFds { max: usize, got: usize },
    #[error("the kernel truncated the file descriptors of a frame")]
    FdsTruncated,
    #[error("expected {expected} file descriptors with the message, got {got}")]
    FdCount { expected: usize, got: usize },
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("the connection's deadline passed before the frame was complete")]
    Deadline,
    #[error("cannot encode message: {0}")]
    Encode(#[from] ron::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] ron::error::SpannedError),
    #[error("not a message of this protocol: {0}")]
    Unexpected(String),
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

/// [`encode`], the same text, five times faster for a document of long
/// strings (the machine state's hex): strings are written as they are,
/// where `ron::to_string` escapes them one character at a time. A string
/// with a quote or a backslash is written as a raw string (`r#"..."#`),
/// which any RON reader takes.
pub fn encode_unescaped<T: Serialize>(msg: &T) -> Result<String, CodecError> {
    let config = ron::ser::PrettyConfig::new()
        .new_line("")
        .indentor("")
        .separator("")
        .struct_names(false)
        .separate_tuple_members(false)
        .compact_arrays(true)
        .compact_structs(true)
        .compact_maps(true)
        .escape_strings(false);
    Ok(ron::ser::to_string_pretty(msg, config)?)
}

/// Sends a payload made by [`encode`] as one frame with `fds` attached.
pub fn send_encoded<S: AsFd>(
    sock: &S,
    payload: &str,
    fds: &[BorrowedFd<'_>],
) -> Result<(), CodecError> {
    if fds.len() > MAX_FDS {
        return Err(CodecError::TooManyFds {
            max: MAX_FDS,
            got: fds.len(),
        });
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

/// Receives one frame, rejecting payloads over `max_len` bytes and more than
/// `max_fds` fds, and decodes it.
pub fn recv<S: AsFd, T: DeserializeOwned>(
    sock: &S,
    max_len: usize,
    max_fds: usize,
) -> Result<Received<T>, CodecError> {
    let (payload, fds) = recv_frame(sock.as_fd(), max_len, max_fds)?;
    Ok(Received {
        msg: decode(&payload)?,
        fds,
    })
}

/// [`recv`], failing with [`CodecError::Deadline`] once `deadline` passes
/// however the peer paces its bytes.
pub fn recv_until<S: AsFd, T: DeserializeOwned>(
    sock: &S,
    max_len: usize,
    max_fds: usize,
    deadline: Instant,
) -> Result<Received<T>, CodecError> {
    let (payload, fds) = recv_frame_until(sock.as_fd(), max_len, max_fds, deadline)?;
    Ok(Received {
        msg: decode(&payload)?,
        fds,
    })
}

/// Decodes one payload: [`CodecError::NotUtf8`] or [`CodecError::Decode`]
/// when it is not RON text at all, [`CodecError::Unexpected`] when it is
/// well-formed RON but not a `T` (wrong type, unknown variant or field).
///
/// The compact RON that [`encode`] and [`encode_unescaped`] write is read
/// by a reader of its own (four times faster on the machine state); any
/// other text, and every error, is `ron`'s.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let text = std::str::from_utf8(payload).map_err(|_| CodecError::NotUtf8)?;
    if let Some(m) = compact::from_str(text) {
        return Ok(m);
    }
    match ron::from_str(text) {
        Ok(m) => Ok(m),
        Err(e) => match ron::from_str::<ron::Value>(text) {
            Ok(_) => Err(CodecError::Unexpected(e.to_string())),
            Err(_) => Err(CodecError::Decode(e)),
        },
    }
}

/// The compact reader of [`decode`] alone: `None` where `decode` hands
/// the text to `ron`. For the tests and benchmarks that hold both readers
/// to one result.
pub fn decode_compact<T: DeserializeOwned>(text: &str) -> Option<T> {
    compact::from_str(text)
}

/// Receives one raw frame: its payload bytes and the (at most `max_fds`) fds
/// that came with it.
pub fn recv_frame(
    fd: BorrowedFd<'_>,
    max_len: usize,
    max_fds: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), CodecError> {
    FrameReader::new(fd, max_fds, None).frame(max_len)
}

/// [`recv_frame`] bounded by `deadline` as a whole.
pub fn recv_frame_until(
    fd: BorrowedFd<'_>,
    max_len: usize,
    max_fds: usize,
    deadline: Instant,
) -> Result<(Vec<u8>, Vec<OwnedFd>), CodecError> {
    FrameReader::new(fd, max_fds, Some(deadline)).frame(max_len)
}

/// One frame being received.
struct FrameReader<'a> {
    fd: BorrowedFd<'a>,
    max_fds: usize,
    deadline: Option<Instant>,
    /// The socket's read timeout (SO_RCVTIMEO), which still bounds each wait
    /// for bytes when there is a deadline.
    idle: Option<std::time::Duration>,
    /// fds received so far, owned (closed on any error).
    fds: Vec<OwnedFd>,
    /// Room for this many fds per `recvmsg` (SCM_MAX_FD but in unit tests).
    cmsg_fds: usize,
}

impl<'a> FrameReader<'a> {
    fn new(fd: BorrowedFd<'a>, max_fds: usize, deadline: Option<Instant>) -> Self {
        let idle = deadline
            .and_then(|_| getsockopt(&fd, sockopt::ReceiveTimeout).ok())
            .map(|tv| {
                std::time::Duration::new(
                    u64::try_from(tv.tv_sec()).unwrap_or(0),
                    u32::try_from(tv.tv_usec())
                        .unwrap_or(0)
                        .saturating_mul(1000),
                )
            })
            .filter(|d| !d.is_zero());
        FrameReader {
            fd,
            max_fds,
            deadline,
            idle,
            fds: Vec::new(),
            cmsg_fds: SCM_MAX_FD,
        }
    }

    fn frame(mut self, max_len: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), CodecError> {
        let mut header = [0u8; HEADER_LEN];
        self.fill(&mut header, true)?;
        let len = u32::from_le_bytes(header) as usize;
        if len > max_len {
            return Err(CodecError::TooLarge { len, max: max_len });
        }
        let mut payload = vec![0u8; len];
        self.fill(&mut payload, false)?;
        Ok((payload, self.fds))
    }

    /// Fills `buf` completely, collecting any fds that arrive on the way.
    /// `at_boundary` tells whether an EOF before the first byte is a clean close.
    fn fill(&mut self, buf: &mut [u8], at_boundary: bool) -> Result<(), CodecError> {
        let mut filled = 0;
        while filled < buf.len() {
            self.wait_readable()?;
            let (n, truncated) =
                match recv_some(self.fd, &mut buf[filled..], &mut self.fds, self.cmsg_fds) {
                    Ok(r) => r,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::ECONNRESET) => return Err(CodecError::Truncated),
                    Err(e) => return Err(CodecError::from_errno(e)),
                };
            if truncated {
                return Err(CodecError::FdsTruncated);
            }
            if self.fds.len() > self.max_fds {
                return Err(CodecError::TooManyFds {
                    max: self.max_fds,
                    got: self.fds.len(),
                });
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

    /// With a deadline, waits until the socket is readable, failing with
    /// `Deadline` when it passes or `Timeout` after the socket's read timeout.
    fn wait_readable(&self) -> Result<(), CodecError> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let idle_until = self.idle.map(|d| Instant::now() + d);
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(CodecError::Deadline);
            }
            let wait = match idle_until {
                Some(t) if t <= now => return Err(CodecError::Timeout),
                Some(t) => left.min(t - now),
                None => left,
            };
            // Round up so that a sub-millisecond rest is not a busy loop.
            let ms = u32::try_from(wait.as_millis() + 1).unwrap_or(u32::MAX);
            let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            let mut pfd = [PollFd::new(self.fd, PollFlags::POLLIN)];
            match poll(&mut pfd, timeout) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(CodecError::from_errno(e)),
            }
        }
    }
}

/// One `recvmsg` into `buf` with room for `cmsg_fds` fds. Every fd the
/// kernel installed is pushed to `fds` (owned from here on), also when it
/// flagged MSG_CTRUNC. Returns the byte count and whether it truncated.
fn recv_some(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    cmsg_fds: usize,
) -> Result<(usize, bool), nix::errno::Errno> {
    let mut control = [0u64; CMSG_WORDS];
    let fd_bytes = (cmsg_fds.min(SCM_MAX_FD) * size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space.min(size_of_val(&control));
    // SAFETY: `hdr` points at `iov` (over `buf`) and `control`, all live and
    // writable for the given lengths for the duration of the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(nix::errno::Errno::last());
    }
    take_rights(&hdr, fds);
    Ok((n as usize, hdr.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Takes ownership of the fds of every SCM_RIGHTS message in `hdr`'s control
/// buffer, as filled in by the kernel.
fn take_rights(hdr: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: `hdr` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay
    // within msg_control/msg_controllen, and each header's cmsg_len was
    // written by the kernel to cover its own data.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: `c` is a non-null header inside the control buffer.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; the data follows the header.
            let data = unsafe { libc::CMSG_DATA(c) };
            let header_len = data as usize - c as usize;
            let count = (h.cmsg_len as usize).saturating_sub(header_len) / size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: `i` < count ints of data inside the buffer.
                let raw = unsafe { data.cast::<RawFd>().add(i).read_unaligned() };
                // SAFETY: the kernel just installed `raw` in our fd table for
                // this message; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescaped_encoding_is_the_same_text_and_round_trips_any_string() {
        #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
        struct Doc {
            id: String,
            hex: String,
            list: Vec<(u32, Option<u64>)>,
            nested: Option<Box<Doc>>,
        }
        let plain = Doc {
            id: "vm0".into(),
            hex: "00ff".repeat(100),
            list: vec![(1, Some(2)), (3, None)],
            nested: Some(Box::new(Doc {
                id: "x".into(),
                hex: String::new(),
                list: vec![],
                nested: None,
            })),
        };
        assert_eq!(encode_unescaped(&plain).unwrap(), encode(&plain).unwrap());
        for odd in [
            "a\"b",
            "back\\slash",
            "line\nbreak\ttab",
            "r#\"x\"#",
            "é\u{0}",
        ] {
            let d = Doc {
                id: odd.into(),
                ..Doc {
                    id: String::new(),
                    hex: "ab".into(),
                    list: vec![(0, None)],
                    nested: None,
                }
            };
            let text = encode_unescaped(&d).unwrap();
            assert_eq!(decode::<Doc>(text.as_bytes()).unwrap(), d, "{text}");
        }
    }
    use serde::Deserialize;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
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
        let mut r: Received<Msg> = recv(&b, DEFAULT_MAX_FRAME, 2).unwrap();
        assert_eq!(r.msg, Msg::Hello { version: 3 });
        assert_eq!(r.take_fds(2).unwrap().len(), 2);
        let r: Received<Msg> = recv(&b, DEFAULT_MAX_FRAME, 2).unwrap();
        assert_eq!(r.msg, Msg::Data(vec![1, 2, 3]));
        assert!(r.fds.is_empty());
        drop(a);
        assert!(matches!(
            recv::<_, Msg>(&b, DEFAULT_MAX_FRAME, 0),
            Err(CodecError::Closed)
        ));
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, DEFAULT_MAX_FRAME, 0),
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
            recv::<_, Msg>(&b, 100, 0),
            Err(CodecError::Truncated)
        ));

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&5u32.to_le_bytes()).unwrap();
        a.write_all(b"Nope(").unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, 100, 0),
            Err(CodecError::Decode(_))
        ));

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&2u32.to_le_bytes()).unwrap();
        a.write_all(&[0xff, 0xfe]).unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, 100, 0),
            Err(CodecError::NotUtf8)
        ));
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let evil = "[".repeat(20_000);
        a.write_all(&(evil.len() as u32).to_le_bytes()).unwrap();
        a.write_all(evil.as_bytes()).unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, 1 << 20, 0),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn read_timeout_is_reported() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        assert!(matches!(
            recv::<_, Msg>(&b, 100, 0),
            Err(CodecError::Timeout)
        ));
    }

    /// A pipe whose write end is sent around: once every copy of the write
    /// end is closed, a read on the read end sees EOF. A leaked copy keeps
    /// it open (EAGAIN on the non-blocking read end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        (r, w)
    }

    fn write_end_closed_everywhere(r: &OwnedFd) -> bool {
        let mut b = [0u8; 1];
        matches!(nix::unistd::read(r, &mut b), Ok(0))
    }

    fn send_raw(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    }

    fn frame_bytes(payload: &str) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(payload.as_bytes());
        f
    }

    #[test]
    fn fds_over_the_allowance_are_closed_and_refused() {
        let (r, w) = pipe();
        let (a, b) = UnixStream::pair().unwrap();
        let copies = vec![w.as_raw_fd(); 200];
        send_raw(&a, &frame_bytes("Hello(version:1)"), &copies);
        drop(w);
        let e = recv::<_, Msg>(&b, 100, 4).unwrap_err();
        assert!(
            matches!(e, CodecError::TooManyFds { max: 4, got: 200 }),
            "{e}"
        );
        assert!(write_end_closed_everywhere(&r));
    }

    #[test]
    fn fds_where_none_are_expected_are_closed_and_refused() {
        let (r, w) = pipe();
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, &Msg::Hello { version: 1 }, &[w.as_fd()]).unwrap();
        drop(w);
        let e = recv::<_, Msg>(&b, 100, 0).unwrap_err();
        assert!(
            matches!(e, CodecError::TooManyFds { max: 0, got: 1 }),
            "{e}"
        );
        assert!(write_end_closed_everywhere(&r));
    }

    #[test]
    fn fds_the_kernel_installed_before_truncating_are_closed() {
        let (r, w) = pipe();
        let (a, b) = UnixStream::pair().unwrap();
        send_raw(
            &a,
            &frame_bytes("Hello(version:1)"),
            &vec![w.as_raw_fd(); 100],
        );
        drop(w);
        let mut reader = FrameReader::new(b.as_fd(), 1000, None);
        reader.cmsg_fds = 10;
        let e = reader.frame(100).unwrap_err();
        assert!(matches!(e, CodecError::FdsTruncated), "{e}");
        assert!(write_end_closed_everywhere(&r));
    }

    #[test]
    fn well_formed_ron_of_another_type_is_unexpected() {
        for text in [
            "42",
            "Hello(version: \"x\")",
            "Hello(version: 1, extra: 2)",
            "Bye",
        ] {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&frame_bytes(text)).unwrap();
            let e = recv::<_, Msg>(&b, 100, 0).unwrap_err();
            assert!(matches!(e, CodecError::Unexpected(_)), "{text}: {e}");
        }
    }

    #[test]
    fn deadline_bounds_a_trickling_peer() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let t = std::thread::spawn(move || {
            a.write_all(&100u32.to_le_bytes()).unwrap();
            for _ in 0..40 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                if a.write_all(b" ").is_err() {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        let e = recv_until::<_, Msg>(&b, 1000, 0, t0 + std::time::Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, CodecError::Deadline), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        drop(b);
        t.join().unwrap();
    }
}
