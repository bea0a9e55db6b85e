//! The modern virtio-mmio transport (version 2, virtio 1.2 §4.2.2).
//!
//! Register accesses arrive as MMIO exits through `BusDevice`; the packet
//! path does not: the VMM registers `queue_eventfds()` as ioeventfds on
//! base + `NOTIFY_OFFSET` (datamatch = queue index) and `interrupt_eventfd()`
//! as the irqfd of the device's GSI. Anything the driver gets wrong is
//! answered with DEVICE_NEEDS_RESET or ignored; nothing here panics.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::queue_state::SavedQueue;
use super::{
    ActiveQueue, GuestMemory, Interrupt, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice,
    status,
};
use crate::devices::bus::BusDevice;
use crate::persist::{Format10PartVersion, Persist};

/// Size of one device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the ioeventfds go.
pub const NOTIFY_OFFSET: u64 = 0x50;
/// First virtio-mmio slot and GSI, by the project's convention.
pub const MMIO_BASE: u64 = 0xD000_0000;
pub const FIRST_GSI: u32 = 5;

/// Address and GSI of virtio-mmio slot `i`.
pub fn slot(i: u32) -> (u64, u32) {
    (MMIO_BASE + u64::from(i) * MMIO_SIZE, FIRST_GSI + i)
}

/// The guest command-line entry announcing slot `i` (Linux convention).
pub fn cmdline_entry(i: u32) -> String {
    let (base, gsi) = slot(i);
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // what QEMU reports; drivers ignore it

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The transport's migratable state. Queue states are the live ones (taken
/// from the paused device when it is active).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub acked_features: u64,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub config_generation: u32,
    pub queues: Vec<SavedQueue>,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("device has an invalid queue maximum size {0}")]
    QueueMaxSize(u16),
    #[error("the device is active and not paused: its queues cannot be saved")]
    NotPaused,
    #[error("state has {found} queues, the device has {expected}")]
    QueueCount { found: usize, expected: usize },
    #[error("state holds an invalid queue {0}: {1}")]
    Queue(usize, String),
    #[error("cannot activate the restored device: {0}")]
    Activate(#[from] super::ActivateError),
}

pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueState>,
    kicks: Vec<Arc<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// What the driver wrote to DriverFeatures, checked at FEATURES_OK.
    driver_features: u64,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

