//! The command line from PVH's `hvm_start_info` and the keys the guest knows.

use crate::text::{parse_ipv4, parse_size, parse_u64};

const HVM_START_MAGIC: u32 = 0x336e_c578;
const CMDLINE_MAX: usize = 4096;
pub const MAX_MMIO_DEVICES: usize = 8;

#[derive(Clone, Copy, Default)]
pub struct MmioDevice {
    pub addr: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Default)]
pub struct Config {
    pub devices: [MmioDevice; MAX_MMIO_DEVICES],
    pub n_devices: usize,
    /// Address and prefix length.
    pub ip: Option<([u8; 4], u8)>,
    pub exit: bool,
    /// `testguest.reset`: after the banner, only the i8042 reset.
    pub reset: bool,
    /// `testguest.fault`: after the banner, a deliberate triple fault.
    pub fault: bool,
    pub heartbeat_ms: Option<u32>,
    /// `testguest.busy` (or `testguest.busy=1`): compute and write RAM
    /// between interrupts instead of halting (`busy.rs`).
    pub busy: bool,
    /// `testguest.txqueue=N`: use at most N tx descriptors (tests use a
    /// tiny ring to exercise the wait-for-space path).
    pub tx_queue_max: Option<u32>,
    /// `testguest.hold_ap=ID[,ID...]` (the key may repeat): APs (xAPIC ids
    /// 0..=255) not started at boot, one bit per id, for UDP 5004 to start.
    pub hold_ap: [u64; 4],
    /// `acpi=off` (Linux's key): find the CPUs in the MP table only.
    pub acpi_off: bool,
    /// Keys we could not parse, counted so that the guest can say so.
    pub bad_keys: u32,
}

impl Config {
    pub fn held(&self, apic_id: u32) -> bool {
        let word = self
            .hold_ap
            .get((apic_id / 64) as usize)
            .copied()
            .unwrap_or(0);
        word & (1 << (apic_id % 64)) != 0
    }
}

/// The command line bytes (without the NUL) that `start_info` points to.
///
/// # Safety
/// `start_info` must be the physical address the PVH loader passed in EBX
/// (identity-mapped), or 0.
pub unsafe fn from_start_info(start_info: u64) -> &'static [u8] {
    if start_info == 0 || start_info >= 0x1_0000_0000 {
        return &[];
    }
    // SAFETY: the loader put a hvm_start_info there; magic at 0, cmdline_paddr at 24.
    let (magic, cmdline) = unsafe {
        let p = start_info as *const u8;
        (
            core::ptr::read_unaligned(p as *const u32),
            core::ptr::read_unaligned(p.add(24) as *const u64),
        )
    };
    if magic != HVM_START_MAGIC || cmdline == 0 || cmdline >= 0x1_0000_0000 {
        return &[];
    }
    let p = cmdline as *const u8;
    let mut len = 0;
    // SAFETY: the loader wrote a NUL-terminated string there; we stop at
    // CMDLINE_MAX in case it did not.
    while len < CMDLINE_MAX && unsafe { core::ptr::read_volatile(p.add(len)) } != 0 {
        len += 1;
    }
    // SAFETY: those `len` bytes were just read and stay untouched (the guest
    // never writes below its own image).
    unsafe { core::slice::from_raw_parts(p, len) }
}

/// Whether the PVH memory map (start info version 1 and later) has one RAM
/// entry covering `[base, base + len)`.
///
/// # Safety
/// As [`from_start_info`].
pub unsafe fn ram_covers(start_info: u64, base: u64, len: u64) -> bool {
    // SAFETY: as the caller's.
    unsafe { map_covers(start_info, base, len, true) }
}

