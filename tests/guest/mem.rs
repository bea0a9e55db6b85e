//! The C memory functions LLVM emits calls to. The host target's
//! compiler_builtins does not provide them (libc would), and -nostdlib links
//! no libc.
//!
//! Plain loops, not `rep movsb`/`rep stosb`: on this host's nested KVM a
//! string instruction interrupted by a host interrupt is finished by the
//! instruction emulator, so a guest copying a lot stalls for seconds. The
//! volatile accesses keep LLVM from turning the loops back into calls to
//! these very functions.

use core::ptr::{read_volatile, write_volatile};

/// # Safety
/// C contract: `dst` and `src` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    // SAFETY: every access is below n on the caller's valid ranges; the
    // u64 accesses happen only at 8-byte aligned addresses (dst and src
    // share their alignment there).
    unsafe {
        if (dst as usize) & 7 == (src as usize) & 7 {
            while i < n && (dst as usize + i) & 7 != 0 {
                write_volatile(dst.add(i), read_volatile(src.add(i)));
                i += 1;
            }
            while i + 8 <= n {
                let w = read_volatile(src.add(i) as *const u64);
                write_volatile(dst.add(i) as *mut u64, w);
                i += 8;
            }
        }
        while i < n {
            write_volatile(dst.add(i), read_volatile(src.add(i)));
            i += 1;
        }
    }
    dst
}

/// # Safety
/// C contract: `dst` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    let mut i = n;
    // SAFETY: backwards, byte by byte, within the caller's valid ranges.
    unsafe {
        while i > 0 {
            i -= 1;
            write_volatile(dst.add(i), read_volatile(src.add(i)));
        }
    }
    dst
}

/// # Safety
/// C contract: `dst` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    let b = c as u8;
    let word = u64::from_ne_bytes([b; 8]);
    let mut i = 0;
    // SAFETY: every access is below n on the caller's valid range; u64
    // stores only at 8-byte aligned addresses.
    unsafe {
        while i < n && (dst as usize + i) & 7 != 0 {
            write_volatile(dst.add(i), b);
            i += 1;
        }
        while i + 8 <= n {
            write_volatile(dst.add(i) as *mut u64, word);
            i += 8;
        }
        while i < n {
            write_volatile(dst.add(i), b);
            i += 1;
        }
    }
    dst
}

/// # Safety
/// C contract: `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n on the caller's valid ranges.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Same contract as memcmp.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
