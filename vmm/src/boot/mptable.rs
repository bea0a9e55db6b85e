//! The Intel MultiProcessor Specification 1.4 table, for guests that do
//! not read ACPI: a floating pointer ("_MP_") and the configuration table
//! ("PCMP") right after it. It says what the MADT says ([`Platform`]): one
//! processor per vCPU (APIC id = vCPU index, vCPU 0 the bootstrap
//! processor), KVM's IOAPIC, ISA IRQ n on pin n, ExtINT on the BSP's LINT0
//! and NMI on every LINT1.
//!
//! No maintained crate builds it; the entries are a few `#[repr(C)]`
//! structs. Processor entries hold an 8-bit APIC id, and 0xff means
//! "all": vCPUs from APIC id 255 on are in the MADT (x2APIC) only.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::firmware::{
    CpuSignature, FirmwareError, IOAPIC_ADDR, IOAPIC_ID, IOAPIC_PINS, IOAPIC_VERSION, ISA_IRQS,
    LAPIC_ADDR, LAPIC_VERSION, Platform,
};

const SPEC_REV: u8 = 4; // 1.4
const FLOATING_LEN_PARAGRAPHS: u8 = 1; // 16 bytes
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
const BUS_ISA: u8 = 0;
/// I/O and local interrupt types.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: 0 conforms to the bus (ISA: edge, active high); pins
/// past the ISA IRQs (virtio devices on GSI 16..24) are said edge, active
/// high outright (polarity 01, trigger 01), as the DSDT says.
const INT_FLAGS_CONFORM: u16 = 0;
const INT_FLAGS_EDGE_HIGH: u16 = 0b0101;
/// Highest APIC id a processor entry can name (0xff is "all").
pub const MAX_MP_APIC_ID: u32 = 0xfe;
/// Destination "every local APIC" of a local interrupt entry.
const ALL_LAPICS: u8 = 0xff;

#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct FloatingPointer {
    signature: [u8; 4],
    config_table: U32,
    length: u8,
    spec_rev: u8,
    checksum: u8,
    /// Feature byte 1: 0 = a configuration table is present.
    feature1: u8,
    /// Bit 7 (IMCR) clear: virtual wire mode, no IMCR to program.
    feature2: u8,
    feature3_5: [u8; 3],
}

#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct ConfigHeader {
    signature: [u8; 4],
    base_table_length: U16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: U32,
    oem_table_size: U16,
    entry_count: U16,
    lapic_addr: U32,
    extended_table_length: U16,
    extended_table_checksum: u8,
    reserved: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct ProcessorEntry {
    entry_type: u8,
    lapic_id: u8,
    lapic_version: u8,
    cpu_flags: u8,
    signature: U32,
    features: U32,
    reserved: [u8; 8],
}

#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct BusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct IoApicEntry {
    entry_type: u8,
    id: u8,
    version: u8,
    flags: u8,
    addr: U32,
}

/// I/O interrupt assignment (type 3) and local interrupt assignment
/// (type 4) share one layout.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptEntry {
    entry_type: u8,
    int_type: u8,
    flags: U16,
    source_bus: u8,
    source_irq: u8,
    dest_id: u8,
    dest_pin: u8,
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_sub(*x))
}

