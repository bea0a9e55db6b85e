//! What the net device needs from where its frames go: per queue pair a
//! `FrameIo` (a TAP queue fd), offload control, and for vhost-net a kernel
//! datapath that takes the rings over. `BackendState` describes a backend
//! for migration (part of the net device's state, saved through its
//! `Persist`); its fds travel beside the RON, referenced by index.

use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

use super::super::GuestMemory;
use super::vhost::{VhostError, VringSetup};
use crate::persist::Format10PartVersion;

/// Most entries one readv/writev takes (Linux `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// Marks an `IoVecs` the kernel writes into (a read's destination).
#[derive(Debug)]
pub enum Dest {}
/// Marks an `IoVecs` the kernel reads from (a write's source).
#[derive(Debug)]
pub enum Src {}

/// A scatter/gather list for one readv/writev. Each entry comes from a
/// `VolatileSlice` of guest memory (translated and bounds-checked by
/// vm-memory) or from a host slice, and is lent for `'a`, so every entry
/// stays valid until the list is dropped; a `Dest` list only takes memory
/// that may be written. At most `IOV_MAX` entries.
#[derive(Debug)]
pub struct IoVecs<'a, D> {
    iov: Vec<libc::iovec>,
    total: usize,
    _lent: PhantomData<(&'a mut [u8], D)>,
}

impl<'a, D> IoVecs<'a, D> {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            iov: Vec::with_capacity(n.min(IOV_MAX)),
            total: 0,
            _lent: PhantomData,
        }
    }

    /// An empty list reusing `store`'s allocation.
    pub fn from_vec(mut store: Vec<libc::iovec>) -> Self {
        store.clear();
        Self {
            iov: store,
            total: 0,
            _lent: PhantomData,
        }
    }

    /// Ends the loan and hands the (emptied) allocation back for reuse.
    pub fn into_vec(mut self) -> Vec<libc::iovec> {
        self.iov.clear();
        self.iov
    }

    pub fn clear(&mut self) {
        self.iov.clear();
        self.total = 0;
    }

    /// Entries so far.
    pub fn len(&self) -> usize {
        self.iov.len()
    }

    pub fn is_empty(&self) -> bool {
        self.iov.is_empty()
    }

    /// Bytes the entries cover together.
    pub fn total(&self) -> usize {
        self.total
    }

    fn push_raw(&mut self, base: *mut u8, len: usize) -> bool {
        if self.iov.len() >= IOV_MAX {
            return false;
        }
        if len != 0 {
            self.iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            });
            self.total += len;
        }
        true
    }

    /// Adds a slice of guest memory; `false` (nothing added) when full.
    pub fn push_guest<B: BitmapSlice>(&mut self, s: &VolatileSlice<'a, B>) -> bool {
        // Guest memory mapped by vm-memory stays mapped while the slice's
        // borrow ('a) lasts; without the `xen` feature the guard is only
        // the pointer, so dropping it early unmaps nothing. Writes through
        // it are not dirty-logged: this VMM's guest memory has no bitmap
        // (local migration shares the memfd).
        self.push_raw(s.ptr_guard_mut().as_ptr(), s.len())
    }

    fn raw(&self) -> (*const libc::iovec, libc::c_int) {
        // len() <= IOV_MAX, so it fits a c_int.
        (self.iov.as_ptr(), self.iov.len() as libc::c_int)
    }
}

impl<'a> IoVecs<'a, Dest> {
    /// Adds a host buffer the read may fill; `false` when full.
    pub fn push_host(&mut self, b: &'a mut [u8]) -> bool {
        self.push_raw(b.as_mut_ptr(), b.len())
    }
}

