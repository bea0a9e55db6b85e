//! Where the CPUs are, from the firmware tables: ACPI (RSDP → XSDT or RSDT
//! → MADT) first, else the Intel MP table, else the boot CPU alone. Every
//! table's checksum is checked; a table that fails is ignored.

use crate::phys::{read8, read16, read32, read64, sum8};

/// CPUs the guest keeps track of (BSP included); more are refused.
pub const MAX_CPUS: usize = 64;
/// An SDT longer than this is taken as garbage.
const SDT_MAX_LEN: u32 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    AcpiMadt,
    MpTable,
    Nothing,
}

pub struct Cpus {
    pub source: Source,
    /// APIC ids: the BSP first, then the others in table order.
    pub ids: [u32; MAX_CPUS],
    pub n: usize,
    /// Enabled CPUs the tables list beyond MAX_CPUS.
    pub dropped: usize,
    /// The (first) IOAPIC's address, when a table gives one.
    pub ioapic: Option<u32>,
}

impl Cpus {
    fn new(source: Source) -> Self {
        Cpus {
            source,
            ids: [0; MAX_CPUS],
            n: 0,
            dropped: 0,
            ioapic: None,
        }
    }

    fn add(&mut self, id: u32) {
        if self.ids().contains(&id) {
            return;
        }
        match self.ids.get_mut(self.n) {
            Some(slot) => {
                *slot = id;
                self.n += 1;
            }
            None => self.dropped += 1,
        }
    }

    pub fn ids(&self) -> &[u32] {
        self.ids.get(..self.n).unwrap_or(&[])
    }

    /// Moves `bsp` to the front (keeping the others' order), adding it if
    /// the table did not list it.
    fn bsp_first(&mut self, bsp: u32) {
        let pos = match self.ids().iter().position(|&i| i == bsp) {
            Some(p) => p,
            None => {
                if self.n == MAX_CPUS {
                    self.n -= 1;
                    self.dropped += 1;
                }
                self.n += 1;
                self.n - 1
            }
        };
        if let Some(s) = self.ids.get_mut(..=pos) {
            s.rotate_right(1);
            if let Some(first) = s.first_mut() {
                *first = bsp;
            }
        }
    }
}

/// The CPUs the firmware describes; `rsdp_hint` is hvm_start_info's
/// rsdp_paddr (0: none given); `use_acpi` false skips ACPI (`acpi=off`).
/// Legacy areas are scanned only where `start_info`'s memory map has an
/// entry (RAM or reserved): a hole there (our vmm has none at
/// 0xA0000..0x100000) would make every read an MMIO exit, ~50 ms in all.
pub fn discover(start_info: u64, rsdp_hint: u64, use_acpi: bool, bsp: u32) -> Cpus {
    // SAFETY: start_info is the loader's hvm_start_info (or 0).
    let mapped = |from: u64, to: u64| unsafe {
        crate::cmdline::map_covers(start_info, from, to - from, false)
    };
    let mut cpus = use_acpi
        .then(|| acpi(rsdp_hint, &mapped))
        .flatten()
        .or_else(|| mp_table(&mapped))
        .unwrap_or_else(|| Cpus::new(Source::Nothing));
    cpus.bsp_first(bsp);
    cpus
}

type Mapped<'a> = &'a dyn Fn(u64, u64) -> bool;

/// The EBDA's segment from the BIOS data area, if it looks sane.
fn ebda(mapped: Mapped) -> Option<u64> {
    if !mapped(0x400, 0x500) {
        return None;
    }
    let base = u64::from(read16(0x40e)) << 4;
    (0x8_0000..0xa_0000).contains(&base).then_some(base)
}

/// First 16-byte aligned address in `[from, to)` where `check` holds,
/// if the memory map covers that range.
fn scan(mapped: Mapped, from: u64, to: u64, check: impl Fn(u64) -> bool) -> Option<u64> {
    if !mapped(from, to) {
        return None;
    }
    (from..to).step_by(16).find(|&a| check(a))
}

fn signature(addr: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, &c)| read8(addr + i as u64) == c)
}

fn rsdp_valid(a: u64) -> bool {
    if !signature(a, b"RSD PTR ") || sum8(a, 20) != 0 {
        return false;
    }
    read8(a + 15) < 2 || sum8(a, 36) == 0
}

