//! A TAP queue as a `FrameIo`: the queue fds netd hands out (IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR [| IFF_MULTI_QUEUE]), or that a migration
//! source sent, each checked by `common::tun::check_tap_queue` before use.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use common::tun::{
    ExpectedTap, IFF_MULTI_QUEUE, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO,
    TUNSETOFFLOAD, TUNSETQUEUE, TapCheckError, check_tap_queue,
};

use crate::frame_io::FrameIo;

/// The ioctl numbers a datapath thread makes on TAP queues, for its
/// seccomp filter.
pub const DATAPATH_IOCTLS: &[libc::c_ulong] = &[TUNSETOFFLOAD, TUNSETQUEUE];

/// virtio-net serves at most 0x8000 queue pairs.
pub const MAX_QUEUE_PAIRS: usize = 0x8000;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("no TAP fd given")]
    NoQueues,
    #[error("{0} TAP fds: more queue pairs than virtio-net supports")]
    TooManyQueues(usize),
    #[error("queue {queue} is not a queue of TAP {expected:?}: {err}")]
    NotTheTap {
        queue: usize,
        expected: String,
        err: TapCheckError,
    },
    #[error("{op} on {fd} failed: {err}")]
    Ioctl {
        op: &'static str,
        fd: RawFd,
        err: io::Error,
    },
}

/// One queue of a TAP device.
#[derive(Debug)]
pub struct TapQueue {
    fd: File,
    multi_queue: bool,
}

impl TapQueue {
    /// Takes the queue fds of TAP `name`, in queue order, checks each is a
    /// queue of that TAP as netd makes it (`check_tap_queue`: IFF_TAP |
    /// IFF_NO_PI, a 12-byte vnet header, IFF_MULTI_QUEUE when more than
    /// one), and makes them non-blocking.
    pub fn from_fds(name: &str, fds: Vec<OwnedFd>) -> Result<Vec<TapQueue>, TapError> {
        if fds.is_empty() {
            return Err(TapError::NoQueues);
        }
        let count = match u16::try_from(fds.len()) {
            Ok(n) if usize::from(n) <= MAX_QUEUE_PAIRS => n,
            _ => return Err(TapError::TooManyQueues(fds.len())),
        };
        let want = ExpectedTap {
            name,
            queues: count,
            vnet_hdr: true,
        };
        let mut queues = Vec::with_capacity(fds.len());
        for (queue, fd) in fds.into_iter().enumerate() {
            let info = check_tap_queue(&fd, &want).map_err(|err| TapError::NotTheTap {
                queue,
                expected: name.to_string(),
                err,
            })?;
            let raw = fd.as_raw_fd();
            // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
            let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
            // SAFETY: as above.
            if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
                return Err(TapError::Ioctl {
                    op: "fcntl(O_NONBLOCK)",
                    fd: raw,
                    err: io::Error::last_os_error(),
                });
            }
            queues.push(TapQueue {
                fd: File::from(fd),
                multi_queue: info.flags & IFF_MULTI_QUEUE != 0,
            });
        }
        Ok(queues)
    }

    /// The queue's fd as a `File` (vhost-net's SET_BACKEND takes one).
    pub fn file(&self) -> &File {
        &self.fd
    }

    /// Sets the offloads matching the guest features in `acked_features`
    /// (TUNSETOFFLOAD, for the whole device) and returns the TUN_F_* flags
    /// in force. Kernels without UFO refuse the whole set: then it is set
    /// without UFO (the TAP never hands the guest UFO frames).
    pub fn set_offload(&self, acked_features: u64) -> io::Result<u32> {
        let want = offload_flags(acked_features);
        match common::tun::set_offload(&self.fd, want) {
            Ok(()) => Ok(want),
            Err(e) if want & TUN_F_UFO != 0 => {
                let less = want & !TUN_F_UFO;
                common::tun::set_offload(&self.fd, less).map_err(|_| e)?;
                Ok(less)
            }
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl FrameIo for TapQueue {
    fn set_enabled(&self, on: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        common::tun::set_queue_attached(&self.fd, on)
    }
}

/// TUN_F_* flags matching the guest offloads in `acked_features`.
pub fn offload_flags(acked_features: u64) -> u32 {
    let has = |b: u32| acked_features & (1u64 << b) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) {
            f |= TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            f |= TUN_F_UFO;
        }
    }
    f
}
