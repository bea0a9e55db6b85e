//! `testguest.busy`: between interrupts the vCPU keeps computing and writing
//! RAM instead of halting, as a busy guest does, so a migration meets a
//! vCPU in guest mode and pages being written. The work goes in small
//! chunks with interrupts on, so the network, the ticks and the UDP
//! services answer as before.

use core::ptr::{read_volatile, write_volatile};

/// The region written: 4 MiB from 4 MiB, above the guest's image (which
/// ends near 2.2 MiB) and below the smallest RAM the tests give a guest.
/// [`crate::cmdline::ram_covers`] checks the PVH memory map first.
pub const BASE: u64 = 0x40_0000;
pub const LEN: u64 = 4 << 20;
/// Written per step: ~100 µs of work here, the longest an interrupt's
/// work waits.
const CHUNK: u64 = 64 << 10;

pub struct Busy {
    /// Next chunk's offset in the region.
    offset: u64,
    /// Completed passes over the whole region (the stats reply's `busy=`).
    pub passes: u64,
    /// Running hash of everything read and written (the "computing").
    hash: u64,
}

impl Busy {
    pub fn new(seed: u64) -> Self {
        Busy {
            offset: 0,
            passes: 0,
            hash: seed,
        }
    }

    /// One chunk: each word becomes a hash of the running hash and its old
    /// value.
    pub fn step(&mut self) {
        let mut h = self.hash;
        let mut i = 0;
        while i < CHUNK {
            let p = (BASE + self.offset + i) as *mut u64;
            // SAFETY: the region is RAM (checked against the PVH memory map
            // before the first step), identity-mapped, aligned, and used by
            // nothing else in the guest.
            let old = unsafe { read_volatile(p) };
            h = crate::mix64(h ^ old ^ i);
            // SAFETY: as above.
            unsafe { write_volatile(p, h) };
            i += 8;
        }
        self.hash = h;
        self.offset += CHUNK;
        if self.offset >= LEN {
            self.offset = 0;
            self.passes = self.passes.wrapping_add(1);
        }
    }
}
