//! The KVM VM: TSS and identity map, in-kernel irqchip and PIT, guest RAM
//! slots, the port and MMIO buses, and the hooks that virtio-mmio devices use
//! to come in (a slot, ioeventfds, an irqfd, a command-line entry).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_PIT_SPEAKER_DUMMY, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::memory::GuestRam;
use crate::persist::{Format10PartVersion, Persist};

/// Just below the LAPIC/IOAPIC-free top of the 32-bit space, as other VMMs do.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The in-kernel IOAPIC has 24 pins; virtio slots take GSIs 5..=23.
pub const VIRTIO_MAX_SLOTS: u32 = 24 - VIRTIO_FIRST_GSI;
/// virtio-mmio QueueNotify register: the ioeventfd address of every queue.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM: cannot create the VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM: {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("device bus: {0}")]
    Bus(#[from] BusError),
    #[error("no free virtio-mmio slot (at most {VIRTIO_MAX_SLOTS})")]
    NoVirtioSlot,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// Why the VM stops; the main thread waits for the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// A write to the debug-exit port (the value written).
    PowerOff { code: u8 },
    /// i8042 reset: treated as power-off (no reboot support).
    Reset,
    /// `vmctl shutdown`.
    ApiShutdown,
    /// SIGTERM or SIGINT (taken by [`crate::exit::SignalWatch`]).
    Signal { signal: i32 },
    /// The guest cannot go on (internal error, triple fault, unhandled exit).
    VcpuFailed { vcpu: u8, message: String },
    /// A migration handed the guest to a target vmm. `keep_api_socket`:
    /// the target serves this process's API socket, whose path must stay.
    Migrated { keep_api_socket: bool },
    /// The migration target took the guest and died: it runs nowhere.
    MigrationLost { reason: String },
}

impl ExitReason {
    /// The process exit code this reason maps to (the table in
    /// [`crate::exit`]): 0 for every orderly end, 1 for a vCPU failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::VcpuFailed { .. } | ExitReason::MigrationLost { .. } => 1,
            _ => 0,
        }
    }
}

/// Cloneable handle any thread uses to stop the VM.
#[derive(Clone)]
pub struct ExitSender {
    tx: mpsc::Sender<ExitReason>,
    stopping: Arc<AtomicBool>,
}

impl ExitSender {
    pub fn send(&self, reason: ExitReason) {
        self.stopping.store(true, Ordering::SeqCst);
        // The receiver lives as long as main; after it is gone nothing matters.
        let _ = self.tx.send(reason);
    }

    /// True once any exit reason was sent: a vCPU thread then stops instead
    /// of entering KVM_RUN again (a vCPU left inside KVM_RUN makes the
    /// process exit much slower on this nested KVM).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

pub fn exit_channel() -> (ExitSender, mpsc::Receiver<ExitReason>) {
    let (tx, rx) = mpsc::channel();
    (
        ExitSender {
            tx,
            stopping: Arc::new(AtomicBool::new(false)),
        },
        rx,
    )
}

/// Where a virtio-mmio device landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioSlot {
    pub index: u32,
    pub base: u64,
    pub gsi: u32,
}

impl VirtioSlot {
    /// Slot `index`'s registers and GSI: the one layout that the devices,
    /// their command-line entries and the firmware tables (DSDT, MP table)
    /// all read.
    pub fn at(index: u32) -> Option<VirtioSlot> {
        (index < VIRTIO_MAX_SLOTS).then(|| VirtioSlot {
            index,
            base: VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_FIRST_GSI + index,
        })
    }

    /// The Linux command-line entry announcing this device.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

/// VM-wide KVM state: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    #[serde(with = "crate::kvm_blob")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "crate::kvm_blob")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "crate::kvm_blob")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "crate::kvm_blob")]
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub ram: GuestRam,
    pub pio: Bus,
    pub mmio: Bus,
    /// Command-line entries devices add (virtio_mmio.device=...).
    pub cmdline_extra: Vec<String>,
    virtio_slots: u32,
}

