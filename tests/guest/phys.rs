//! Reads of guest-physical memory the firmware or the loader wrote (tables,
//! the initrd). All of 0..4 GiB is identity-mapped; addresses at or above
//! 4 GiB read as zero rather than fault.

const LIMIT: u64 = 0x1_0000_0000;

pub fn read8(addr: u64) -> u8 {
    if addr >= LIMIT {
        return 0;
    }
    // SAFETY: identity-mapped below 4 GiB (entry.rs); a volatile read of
    // memory no Rust object owns.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn read16(addr: u64) -> u16 {
    u16::from_le_bytes([read8(addr), read8(addr + 1)])
}

pub fn read32(addr: u64) -> u32 {
    u32::from(read16(addr)) | (u32::from(read16(addr + 2)) << 16)
}

pub fn read64(addr: u64) -> u64 {
    u64::from(read32(addr)) | (u64::from(read32(addr + 4)) << 32)
}

/// Byte sum of `[addr, addr + len)` (a valid ACPI/MP table sums to 0).
pub fn sum8(addr: u64, len: u64) -> u8 {
    (addr..addr.saturating_add(len)).fold(0u8, |s, a| s.wrapping_add(read8(a)))
}

/// `len` bytes at `addr` as a slice, when the range lies below 4 GiB.
///
/// # Safety
/// The range must be RAM nothing writes while the slice lives.
pub unsafe fn bytes(addr: u64, len: u64) -> Option<&'static [u8]> {
    let end = addr.checked_add(len)?;
    if end > LIMIT || addr == 0 {
        return None;
    }
    // SAFETY: identity-mapped; the caller guarantees it is RAM left alone.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
}
