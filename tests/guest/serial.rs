//! Output on the 16550 UART at 0x3f8, polled (THRE before each byte).

use crate::arch::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 0x20;

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
    write(b"testguest: ");
    write(msg);
    write_byte(b'\n');
}