fn find_rsdp(hint: u64, mapped: Mapped) -> Option<u64> {
    if hint != 0 && rsdp_valid(hint) {
        return Some(hint);
    }
    ebda(mapped)
        .and_then(|e| scan(mapped, e, e + 1024, rsdp_valid))
        .or_else(|| scan(mapped, 0xe_0000, 0x10_0000, rsdp_valid))
}

/// A checksummed SDT with signature `sig` at `addr`: its length.
fn sdt(addr: u64, sig: &[u8]) -> Option<u32> {
    if addr == 0 || addr >= 0x1_0000_0000 || !signature(addr, sig) {
        return None;
    }
    let len = read32(addr + 4);
    (36..=SDT_MAX_LEN).contains(&len).then_some(())?;
    (sum8(addr, u64::from(len)) == 0).then_some(len)
}

fn acpi(hint: u64, mapped: Mapped) -> Option<Cpus> {
    let rsdp = find_rsdp(hint, mapped)?;
    let xsdt = if read8(rsdp + 15) >= 2 {
        read64(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size, len) = match sdt(xsdt, b"XSDT") {
        Some(len) => (xsdt, 8, len),
        None => {
            let rsdt = u64::from(read32(rsdp + 16));
            (rsdt, 4, sdt(rsdt, b"RSDT")?)
        }
    };
    let entries = (u64::from(len) - 36) / entry_size;
    (0..entries)
        .map(|i| {
            let at = root + 36 + i * entry_size;
            if entry_size == 8 {
                read64(at)
            } else {
                u64::from(read32(at))
            }
        })
        .find_map(|t| sdt(t, b"APIC").map(|len| madt(t, len)))
}

fn madt(addr: u64, len: u32) -> Cpus {
    let mut cpus = Cpus::new(Source::AcpiMadt);
    let end = addr + u64::from(len);
    let mut at = addr + 44;
    while at + 2 <= end {
        let (kind, elen) = (read8(at), u64::from(read8(at + 1)));
        if elen < 2 || at + elen > end {
            break;
        }
        // Enabled (bit 0) or online capable (bit 1).
        match (kind, elen) {
            (0, 8..) if read32(at + 4) & 3 != 0 => cpus.add(u32::from(read8(at + 3))),
            (9, 16..) if read32(at + 8) & 3 != 0 => cpus.add(read32(at + 4)),
            (1, 12..) if cpus.ioapic.is_none() => cpus.ioapic = Some(read32(at + 4)),
            _ => {}
        }
        at += elen;
    }
    cpus
}

fn mp_floating_valid(a: u64) -> bool {
    signature(a, b"_MP_") && {
        let len = u64::from(read8(a + 8)) * 16;
        len >= 16 && sum8(a, len) == 0
    }
}

fn mp_table(mapped: Mapped) -> Option<Cpus> {
    let fp = ebda(mapped)
        .and_then(|e| scan(mapped, e, e + 1024, mp_floating_valid))
        .or_else(|| scan(mapped, 0x9_fc00, 0xa_0000, mp_floating_valid))
        .or_else(|| scan(mapped, 0xf_0000, 0x10_0000, mp_floating_valid))?;
    let table = u64::from(read32(fp + 4));
    if table == 0 || !signature(table, b"PCMP") {
        // A "default configuration" (no table) is not something our peers use.
        return None;
    }
    let len = u64::from(read16(table + 4));
    if len < 44 || sum8(table, len) != 0 {
        return None;
    }
    let end = table + len;
    let mut cpus = Cpus::new(Source::MpTable);
    let mut at = table + 44;
    // Walked by the base table's length, as Linux does: the entry count
    // (offset 34) is 0 in the table QEMU microvm's firmware (qboot) builds.
    while at < end {
        let elen = match read8(at) {
            0 => 20,
            1..=4 => 8,
            _ => break,
        };
        if at + elen > end {
            break;
        }
        match read8(at) {
            0 if read8(at + 3) & 1 != 0 => cpus.add(u32::from(read8(at + 1))),
            2 if read8(at + 3) & 1 != 0 && cpus.ioapic.is_none() => {
                cpus.ioapic = Some(read32(at + 4))
            }
            _ => {}
        }
        at += elen;
    }
    Some(cpus)
}