/// Whether one PVH memory map entry (RAM only, or of any type: firmware
/// areas are "reserved") covers `[base, base + len)`.
///
/// # Safety
/// As [`from_start_info`].
pub unsafe fn map_covers(start_info: u64, base: u64, len: u64, ram_only: bool) -> bool {
    const MEMMAP_MAX: u32 = 128;
    const E820_RAM: u32 = 1;
    if start_info == 0 || start_info >= 0x1_0000_0000 {
        return false;
    }
    let p = start_info as *const u8;
    // SAFETY: the loader put a hvm_start_info there: magic at 0, version at
    // 4, memmap_paddr at 40, memmap_entries at 48.
    let (magic, version, map, n) = unsafe {
        (
            core::ptr::read_unaligned(p as *const u32),
            core::ptr::read_unaligned(p.add(4) as *const u32),
            core::ptr::read_unaligned(p.add(40) as *const u64),
            core::ptr::read_unaligned(p.add(48) as *const u32),
        )
    };
    if magic != HVM_START_MAGIC || version < 1 || map == 0 || map >= 0x1_0000_0000 {
        return false;
    }
    let end = base.saturating_add(len);
    (0..n.min(MEMMAP_MAX) as usize).any(|i| {
        let e = (map as usize + 24 * i) as *const u8;
        // SAFETY: entry i of the table the loader wrote (addr, size, type),
        // bounded by its own count and MEMMAP_MAX.
        let (addr, size, kind) = unsafe {
            (
                core::ptr::read_unaligned(e as *const u64),
                core::ptr::read_unaligned(e.add(8) as *const u64),
                core::ptr::read_unaligned(e.add(16) as *const u32),
            )
        };
        (kind == E820_RAM || !ram_only) && addr <= base && addr.saturating_add(size) >= end
    })
}

pub fn parse(cmdline: &[u8]) -> Config {
    let mut cfg = Config::default();
    for word in cmdline.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
        if word.is_empty() {
            continue;
        }
        let (key, value) = match word.iter().position(|&c| c == b'=') {
            Some(i) => (word.get(..i).unwrap_or(&[]), word.get(i + 1..)),
            None => (word, None),
        };
        let ok = match (key, value) {
            (b"virtio_mmio.device", Some(v)) => parse_device(v).is_some_and(|d| {
                if let Some(slot) = cfg.devices.get_mut(cfg.n_devices) {
                    *slot = d;
                    cfg.n_devices += 1;
                }
                true
            }),
            (b"testguest.ip", Some(v)) => {
                cfg.ip = parse_cidr(v);
                cfg.ip.is_some()
            }
            (b"testguest.exit", None) => {
                cfg.exit = true;
                true
            }
            (b"testguest.reset", None) => {
                cfg.reset = true;
                true
            }
            (b"testguest.fault", None) => {
                cfg.fault = true;
                true
            }
            (b"testguest.busy", None) => {
                cfg.busy = true;
                true
            }
            (b"testguest.busy", Some(v)) => match parse_u64(v) {
                Some(n) if n <= 1 => {
                    cfg.busy = n == 1;
                    true
                }
                _ => false,
            },
            (b"testguest.heartbeat", Some(v)) => {
                cfg.heartbeat_ms = parse_u64(v)
                    .and_then(|ms| u32::try_from(ms).ok())
                    .filter(|&ms| ms > 0);
                cfg.heartbeat_ms.is_some()
            }
            (b"testguest.txqueue", Some(v)) => {
                cfg.tx_queue_max = parse_u64(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0);
                cfg.tx_queue_max.is_some()
            }
            (b"acpi", Some(v)) => {
                cfg.acpi_off = v == b"off";
                true
            }
            (b"testguest.hold_ap", Some(v)) => v.split(|&c| c == b',').all(|id| {
                match parse_u64(id)
                    .and_then(|id| cfg.hold_ap.get_mut((id / 64) as usize).map(|w| (w, id)))
                {
                    Some((w, id)) => {
                        *w |= 1 << (id % 64);
                        true
                    }
                    None => false,
                }
            }),
            _ => true, // someone else's key
        };
        if !ok {
            cfg.bad_keys += 1;
        }
    }
    cfg
}

/// `SIZE@ADDR:IRQ[:ID]`, as Linux's virtio_mmio module takes it.
fn parse_device(v: &[u8]) -> Option<MmioDevice> {
    let at = v.iter().position(|&c| c == b'@')?;
    let size = parse_size(v.get(..at)?)?;
    let rest = v.get(at + 1..)?;
    let colon = rest.iter().position(|&c| c == b':')?;
    let addr = parse_size(rest.get(..colon)?)?;
    let irq_part = rest.get(colon + 1..)?;
    let irq_end = irq_part
        .iter()
        .position(|&c| c == b':')
        .unwrap_or(irq_part.len());
    let irq = u32::try_from(parse_u64(irq_part.get(..irq_end)?)?).ok()?;
    Some(MmioDevice { addr, size, irq })
}

fn parse_cidr(v: &[u8]) -> Option<([u8; 4], u8)> {
    let (ip, prefix) = match v.iter().position(|&c| c == b'/') {
        Some(i) => (v.get(..i)?, u8::try_from(parse_u64(v.get(i + 1..)?)?).ok()?),
        None => (v, 24),
    };
    if prefix > 32 {
        return None;
    }
    Some((parse_ipv4(ip)?, prefix))
}
