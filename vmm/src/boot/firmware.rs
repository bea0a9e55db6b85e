//! The machine the firmware tables describe, and where in low memory they
//! go. ACPI ([`super::acpi`]) and the MP table ([`super::mptable`]) both
//! read the one [`Platform`], so they cannot disagree about a CPU, a pin or
//! a device.
//!
//! Layout (all below 1 MiB, in the hole the PVH memory map does not report
//! as RAM, [`super::pvh::memory_map`] marks it reserved):
//! - `0xE0000..0xF0000`: RSDP, then DSDT, FACP, APIC, XSDT;
//! - `0xF0000..0x100000`: the MP floating pointer, then the MP config table
//!   (where the MP spec's search looks, in the BIOS ROM area).

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::serial::{SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN};
use crate::memory::GuestRam;
use crate::vm::{VIRTIO_MAX_SLOTS, VirtioSlot};

/// Every local APIC's MMIO base (KVM's default).
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// KVM's in-kernel IOAPIC: id 0, 24 pins, GSIs 0..24.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
pub const IOAPIC_ID: u8 = 0;
pub const IOAPIC_PINS: u8 = 24;
/// Version register of KVM's IOAPIC (IOAPIC_VERSION_ID) and LAPIC
/// (APIC_VERSION), for the MP table.
pub const IOAPIC_VERSION: u8 = 0x11;
pub const LAPIC_VERSION: u8 = 0x14;
/// ISA IRQs 0..16 map to IOAPIC pins 0..16 one to one: the vmm keeps KVM's
/// default GSI routing, where GSI n is PIC input n and IOAPIC pin n. So the
/// in-kernel PIT (GSI 0) is on pin 0, not on pin 2 as on a PC chipset.
pub const ISA_IRQS: u8 = 16;
pub const PIT_IRQ: u8 = 0;

/// Where the ACPI tables go (RSDP first).
pub const ACPI_ADDR: u64 = 0xE_0000;
/// Where the MP floating pointer goes; the ACPI tables end below it.
pub const MPTABLE_ADDR: u64 = 0xF_0000;
/// End of the firmware area (and of the BIOS ROM area on a PC).
pub const FIRMWARE_END: u64 = 0x10_0000;

/// The serial port the DSDT describes.
pub const SERIAL: LegacyPort = LegacyPort {
    base: SERIAL_PORT as u16,
    len: SERIAL_PORT_LEN as u8,
    irq: SERIAL_IRQ,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacyPort {
    pub base: u16,
    pub len: u8,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("firmware tables need at least one vCPU")]
    NoVcpus,
    #[error("at most {VIRTIO_MAX_SLOTS} virtio-mmio devices can be described, not {0}")]
    TooManyDevices(usize),
    #[error(
        "the ACPI tables for {vcpus} vCPUs take {size} bytes, more than the {room} bytes at {ACPI_ADDR:#x}"
    )]
    AcpiTooLarge { vcpus: u32, size: u64, room: u64 },
    #[error("the MP table takes {size} bytes, more than the {room} bytes at {MPTABLE_ADDR:#x}")]
    MpTableTooLarge { size: u64, room: u64 },
    #[error("KVM's CPUID has no leaf 1 for the MP table's CPU signature")]
    NoCpuidLeaf1,
    #[error("KVM: cannot get the supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("cannot write the firmware tables into guest RAM: {0}")]
    Write(String),
}

/// What the tables describe: the vCPUs (vCPU i has APIC id i) and the
/// virtio-mmio devices, in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub vcpus: u32,
    pub virtio: Vec<VirtioSlot>,
}

impl Platform {
    pub fn new(vcpus: u32, virtio: Vec<VirtioSlot>) -> Result<Self, FirmwareError> {
        if vcpus == 0 {
            return Err(FirmwareError::NoVcpus);
        }
        if virtio.len() > VIRTIO_MAX_SLOTS as usize {
            return Err(FirmwareError::TooManyDevices(virtio.len()));
        }
        Ok(Platform { vcpus, virtio })
    }

