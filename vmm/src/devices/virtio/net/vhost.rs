//! Kernel vhost-net backend, driven from vhost fds netd opened (one per
//! queue pair). vmm calls VHOST_SET_OWNER itself: the kernel binds a vhost
//! device to the address space of the process that owns it.
//!
//! The kernel signals used buffers on per-ring "call" eventfds. virtio-mmio
//! has one interrupt whose InterruptStatus the guest reads, so the device's
//! relay thread turns call events into `Interrupt::signal_used_queue`
//! (which sets the status bit and fires the irqfd).
//!
//! Not runnable on hosts without /dev/vhost-net (the project's CI host).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vhost::net::VhostNet as _;
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::QueueT;

use super::super::{GuestMemory, GuestMemoryMmap};
use super::backend::{
    BackendKind, BackendState, DatapathError, ExternalDatapath, FrameIo, NetBackend, VringSetup,
    memory_table, ring_pairs,
};
use super::tap::Tap;

/// vhost's own feature bits (VHOST_F_LOG_ALL, VHOST_NET_F_VIRTIO_NET_HDR)
/// that vmm never asks for: the TAP handles the vnet header.
const VHOST_F_LOG_ALL: u32 = 26;
const VHOST_NET_F_VIRTIO_NET_HDR: u32 = 27;

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("{0} vhost fds for {1} TAP queues: need one per queue pair")]
    FdCount(usize, usize),
}

/// A received vhost-net fd seen with the guest memory it will serve: the
/// vhost crate's `VhostKernBackend` gives it every `VhostBackend` ioctl.
struct KernFd<'a> {
    file: &'a File,
    mem: &'a GuestMemory,
}

impl AsRawFd for KernFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl VhostKernBackend for KernFd<'_> {
    type AS = Arc<GuestMemoryMmap>;
    fn mem(&self) -> &Self::AS {
        self.mem
    }
}

impl vhost::net::VhostNet for KernFd<'_> {
    fn set_backend(&self, queue_index: usize, fd: Option<&File>) -> vhost::Result<()> {
        let file = vhost::vhost_kern::vhost_binding::vhost_vring_file {
            index: queue_index as u32,
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
        };
        // SAFETY: a valid vhost fd and a vhost_vring_file that lives across
        // the call; the kernel only reads it. The result is checked.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(
                self,
                vhost::vhost_kern::vhost_binding::VHOST_NET_SET_BACKEND(),
                &file,
            )
        };
        if r < 0 {
            Err(vhost::Error::IoctlError(std::io::Error::last_os_error()))
        } else {
            Ok(())
        }
    }
}

/// vhost-net over a TAP: the TAP's fds for offloads and migration, one
/// vhost fd per pair for the datapath.
pub struct VhostNetBackend {
    tap: Tap,
    vhost: Vec<File>,
    owned: bool,
    started: usize,
    mem: Option<GuestMemory>,
}

impl VhostNetBackend {
    pub fn new(tap: Tap, vhost: Vec<File>) -> Result<Self, VhostError> {
        if vhost.len() != tap.queues().len() {
            return Err(VhostError::FdCount(vhost.len(), tap.queues().len()));
        }
        Ok(Self {
            tap,
            vhost,
            owned: false,
            started: 0,
            mem: None,
        })
    }

    /// Whether this host can run vhost-net at all.
    pub fn host_supported() -> bool {
        std::path::Path::new("/dev/vhost-net").exists()
    }
}

fn ioctl<T>(op: &'static str, pair: usize, r: vhost::Result<T>) -> Result<T, DatapathError> {
    r.map_err(|err| DatapathError::Vhost { op, pair, err })
}

impl NetBackend for VhostNetBackend {
    fn state(&self) -> BackendState {
        BackendState {
            kind: BackendKind::VhostNet,
            ..self.tap.state()
        }
    }

    fn queue_pairs(&self) -> u16 {
        self.tap.queue_pairs()
    }

    fn frame_io(&self, pair: usize) -> Option<Arc<dyn FrameIo>> {
        self.tap.frame_io(pair)
    }

