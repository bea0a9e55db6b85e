//! Virtio devices over the virtio-mmio transport.
//!
//! A device (`VirtioDevice`) knows its queues, features and config space; the
//! transport (`mmio::MmioTransport`) owns the guest-visible registers and
//! hands the device its queues, kick `EventFd`s and the interrupt when the
//! driver sets DRIVER_OK.
//!
//! Attaching a `--net` device in slot `i` (what the VMM does):
//! 1. `net::backend_from_fds(tap_fds, vhost_fds)` on the fds netd sent;
//!    `NetDevice::new(backend, mac)`; `set_thread_hook` (seccomp for the
//!    device threads) and `start_threads()` before the VMM sandboxes itself.
//! 2. `MmioTransport::new(device, guest_memory)`; `(base, gsi) = mmio::slot(i)`.
//! 3. Register with KVM: each `queue_eventfds()[q]` as an ioeventfd at
//!    `base + mmio::NOTIFY_OFFSET`, 4 bytes, datamatch `q`; and
//!    `interrupt_eventfd()` as an irqfd on `gsi`.
//! 4. Put the transport on the MMIO bus at `base`, length `mmio::MMIO_SIZE`,
//!    and add `mmio::cmdline_entry(i)` to the guest command line.
//!
//! Migration (each through its `persist::Persist` impl): `device_mut().pause()`,
//! then `save` of the transport and of the net device (TAP fds travel beside
//! the RON in `BackendState::tap_fds` order); on the target, a device and
//! transport built as for a boot, `restore` of the net device then of the
//! transport, and `resume()`.

pub mod mmio;
pub mod net;
pub mod queue_state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory as the devices see it (shared with the device threads).
pub use net_datapath::GuestMemoryMmap;
pub type GuestMemory = Arc<GuestMemoryMmap>;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Transport-independent feature bits.
pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bits (InterruptStatus register).
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Device type ids (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;

/// The device's one interrupt line: an `EventFd` the VMM registers as an
/// irqfd on the device's GSI, plus the InterruptStatus bits the driver reads
/// and acknowledges. Shared between the transport and the device threads.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
    needs_reset: AtomicBool,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
            needs_reset: AtomicBool::new(false),
        })
    }

    /// The fd to register as irqfd (KVM_IRQFD) on the device's GSI.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio: cannot signal interrupt: {e}");
        }
    }

    /// A used ring changed.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// The config space changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// Something the driver did broke the device: it stops and tells the
    /// driver through DEVICE_NEEDS_RESET and a config interrupt.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config();
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        // An interrupt the driver has not acknowledged may have been lost on
        // the way: an irqfd write reaches the irqchip asynchronously, after
        // the saved irqchip state was read. Raise it again; a driver that
        // already saw it finds its ISR bits and nothing new.
        if status != 0
            && let Err(e) = self.evt.write(1)
        {
            log::warn!("virtio: cannot signal a restored interrupt: {e}");
        }
    }

    fn clear(&self) {
        self.restore(0, false);
    }
}

/// The datapath signals the guest through the device's interrupt.
impl net_datapath::queue_pair::Notify for Interrupt {
    fn signal_used_queue(&self) {
        Interrupt::signal_used_queue(self);
    }
    fn set_needs_reset(&self) {
        Interrupt::set_needs_reset(self);
    }
}

/// A queue handed to the device at activation, with the `EventFd` the
/// driver's notifications arrive on (ioeventfd on QueueNotify).
#[derive(Debug)]
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: Arc<EventFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is required but was not set up by the driver")]
    MissingQueue(usize),
    #[error("backend: {0}")]
    Backend(String),
    #[error("cannot create the device thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("device is already active")]
    AlreadyActive,
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    /// Called once FEATURES_OK is accepted, with a subset of `avail_features`.
    fn set_acked_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving. `queues[i]` is `None` for a queue the driver left
    /// unready. On error the transport sets DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Option<ActiveQueue>>,
    ) -> Result<(), ActivateError>;
    /// Stop serving and forget the queues (driver wrote 0 to Status).
    fn reset(&mut self);
    /// Current state of the active queues (pauses nothing: for a consistent
    /// snapshot the device must be paused first). `None` when not active.
    fn queue_states(&self) -> Option<Vec<Option<virtio_queue::QueueState>>>;
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