    /// The platform a VM with `vcpus` vCPUs and `devices` virtio devices
    /// gets: devices take slots 0, 1, ... in order, as
    /// [`crate::vm::Vm::attach_virtio_mmio`] gives them.
    pub fn with_devices(vcpus: u32, devices: usize) -> Result<Self, FirmwareError> {
        let slots = (0..devices)
            .map(|i| u32::try_from(i).ok().and_then(VirtioSlot::at))
            .collect::<Option<Vec<_>>>()
            .ok_or(FirmwareError::TooManyDevices(devices))?;
        Self::new(vcpus, slots)
    }
}

/// The CPU the MP table's processor entries name: CPUID leaf 1's EAX
/// (family, model, stepping) and EDX (feature flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSignature {
    pub signature: u32,
    pub features: u32,
}

impl CpuSignature {
    /// From the CPUID the vCPUs get.
    pub fn from_cpuid(cpuid: &CpuId) -> Result<Self, FirmwareError> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1 && e.index == 0)
            .map(|e| CpuSignature {
                signature: e.eax,
                features: e.edx,
            })
            .ok_or(FirmwareError::NoCpuidLeaf1)
    }
}

/// What the firmware tables describe, and the CPU the MP table names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub platform: Platform,
    pub cpu: CpuSignature,
}

impl Firmware {
    /// For a VM of `vcpus` vCPUs with these virtio slots, whose vCPUs get
    /// KVM's supported CPUID ([`crate::kvm_cpuid`]).
    pub fn for_vm(kvm: &Kvm, vcpus: u32, virtio: Vec<VirtioSlot>) -> Result<Self, FirmwareError> {
        let cpuid = crate::kvm_cpuid::supported(kvm).map_err(FirmwareError::Cpuid)?;
        Ok(Firmware {
            platform: Platform::new(vcpus, virtio)?,
            cpu: CpuSignature::from_cpuid(&cpuid)?,
        })
    }
}

/// Builds both tables for `platform` and writes them into `ram`. Returns
/// the RSDP's address, for `hvm_start_info.rsdp_paddr`.
pub fn write(ram: &GuestRam, platform: &Platform, cpu: CpuSignature) -> Result<u64, FirmwareError> {
    let acpi = super::acpi::build(platform, ACPI_ADDR, MPTABLE_ADDR)?;
    let mp = super::mptable::build(platform, cpu, MPTABLE_ADDR, FIRMWARE_END)?;
    let put = |addr: u64, bytes: &[u8]| {
        ram.memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| FirmwareError::Write(e.to_string()))
    };
    for (addr, bytes) in acpi.placed() {
        put(addr, bytes)?;
    }
    put(MPTABLE_ADDR, &mp)?;
    Ok(acpi.rsdp_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_checks_its_counts() {
        assert!(matches!(
            Platform::new(0, vec![]),
            Err(FirmwareError::NoVcpus)
        ));
        let p = Platform::with_devices(4, 2).unwrap();
        assert_eq!(
            p.virtio,
            vec![VirtioSlot::at(0).unwrap(), VirtioSlot::at(1).unwrap()]
        );
        assert!(matches!(
            Platform::with_devices(1, VIRTIO_MAX_SLOTS as usize + 1),
            Err(FirmwareError::TooManyDevices(n)) if n == VIRTIO_MAX_SLOTS as usize + 1
        ));
    }

    #[test]
    fn cpu_signature_comes_from_kvm_leaf_1() {
        let kvm = Kvm::new().unwrap();
        let f = Firmware::for_vm(&kvm, 2, vec![]).unwrap();
        // Family 6 or above on any x86_64 host KVM runs on.
        assert!((f.cpu.signature >> 8) & 0xf >= 6, "{:#x}", f.cpu.signature);
        // FPU and APIC feature bits.
        assert_eq!(f.cpu.features & (1 | 1 << 9), 1 | 1 << 9);
    }

    #[test]
    fn tables_land_in_guest_ram_with_checksums() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let p = Platform::with_devices(4, 3).unwrap();
        let sig = CpuSignature {
            signature: 0x806f8,
            features: 0x178bfbff,
        };
        let rsdp = write(&ram, &p, sig).unwrap();
        assert_eq!(rsdp, ACPI_ADDR);
        let mut r = [0u8; 36];
        ram.memory.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let mut f = [0u8; 16];
        ram.memory
            .read_slice(&mut f, GuestAddress(MPTABLE_ADDR))
            .unwrap();
        assert_eq!(&f[..4], b"_MP_");
        assert_eq!(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
