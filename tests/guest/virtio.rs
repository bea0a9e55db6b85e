//! Modern (version 2) virtio-mmio transport and split virtqueues in static
//! memory. Descriptor i of a queue always points at buffer i of that queue,
//! so only lengths and ring entries change at run time.

use crate::arch::{self, mmio_read32, mmio_write32};

pub const MAGIC: u32 = 0x7472_6976;

pub const REG_MAGIC: usize = 0x000;
pub const REG_VERSION: usize = 0x004;
pub const REG_DEVICE_ID: usize = 0x008;
pub const REG_DEVICE_FEATURES: usize = 0x010;
pub const REG_DEVICE_FEATURES_SEL: usize = 0x014;
pub const REG_DRIVER_FEATURES: usize = 0x020;
pub const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
pub const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC_LOW: usize = 0x080;
const REG_QUEUE_DESC_HIGH: usize = 0x084;
const REG_QUEUE_DRIVER_LOW: usize = 0x090;
const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
pub const REG_CONFIG: usize = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Largest queue we use; a device offering more gets this many.
pub const QUEUE_SIZE: usize = 256;
pub const BUF_SIZE: usize = 2048;

/// Descriptor table, available ring and used ring, a page each.
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [u8; 4096],
    avail: [u8; 4096],
    used: [u8; 4096],
}

impl QueueMem {
    pub const fn new() -> Self {
        QueueMem {
            desc: [0; 4096],
            avail: [0; 4096],
            used: [0; 4096],
        }
    }
}

#[repr(C, align(4096))]
pub struct Buffers(pub [[u8; BUF_SIZE]; QUEUE_SIZE]);

impl Buffers {
    pub const fn new() -> Self {
        Buffers([[0; BUF_SIZE]; QUEUE_SIZE])
    }
}

/// Static memory the device reads and writes behind Rust's back: only ever
/// accessed through raw pointers (volatile for the rings).
pub struct Dma<T>(core::cell::UnsafeCell<T>);
// SAFETY: one CPU; the memory is reached only through raw pointers.
unsafe impl<T> Sync for Dma<T> {}
impl<T> Dma<T> {
    pub const fn new(v: T) -> Self {
        Dma(core::cell::UnsafeCell::new(v))
    }
    pub fn addr(&self) -> usize {
        self.0.get() as usize
    }
}

