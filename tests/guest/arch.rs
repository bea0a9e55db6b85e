//! Thin wrappers over the x86 instructions the guest needs. None of these
//! can fault on the hosts we run on (port I/O and MMIO exit to the VMM).

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as outb.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 32-bit MMIO register. `addr` must be an identity-mapped device
/// register (below 4 GiB): the caller guarantees this.
pub fn mmio_read32(addr: usize) -> u32 {
    // SAFETY: all of 0..4 GiB is mapped; device registers are not Rust memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: usize, value: u32) {
    // SAFETY: as mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

pub fn mmio_read8(addr: usize) -> u8 {
    // SAFETY: as mmio_read32.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf 1 ECX bit 30 says RDRAND exists.
pub fn has_rdrand() -> bool {
    cpuid(1).2 & (1 << 30) != 0
}

/// One RDRAND attempt; None when the hardware had no entropy ready.
pub fn rdrand() -> Option<u64> {
    let v: u64;
    let ok: u8;
    // SAFETY: only called when CPUID reports RDRAND, so it cannot #UD.
    unsafe {
        asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok, options(nomem, nostack))
    }
    (ok != 0).then_some(v)
}

pub fn cli() {
    // SAFETY: masking interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

pub fn sti() {
    // SAFETY: handlers for every unmasked vector are installed before the first sti.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// `sti; hlt` back to back: the interrupt shadow of sti makes the pair
/// atomic, so a wake-up interrupt arriving after the caller's last check
/// (made with interrupts off) cannot be lost.
pub fn sti_hlt() {
    // SAFETY: as sti; hlt just waits for the next interrupt.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
}

/// Stops the CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, hlt only ends the guest's work.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Ends the vCPU on purpose (`testguest.fault`): an empty IDT, then an
/// invalid opcode. Real hardware cannot deliver the #UD, nor the #DF after
/// it: a triple fault (KVM_EXIT_SHUTDOWN). The nested KVM of the test hosts
/// cannot deliver exceptions at all and reports an emulation failure
/// (KVM_EXIT_INTERNAL_ERROR). Either way the VMM sees a failed vCPU.
pub fn triple_fault() -> ! {
    // limit 0, base 0: every vector is outside the IDT.
    let idtr = [0u16; 5];
    // SAFETY: deliberately ends the guest; nothing runs afterwards.
    unsafe {
        asm!("cli", "lidt [{0}]", "ud2", in(reg) idtr.as_ptr(), options(noreturn, nostack))
    }
}

/// Full memory barrier between our ring writes and the device's view.
pub fn mb() {
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// CPUID leaf `leaf` (subleaf 0): (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid has no memory effects; rbx is saved because LLVM reserves it.
    unsafe {
        asm!("mov {tmp:r}, rbx", "cpuid", "xchg {tmp:r}, rbx",
             tmp = out(reg) b, inout("eax") leaf => a, inout("ecx") 0u32 => c, out("edx") d,
             options(nomem, nostack, preserves_flags))
    }
    (a, b, c, d)
}