    fn filter_features(&self, offered: u64) -> u64 {
        let Some(f) = self.vhost.first() else {
            return offered;
        };
        // GET_FEATURES needs no owner and no memory; a dummy map is enough.
        let mem = match GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]) {
            Ok(m) => Arc::new(m),
            Err(_) => return offered,
        };
        let k = KernFd { file: f, mem: &mem };
        match k.get_features() {
            // Device-level offload bits are the TAP's business, not vhost's.
            Ok(v) => offered & (v | 0xff_ffff),
            Err(e) => {
                log::warn!("vhost-net: GET_FEATURES: {e}");
                offered
            }
        }
    }

    fn set_offload(&mut self, acked_features: u64) -> std::io::Result<()> {
        self.tap.set_offload(acked_features)
    }

    fn external_datapath(&mut self) -> Option<&mut dyn ExternalDatapath> {
        Some(self)
    }
}

impl ExternalDatapath for VhostNetBackend {
    fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        rings: &[VringSetup<'_>],
    ) -> Result<(), DatapathError> {
        let pairs = ring_pairs(rings, self.vhost.len())?;
        let regions = memory_table(mem);
        let features =
            acked_features & !(1 << VHOST_F_LOG_ALL) & !(1 << VHOST_NET_F_VIRTIO_NET_HDR);
        for (pair, file) in self.vhost.iter().enumerate().take(pairs) {
            let k = KernFd { file, mem };
            if !self.owned {
                ioctl("SET_OWNER", pair, k.set_owner())?;
            }
            let supported = ioctl("GET_FEATURES", pair, k.get_features())?;
            ioctl("SET_FEATURES", pair, k.set_features(features & supported))?;
            ioctl("SET_MEM_TABLE", pair, k.set_mem_table(&regions))?;
            for idx in 0..2 {
                let r = rings
                    .get(2 * pair + idx)
                    .ok_or_else(|| DatapathError::Rings("missing ring".into()))?;
                let q = r.queue;
                let cfg = VringConfigData {
                    queue_max_size: q.max_size(),
                    queue_size: q.size(),
                    flags: 0,
                    desc_table_addr: q.desc_table(),
                    used_ring_addr: q.used_ring(),
                    avail_ring_addr: q.avail_ring(),
                    log_addr: None,
                };
                ioctl("SET_VRING_NUM", pair, k.set_vring_num(idx, q.size()))?;
                ioctl("SET_VRING_ADDR", pair, k.set_vring_addr(idx, &cfg))?;
                ioctl(
                    "SET_VRING_BASE",
                    pair,
                    k.set_vring_base(idx, q.next_avail()),
                )?;
                ioctl("SET_VRING_CALL", pair, k.set_vring_call(idx, r.call))?;
                ioctl("SET_VRING_KICK", pair, k.set_vring_kick(idx, r.kick))?;
            }
            let tapq = self
                .tap
                .queues()
                .get(pair)
                .ok_or_else(|| DatapathError::Rings("missing TAP queue".into()))?;
            for idx in 0..2 {
                ioctl(
                    "NET_SET_BACKEND",
                    pair,
                    k.set_backend(idx, Some(tapq.file())),
                )?;
            }
        }
        self.owned = true;
        self.started = pairs;
        self.mem = Some(mem.clone());
        Ok(())
    }

    fn stop(&mut self) -> Result<Vec<u16>, DatapathError> {
        let Some(mem) = self.mem.take() else {
            return Ok(Vec::new());
        };
        let mut bases = Vec::with_capacity(2 * self.vhost.len());
        for (pair, file) in self.vhost.iter().enumerate().take(self.started) {
            let k = KernFd { file, mem: &mem };
            for idx in 0..2 {
                ioctl("NET_SET_BACKEND", pair, k.set_backend(idx, None))?;
            }
            for idx in 0..2 {
                let b = ioctl("GET_VRING_BASE", pair, k.get_vring_base(idx))?;
                bases.push(b as u16);
            }
        }
        Ok(bases)
    }
}
