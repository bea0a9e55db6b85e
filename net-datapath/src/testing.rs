//! Test doubles: a socketpair (SOCK_SEQPACKET, so frame boundaries stay
//! as a TAP queue keeps them) whose device end is a `FrameIo` and whose
//! other end plays the network.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use crate::GuestMemoryMmap;
use crate::frame_io::FrameIo;

/// The end of low RAM in the test layout (where a VMM's MMIO hole starts).
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Where RAM continues above the hole.
pub const HIGH_RAM: u64 = 0x1_0000_0000;
/// RAM above the hole.
pub const HIGH_RAM_SIZE: u64 = 2 << 20;
/// An address inside the hole: never guest RAM.
pub const IN_HOLE: u64 = LOW_RAM_END + 0x1000_0000;

/// Guest RAM laid out as a VMM lays out a guest a little larger than its
/// MMIO hole's start: low RAM up to the hole, then `HIGH_RAM_SIZE` above
/// 4 GiB. Anonymous and reserved lazily, so only the pages a test touches
/// cost memory.
pub fn layout_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_RAM_END as usize),
        (GuestAddress(HIGH_RAM), HIGH_RAM_SIZE as usize),
    ])
    .expect("test guest memory")
}

/// The device end of a socketpair.
pub struct SockIo {
    fd: OwnedFd,
    pub enabled: AtomicBool,
}

impl AsRawFd for SockIo {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl SockIo {
    /// Bytes waiting to be read on the device's end (0 once the device has
    /// taken every frame the peer sent).
    pub fn queued(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int to the pointer, which is live.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD: {}", io::Error::last_os_error());
        n as usize
    }
}

impl FrameIo for SockIo {
    fn set_enabled(&self, on: bool) -> io::Result<()> {
        self.enabled.store(on, Ordering::SeqCst);
        Ok(())
    }
}

/// The "network" end: what the device sends, and frames to send it.
pub struct Peer {
    fd: OwnedFd,
}

impl Peer {
    pub fn send(&self, frame: &[u8]) {
        assert!(self.try_send(frame), "peer send failed");
    }

    /// Sends unless the socket buffer is full.
    pub fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: frame is valid for its length.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        r as usize == frame.len()
    }

    /// Waits up to 10 s for a frame.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 70000];
        while Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let r = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r >= 0 {
                buf.truncate(r as usize);
                return Some(buf);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        // SAFETY: buf is valid for its length.
        let r = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (r >= 0).then(|| {
            buf.truncate(r as usize);
            buf
        })
    }
}

pub fn sock_pair() -> (Arc<SockIo>, Peer) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: socketpair returned two fresh fds we now own.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (
        Arc::new(SockIo {
            fd: a,
            enabled: AtomicBool::new(true),
        }),
        Peer { fd: b },
    )
}
