//! The virtio-net driver: feature negotiation, rx/tx queues, receive loop
//! and a transmit path that waits for ring space instead of dropping.

use crate::arch::{self, mmio_read8, mmio_read32, mmio_write32};
use crate::cmdline::MmioDevice;
use crate::net::{Stack, Transmit};
use crate::serial;
use crate::text::TextBuf;
use crate::virtio::{self, BUF_SIZE, Buffers, Dma, QUEUE_SIZE, QueueMem, Virtqueue};

const DEVICE_ID_NET: u32 = 1;
const F_NET_MAC: u64 = 1 << 5;
const F_NET_MRG_RXBUF: u64 = 1 << 15;
/// virtio_net_hdr with num_buffers: always 12 bytes with VERSION_1.
pub const NET_HDR_LEN: usize = 12;

static RX_MEM: Dma<QueueMem> = Dma::new(QueueMem::new());
static TX_MEM: Dma<QueueMem> = Dma::new(QueueMem::new());
static RX_BUFS: Dma<Buffers> = Dma::new(Buffers::new());
static TX_BUFS: Dma<Buffers> = Dma::new(Buffers::new());

#[allow(clippy::large_enum_variant)] // built once at boot
pub enum Probe {
    /// No device, or another kind of device, at this address.
    NotNet,
    Failed(&'static str),
    Ready(NetDevice),
}

pub struct NetDevice {
    pub mac: [u8; 6],
    pub features: u64,
    rx: Virtqueue,
    tx: TxQueue,
    mrg_rxbuf: bool,
    rx_hold: RxHold,
    /// rx buffers still to be given back too short (UDP 5005).
    rx_short: u16,
}

/// A UDP 5003 rx hold: rx buffers the device returns are kept back until
/// the heartbeat tick `until`, so the device runs out of buffers and has
/// to hold a frame it read. Serial lines: `testguest: rx hold for <t>
/// ticks, <k> buffers posted` when it starts (k: buffers the device may
/// still fill), `testguest: rx ring empty` once it has none,
/// `testguest: rx hold released, <n> buffers given back` at the end.
struct RxHold {
    /// rx buffers the device has (offered, not yet returned).
    outstanding: usize,
    until: Option<u64>,
    kept: [u16; virtio::QUEUE_SIZE],
    n_kept: usize,
    said_empty: bool,
}

pub struct TxQueue {
    vq: Virtqueue,
    free: [u16; virtio::QUEUE_SIZE],
    n_free: usize,
    /// Times the transmit path waited for ring space (diagnostics).
    pub waits: u64,
}

impl NetDevice {
    /// Probes and initialises the device; on failure sets FAILED.
    pub fn probe(dev: &MmioDevice, tx_queue_max: usize) -> Probe {
        if dev.addr == 0 || dev.addr.saturating_add(0x200) > 0x1_0000_0000 || dev.size < 0x100 {
            return Probe::Failed("address outside 0..4 GiB");
        }
        let base = dev.addr as usize;
        if mmio_read32(base + virtio::REG_MAGIC) != virtio::MAGIC {
            return Probe::NotNet;
        }
        if mmio_read32(base + virtio::REG_DEVICE_ID) != DEVICE_ID_NET {
            return Probe::NotNet;
        }
        if mmio_read32(base + virtio::REG_VERSION) != 2 {
            return Probe::Failed("legacy virtio-mmio (version 1) is not supported");
        }
        match Self::init(base, tx_queue_max) {
            Ok(d) => Probe::Ready(d),
            Err(e) => {
                mmio_write32(base + virtio::REG_STATUS, virtio::STATUS_FAILED);
                Probe::Failed(e)
            }
        }
    }

    fn init(base: usize, tx_queue_max: usize) -> Result<Self, &'static str> {
        let status = base + virtio::REG_STATUS;
        mmio_write32(status, 0);
        let mut tries = 0;
        while mmio_read32(status) != 0 {
            tries += 1;
            if tries > 1000 {
                return Err("device does not reset");
            }
        }
        mmio_write32(status, virtio::STATUS_ACKNOWLEDGE);
        mmio_write32(status, virtio::STATUS_ACKNOWLEDGE | virtio::STATUS_DRIVER);

