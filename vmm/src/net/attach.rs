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

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use common::api::{NetCounters, NetDrops, NetStatus};
use common::migration::FdRole;

use super::config::NetConfig;
use super::netd_client::{self, NetdClientError};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport};
use crate::devices::virtio::net::event_handler::ThreadHook;
use crate::devices::virtio::net::vhost_user::VhostUserError;
use crate::devices::virtio::net::{
    BackendError, BackendKind, NetDevice, NetError, NetState, NetStats, VhostUserNet,
    backend_from_fds,
};
use crate::devices::virtio::net::{FrameIo, NetBackend};
use crate::persist::{FdTable, Format10PartVersion, Persist};
use crate::vm::{VirtioSlot, Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum NetAttachError {
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
    #[error("--net id={id}: no TAP for this NIC")]
    NoTap { id: String },
    #[error("--net id={id}: {err}")]
    VhostUser { id: String, err: VhostUserError },
}

impl NetAttachError {
    /// True when the user's input is at fault (a policy refusal; a bad
    /// `--net` value is refused with the command line).
    pub fn is_bad_input(&self) -> bool {
        match self {
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

/// Gets each `--net` NIC's TAP from netd, and builds the device
/// with its threads started (`hook` runs first in each device thread, e.g.
/// to install its seccomp filter). Call after the user drop and the
/// sandbox's lock-down, before the vCPU threads.
pub fn open_nets(
    configs: &[NetConfig],
    hook: Option<ThreadHook>,
) -> Result<Vec<OpenedNet>, NetAttachError> {
    configs
        .iter()
        .map(|c| open_net(c.clone(), hook.clone()))
        .collect()
}

fn open_net(config: NetConfig, hook: Option<ThreadHook>) -> Result<OpenedNet, NetAttachError> {
    let id = config.id.clone();
    if let Some(path) = config.vhost_user_socket() {
        let backend = VhostUserNet::connect(&id, path, config.queues).map_err(|err| {
            NetAttachError::VhostUser {
                id: id.clone(),
                err,
            }
        })?;
        log::info!("net {id}: vhost-user backend at {}", path.display());
        return OpenedNet::on_backend(config, String::new(), Box::new(backend), hook);
    }
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
    OpenedNet::from_fds(config, fds.name, fds.taps, fds.vhost, hook)
}

impl OpenedNet {
    /// A new device on TAP (and vhost-net) fds that are already open: the
    /// TAP fds must be queues of TAP `tap` (checked, as on every path).
    pub fn from_fds(
        config: NetConfig,
        tap: String,
        taps: Vec<OwnedFd>,
        vhost: Vec<OwnedFd>,
        hook: Option<ThreadHook>,
    ) -> Result<Self, NetAttachError> {
        let backend =
            backend_from_fds(&tap, taps, vhost).map_err(|err| NetAttachError::Backend {
                id: config.id.clone(),
                err,
            })?;
        Self::on_backend(config, tap, backend, hook)
    }

    /// A migration target's vhost-user NIC on the connection its source
    /// handed over (`None`: the backend was away; the device connects when
    /// it resumes).
    pub fn inherit_vhost_user(
        config: NetConfig,
        conn: Option<OwnedFd>,
        hook: Option<ThreadHook>,
    ) -> Result<Self, NetAttachError> {
        let id = config.id.clone();
        let path = config
            .vhost_user_socket()
            .ok_or_else(|| NetAttachError::NoTap { id: id.clone() })?
            .to_path_buf();
        let backend = VhostUserNet::inherit(&id, &path, config.queues, conn)
            .map_err(|err| NetAttachError::VhostUser { id, err })?;
        Self::on_backend(config, String::new(), Box::new(backend), hook)
    }

    /// A new device on `backend` (`tap`: its TAP's name, empty when the
    /// TAP is not the vmm's).
    pub fn on_backend(
        config: NetConfig,
        tap: String,
        backend: Box<dyn NetBackend>,
        hook: Option<ThreadHook>,
    ) -> Result<Self, NetAttachError> {
        let id = config.id.clone();
        let mac = config.mac.unwrap_or_else(random_mac);
        let device = NetDevice::new(backend, Some(mac)).map_err(|err| NetAttachError::Device {
            id: id.clone(),
            err,
        })?;
        Self::start(config, tap, mac, device, hook)
    }

    fn start(
        config: NetConfig,
        tap: String,
        mac: [u8; 6],
        mut device: NetDevice,
        hook: Option<ThreadHook>,
    ) -> Result<Self, NetAttachError> {
        if let Some(h) = hook {
            device.set_thread_hook(h);
        }
        device
            .start_threads()
            .map_err(|err| NetAttachError::Device {
                id: config.id.clone(),
                err,
            })?;
        Ok(OpenedNet {
            config,
            tap,
            mac,
            device,
        })
    }
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
        .map_err(|err| NetAttachError::Vm {
            id: id.clone(),
            err,
        })?;
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

/// One net device's part of the machine state: transport, device and
/// backend description. The TAP fds travel beside it, in
/// `net.backend.tap_fds` order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDeviceState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
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
        let kind = t.device().backend().state().kind;
        let vhost_user = t.device().backend().connection_status();
        let pairs = t.device().queue_pairs();
        let queues = t.device().queue_stats();
        drop(t);
        let vhost = kind == BackendKind::VhostNet;
        let note = match kind {
            BackendKind::VhostNet => Some(VHOST_COUNTERS_NOTE),
            BackendKind::VhostUser => Some(VHOST_USER_COUNTERS_NOTE),
            BackendKind::Tap => None,
        };
        NetStatus {
            id: self.config.id.clone(),
            tap: self.tap.clone(),
            mac: format_mac(&self.mac),
            queues: pairs,
            vhost,
            counters: Some(api_counters(
                &queues.iter().fold(NetStats::default(), |t, s| t.plus(s)),
            )),
            queue_counters: queues.iter().map(api_counters).collect(),
            counters_note: note.map(str::to_string),
            vhost_user,
        }
    }

    pub fn queue_pairs(&self) -> u16 {
        self.lock().device().queue_pairs()
    }

    /// The fds this NIC hands a migration target, each with its role: its
    /// TAP queues with backend transfer, or, for a vhost-user NIC, its
    /// backend connection whenever there is one. Duplicates, so nothing the
    /// device does meanwhile closes them.
    pub fn handover(&self, with_taps: bool) -> std::io::Result<Vec<(FdRole, OwnedFd)>> {
        let id = &self.config.id;
        let t = self.lock();
        let b = t.device().backend();
        if let Some(conn) = b.dup_connection() {
            return Ok(vec![(FdRole::VhostUser { net: id.clone() }, conn?)]);
        }
        if !with_taps || self.config.vhost_user_socket().is_some() {
            return Ok(Vec::new());
        }
        (0..b.queue_pairs())
            .map(|q| {
                let io = b
                    .frame_io(usize::from(q))
                    .ok_or_else(|| std::io::Error::other(format!("NIC {id}: no TAP queue {q}")))?;
                // SAFETY: the device owns the TAP queue fd and keeps it
                // while the transport lock is held; the borrow ends here.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(io.as_raw_fd()) };
                Ok((
                    FdRole::TapQueue {
                        net: id.clone(),
                        queue: q,
                    },
                    fd.try_clone_to_owned()?,
                ))
            })
            .collect()
    }

    /// Each queue pair's frame I/O (the TAP queue fds), in pair order.
    pub fn frame_ios(&self) -> Vec<Arc<dyn FrameIo>> {
        let t = self.lock();
        let b = t.device().backend();
        (0..usize::from(b.queue_pairs()))
            .filter_map(|p| b.frame_io(p))
            .collect()
    }

    /// Signals every queue's ioeventfd once, as a guest notification
    /// would: a restored device then looks at buffers the driver made
    /// available while the machine was paused.
    pub fn kick_all_queues(&self) {
        for (i, k) in self.lock().queue_eventfds().iter().enumerate() {
            if let Err(e) = k.write(1) {
                log::warn!("net {}: cannot kick queue {i}: {e}", self.config.id);
            }
        }
    }
}

/// What a vhost-net NIC's counters leave out.
const VHOST_COUNTERS_NOTE: &str = "vhost-net: the kernel moves the frames, so packets, bytes \
     and drops are not counted here (the TAP's own statistics have them); interrupts relayed \
     (after EVENT_IDX, which the kernel applies) and control-queue bad chains are";

/// What a vhost-user NIC's counters leave out.
const VHOST_USER_COUNTERS_NOTE: &str = "vhost-user: the backend process moves the frames, so \
     packets, bytes and drops are not counted here (the backend's TAP has them); interrupts \
     relayed and control-queue bad chains are";

fn api_counters(s: &NetStats) -> NetCounters {
    NetCounters {
        rx_packets: s.rx_packets,
        rx_bytes: s.rx_bytes,
        tx_packets: s.tx_packets,
        tx_bytes: s.tx_bytes,
        drops: NetDrops {
            no_rx_buffer: s.rx_dropped_no_buffer,
            rx_tap_errors: s.rx_tap_errors,
            tx_tap_errors: s.tx_tap_errors,
            rx_bad_chains: s.rx_bad_chains,
            tx_bad_chains: s.tx_bad_chains,
            ctrl_bad_chains: s.ctrl_bad_chains,
        },
        interrupts: s.interrupts,
        interrupts_saved_by_event_idx: s.interrupts_suppressed,
    }
}

/// The NIC's device and transport sit behind the lock they share with the
/// MMIO bus: restored through `&NetAttachment`.
impl Persist for &NetAttachment {
    type State = NetDeviceState;
    /// The table the TAP fds travel in; `None` when they do not (the
    /// classic path: the target runs on a TAP of its own).
    type Context<'a> = Option<&'a FdTable>;
    type Error = NetError;

    /// The device's state, naming its TAP fds by their index in `fds`
    /// (none when the TAP does not travel); it must be paused.
    fn save(&self, fds: Option<&FdTable>) -> Result<NetDeviceState, NetError> {
        let t = self.lock();
        let mut net = t.device().save(())?;
        net.backend.tap_fds = fds
            .and_then(|fds| {
                (0..net.queue_pairs)
                    .map(|q| fds.tap_queue(&self.config.id, q))
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or_default();
        let mmio = t.save(()).map_err(|e| NetError::State(e.to_string()))?;
        Ok(NetDeviceState {
            format_1_0_version: Format10PartVersion,
            id: self.config.id.clone(),
            tap: self.tap.clone(),
            slot: self.slot,
            mmio,
            net,
        })
    }

    /// Loads a saved state into this freshly attached device. `fds` is the
    /// table the device's TAP fds came in (backend transfer), or `None`
    /// when it runs on a TAP of its own (the classic path). Nothing touches
    /// the TAP until [`NetAttachment::resume`].
    fn restore(&mut self, fds: Option<&FdTable>, s: &NetDeviceState) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::State(m));
        if s.slot != self.slot {
            return bad(format!(
                "saved in virtio-mmio slot {:?}, attached in {:?}",
                s.slot, self.slot
            ));
        }
        if (fds.is_some() || self.config.vhost_user_socket().is_some()) && s.id != self.config.id {
            return bad(format!("state is for NIC {:?}", s.id));
        }
        if s.net.backend.kind != self.lock().device().backend().state().kind {
            return bad(format!(
                "state is for a {:?} NIC, this one is {:?}",
                s.net.backend.kind,
                self.lock().device().backend().state().kind
            ));
        }
        // A vhost-user NIC's TAP is its backend's.
        if let Some(fds) = fds.filter(|_| self.config.vhost_user_socket().is_none()) {
            let mine: Option<Vec<usize>> = (0..self.queue_pairs())
                .map(|q| fds.tap_queue(&self.config.id, q))
                .collect();
            if mine.as_ref() != Some(&s.net.backend.tap_fds) {
                return bad(format!(
                    "state names TAP fds {:?}, the device was built on {:?}",
                    s.net.backend.tap_fds, mine
                ));
            }
        }
        let mut t = self.lock();
        t.device_mut().restore((), &s.net)?;
        t.restore((), &s.mmio)
            .map_err(|e| NetError::State(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use kvm_ioctls::Kvm;

    /// A TAP with vnet header in a network namespace of the calling thread's
    /// own (needs root, as the test suite runs); None (a reported skip, or a
    /// failure where REQUIRE_NETNS=1) when unavailable.
    pub(crate) fn own_netns_tap(name: &str) -> Option<OwnedFd> {
        use crate::devices::virtio::testing::netns_unavailable;
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            netns_unavailable(
                "net::attach::tests (a TAP of its own)",
                "unshare(CLONE_NEWNET)",
                e,
            );
            return None;
        }
        use common::tun::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, open_queue};
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let f = match open_queue(name, flags, Some(common::netd::VNET_HDR_LEN)) {
            Ok(f) => f,
            Err(e) => {
                netns_unavailable("net::attach::tests (a TAP of its own)", e.op, e.err);
                return None;
            }
        };
        Some(OwnedFd::from(f))
    }

    pub(crate) fn config(id: &str) -> NetConfig {
        NetConfig::parse(&format!("netd=/nonexistent,id={id},mac=52:54:00:aa:bb:cc")).unwrap()
    }

    fn write32(vm: &Vm, base: u64, off: u64, v: u32) {
        assert!(vm.mmio.write(base + off, &v.to_le_bytes()));
    }

    /// Plays a driver on the MMIO bus: VERSION_1, rx/tx queues of 16
    /// entries, DRIVER_OK (which starts the device's work).
    fn drive_to_driver_ok(vm: &Vm, base: u64) {
        write32(vm, base, 0x70, 1 | 2);
        write32(vm, base, 0x24, 1);
        write32(vm, base, 0x20, 1); // VERSION_1 (bit 32)
        write32(vm, base, 0x70, 1 | 2 | 8);
        for q in 0..2u32 {
            let at = 0x1_0000 * u64::from(q + 1);
            write32(vm, base, 0x30, q);
            write32(vm, base, 0x38, 16);
            write32(vm, base, 0x80, at as u32);
            write32(vm, base, 0x90, (at + 0x1000) as u32);
            write32(vm, base, 0xa0, (at + 0x2000) as u32);
            write32(vm, base, 0x44, 1);
        }
        write32(vm, base, 0x70, 1 | 2 | 8 | 4);
    }

    fn save_restore_in_own_netns() {
        let Some(tap) = own_netns_tap("vmsave0") else {
            return;
        };
        let dup = tap.try_clone().unwrap();
        let mut vm = Vm::new(Kvm::new().unwrap(), GuestRam::new(16 << 20).unwrap()).unwrap();
        let opened =
            OpenedNet::from_fds(config("vmsave0"), "vmsave0".into(), vec![tap], vec![], None)
                .unwrap();
        let nets = attach_nets(&mut vm, vec![opened]).unwrap();
        let net = &nets[0];
        assert_eq!(net.slot.base, 0xd000_0000);
        assert_eq!(vm.cmdline_extra, vec!["virtio_mmio.device=4K@0xd0000000:5"]);
        drive_to_driver_ok(&vm, net.slot.base);
        assert!(net.is_running(), "DRIVER_OK starts the device threads");
        assert!(matches!(Persist::save(&net, None), Err(NetError::Running)));
        let st = net.status();
        assert_eq!(
            (st.tap.as_str(), st.mac.as_str()),
            ("vmsave0", "52:54:00:aa:bb:cc")
        );

        net.pause().unwrap();
        let state = Persist::save(&net, None).unwrap();
        assert_eq!(state.mmio.status, 1 | 2 | 8 | 4);
        assert!(state.mmio.queues[0].0.ready);
        assert_eq!(state.mmio.queues[1].0.desc_table, 0x2_0000);
        let text = ron::to_string(&state).unwrap();
        let back: NetDeviceState = ron::from_str(&text).unwrap();
        assert_eq!(back, state);

        // A second VM (as a migration target builds it) on the same TAP,
        // the state loaded into the freshly attached device.
        let mut vm2 = Vm::new(Kvm::new().unwrap(), GuestRam::new(16 << 20).unwrap()).unwrap();
        let fresh =
            OpenedNet::from_fds(config("vmsave0"), "vmsave0".into(), vec![dup], vec![], None)
                .unwrap();
        let nets2 = attach_nets(&mut vm2, vec![fresh]).unwrap();
        Persist::restore(&mut &nets2[0], None, &back).unwrap();
        assert!(!nets2[0].is_running(), "a restored device waits for resume");
        assert_eq!(Persist::save(&&nets2[0], None).unwrap(), state);
        nets2[0].resume().unwrap();
        assert!(nets2[0].is_running());
        nets2[0].pause().unwrap();

        // A state from another layout is refused.
        let t3 = own_tap_dup(&nets2[0]);
        let other =
            OpenedNet::from_fds(config("vmsave0"), "vmsave0".into(), vec![t3], vec![], None)
                .unwrap();
        let nets3 = attach_nets(&mut vm2, vec![other]).unwrap();
        assert_eq!(nets3[0].slot.index, 1);
        assert!(Persist::restore(&mut &nets3[0], None, &state).is_err());
    }

    fn own_tap_dup(net: &NetAttachment) -> OwnedFd {
        let t = net.lock();
        let io = t.device().backend().frame_io(0).unwrap();
        // SAFETY: the fd is open while `io` lives; dup makes an owned copy.
        let fd = unsafe { libc::dup(io.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: dup returned a new fd that nothing else owns.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    #[test]
    fn net_device_saves_and_restores_on_its_tap() {
        // The namespace belongs to this helper thread only.
        std::thread::spawn(save_restore_in_own_netns)
            .join()
            .unwrap();
    }

    #[test]
    fn a_missing_netd_is_not_bad_input() {
        let e = open_nets(&[config("vm0")], None).err().unwrap();
        assert!(!e.is_bad_input(), "{e}");
        assert!(e.to_string().contains("vm0"), "{e}");
    }

    #[test]
    fn macs_format_and_random_ones_are_local_unicast() {
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 1, 0xab, 0xff]),
            "52:54:00:01:ab:ff"
        );
        let m = random_mac();
        assert_eq!(m[0] & 1, 0, "unicast");
        assert_eq!(m[0] & 2, 2, "locally administered");
    }
}
