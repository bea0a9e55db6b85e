//! Test helpers: a mock frame backend over a SOCK_SEQPACKET socketpair (a
//! real fd that keeps frame boundaries, like a TAP queue) and a simulated
//! guest driver that programs the transport and fills rings in memory.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::mmio::MmioTransport;
use super::net::backend::{BackendKind, BackendState, FrameIo, NetBackend};
use super::net::{NetDevice, datapath::VNET_HDR_LEN};
use super::{GuestMemory, GuestMemoryMmap, VirtioDevice, status};
use crate::devices::bus::BusDevice;
use crate::persist::Format10PartVersion;
pub use net_datapath::testing::{Peer, SockIo, sock_pair};

/// Rings and buffers of the tests live in the first `MEM_SIZE` bytes of
/// guest RAM.
pub const MEM_SIZE: usize = 4 << 20;
pub const BUF_BASE: u64 = 0x10_0000;
/// RAM above the MMIO hole in the test layout.
pub const HIGH_RAM_SIZE: u64 = 2 << 20;
/// The end of low RAM (the start of the MMIO hole, as in the real layout).
pub const LOW_RAM_END: u64 = crate::memory::MMIO_HOLE_START;
/// Where RAM continues above the hole.
pub const HIGH_RAM: u64 = crate::memory::HIGH_RAM_START;
/// An address inside the MMIO hole: never guest RAM.
pub const IN_HOLE: u64 = LOW_RAM_END + 0x1000_0000;

/// Guest RAM laid out as the VMM lays out a guest a little larger than the
/// hole's start (`memory::ram_ranges`): low RAM up to the MMIO hole, then
/// `HIGH_RAM_SIZE` above 4 GiB. Anonymous and reserved lazily, so only the
/// pages a test touches cost memory.
pub fn layout_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = crate::memory::ram_ranges(LOW_RAM_END + HIGH_RAM_SIZE)
        .into_iter()
        .map(|(a, len)| (a, len as usize))
        .collect();
    assert_eq!(ranges.len(), 2, "the layout has an MMIO hole");
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

pub fn memory() -> GuestMemory {
    Arc::new(layout_memory())
}

pub struct MockBackend {
    pub queues: Vec<Arc<SockIo>>,
    pub offload_calls: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl NetBackend for MockBackend {
    fn state(&self) -> BackendState {
        BackendState {
            format_1_0_version: Format10PartVersion,
            kind: BackendKind::Tap,
            ifname: "mock0".into(),
            queue_pairs: self.queues.len() as u16,
            vnet_hdr_len: VNET_HDR_LEN as u16,
            offloads: 0,
            tap_fds: (0..self.queues.len()).collect(),
        }
    }
    fn queue_pairs(&self) -> u16 {
        self.queues.len() as u16
    }
    fn frame_io(&self, pair: usize) -> Option<Arc<dyn FrameIo>> {
        self.queues.get(pair).map(|q| q.clone() as Arc<dyn FrameIo>)
    }
    fn set_offload(&mut self, acked: u64) -> io::Result<()> {
        self.offload_calls.lock().unwrap().push(acked);
        Ok(())
    }
}

pub fn mock_backend(pairs: usize) -> (MockBackend, Vec<Peer>) {
    let (q, p): (Vec<_>, Vec<_>) = (0..pairs).map(|_| sock_pair()).unzip();
    (
        MockBackend {
            queues: q,
            offload_calls: Default::default(),
        },
        p,
    )
}

pub const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// A guest-side view of one split virtqueue.
#[derive(Clone, Copy, Debug)]
pub struct GuestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

/// A simulated driver talking to the transport through its registers.
pub struct Driver {
    pub t: MmioTransport<NetDevice>,
    pub mem: GuestMemory,
    pub q: Vec<GuestQueue>,
    next_buf: u64,
}

impl Driver {
    pub fn read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn new_unstarted(backend: MockBackend, mem: GuestMemory) -> Self {
        let dev = NetDevice::new(Box::new(backend), Some(MAC)).unwrap();
        let t = MmioTransport::new(dev, mem.clone()).unwrap();
        Self::wrap(t, mem)
    }