fn default_queue(max: u16) -> Result<QueueState, MmioError> {
    Queue::new(max)
        .map(|q| q.state())
        .map_err(|_| MmioError::QueueMaxSize(max))
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemory) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| default_queue(m))
            .collect::<Result<Vec<_>, _>>()?;
        let kicks = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new().map_err(MmioError::EventFd)?),
            queues,
            kicks,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// One per queue, in queue order: register each as an ioeventfd at
    /// base + NOTIFY_OFFSET, 4 bytes, datamatch = its index.
    pub fn queue_eventfds(&self) -> &[Arc<EventFd>] {
        &self.kicks
    }

    /// Register as an irqfd on the device's GSI.
    pub fn interrupt_eventfd(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        // Queue layout may change only before DRIVER_OK (virtio 1.2 §4.2.2.3).
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        for q in self.queues.iter_mut() {
            if let Ok(d) = default_queue(q.max_size) {
                *q = d;
            }
        }
        for k in &self.kicks {
            // Drop notifications the old driver left behind.
            let _ = k.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn fail(&mut self, why: &str) {
        common::warn_rate_limited!("virtio-mmio: {why}: device needs reset");
        self.interrupt.set_needs_reset();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.interrupt.needs_reset() {
            return;
        }
        // The driver only adds bits (§3.1.1); clearing one without a reset is a bug.
        if value & self.status != self.status {
            self.fail("driver cleared status bits without reset");
            return;
        }
        let new = value & !self.status;
        let mut accepted = self.status | (new & !(status::FEATURES_OK | status::DRIVER_OK));
        accepted &= !status::DEVICE_NEEDS_RESET;
        if new & status::FEATURES_OK != 0 {
            let f = self.driver_features;
            if f & !self.device.avail_features() == 0 && f & (1 << VIRTIO_F_VERSION_1) != 0 {
                self.acked_features = f;
                self.device.set_acked_features(f);
                accepted |= status::FEATURES_OK;
            } else {
                common::warn_rate_limited!("virtio-mmio: refusing driver features {f:#x}");
            }
        }
        self.status = accepted;
        if new & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.fail("DRIVER_OK without FEATURES_OK");
                return;
            }
            self.status |= status::DRIVER_OK;
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        for (i, st) in self.queues.iter().enumerate() {
            if !st.ready {
                active.push(None);
                continue;
            }
            let mut st = *st;
            st.event_idx_enabled = event_idx;
            let q = match Queue::try_from(st) {
                Ok(q) if q.is_valid(&*self.mem) => q,
                Ok(_) => return self.fail(&format!("queue {i} lies outside guest memory")),
                Err(e) => return self.fail(&format!("queue {i} is invalid: {e}")),
            };
            let kick = self.kicks.get(i).cloned();
            let Some(kick) = kick else {
                return self.fail("queue without eventfd");
            };
            active.push(Some(ActiveQueue { queue: q, kick }));
        }
        self.activate_queues(active);
    }

    fn activate_queues(&mut self, queues: Vec<Option<ActiveQueue>>) {
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            Ok(()) => self.active = true,
            Err(e) => self.fail(&format!("activation failed: {e}")),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_NUM => q.map_or(0, |q| u32::from(q.size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table as u32),
            reg::QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => q.map_or(0, |q| q.avail_ring as u32),
            reg::QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.avail_ring >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => q.map_or(0, |q| q.used_ring as u32),
            reg::QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.used_ring >> 32) as u32),
            // No shared memory regions: length all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let lo = |x: u64| (x & !0xffff_ffff) | u64::from(v);
        let hi = |x: u64| (x & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    let f = &mut self.driver_features;
                    match self.driver_features_sel {
                        0 => *f = (*f & !0xffff_ffff) | u64::from(v),
                        1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
                        _ => {}
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // Checked (power of two, <= max) at DRIVER_OK.
                    q.size = v.min(u32::from(u16::MAX)) as u16;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.desc_table = lo(q.desc_table)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.desc_table = hi(q.desc_table)),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.avail_ring = lo(q.avail_ring)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.avail_ring = hi(q.avail_ring)),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.used_ring = lo(q.used_ring)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.used_ring = hi(q.used_ring)),
            _ => log::debug!("virtio-mmio: write {v:#x} to unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut QueueState)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    /// A QueueNotify that reached the VMM (no ioeventfd registered, or a
    /// test): same effect as the ioeventfd. Ignored before DRIVER_OK.
    fn notify(&self, queue: u32) {
        if !self.active || self.interrupt.needs_reset() {
            return;
        }
        if let Some(Err(e)) = self.kicks.get(queue as usize).map(|k| k.write(1)) {
            log::warn!("virtio-mmio: cannot signal queue {queue}: {e}");
        }
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioState;
    type Context<'a> = ();
    type Error = MmioError;

    /// Saves the transport. An active device must be paused first.
    fn save(&self, _: ()) -> Result<MmioState, MmioError> {
        let mut queues: Vec<SavedQueue> = self.queues.iter().map(|q| SavedQueue(*q)).collect();
        if self.active {
            let live = self.device.queue_states().ok_or(MmioError::NotPaused)?;
            for (slot, st) in queues.iter_mut().zip(live) {
                if let Some(st) = st {
                    slot.0 = st;
                }
            }
        }
        Ok(MmioState {
            format_1_0_version: Format10PartVersion,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            acked_features: self.acked_features,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            config_generation: self.config_generation,
            queues,
        })
    }

    /// Loads a saved state into this fresh transport (its device already
    /// restored). When the saved driver had reached DRIVER_OK the device is
    /// activated with the saved queues; a device restored paused starts no
    /// work until resumed.
    fn restore(&mut self, _: (), state: &MmioState) -> Result<(), MmioError> {
        if self.active {
            return Err(MmioError::NotPaused);
        }
        let t = self;
        if state.queues.len() != t.queues.len() {
            return Err(MmioError::QueueCount {
                found: state.queues.len(),
                expected: t.queues.len(),
            });
        }
        for (i, (q, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.0.max_size != q.max_size {
                return Err(MmioError::Queue(i, "maximum size differs".into()));
            }
            *q = saved.0;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.acked_features = state.acked_features;
        t.driver_features = state.driver_features;
        t.status = state.status & !status::DEVICE_NEEDS_RESET;
        t.config_generation = state.config_generation;
        t.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if t.status & status::FEATURES_OK != 0 {
            t.device.set_acked_features(t.acked_features);
        }
        if t.status & status::DRIVER_OK != 0 && !state.needs_reset {
            let mut active = Vec::with_capacity(t.queues.len());
            for (i, st) in t.queues.iter().enumerate() {
                if !st.ready {
                    active.push(None);
                    continue;
                }
                let q = Queue::try_from(*st).map_err(|e| MmioError::Queue(i, e.to_string()))?;
                if !q.is_valid(&*t.mem) {
                    return Err(MmioError::Queue(i, "outside guest memory".into()));
                }
                let kick = t.kicks.get(i).cloned().ok_or(MmioError::QueueCount {
                    found: i,
                    expected: t.kicks.len(),
                })?;
                active.push(Some(ActiveQueue { queue: q, kick }));
            }
            t.device
                .activate(t.mem.clone(), t.interrupt.clone(), active)?;
            t.active = true;
        }
        Ok(())
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio-mmio: ignoring {}-byte register write", data.len());
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
