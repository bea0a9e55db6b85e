//! Userspace TAP backend over the queue fds netd handed over (opened with
//! IFF_TAP | IFF_NO_PI | IFF_VNET_HDR [| IFF_MULTI_QUEUE]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};

use super::backend::{BackendKind, BackendState, FrameIo, NetBackend};
use super::datapath::VNET_HDR_LEN;
use crate::persist::Format10PartVersion;

// <linux/if_tun.h>
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: i16 = 0x0002;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// The ioctl numbers the device thread uses, for its seccomp filter.
pub const DEVICE_THREAD_IOCTLS: &[libc::c_ulong] = &[TUNSETOFFLOAD, TUNSETQUEUE];

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("no TAP fd given")]
    NoQueues,
    #[error("{0} TAP fds: more queue pairs than virtio-net supports")]
    TooManyQueues(usize),
    #[error("fd {fd} is not a usable TAP: {what}")]
    NotTap { fd: RawFd, what: String },
    #[error("fd {fd} belongs to {found}, not to {expected}")]
    Mismatch {
        fd: RawFd,
        found: String,
        expected: String,
    },
    #[error("{op} on {fd} failed: {err}")]
    Ioctl {
        op: &'static str,
        fd: RawFd,
        err: io::Error,
    },
}

/// An `ifreq` as TUNGETIFF/TUNSETQUEUE use it: name, then flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
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

fn ifname(req: &IfReq) -> String {
    let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(req.name.get(..end).unwrap_or_default()).into_owned()
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
    /// Takes the fds netd sent, in queue order. Makes them non-blocking,
    /// checks they are queues of one TAP with a vnet header, and sets the
    /// header to the 12 bytes of virtio 1.x.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Self, TapError> {
        if fds.is_empty() {
            return Err(TapError::NoQueues);
        }
        if fds.len() > 0x8000 {
            return Err(TapError::TooManyQueues(fds.len()));
        }
        let mut queues = Vec::with_capacity(fds.len());
        let mut name: Option<String> = None;
        for fd in fds {
            let raw = fd.as_raw_fd();
            let mut req = IfReq::default();
            ioctl_ptr(raw, TUNGETIFF, &mut req).map_err(|e| TapError::NotTap {
                fd: raw,
                what: format!("TUNGETIFF: {e}"),
            })?;
            if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 {
                return Err(TapError::NotTap {
                    fd: raw,
                    what: format!("flags {:#x} lack IFF_TAP or IFF_VNET_HDR", req.flags),
                });
            }
            let this = ifname(&req);
            match &name {
                Some(n) if *n != this => {
                    return Err(TapError::Mismatch {
                        fd: raw,
                        found: this,
                        expected: n.clone(),
                    });
                }
                _ => name = Some(this),
            }
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
            let mut hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
            ioctl_ptr(raw, TUNSETVNETHDRSZ, &mut hdr).map_err(|err| TapError::Ioctl {
                op: "TUNSETVNETHDRSZ",
                fd: raw,
                err,
            })?;
            queues.push(Arc::new(TapQueue {
                fd: File::from(fd),
                multi_queue: req.flags & IFF_MULTI_QUEUE != 0,
            }));
        }
        Ok(Self {
            queues,
            ifname: name.unwrap_or_default(),
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
