//! The initrd: module 0 of hvm_start_info's module list (paddr, size,
//! cmdline_paddr, reserved: four u64), reported as its size and IEEE CRC-32
//! (the zlib one), so a test can check the loader put the right bytes in RAM.

use crate::phys::{read32, read64};
use crate::text::TextBuf;

const HVM_START_MAGIC: u32 = 0x336e_c578;

/// Module 0's (address, size), when the start info lists one.
pub fn module0(start_info: u64) -> Option<(u64, u64)> {
    if start_info == 0 || read32(start_info) != HVM_START_MAGIC || read32(start_info + 12) == 0 {
        return None;
    }
    let list = read64(start_info + 16);
    if list == 0 {
        return None;
    }
    Some((read64(list), read64(list + 8)))
}

/// `testguest: initrd <size> bytes, crc32 <hex>`, or why not.
pub fn report(start_info: u64) {
    let Some((addr, size)) = module0(start_info) else {
        return;
    };
    let mut line = TextBuf::<96>::new();
    // SAFETY: start_info is the loader's hvm_start_info.
    let in_ram = unsafe { crate::cmdline::ram_covers(start_info, addr, size) };
    // SAFETY: the memory map says it is RAM, and nothing in the guest
    // writes there (the trampoline avoids the module, see smp.rs).
    match in_ram
        .then(|| unsafe { crate::phys::bytes(addr, size) })
        .flatten()
    {
        Some(data) => {
            line.str("initrd ")
                .dec(size)
                .str(" bytes, crc32 ")
                .hex(u64::from(crc32(data)), 8);
        }
        None => {
            line.str("initrd at 0x")
                .hex(addr, 16)
                .str(" size ")
                .dec(size)
                .str(" is not RAM in the memory map");
        }
    }
    crate::serial::line(line.as_bytes());
}

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// IEEE 802.3 CRC-32 (reflected, init and final xor 0xffffffff).
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        let i = usize::from((c as u8) ^ b);
        CRC_TABLE.get(i).copied().unwrap_or(0) ^ (c >> 8)
    })
}