/// A KVM VM with its platform (TSS, identity map, irqchip, PIT) but no RAM
/// yet: what a migration target builds before the source has sent the
/// guest's memfd.
pub struct VmShell {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl VmShell {
    pub fn new(kvm: Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        create_platform(&fd)?;
        Ok(VmShell { kvm, fd })
    }

    /// Registers `ram` with KVM: the VM is complete.
    pub fn with_ram(self, ram: GuestRam) -> Result<Vm, VmError> {
        register_ram(&self.fd, &ram)?;
        Ok(Vm::assemble(self.kvm, self.fd, ram))
    }
}

/// Puts every RAM region in a KVM memory slot.
fn register_ram(fd: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let mem = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the
        // Vm keeps for as long as the VM fd (and so the slot) exists.
        unsafe { fd.set_user_memory_region(mem) }.map_err(kvm_err("set user memory region"))?;
    }
    Ok(())
}

/// TSS, identity map, in-kernel irqchip and PIT.
fn create_platform(fd: &VmFd) -> Result<(), VmError> {
    create_platform_without_pit(fd)?;
    create_pit(fd)
}

/// TSS, identity map and in-kernel irqchip.
fn create_platform_without_pit(fd: &VmFd) -> Result<(), VmError> {
    fd.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("set TSS address"))?;
    fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("set identity map address"))?;
    fd.create_irq_chip().map_err(kvm_err("create irqchip"))
}

/// The in-kernel PIT. KVM starts a kernel thread for it, which takes from
/// 0.03 ms to several ms here depending on the host's load, so a boot asks
/// for it on another thread ([`Vm::new_without_pit`]).
pub fn create_pit(fd: &VmFd) -> Result<(), VmError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("create PIT"))
}

impl Vm {
    /// Creates the VM with its RAM slots, irqchip and PIT. RAM goes in
    /// first: on this nested KVM that is ~5 ms cheaper than after the
    /// irqchip.
    pub fn new(kvm: Kvm, ram: GuestRam) -> Result<Self, VmError> {
        let vm = Self::new_without_pit(kvm, ram)?;
        create_pit(&vm.fd)?;
        Ok(vm)
    }

    /// As [`Vm::new`], but the caller creates the PIT ([`create_pit`])
    /// before any vCPU runs.
    pub fn new_without_pit(kvm: Kvm, ram: GuestRam) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        register_ram(&fd, &ram)?;
        create_platform_without_pit(&fd)?;
        Ok(Self::assemble(kvm, fd, ram))
    }

    fn assemble(kvm: Kvm, fd: VmFd, ram: GuestRam) -> Self {
        Vm {
            kvm,
            fd: Arc::new(fd),
            ram,
            pio: Bus::new(),
            mmio: Bus::new(),
            cmdline_extra: Vec::new(),
            virtio_slots: 0,
        }
    }

    /// Signals `evt` when the guest writes `datamatch` (32-bit) at MMIO `addr`.
    pub fn register_ioevent(
        &self,
        addr: u64,
        datamatch: u32,
        evt: &EventFd,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("register ioeventfd"))
    }

    /// Raises `gsi` whenever `evt` is written.
    /// Restarts the in-kernel PIT's channels from now, as reloading their
    /// counts does: the ticks that fell due while the guest was paused are
    /// dropped, where KVM would otherwise inject every one of them at the
    /// resume (the guest's PIT clock would run on through the pause). QEMU
    /// does the same on `cont`.
    pub fn restart_pit(&self) -> Result<(), VmError> {
        let pit = self.fd.get_pit2().map_err(kvm_err("get PIT"))?;
        self.fd.set_pit2(&pit).map_err(kvm_err("set PIT"))
    }

    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("register irqfd"))
    }

    /// Attaches a virtio-mmio transport at the next slot: its registers on
    /// the MMIO bus, one ioeventfd per queue on QueueNotify (datamatch = queue
    /// index), the irqfd on the slot's GSI, and its command-line entry.
    pub fn attach_virtio_mmio(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        queue_notifiers: &[(u32, &EventFd)],
        irq: &EventFd,
    ) -> Result<VirtioSlot, VmError> {
        let slot = VirtioSlot::at(self.virtio_slots).ok_or(VmError::NoVirtioSlot)?;
        self.mmio.insert(slot.base, VIRTIO_MMIO_SIZE, device)?;
        for (queue, evt) in queue_notifiers {
            self.register_ioevent(slot.base + VIRTIO_MMIO_QUEUE_NOTIFY, *queue, evt)?;
        }
        self.register_irqfd(irq, slot.gsi)?;
        self.cmdline_extra.push(slot.cmdline_entry());
        self.virtio_slots += 1;
        Ok(slot)
    }
}

