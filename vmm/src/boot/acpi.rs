//! The ACPI tables (ACPI 6.5, hardware-reduced), built with rust-vmm's
//! `acpi_tables`: RSDP (revision 2) → XSDT → FACP (→ DSDT) and APIC (the
//! MADT). The DSDT's AML describes the serial port and every virtio-mmio
//! device the way Firecracker and Cloud Hypervisor do (`LNRO0005`, a 4 KiB
//! window and the device's GSI).
//!
//! The MADT is built on the crate's generic [`Sdt`]: its `MADT` type offers
//! no way to set the MADT flags (PCAT_COMPAT), and it has no x2APIC,
//! interrupt source override or NMI structures, which are defined here.

use acpi_tables::aml::{
    self, Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::firmware::{
    FirmwareError, IOAPIC_ADDR, IOAPIC_ID, LAPIC_ADDR, PIT_IRQ, Platform, SERIAL,
};
use crate::devices::power::{I8042_COMMAND, I8042_PORT, I8042_RESET};
use crate::vm::VIRTIO_MMIO_SIZE;

const OEM_ID: [u8; 6] = *b"RSVMM ";
const OEM_REVISION: u32 = 1;
/// MADT revision of ACPI 6.5 (the FADT the crate builds is 6.5 too).
const MADT_REVISION: u8 = 6;
/// DSDT revision 2: integers in its AML are 64-bit.
const DSDT_REVISION: u8 = 2;
/// MADT flags bit 0: the machine also has a dual 8259 (KVM's in-kernel
/// irqchip does), which an OS must mask before using the IOAPIC.
const MADT_PCAT_COMPAT: u32 = 1;
/// Processor UID meaning "every processor" in the NMI structures.
const ALL_XAPIC_UIDS: u8 = 0xff;
const ALL_X2APIC_UIDS: u32 = u32::MAX;
/// APIC ids from here on do not fit a Processor Local APIC structure (and
/// 0xff is the xAPIC broadcast): they get x2APIC structures.
pub const FIRST_X2APIC_ID: u32 = 0xff;
/// IAPC_BOOT_ARCH: no VGA, no MSI, no CMOS RTC; and neither
/// LEGACY_DEVICES nor 8042 (the i8042 here only knows the reset command).
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Tables are placed on 16-byte boundaries (the RSDP must be).
const ALIGN: u64 = 16;

/// MADT Interrupt Source Override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable, FromBytes)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable, FromBytes)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

/// MADT Processor Local x2APIC (type 9).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable, FromBytes)]
struct LocalX2Apic {
    r#type: u8,
    length: u8,
    reserved: U16,
    x2apic_id: U32,
    flags: U32,
    processor_uid: U32,
}

/// MADT Local x2APIC NMI (type 0xA).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable, FromBytes)]
struct LocalX2ApicNmi {
    r#type: u8,
    length: u8,
    flags: U16,
    processor_uid: U32,
    lint: u8,
    reserved: [u8; 3],
}

/// AML bytes already generated, as a child of another AML object.
struct AmlBytes(Vec<u8>);

impl Aml for AmlBytes {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn bytes_of(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// One table and the guest-physical address it was built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub addr: u64,
    pub bytes: Vec<u8>,
}

impl Table {
    /// "RSDP" for the RSDP, else the header's signature.
    pub fn signature(&self) -> String {
        if self.bytes.starts_with(b"RSD PTR ") {
            return "RSDP".into();
        }
        String::from_utf8_lossy(self.bytes.get(..4).unwrap_or_default()).into_owned()
    }
}

/// The whole set, each table at the address the others point to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: Table,
    pub xsdt: Table,
    pub fadt: Table,
    pub madt: Table,
    pub dsdt: Table,
}

impl AcpiTables {
    pub fn rsdp_addr(&self) -> u64 {
        self.rsdp.addr
    }

    /// Every table, the RSDP first.
    pub fn all(&self) -> [&Table; 5] {
        [&self.rsdp, &self.xsdt, &self.fadt, &self.madt, &self.dsdt]
    }

    /// The tables with a standard header (all but the RSDP).
    pub fn sdts(&self) -> [&Table; 4] {
        [&self.xsdt, &self.fadt, &self.madt, &self.dsdt]
    }

    /// (address, bytes) of every table, to copy into guest RAM.
    pub fn placed(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.all().into_iter().map(|t| (t.addr, t.bytes.as_slice()))
    }
}

/// Hands out 16-byte-aligned addresses from `base`.
struct Cursor {
    next: u64,
}

impl Cursor {
    fn take(&mut self, len: usize) -> u64 {
        let at = self.next;
        self.next = (at + len as u64).div_ceil(ALIGN) * ALIGN;
        at
    }
}

/// Builds the tables for `platform`, placed from `base` on; they must end
/// at or below `limit`.
pub fn build(platform: &Platform, base: u64, limit: u64) -> Result<AcpiTables, FirmwareError> {
    let mut at = Cursor { next: base };
    let rsdp_addr = at.take(Rsdp::len());
    let dsdt = dsdt(platform);
    let dsdt_addr = at.take(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = at.take(fadt.len());
    let madt = madt(platform.vcpus);
    let madt_addr = at.take(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, *b"RSVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = at.take(xsdt.len());
    if at.next > limit {
        return Err(FirmwareError::AcpiTooLarge {
            vcpus: platform.vcpus,
            size: at.next - base,
            room: limit - base,
        });
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    let table = |addr, bytes| Table { addr, bytes };
    Ok(AcpiTables {
        rsdp: table(rsdp_addr, rsdp),
        xsdt: table(xsdt_addr, xsdt),
        fadt: table(fadt_addr, fadt),
        madt: table(madt_addr, madt),
        dsdt: table(dsdt_addr, dsdt),
    })
}

/// Hardware-reduced: no SCI, no PM blocks, no FACS. Resets through the
/// i8042's reset command, the one fixed-hardware-free reset this vmm has.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"RSVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.iapc_boot_arch =
        (BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED | BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
            .into();
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        I8042_PORT + I8042_COMMAND,
    );
    f.reset_value = I8042_RESET;
    bytes_of(&f.finalize())
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut t = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        *b"RSVMAPIC",
        OEM_REVISION,
    );
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, MADT_PCAT_COMPAT);
    let enabled = EnabledStatus::Enabled as u32;
    for id in 0..vcpus {
        match u8::try_from(id) {
            Ok(id8) if id < FIRST_X2APIC_ID => t.append_slice(&bytes_of(&ProcessorLocalApic::new(
                id8,
                id8,
                EnabledStatus::Enabled,
            ))),
            _ => t.append(LocalX2Apic {
                r#type: 9,
                length: 16,
                reserved: 0.into(),
                x2apic_id: id.into(),
                flags: enabled.into(),
                processor_uid: id.into(),
            }),
        }
    }
    t.append_slice(&bytes_of(&IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0)));
    // KVM's default routing puts ISA IRQ n on GSI n, the PIT included; said
    // explicitly for IRQ 0 because a PC puts it on GSI 2. Flags 0: as the
    // ISA bus conforms (edge, active high).
    t.append(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: PIT_IRQ,
        gsi: u32::from(PIT_IRQ).into(),
        flags: 0.into(),
    });
    // LINT1 of every local APIC is the NMI input (KVM's LAPIC reset state).
    t.append(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: ALL_XAPIC_UIDS,
        flags: 0.into(),
        lint: 1,
    });
    if vcpus > FIRST_X2APIC_ID {
        t.append(LocalX2ApicNmi {
            r#type: 0xa,
            length: 12,
            flags: 0.into(),
            processor_uid: ALL_X2APIC_UIDS.into(),
            lint: 1,
            reserved: [0; 3],
        });
    }
    t.as_slice().to_vec()
}