        let mut offered = 0u64;
        for sel in 0..2u32 {
            mmio_write32(base + virtio::REG_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(mmio_read32(base + virtio::REG_DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & virtio::F_VERSION_1 == 0 {
            return Err("device does not offer VERSION_1");
        }
        let features = offered
            & (virtio::F_VERSION_1 | F_NET_MAC | F_NET_MRG_RXBUF | virtio::F_RING_EVENT_IDX);
        for sel in 0..2u32 {
            mmio_write32(base + virtio::REG_DRIVER_FEATURES_SEL, sel);
            mmio_write32(
                base + virtio::REG_DRIVER_FEATURES,
                (features >> (32 * sel)) as u32,
            );
        }
        let s = virtio::STATUS_ACKNOWLEDGE | virtio::STATUS_DRIVER | virtio::STATUS_FEATURES_OK;
        mmio_write32(status, s);
        if mmio_read32(status) & virtio::STATUS_FEATURES_OK == 0 {
            return Err("device rejected the features");
        }

        let mut mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
        if features & F_NET_MAC != 0 {
            for (i, m) in mac.iter_mut().enumerate() {
                *m = mmio_read8(base + virtio::REG_CONFIG + i);
            }
        }

        let event_idx = features & virtio::F_RING_EVENT_IDX != 0;
        let mut rx = Virtqueue::setup(base, 0, &RX_MEM, &RX_BUFS, true, event_idx, QUEUE_SIZE)?;
        let tx = Virtqueue::setup(base, 1, &TX_MEM, &TX_BUFS, false, event_idx, tx_queue_max)?;
        for id in 0..rx.size() {
            rx.push(id, None);
        }
        let mut free = [0u16; virtio::QUEUE_SIZE];
        for (i, f) in free.iter_mut().enumerate() {
            *f = i as u16;
        }
        let n_free = usize::from(tx.size());
        let rx_hold = RxHold {
            outstanding: usize::from(rx.size()),
            until: None,
            kept: [0; virtio::QUEUE_SIZE],
            n_kept: 0,
            said_empty: false,
        };
        rx.want_interrupt();
        // Completed transmissions are reclaimed when sending; the tx
        // interrupt is wanted only while waiting for ring space.
        tx.suppress_interrupts();
        mmio_write32(status, s | virtio::STATUS_DRIVER_OK);
        rx.publish();
        Ok(NetDevice {
            mac,
            features,
            rx,
            tx: TxQueue {
                vq: tx,
                free,
                n_free,
                waits: 0,
            },
            mrg_rxbuf: features & F_NET_MRG_RXBUF != 0,
            rx_hold,
            rx_short: 0,
        })
    }

    /// Handles everything the device has completed, then re-arms
    /// interrupts; returns when both rings are drained. `tick` is the
    /// heartbeat's count (None without one: no rx hold then).
    pub fn poll(&mut self, stack: &mut Stack, tick: Option<u64>) {
        loop {
            while let Some((id, len)) = self.rx.pop_used() {
                self.rx_hold.outstanding = self.rx_hold.outstanding.saturating_sub(1);
                stack.rx_frames += 1;
                let Some(buf) = self.rx.buffer(id) else {
                    continue;
                };
                let len = (len as usize).min(BUF_SIZE);
                // SAFETY: the device gave buffer `id` back to us; it is
                // BUF_SIZE bytes of static memory nobody else touches until
                // we push it again below.
                let data = unsafe { core::slice::from_raw_parts(buf as *const u8, len) };
                let num_buffers = data
                    .get(10..12)
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map_or(1, u16::from_le_bytes);
                if self.mrg_rxbuf && num_buffers > 1 {
                    // A frame larger than one buffer: we never see those
                    // without GSO; drop it with all its buffers.
                    for _ in 1..num_buffers {
                        match self.rx.pop_used() {
                            Some((more, _)) => {
                                self.rx_hold.outstanding =
                                    self.rx_hold.outstanding.saturating_sub(1);
                                self.give_rx(more);
                            }
                            None => break,
                        }
                    }
                } else if let Some(frame) = data.get(NET_HDR_LEN..) {
                    stack.handle(frame, &mut self.tx);
                }
                if let Some(ticks) = stack.hold_request.take() {
                    self.start_hold(ticks, tick);
                }
                if let Some((ntx, nrx)) = stack.bad_chains_request.take() {
                    self.tx.post_bad(ntx);
                    self.rx_short = nrx;
                }
                self.give_rx(id);
            }
            if self.rx_hold.until.is_some()
                && self.rx_hold.outstanding == 0
                && !self.rx_hold.said_empty
            {
                self.rx_hold.said_empty = true;
                serial::line(b"rx ring empty");
            }
            self.rx.publish();
            self.tx.flush();
            self.tx.reclaim();
            self.rx.want_interrupt();
            if !self.rx.has_used() {
                break;
            }
        }
    }

    /// Offers rx buffer `id` to the device again, or keeps it during a hold.
    fn give_rx(&mut self, id: u16) {
        let h = &mut self.rx_hold;
        if h.until.is_some()
            && let Some(slot) = h.kept.get_mut(h.n_kept)
        {
            *slot = id;
            h.n_kept += 1;
            return;
        }
        // Full length again (a UDP 5005 buffer was shortened), or short.
        let len = if self.rx_short > 0 {
            self.rx_short -= 1;
            SHORT_RX_BUF
        } else {
            BUF_SIZE as u32
        };
        self.rx.push(id, Some(len));
        h.outstanding += 1;
    }

    fn start_hold(&mut self, ticks: u32, now: Option<u64>) {
        let Some(now) = now else {
            serial::line(b"rx hold needs testguest.heartbeat");
            return;
        };
        let h = &mut self.rx_hold;
        h.until = Some(now.saturating_add(u64::from(ticks)));
        h.said_empty = false;
        let mut line = TextBuf::<80>::new();
        line.str("rx hold for ")
            .dec(u64::from(ticks))
            .str(" ticks, ")
            .dec(h.outstanding as u64)
            .str(" buffers posted");
        serial::line(line.as_bytes());
    }

    /// Ends an rx hold once the heartbeat reached its end.
    pub fn tick(&mut self, now: u64) {
        if !self.rx_hold.until.is_some_and(|u| now >= u) {
            return;
        }
        self.rx_hold.until = None;
        let n = self.rx_hold.n_kept;
        self.rx_hold.n_kept = 0;
        for i in 0..n {
            if let Some(&id) = self.rx_hold.kept.get(i) {
                self.rx.push(id, Some(BUF_SIZE as u32));
                self.rx_hold.outstanding += 1;
            }
        }
        self.rx.publish();
        self.rx.want_interrupt();
        let mut line = TextBuf::<64>::new();
        line.str("rx hold released, ")
            .dec(n as u64)
            .str(" buffers given back");
        serial::line(line.as_bytes());
    }
}

/// A UDP 5005 bad chain's length: shorter than a vnet header.
const SHORT_TX_CHAIN: u32 = 2;
const SHORT_RX_BUF: u32 = 4;

impl TxQueue {
    /// Posts `n` tx chains too short for a vnet header (UDP 5005).
    fn post_bad(&mut self, n: u16) {
        for _ in 0..n {
            let id = self.take();
            self.vq.push(id, Some(SHORT_TX_CHAIN));
        }
        self.vq.publish();
    }

    fn reclaim(&mut self) {
        while let Some((id, _)) = self.vq.pop_used() {
            if id >= self.vq.size() {
                continue; // an id we never gave out: a device bug, ignore it
            }
            if let Some(f) = self.free.get_mut(self.n_free) {
                *f = id;
                self.n_free += 1;
            }
        }
    }

    /// A free descriptor, waiting (in hlt, for the tx interrupt) while the
    /// ring is full.
    fn take(&mut self) -> u16 {
        loop {
            self.reclaim();
            if self.n_free > 0 {
                self.n_free -= 1;
                if let Some(&id) = self.free.get(self.n_free) {
                    return id;
                }
            }
            self.vq.publish();
            self.vq.want_interrupt();
            self.waits += 1;
            arch::cli();
            if self.vq.has_used() {
                arch::sti();
            } else {
                arch::sti_hlt();
            }
            self.vq.suppress_interrupts();
        }
    }
}

impl Transmit for TxQueue {
    fn send(&mut self, build: &mut dyn FnMut(&mut [u8]) -> usize) -> bool {
        let id = self.take();
        let Some(buf) = self.vq.buffer(id) else {
            return false;
        };
        // SAFETY: descriptor `id` is ours (taken from the free list), its
        // buffer is BUF_SIZE bytes of static memory the device does not
        // read until we push it.
        let buf = unsafe { core::slice::from_raw_parts_mut(buf, BUF_SIZE) };
        let (hdr, frame) = buf.split_at_mut(NET_HDR_LEN);
        hdr.fill(0);
        let len = build(frame).min(frame.len());
        if len == 0 {
            if let Some(f) = self.free.get_mut(self.n_free) {
                *f = id;
                self.n_free += 1;
            }
            return false;
        }
        self.vq.push(id, Some((NET_HDR_LEN + len) as u32));
        // Publish in batches of a few frames; `flush` does the rest.
        if self.vq.unpublished() >= 16 {
            self.vq.publish();
        }
        true
    }

    fn flush(&mut self) {
        self.vq.publish();
    }

    fn waits(&self) -> u64 {
        self.waits
    }
}