fn rd16(addr: usize) -> u16 {
    // SAFETY: callers pass addresses inside a QueueMem (aligned, static).
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
fn wr16(addr: usize, v: u16) {
    // SAFETY: as rd16.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
fn rd32(addr: usize) -> u32 {
    // SAFETY: as rd16.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
fn wr64(addr: usize, v: u64) {
    // SAFETY: as rd16.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

pub struct Virtqueue {
    index: u16,
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    bufs: usize,
    notify: usize,
    event_idx: bool,
    /// Our shadow of avail.idx and the avail.idx last made visible.
    avail_idx: u16,
    published: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Configures queue `index` of the device at `base` over `mem` and `bufs`.
    pub fn setup(
        base: usize,
        index: u16,
        mem: &Dma<QueueMem>,
        bufs: &Dma<Buffers>,
        device_writes: bool,
        event_idx: bool,
        max_size: usize,
    ) -> Result<Self, &'static str> {
        mmio_write32(base + REG_QUEUE_SEL, u32::from(index));
        if mmio_read32(base + REG_QUEUE_READY) != 0 {
            return Err("queue already ready");
        }
        let max = mmio_read32(base + REG_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        // Split rings want a power of two.
        let mut size = (max as usize).min(QUEUE_SIZE).min(max_size.max(1));
        while !size.is_power_of_two() {
            size &= size - 1;
        }
        let mem_addr = mem.addr();
        let q = Virtqueue {
            index,
            size: size as u16,
            desc: mem_addr,
            avail: mem_addr + 4096,
            used: mem_addr + 8192,
            bufs: bufs.addr(),
            notify: base + REG_QUEUE_NOTIFY,
            event_idx,
            avail_idx: 0,
            published: 0,
            last_used: 0,
        };
        for i in 0..size {
            let d = q.desc + i * 16;
            wr64(d, (q.bufs + i * BUF_SIZE) as u64);
            let flags = if device_writes { DESC_F_WRITE } else { 0 };
            wr64(d + 8, BUF_SIZE as u64 | (u64::from(flags) << 32));
        }
        // Fresh rings (the memory may hold a previous driver's state).
        wr16(q.avail, 0);
        wr16(q.avail + 2, 0);
        wr16(q.used_event_addr(), 0);
        wr16(q.used, 0);
        wr16(q.used + 2, 0);
        arch::mb();
        mmio_write32(base + REG_QUEUE_NUM, size as u32);
        let split = |v: usize| (v as u32, ((v as u64) >> 32) as u32);
        let (lo, hi) = split(q.desc);
        mmio_write32(base + REG_QUEUE_DESC_LOW, lo);
        mmio_write32(base + REG_QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(q.avail);
        mmio_write32(base + REG_QUEUE_DRIVER_LOW, lo);
        mmio_write32(base + REG_QUEUE_DRIVER_HIGH, hi);
        let (lo, hi) = split(q.used);
        mmio_write32(base + REG_QUEUE_DEVICE_LOW, lo);
        mmio_write32(base + REG_QUEUE_DEVICE_HIGH, hi);
        mmio_write32(base + REG_QUEUE_READY, 1);
        Ok(q)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn used_event_addr(&self) -> usize {
        self.avail + 4 + 2 * usize::from(self.size)
    }

    fn avail_event_addr(&self) -> usize {
        self.used + 4 + 8 * usize::from(self.size)
    }

    /// Buffer `id` as a raw pointer (valid for BUF_SIZE bytes), or None for
    /// an id the device should never have returned.
    pub fn buffer(&self, id: u16) -> Option<*mut u8> {
        (id < self.size).then(|| (self.bufs + usize::from(id) * BUF_SIZE) as *mut u8)
    }

    /// Offers descriptor `id` (with `len` bytes for the device to read, or
    /// the full buffer when the device writes). Visible after `publish`.
    pub fn push(&mut self, id: u16, len: Option<u32>) {
        if id >= self.size {
            return;
        }
        if let Some(len) = len {
            let d = self.desc + usize::from(id) * 16 + 8;
            // SAFETY: inside the descriptor table; writes the len field only.
            unsafe { core::ptr::write_volatile(d as *mut u32, len.min(BUF_SIZE as u32)) };
        }
        // size is a power of two (setup), so masking is the modulo.
        let slot = usize::from(self.avail_idx & self.size.wrapping_sub(1));
        wr16(self.avail + 4 + 2 * slot, id);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Descriptors pushed but not yet published.
    pub fn unpublished(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.published)
    }

    /// Makes pushed descriptors visible and notifies the device if it asked.
    pub fn publish(&mut self) {
        if self.avail_idx == self.published {
            return;
        }
        arch::mb();
        wr16(self.avail + 2, self.avail_idx);
        arch::mb();
        let old = self.published;
        let new = self.avail_idx;
        self.published = new;
        let notify = if self.event_idx {
            let event = rd16(self.avail_event_addr());
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            rd16(self.used) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            mmio_write32(self.notify, u32::from(self.index));
        }
    }

    pub fn has_used(&self) -> bool {
        rd16(self.used + 2) != self.last_used
    }

    /// The next used element: (descriptor id, bytes written).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        arch::mb();
        let slot = usize::from(self.last_used & self.size.wrapping_sub(1));
        let e = self.used + 4 + 8 * slot;
        let id = rd32(e);
        let len = rd32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((u16::try_from(id).unwrap_or(u16::MAX), len))
    }

    /// Asks for an interrupt at the next used element. Callers check
    /// `has_used` afterwards to close the race with the device.
    pub fn want_interrupt(&self) {
        if self.event_idx {
            wr16(self.used_event_addr(), self.last_used);
        } else {
            wr16(self.avail, 0);
        }
        arch::mb();
    }

    /// Asks the device not to interrupt for this queue (a hint: a device
    /// may still do so, which is harmless).
    pub fn suppress_interrupts(&self) {
        if self.event_idx {
            // The event index just behind us is reached only after 65535
            // more used elements.
            wr16(self.used_event_addr(), self.last_used.wrapping_sub(1));
        } else {
            wr16(self.avail, AVAIL_F_NO_INTERRUPT);
        }
    }
}
