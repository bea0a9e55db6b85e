//! Userspace TAP backend over the queue fds netd handed over (opened with
//! IFF_TAP | IFF_NO_PI | IFF_VNET_HDR [| IFF_MULTI_QUEUE]), or that a
//! migration source sent: both are checked by `common::tun::check_tap_queue`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use common::tun::{
    ExpectedTap, IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE, IFF_MULTI_QUEUE, TUNSETOFFLOAD, TUNSETQUEUE,
    TapCheckError, check_tap_queue,
};
pub use common::tun::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};

use super::backend::{BackendKind, BackendState, FrameIo, NetBackend};
use super::datapath::VNET_HDR_LEN;
use crate::persist::Format10PartVersion;

/// The ioctl numbers the device thread uses, for its seccomp filter.
pub const DEVICE_THREAD_IOCTLS: &[libc::c_ulong] = &[TUNSETOFFLOAD, TUNSETQUEUE];

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

/// An `ifreq` as TUNSETQUEUE uses it: name, then flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    flags: u16,
    _pad: [u8; 22],
}

/// One queue of a TAP device.
#[derive(Debug)]
pub struct TapQueue {
    fd: File,
    multi_queue: bool,
}

impl TapQueue {
    /// The queue's fd as a `File` (vhost-net's SET_BACKEND takes one).
    pub fn file(&self) -> &File {
        &self.fd
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
        let mut req = IfReq {
            flags: if on {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            ..Default::default()
        };
        match ioctl_ptr(self.as_raw_fd(), TUNSETQUEUE, &mut req) {
            // Attaching an attached queue (or detaching a detached one) is EINVAL.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r,
        }
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly sized object for this request and
    // the kernel writes at most size_of::<T>() bytes into it.
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value; nothing is written.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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

/// A TAP device: one queue per virtio queue pair.
#[derive(Debug)]
pub struct Tap {
    queues: Vec<Arc<TapQueue>>,
    ifname: String,
    offloads: u32,
}

impl Tap {
    /// Takes the queue fds of TAP `name`, in queue order (from netd or a
    /// migration source), checks each is a queue of that TAP as netd makes
    /// it (`common::tun::check_tap_queue`: IFF_TAP | IFF_NO_PI, a 12-byte
    /// vnet header, IFF_MULTI_QUEUE when more than one), and makes them
    /// non-blocking.
    pub fn from_fds(name: &str, fds: Vec<OwnedFd>) -> Result<Self, TapError> {
        if fds.is_empty() {
            return Err(TapError::NoQueues);
        }
        let Ok(count) = u16::try_from(fds.len()) else {
            return Err(TapError::TooManyQueues(fds.len()));
        };
        if count > 0x8000 {
            return Err(TapError::TooManyQueues(fds.len()));
        }
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
            queues.push(Arc::new(TapQueue {
                fd: File::from(fd),
                multi_queue: info.flags & IFF_MULTI_QUEUE != 0,
            }));
        }
        Ok(Self {
            queues,
            ifname: name.to_string(),
            offloads: 0,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The TAP queue fds, in queue order (for migration and vhost).
    pub fn queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }
}

impl NetBackend for Tap {
    fn state(&self) -> BackendState {
        BackendState {
            format_1_0_version: Format10PartVersion,
            kind: BackendKind::Tap,
            ifname: self.ifname.clone(),
            queue_pairs: self.queues.len() as u16,
            vnet_hdr_len: VNET_HDR_LEN as u16,
            offloads: self.offloads,
            tap_fds: (0..self.queues.len()).collect(),
        }
    }

    fn queue_pairs(&self) -> u16 {
        self.queues.len() as u16
    }

    fn frame_io(&self, pair: usize) -> Option<Arc<dyn FrameIo>> {
        self.queues.get(pair).map(|q| q.clone() as Arc<dyn FrameIo>)
    }

    fn set_offload(&mut self, acked_features: u64) -> io::Result<()> {
        let Some(q) = self.queues.first() else {
            return Ok(());
        };
        let fd = q.as_raw_fd();
        let want = offload_flags(acked_features);
        match ioctl_val(fd, TUNSETOFFLOAD, want.into()) {
            Ok(()) => self.offloads = want,
            // Kernels without UFO refuse the whole set: retry without it
            // (the TAP then never hands the guest UFO frames).
            Err(e) if want & TUN_F_UFO != 0 => {
                let less = want & !TUN_F_UFO;
                ioctl_val(fd, TUNSETOFFLOAD, less.into()).map_err(|_| e)?;
                self.offloads = less;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