impl<'a> IoVecs<'a, Src> {
    /// Adds host bytes to send; `false` when full.
    pub fn push_host(&mut self, b: &'a [u8]) -> bool {
        // Only read through: a `Src` list is never handed to readv.
        self.push_raw(b.as_ptr().cast_mut(), b.len())
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One queue pair's frames, each read or written whole, vnet header first.
/// Non-blocking: reads fail with `WouldBlock` when nothing is queued.
pub trait FrameIo: AsRawFd + Send + Sync {
    /// Reads one frame into `buf` (a longer frame is cut there).
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        cvt(unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }
    /// Writes `buf` as one frame.
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        cvt(unsafe { libc::write(self.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
    }
    /// Reads one frame scattered over `iov` (readv); returns the bytes
    /// stored, at most `iov.total()` (a longer frame is cut there).
    fn read_frame_vectored(&self, iov: &IoVecs<'_, Dest>) -> io::Result<usize> {
        if let [one] = iov.iov.as_slice() {
            // SAFETY: the entry is writable memory of iov_len bytes lent
            // to the list for its lifetime (see `IoVecs`).
            return cvt(unsafe { libc::read(self.as_raw_fd(), one.iov_base, one.iov_len) });
        }
        let (p, n) = iov.raw();
        // SAFETY: every entry of a `Dest` list is writable memory lent to
        // the list for its lifetime (see `IoVecs`), and n <= IOV_MAX.
        cvt(unsafe { libc::readv(self.as_raw_fd(), p, n) })
    }
    /// Writes one frame gathered from `iov` (writev).
    fn write_frame_vectored(&self, iov: &IoVecs<'_, Src>) -> io::Result<usize> {
        if let [one] = iov.iov.as_slice() {
            // One piece (the usual tx chain): plain write, the kernel's
            // cheapest path.
            // SAFETY: the entry is readable memory of iov_len bytes lent
            // to the list for its lifetime (see `IoVecs`).
            return cvt(unsafe { libc::write(self.as_raw_fd(), one.iov_base, one.iov_len) });
        }
        let (p, n) = iov.raw();
        // SAFETY: every entry is readable memory lent to the list for its
        // lifetime (see `IoVecs`), and n <= IOV_MAX.
        cvt(unsafe { libc::writev(self.as_raw_fd(), p, n) })
    }
    /// Attach (`true`) or detach this queue from a multiqueue device, so
    /// the kernel steers no frame to a queue the driver does not serve.
    fn set_enabled(&self, on: bool) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum BackendKind {
    /// Frames move through vmm's device threads (readv/writev on the TAP).
    Tap,
    /// The host kernel's vhost-net moves them; vmm only relays interrupts.
    VhostNet,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    pub kind: BackendKind,
    /// The TAP interface, as TUNGETIFF reports it.
    pub ifname: String,
    pub queue_pairs: u16,
    pub vnet_hdr_len: u16,
    /// TUN_F_* flags last set with TUNSETOFFLOAD.
    pub offloads: u32,
    /// Index, in the fd list sent beside the state, of each pair's TAP fd.
    pub tap_fds: Vec<usize>,
}

/// A backend of the net device.
pub trait NetBackend: Send {
    fn state(&self) -> BackendState;
    fn queue_pairs(&self) -> u16;
    /// Frame I/O of queue pair `pair`.
    fn frame_io(&self, pair: usize) -> Option<Arc<dyn FrameIo>>;
    /// Feature bits the backend can serve, out of `offered`.
    fn filter_features(&self, offered: u64) -> u64 {
        offered
    }
    /// Apply the offloads the driver acked (TUNSETOFFLOAD).
    fn set_offload(&mut self, acked_features: u64) -> io::Result<()>;
    /// A backend whose rings the kernel serves (vhost-net).
    fn kernel_datapath(&mut self) -> Option<&mut dyn KernelDatapath> {
        None
    }
}

/// A datapath in the kernel: vmm hands it the rings and gets them back.
pub trait KernelDatapath: Send {
    /// Starts serving `rings` (rx, tx per pair, in queue order).
    fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        rings: &[VringSetup<'_>],
    ) -> Result<(), VhostError>;
    /// Stops serving; returns each ring's next available index.
    fn stop(&mut self) -> Result<Vec<u16>, VhostError>;
}
