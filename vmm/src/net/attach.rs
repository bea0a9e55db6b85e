//! `--net` end to end: ask netd for the TAP (as the unprivileged user, so
//! netd's policy sees the tenant's uid), build the virtio-net device and
//! start its threads (before any vCPU runs: a device activated by the guest
//! would otherwise create them on the vCPU thread, under its filter), then,
//! once the VM exists, put its virtio-mmio transport in a slot with
//! ioeventfds, irqfd and the command-line entry.
//!
//! Two steps: [`open_nets`] right after the sandbox is up (the device
//! threads inherit it and narrow it with their own filter through the
//! hook), [`attach_nets`] where the VM takes its virtio devices. [`NetAttachment`] then pauses, resumes, reports
//! and saves each device for the API and for migration.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use common::api::NetStatus;

use super::config::{NetConfig, NetConfigError};
use super::netd_client::{self, NetdClientError};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport};
use crate::devices::virtio::net::event_handler::ThreadHook;
use crate::devices::virtio::net::{
    BackendError, BackendKind, NetDevice, NetError, NetState, backend_from_fds,
};
use crate::vm::{VirtioSlot, Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum NetAttachError {
    #[error("{0}")]
    Config(#[from] NetConfigError),
    #[error("--net id={id}: {err}")]
    Netd {
        id: String,
        err: Box<NetdClientError>,
    },
    #[error("--net id={id}: {err}")]
    Backend { id: String, err: BackendError },
    #[error("--net id={id}: {err}")]
    Device { id: String, err: NetError },
    #[error("--net id={id}: virtio-mmio: {err}")]
    Transport { id: String, err: MmioError },
    #[error("--net id={id}: cannot duplicate an eventfd: {err}")]
    EventFd { id: String, err: std::io::Error },
    #[error("--net id={id}: {err}")]
    Vm { id: String, err: VmError },
}

impl NetAttachError {
    /// True when the user's input is at fault (bad option, policy refusal).
    pub fn is_bad_input(&self) -> bool {
        match self {
            NetAttachError::Config(_) => true,
            NetAttachError::Netd { err, .. } => {
                matches!(**err, NetdClientError::Refused { .. })
            }
            _ => false,
        }
    }
}

/// A net device built from netd's fds, threads running, not yet in the VM.
pub struct OpenedNet {
    pub config: NetConfig,
    /// The TAP's name as the kernel reports it.
    pub tap: String,
    pub mac: [u8; 6],
    device: NetDevice,
}

/// A locally administered unicast MAC (52:54:00 like QEMU, then random).
fn random_mac() -> [u8; 6] {
    let mut tail = [0u8; 3];
    // SAFETY: getrandom writes at most tail.len() bytes into the live buffer.
    let n = unsafe { libc::getrandom(tail.as_mut_ptr().cast(), tail.len(), 0) };
    if n != tail.len() as isize {
        // Still unique enough per host: the pid and the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let v = t ^ std::process::id().rotate_left(12);
        tail = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
    }
    [0x52, 0x54, 0x00, tail[0], tail[1], tail[2]]
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses each `--net` value, gets its TAP from netd, and builds the device
/// with its threads started (`hook` runs first in each device thread, e.g.
/// to install its seccomp filter). Call after the user drop and the
/// sandbox's lock-down, before the vCPU threads.
pub fn open_nets(
    values: &[String],
    hook: Option<ThreadHook>,
) -> Result<Vec<OpenedNet>, NetAttachError> {
    let configs = values
        .iter()
        .map(|v| NetConfig::parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    configs
        .into_iter()
        .map(|c| open_net(c, hook.clone()))
        .collect()
}

fn open_net(config: NetConfig, hook: Option<ThreadHook>) -> Result<OpenedNet, NetAttachError> {
    let id = config.id.clone();
    let fds = netd_client::open_tap_for(&config).map_err(|err| NetAttachError::Netd {
        id: id.clone(),
        err: Box::new(err),
    })?;
    log::info!(
        "net {id}: TAP {} with {} queue fd(s), {} vhost fd(s)",
        fds.name,
        fds.taps.len(),
        fds.vhost.len()
    );
    let backend = backend_from_fds(fds.taps, fds.vhost).map_err(|err| NetAttachError::Backend {
        id: id.clone(),
        err,
    })?;
    let mac = config.mac.unwrap_or_else(random_mac);
    let mut device = NetDevice::new(backend, Some(mac)).map_err(|err| NetAttachError::Device {
        id: id.clone(),
        err,
    })?;
    if let Some(h) = hook {
        device.set_thread_hook(h);
    }
    device
        .start_threads()
        .map_err(|err| NetAttachError::Device { id, err })?;
    Ok(OpenedNet {
        config,
        tap: fds.name,
        mac,
        device,
    })
}

/// A net device in the VM: its slot and its transport (shared with the MMIO
/// bus, which the vCPUs reach it through).
pub struct NetAttachment {
    pub config: NetConfig,
    pub tap: String,
    pub mac: [u8; 6],
    pub slot: VirtioSlot,
    transport: Arc<Mutex<MmioTransport<NetDevice>>>,
}

/// Puts each device on the VM's MMIO bus in the next virtio-mmio slot, with
/// its queues' ioeventfds, its irqfd and its command-line entry.
pub fn attach_nets(
    vm: &mut Vm,
    nets: Vec<OpenedNet>,
) -> Result<Vec<NetAttachment>, NetAttachError> {
    nets.into_iter().map(|n| attach_net(vm, n)).collect()
}

fn attach_net(vm: &mut Vm, net: OpenedNet) -> Result<NetAttachment, NetAttachError> {
    let id = net.config.id.clone();
    let mem = Arc::new(vm.ram.memory.clone());
    let transport =
        MmioTransport::new(net.device, mem).map_err(|err| NetAttachError::Transport {
            id: id.clone(),
            err,
        })?;
    let kicks: Vec<Arc<EventFd>> = transport.queue_eventfds().to_vec();
    let irq = transport
        .interrupt_eventfd()
        .try_clone()
        .map_err(|err| NetAttachError::EventFd {
            id: id.clone(),
            err,
        })?;
    let transport = Arc::new(Mutex::new(transport));
    let notifiers: Vec<(u32, &EventFd)> = kicks
        .iter()
        .enumerate()
        .map(|(q, k)| (q as u32, &**k))
        .collect();
    let slot = vm
        .attach_virtio_mmio(transport.clone(), &notifiers, &irq)
        .map_err(|err| NetAttachError::Vm { id, err })?;
    log::info!(
        "net {}: TAP {} in virtio-mmio slot {} at {:#x}, GSI {}",
        net.config.id,
        net.tap,
        slot.index,
        slot.base,
        slot.gsi
    );
    Ok(NetAttachment {
        config: net.config,
        tap: net.tap,
        mac: net.mac,
        slot,
        transport,
    })
}

pub const NET_DEVICE_STATE_VERSION: u32 = 1;

/// One net device's part of the machine state: transport, device and
/// backend description. The TAP fds travel beside it, in
/// `net.backend.tap_fds` order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDeviceState {
    pub version: u32,
    pub id: String,
    pub tap: String,
    pub slot: VirtioSlot,
    pub mmio: MmioState,
    pub net: NetState,
}

impl NetAttachment {
    fn lock(&self) -> MutexGuard<'_, MmioTransport<NetDevice>> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the device threads (frames wait in the TAP). Pause the vCPUs
    /// first so no driver write races the pause.
    pub fn pause(&self) -> Result<(), NetError> {
        self.lock().device_mut().pause()
    }

    pub fn resume(&self) -> Result<(), NetError> {
        self.lock().device_mut().resume()
    }

    pub fn is_running(&self) -> bool {
        self.lock().device().is_running()
    }

    pub fn status(&self) -> NetStatus {
        let t = self.lock();
        NetStatus {
            id: self.config.id.clone(),
            tap: self.tap.clone(),
            mac: format_mac(&self.mac),
            queues: t.device().queue_pairs(),
            vhost: t.device().backend().state().kind == BackendKind::VhostNet,
        }
    }

    /// The device's state; it must be paused.
    pub fn save(&self) -> Result<NetDeviceState, NetError> {
        let t = self.lock();
        let net = t.device().save()?;
        let mmio = t.save().map_err(|e| NetError::State(e.to_string()))?;
        Ok(NetDeviceState {
            version: NET_DEVICE_STATE_VERSION,
            id: self.config.id.clone(),
            tap: self.tap.clone(),
            slot: self.slot,
            mmio,
            net,
        })
    }
}
