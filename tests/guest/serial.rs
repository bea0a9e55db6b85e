//! Output on the 16550 UART at 0x3f8, polled (THRE before each byte).
//! Whole lines go out under a spinlock, so lines from several CPUs never
//! interleave. Interrupt handlers never print, so a CPU holding the lock
//! cannot be interrupted into waiting for itself.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 0x20;

static LINE_LOCK: AtomicBool = AtomicBool::new(false);

pub fn write_byte(b: u8) {
    while inb(LSR) & LSR_THRE == 0 {}
    outb(COM1, b);
}

pub fn write(bytes: &[u8]) {
    for &b in bytes {
        write_byte(b);
    }
}

/// Prints `testguest: <msg>\n`.
pub fn line(msg: &[u8]) {
    while LINE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    write(b"testguest: ");
    write(msg);
    write_byte(b'\n');
    LINE_LOCK.store(false, Ordering::Release);
}