/// `\_SB.COM1` and `\_SB.Vnnn` for each virtio-mmio slot.
fn dsdt(platform: &Platform) -> Vec<u8> {
    let mut devices = Vec::with_capacity(platform.virtio.len() + 1);
    let io = IO::new(SERIAL.base, SERIAL.base, 1, SERIAL.len);
    // Consumer, edge-triggered, active high, exclusive: an irqfd pulses
    // its GSI.
    let irq = Interrupt::new(true, true, false, false, SERIAL.irq);
    let com1 = ResourceTemplate::new(vec![&io, &irq]);
    devices.push(AmlBytes(bytes_of(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &com1),
        ],
    ))));
    for slot in &platform.virtio {
        // The MMIO window lies below 4 GiB by construction (VIRTIO_MMIO_BASE).
        let base = u32::try_from(slot.base).unwrap_or(u32::MAX);
        let window = Memory32Fixed::new(true, base, VIRTIO_MMIO_SIZE as u32);
        let irq = Interrupt::new(true, true, false, false, slot.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let name = format!("V{:03X}", slot.index);
        devices.push(AmlBytes(bytes_of(&Device::new(
            Path::new(&name),
            vec![
                &Name::new(Path::new("_HID"), &"LNRO0005"),
                &Name::new(Path::new("_UID"), &slot.index),
                &Name::new(Path::new("_CRS"), &crs),
            ],
        ))));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let sb = Scope::new(Path::new("\\_SB_"), children);
    let mut t = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"RSVMDSDT",
        OEM_REVISION,
    );
    t.append_slice(&bytes_of(&sb));
    t.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::firmware::{ACPI_ADDR, MPTABLE_ADDR};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// (type, bytes) of each MADT structure.
    fn madt_entries(m: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut o = 44;
        while o < m.len() {
            let len = m[o + 1] as usize;
            assert!(len >= 2 && o + len <= m.len(), "bad MADT entry at {o}");
            out.push((m[o], &m[o..o + len]));
            o += len;
        }
        out
    }

    fn tables(vcpus: u32, devices: usize) -> AcpiTables {
        build(
            &Platform::with_devices(vcpus, devices).unwrap(),
            ACPI_ADDR,
            MPTABLE_ADDR,
        )
        .unwrap()
    }

    #[test]
    fn every_table_sums_to_zero_and_declares_its_length() {
        for n in [1, 4, 32, 255, 256, 1024] {
            let t = tables(n, 3);
            for table in t.all() {
                assert_eq!(sum(&table.bytes), 0, "{} for {n}", table.signature());
                assert_eq!(table.addr % 16, 0);
            }
            assert_eq!(sum(&t.rsdp.bytes[..20]), 0, "RSDP v1 checksum");
            for table in &t.all()[1..] {
                assert_eq!(u32_at(&table.bytes, 4) as usize, table.bytes.len());
            }
        }
    }

    #[test]
    fn pointers_chain_rsdp_xsdt_fadt_dsdt() {
        let t = tables(4, 2);
        assert_eq!(t.rsdp.addr, ACPI_ADDR);
        assert_eq!(t.rsdp.bytes[15], 2, "RSDP revision");
        assert_eq!(u64_at(&t.rsdp.bytes, 24), t.xsdt.addr);
        assert_eq!(u64_at(&t.xsdt.bytes, 36), t.fadt.addr);
        assert_eq!(u64_at(&t.xsdt.bytes, 44), t.madt.addr);
        assert_eq!(t.xsdt.bytes.len(), 36 + 16);
        let f = &t.fadt.bytes;
        assert_eq!(&f[..4], b"FACP");
        assert_eq!((f[8], f[131]), (6, 5), "FADT 6.5");
        assert_eq!(u64_at(f, 140), t.dsdt.addr, "X_DSDT");
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
        assert_ne!(u32_at(f, 112) & Flags::HwReducedAcpi as u32, 0);
        assert_eq!(u32_at(f, 56), 0, "no PM1a event block");
        // Tables do not overlap.
        let mut spans: Vec<_> = t
            .all()
            .iter()
            .map(|x| (x.addr, x.addr + x.bytes.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn madt_has_one_enabled_local_apic_per_vcpu() {
        for n in [1u32, 4, 32, 255, 256, 1024] {
            let t = tables(n, 0);
            let m = &t.madt.bytes;
            assert_eq!(&m[..4], b"APIC");
            assert_eq!(u32_at(m, 36), LAPIC_ADDR);
            assert_eq!(u32_at(m, 40), MADT_PCAT_COMPAT);
            let e = madt_entries(m);
            let mut ids = Vec::new();
            for (ty, b) in &e {
                match ty {
                    0 => {
                        assert_eq!(b[2], b[3], "uid = apic id");
                        assert_eq!(u32_at(b, 4), 1, "enabled");
                        ids.push(u32::from(b[3]));
                    }
                    9 => {
                        assert_eq!(u32_at(b, 4), u32_at(b, 12), "uid = x2apic id");
                        assert_eq!(u32_at(b, 8), 1, "enabled");
                        assert!(u32_at(b, 4) >= FIRST_X2APIC_ID);
                        ids.push(u32_at(b, 4));
                    }
                    _ => {}
                }
            }
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "{n} vCPUs");
            let ioapics: Vec<_> = e.iter().filter(|(t, _)| *t == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0].1;
            assert_eq!((io[2], u32_at(io, 4), u32_at(io, 8)), (0, IOAPIC_ADDR, 0));
            let x2nmi = e.iter().filter(|(t, _)| *t == 0xa).count();
            assert_eq!(x2nmi, usize::from(n > FIRST_X2APIC_ID));
        }
    }

    #[test]
    fn pit_override_says_irq0_is_gsi0() {
        let t = tables(1, 0);
        let isos: Vec<_> = madt_entries(&t.madt.bytes)
            .into_iter()
            .filter(|(t, _)| *t == 2)
            .collect();
        assert_eq!(isos.len(), 1);
        let b = isos[0].1;
        assert_eq!((b[2], b[3], u32_at(b, 4)), (0, 0, 0));
    }

    #[test]
    fn dsdt_names_the_serial_port_and_each_virtio_device() {
        let t = tables(1, 3);
        let d = &t.dsdt.bytes;
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"COM1"));
        assert!(has(b"LNRO0005"));
        for i in 0..3u32 {
            let s = crate::vm::VirtioSlot::at(i).unwrap();
            assert!(has(format!("V{i:03X}").as_bytes()));
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(s.base as u32).to_le_bytes());
            m.extend_from_slice(&(VIRTIO_MMIO_SIZE as u32).to_le_bytes());
            assert!(has(&m), "window of slot {i}");
            // Extended interrupt: tag 0x89, length 6, consumer+edge, 1 GSI.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend_from_slice(&s.gsi.to_le_bytes());
            assert!(has(&irq), "GSI of slot {i}");
        }
        assert!(!has(b"V003"));
    }

    #[test]
    fn too_many_vcpus_is_an_error_not_an_overlap() {
        let p = Platform::with_devices(8192, 19).unwrap();
        assert!(matches!(
            build(&p, ACPI_ADDR, MPTABLE_ADDR),
            Err(FirmwareError::AcpiTooLarge { vcpus: 8192, .. })
        ));
    }
}