    pub fn wrap(t: MmioTransport<NetDevice>, mem: GuestMemory) -> Self {
        Driver {
            t,
            mem,
            q: Vec::new(),
            next_buf: BUF_BASE,
        }
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(0x14, 0);
        let lo = self.read(0x10);
        self.write(0x14, 1);
        let hi = self.read(0x10);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Negotiates `want & offered`; returns whether FEATURES_OK stuck.
    pub fn negotiate(&mut self, want: u64) -> bool {
        self.write(0x70, 0);
        self.write(0x70, status::ACKNOWLEDGE);
        self.write(0x70, status::ACKNOWLEDGE | status::DRIVER);
        let f = self.device_features() & want;
        self.write(0x24, 0);
        self.write(0x20, f as u32);
        self.write(0x24, 1);
        self.write(0x20, (f >> 32) as u32);
        self.write(
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.read(0x70) & status::FEATURES_OK != 0
    }

    /// Sets up queue `i` of `size` entries at a fixed place.
    pub fn setup_queue(&mut self, i: u32, size: u16) {
        let base = 0x1_0000 * (u64::from(i) + 1);
        let gq = GuestQueue {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        // Fresh rings, as a driver allocates them: a device that starts
        // serving at DRIVER_OK must not see a previous activation's entries.
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(base))
            .unwrap();
        self.write(0x30, i);
        self.write(0x38, u32::from(size));
        self.write(0x80, gq.desc as u32);
        self.write(0x84, 0);
        self.write(0x90, gq.avail as u32);
        self.write(0x94, 0);
        self.write(0xa0, gq.used as u32);
        self.write(0xa4, 0);
        self.write(0x44, 1);
        let i = i as usize;
        if self.q.len() <= i {
            self.q.resize(
                i + 1,
                GuestQueue {
                    size: 0,
                    desc: 0,
                    avail: 0,
                    used: 0,
                    next_desc: 0,
                    avail_idx: 0,
                    used_seen: 0,
                },
            );
        }
        self.q[i] = gq;
    }

    pub fn driver_ok(&mut self) {
        let s = self.read(0x70);
        self.write(0x70, s | status::DRIVER_OK);
    }

    /// A started device with `queues` queues of 16 entries.
    pub fn start(backend: MockBackend, want: u64) -> Self {
        let mem = memory();
        let mut d = Self::new_unstarted(backend, mem);
        assert!(d.negotiate(want));
        let n = d.t.device().queue_max_sizes().len() as u32;
        for i in 0..n {
            d.setup_queue(i, 16);
        }
        d.driver_ok();
        assert_eq!(d.read(0x70) & status::DEVICE_NEEDS_RESET, 0);
        d
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += (len + 15) & !15;
        if self.next_buf > MEM_SIZE as u64 - 0x1_0000 {
            self.next_buf = BUF_BASE;
        }
        a
    }

    pub fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let g = self.q[q];
        let a = GuestAddress(g.desc + 16 * u64::from(i));
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Puts `head` in the avail ring and publishes it (no kick).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let g = &mut self.q[q];
        let slot = g.avail + 4 + 2 * u64::from(g.avail_idx % g.size);
        g.avail_idx = g.avail_idx.wrapping_add(1);
        let (idx, avail) = (g.avail_idx, g.avail);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    pub fn kick(&mut self, q: usize) {
        self.write(0x50, q as u32);
    }

    /// Adds a chain of (addr, len, device-writable) buffers and kicks.
    pub fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.q[q].size;
        let head = self.q[q].next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % size;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { 1 } | if w { 2 } else { 0 };
            self.write_desc(q, i, addr, len, flags, (i + 1) % size);
        }
        self.q[q].next_desc = (head + bufs.len() as u16) % size;
        self.push_avail(q, head);
        self.kick(q);
        head
    }

    /// Sends a frame (vnet header + payload) on tx queue 1.
    pub fn send(&mut self, payload: &[u8]) -> u16 {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        let a = self.alloc(f.len() as u64);
        self.mem.write_slice(&f, GuestAddress(a)).unwrap();
        self.add_chain(1, &[(a, f.len() as u32, false)])
    }

    /// Offers one rx buffer of `len` bytes on queue 0; returns its address.
    pub fn give_rx(&mut self, len: u32) -> u64 {
        let a = self.alloc(u64::from(len));
        self.add_chain(0, &[(a, len, true)]);
        a
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.q[q].used + 2))
            .unwrap()
    }

    /// New used entries (id, len), waiting up to 10 s for `n` of them.
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(q).wrapping_sub(self.q[q].used_seen) < n as u16 {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} used entries on queue {q}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        self.take_used(q)
    }

    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let g = self.q[q];
        let end = self.used_idx(q);
        let mut out = Vec::new();
        let mut i = g.used_seen;
        while i != end {
            let e = g.used + 4 + 8 * u64::from(i % g.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            i = i.wrapping_add(1);
        }
        self.q[q].used_seen = end;
        out
    }

    /// Interrupts fired since the last call.
    pub fn interrupts(&self) -> u64 {
        self.t.interrupt_eventfd().read().unwrap_or(0)
    }

    pub fn needs_reset(&mut self) -> bool {
        self.read(0x70) & status::DEVICE_NEEDS_RESET != 0
    }

    /// Waits up to 10 s for DEVICE_NEEDS_RESET.
    pub fn wait_needs_reset(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.needs_reset() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

/// For unit tests that need root's powers (a network namespace of their own,
/// a TAP) when the host refuses them: a failure where `REQUIRE_NETNS=1`
/// promises them (`.ci/run` sets it; the suite runs as root), otherwise a
/// skip reported where the harness does not hide it (fd 2, not captured like
/// `eprintln!`) and appended to `$TESTS_SKIP_LOG` when set.
/// `test` names the test (its helper thread has no name of its own).
pub fn netns_unavailable(test: &str, what: &str, reason: impl std::fmt::Display) {
    use std::io::Write;
    assert!(
        std::env::var("REQUIRE_NETNS").as_deref() != Ok("1"),
        "{test}: {what} failed although REQUIRE_NETNS=1 promises it: {reason}"
    );
    let line =
        format!("SKIP {test}: {what}: {reason} (set REQUIRE_NETNS=1 to make this a failure)\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("TESTS_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!("cannot append to TESTS_SKIP_LOG {path:?}: {e}");
        }
    }
}