/// The floating pointer at `addr` followed by the configuration table;
/// the whole must end at or below `limit`.
pub fn build(
    platform: &Platform,
    cpu: CpuSignature,
    addr: u64,
    limit: u64,
) -> Result<Vec<u8>, FirmwareError> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count = count.wrapping_add(1);
    };
    for id in 0..platform.vcpus.min(MAX_MP_APIC_ID + 1) {
        let bsp = if id == 0 { CPU_BSP } else { 0 };
        push(
            ProcessorEntry {
                entry_type: 0,
                lapic_id: id as u8,
                lapic_version: LAPIC_VERSION,
                cpu_flags: CPU_ENABLED | bsp,
                signature: cpu.signature.into(),
                features: cpu.features.into(),
                reserved: [0; 8],
            }
            .as_bytes(),
        );
    }
    push(
        BusEntry {
            entry_type: 1,
            bus_id: BUS_ISA,
            bus_type: *b"ISA   ",
        }
        .as_bytes(),
    );
    push(
        IoApicEntry {
            entry_type: 2,
            id: IOAPIC_ID,
            version: IOAPIC_VERSION,
            flags: IOAPIC_ENABLED,
            addr: IOAPIC_ADDR.into(),
        }
        .as_bytes(),
    );
    for pin in 0..IOAPIC_PINS {
        let flags = if pin < ISA_IRQS {
            INT_FLAGS_CONFORM
        } else {
            INT_FLAGS_EDGE_HIGH
        };
        push(
            InterruptEntry {
                entry_type: 3,
                int_type: INT_TYPE_INT,
                flags: flags.into(),
                source_bus: BUS_ISA,
                source_irq: pin,
                dest_id: IOAPIC_ID,
                dest_pin: pin,
            }
            .as_bytes(),
        );
    }
    // KVM wires the 8259 to the BSP's LINT0 (ExtINT); LINT1 is NMI on all.
    for (int_type, dest_id, dest_pin) in [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LAPICS, 1)] {
        push(
            InterruptEntry {
                entry_type: 4,
                int_type,
                flags: INT_FLAGS_CONFORM.into(),
                source_bus: BUS_ISA,
                source_irq: 0,
                dest_id,
                dest_pin,
            }
            .as_bytes(),
        );
    }

    let floating_len = std::mem::size_of::<FloatingPointer>();
    let header_len = std::mem::size_of::<ConfigHeader>();
    let table_len = header_len + entries.len();
    let size = (floating_len + table_len) as u64;
    let too_large = || FirmwareError::MpTableTooLarge {
        size,
        room: limit.saturating_sub(addr),
    };
    if addr.saturating_add(size) > limit {
        return Err(too_large());
    }
    let config_addr = u32::try_from(addr + floating_len as u64).map_err(|_| too_large())?;
    let mut header = ConfigHeader {
        signature: *b"PCMP",
        base_table_length: u16::try_from(table_len).map_err(|_| too_large())?.into(),
        spec_rev: SPEC_REV,
        checksum: 0,
        oem_id: *b"RSVMM   ",
        product_id: *b"RSVMM VM    ",
        oem_table: 0.into(),
        oem_table_size: 0.into(),
        entry_count: count.into(),
        lapic_addr: LAPIC_ADDR.into(),
        extended_table_length: 0.into(),
        extended_table_checksum: 0,
        reserved: 0,
    };
    header.checksum = checksum(header.as_bytes()).wrapping_add(checksum(&entries));
    let mut floating = FloatingPointer {
        signature: *b"_MP_",
        config_table: config_addr.into(),
        length: FLOATING_LEN_PARAGRAPHS,
        spec_rev: SPEC_REV,
        checksum: 0,
        feature1: 0,
        feature2: 0,
        feature3_5: [0; 3],
    };
    floating.checksum = checksum(floating.as_bytes());

    let mut out = Vec::with_capacity(size as usize);
    out.extend_from_slice(floating.as_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&entries);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::firmware::{FIRMWARE_END, MPTABLE_ADDR};

    const SIG: CpuSignature = CpuSignature {
        signature: 0x000806f8,
        features: 0x178bfbff,
    };

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// (type, bytes) of each entry of the configuration table.
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]) as usize;
        let mut o = 16 + 44;
        let mut out = Vec::new();
        for _ in 0..count {
            let len = if t[o] == 0 { 20 } else { 8 };
            out.push((t[o], &t[o..o + len]));
            o += len;
        }
        assert_eq!(o, t.len(), "entry count matches the length");
        out
    }

    fn table(n: u32) -> Vec<u8> {
        let p = Platform::with_devices(n, 2).unwrap();
        build(&p, SIG, MPTABLE_ADDR, FIRMWARE_END).unwrap()
    }

    #[test]
    fn checksums_and_pointers_are_right() {
        for n in [1, 4, 32, 255, 256] {
            let t = table(n);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer, {n} vCPUs");
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64,
                MPTABLE_ADDR + 16
            );
            assert_eq!((t[8], t[9]), (1, 4));
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            assert_eq!(u16::from_le_bytes([cfg[4], cfg[5]]) as usize, cfg.len());
            assert_eq!(sum(cfg), 0, "config table, {n} vCPUs");
        }
    }

    #[test]
    fn one_processor_per_vcpu_bsp_first() {
        for n in [1u32, 4, 32, 255, 256] {
            let t = table(n);
            let cpus: Vec<_> = entries(&t).into_iter().filter(|(ty, _)| *ty == 0).collect();
            assert_eq!(cpus.len() as u32, n.min(255), "{n} vCPUs");
            for (i, (_, c)) in cpus.iter().enumerate() {
                assert_eq!(c[1] as usize, i, "APIC id");
                assert_eq!(c[2], LAPIC_VERSION);
                let want = if i == 0 { 3 } else { 1 };
                assert_eq!(c[3], want, "flags of CPU {i}");
                assert_eq!(
                    u32::from_le_bytes(c[4..8].try_into().unwrap()),
                    SIG.signature
                );
                assert_eq!(
                    u32::from_le_bytes(c[8..12].try_into().unwrap()),
                    SIG.features
                );
            }
        }
    }

    #[test]
    fn interrupts_match_the_madt() {
        let t = table(4);
        let e = entries(&t);
        let bus: Vec<_> = e.iter().filter(|(ty, _)| *ty == 1).collect();
        assert_eq!(bus.len(), 1);
        assert_eq!(&bus[0].1[2..8], b"ISA   ");
        let io: Vec<_> = e.iter().filter(|(ty, _)| *ty == 2).collect();
        assert_eq!(io.len(), 1);
        assert_eq!(
            (
                io[0].1[1],
                io[0].1[3],
                u32::from_le_bytes(io[0].1[4..8].try_into().unwrap())
            ),
            (IOAPIC_ID, 1, IOAPIC_ADDR)
        );
        let ints: Vec<_> = e.iter().filter(|(ty, _)| *ty == 3).collect();
        assert_eq!(ints.len(), IOAPIC_PINS as usize);
        for (pin, (_, b)) in ints.iter().enumerate() {
            // INT, source IRQ = destination pin: IRQ 0 (the PIT) on pin 0.
            assert_eq!((b[1], b[5], b[6], b[7] as usize), (0, pin as u8, 0, pin));
        }
        let local: Vec<_> = e
            .iter()
            .filter(|(ty, _)| *ty == 4)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(local.len(), 2);
        assert_eq!(
            (local[0][1], local[0][6], local[0][7]),
            (INT_TYPE_EXTINT, 0, 0)
        );
        assert_eq!(
            (local[1][1], local[1][6], local[1][7]),
            (INT_TYPE_NMI, 0xff, 1)
        );
    }

    #[test]
    fn fits_below_1mib_at_any_vcpu_count_and_refuses_otherwise() {
        // Entries stop at APIC id 254: the largest table fits the 64 KiB.
        let p = Platform::with_devices(4096, 19).unwrap();
        let t = build(&p, SIG, MPTABLE_ADDR, FIRMWARE_END).unwrap();
        assert!(MPTABLE_ADDR + t.len() as u64 <= FIRMWARE_END);
        assert!(matches!(
            build(&p, SIG, MPTABLE_ADDR, MPTABLE_ADDR + 1024),
            Err(FirmwareError::MpTableTooLarge { .. })
        ));
    }
}
