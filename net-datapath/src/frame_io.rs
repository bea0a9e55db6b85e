//! How frames reach a queue pair's host side: `FrameIo` reads and writes
//! one whole frame (vnet header first) per call, scattered straight into or
//! gathered straight from guest memory through an `IoVecs` list.

use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

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