/// The VM-wide state lives in the VM fd: restored through `&Vm`, which
/// the machine shares.
impl Persist for &Vm {
    type State = VmState;
    type Context<'a> = ();
    type Error = VmError;

    fn save(&self, _: ()) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("get irqchip"))?;
            Ok(c)
        };
        let mut clock = self.fd.get_clock().map_err(kvm_err("get clock"))?;
        // Only the flags KVM_SET_CLOCK accepts may go back in.
        clock.flags &= KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            format_1_0_version: Format10PartVersion,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("get PIT"))?,
            clock,
        })
    }

    fn restore(&mut self, _: (), s: &VmState) -> Result<(), VmError> {
        self.fd
            .set_irqchip(&s.pic_master)
            .map_err(kvm_err("set PIC master"))?;
        self.fd
            .set_irqchip(&s.pic_slave)
            .map_err(kvm_err("set PIC slave"))?;
        self.fd
            .set_irqchip(&s.ioapic)
            .map_err(kvm_err("set IOAPIC"))?;
        self.fd.set_pit2(&s.pit).map_err(kvm_err("set PIT"))?;
        let mut clock = s.clock;
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(kvm_err("set clock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    struct Regs;
    impl BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn virtio_slots_get_address_gsi_eventfds_and_cmdline() {
        let mut vm = Vm::new(Kvm::new().unwrap(), GuestRam::new(16 << 20).unwrap()).unwrap();
        let q0 = EventFd::new(0).unwrap();
        let q1 = EventFd::new(0).unwrap();
        let irq = EventFd::new(0).unwrap();
        let a = vm
            .attach_virtio_mmio(Arc::new(Mutex::new(Regs)), &[(0, &q0), (1, &q1)], &irq)
            .unwrap();
        let b = vm
            .attach_virtio_mmio(Arc::new(Mutex::new(Regs)), &[], &EventFd::new(0).unwrap())
            .unwrap();
        assert_eq!((a.index, a.base, a.gsi), (0, 0xd000_0000, 5));
        assert_eq!((b.index, b.base, b.gsi), (1, 0xd000_1000, 6));
        assert_eq!(
            vm.cmdline_extra,
            vec![
                "virtio_mmio.device=4K@0xd0000000:5".to_string(),
                "virtio_mmio.device=4K@0xd0001000:6".to_string()
            ]
        );
        let mut v = [0u8; 4];
        assert!(vm.mmio.read(0xd000_1008, &mut v));
        assert_eq!(v, [8; 4]);
        // The same ioeventfd address and datamatch cannot be registered twice:
        // proof that KVM holds the first registration.
        assert!(
            vm.register_ioevent(a.base + VIRTIO_MMIO_QUEUE_NOTIFY, 1, &q1)
                .is_err()
        );
        for _ in 2..VIRTIO_MAX_SLOTS {
            vm.attach_virtio_mmio(Arc::new(Mutex::new(Regs)), &[], &EventFd::new(0).unwrap())
                .unwrap();
        }
        assert!(matches!(
            vm.attach_virtio_mmio(Arc::new(Mutex::new(Regs)), &[], &EventFd::new(0).unwrap()),
            Err(VmError::NoVirtioSlot)
        ));
    }
}
