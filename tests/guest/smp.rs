//! Application processors: started with INIT-SIPI-SIPI through the xAPIC's
//! ICR into a real-mode trampoline copied to 0x8000 (SIPI vector 0x08),
//! which goes to protected mode, then long mode on the BSP's page tables,
//! claims a stack of its own and enters `ap_rust_entry`. An AP says
//! `testguest: cpu <apic id> up`, then idles in `sti; hlt`, counting the
//! ticks of its LAPIC timer (periodic, one per heartbeat tick, its rate
//! calibrated once against the PIT by the BSP).
//!
//! Only the BSP starts APs, one at a time (at boot, or later on a UDP 5004
//! request for an AP held back with `testguest.hold_ap`).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::arch;
use crate::firmware::{Cpus, MAX_CPUS};
use crate::phys::{read32, read64};
use crate::text::TextBuf;

const TRAMPOLINE: u64 = 0x8000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;
/// The APs' LAPIC timer vector (a stub in intr.rs; 0x30.. are devices).
pub const TICK_VECTOR: u8 = 0x28;
const AP_STACK_SIZE: usize = 8192;
/// The highest APIC id the xAPIC ICR can address.
const XAPIC_MAX_ID: u32 = 0xfe;

const LAPIC: usize = 0xfee0_0000;
const LAPIC_ID: usize = LAPIC + 0x20;
const LAPIC_ICR_LO: usize = LAPIC + 0x300;
const LAPIC_ICR_HI: usize = LAPIC + 0x310;
const LAPIC_LVT_TIMER: usize = LAPIC + 0x320;
const LAPIC_TIMER_INIT: usize = LAPIC + 0x380;
const LAPIC_TIMER_CUR: usize = LAPIC + 0x390;
const LAPIC_TIMER_DIV: usize = LAPIC + 0x3e0;
const ICR_INIT: u32 = 0x4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x4600; // start-up, level assert
const ICR_BUSY: u32 = 1 << 12;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// TDCR encodings of divide by 1, 2, 4, ... 128.
const TIMER_DIVIDERS: [u32; 8] = [
    0b1011, 0b0000, 0b0001, 0b0010, 0b0011, 0b1000, 0b1001, 0b1010,
];

/// Bounded waits, in LAPIC timer counts at divide 1 (1 ns each on KVM,
/// slower on hardware; this host's TSC rate is unusable as a clock). KVM
/// needs no Linux-style 10 ms INIT delay; these only bound how long a CPU
/// that never comes is waited for.
const WAIT_ICR: u32 = 10_000_000;
const WAIT_ALIVE: u32 = 20_000_000;
const WAIT_UP: u32 = 1_000_000_000;
/// Wake-ups (any interrupt) the BSP waits through for the calibration.
const WAIT_CALIBRATION_WAKEUPS: u32 = 10_000;

const NOT_STARTED: u8 = 0;
const HELD: u8 = 1;
const STARTING: u8 = 2;
const UP: u8 = 3;
const FAILED: u8 = 4;

/// The CPUs' APIC ids (index 0: the BSP), published before any AP starts.
static IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static COUNT: AtomicUsize = AtomicUsize::new(1);
static STATE: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(NOT_STARTED) }; MAX_CPUS];
/// Each AP's LAPIC timer ticks (index 0 unused: the BSP's count is the heartbeat's).
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static CPUS_UP: AtomicU32 = AtomicU32::new(1);
/// Whether the trampoline is in place (APs can be started).
static TRAMPOLINE_READY: AtomicU8 = AtomicU8::new(0);

/// The APs' LAPIC timer for one heartbeat tick: initial count and TDCR
/// (count 0: no timer, i.e. no heartbeat).
static TIMER_COUNT: AtomicU32 = AtomicU32::new(0);
static TIMER_DIVIDE: AtomicU32 = AtomicU32::new(0);
/// Calibration against the PIT, driven by the BSP's PIT interrupts.
static CAL_STATE: AtomicU8 = AtomicU8::new(CAL_OFF);
static CAL_COUNTS: AtomicU32 = AtomicU32::new(0);
const CAL_OFF: u8 = 0;
const CAL_ARMED: u8 = 1;
const CAL_COUNTING: u8 = 2;
const CAL_DONE: u8 = 3;

/// Next free AP stack (claimed with `lock xadd` by the trampoline, so an AP
/// that turns up late cannot share a stack with the next one).
#[unsafe(no_mangle)]
static AP_SLOT_NEXT: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(16))]
struct ApStacks(UnsafeCell<[u8; AP_STACK_SIZE * MAX_CPUS]>);
// SAFETY: Rust never touches it; each AP uses the slice its slot names.
unsafe impl Sync for ApStacks {}
#[unsafe(no_mangle)]
static AP_STACKS: ApStacks = ApStacks(UnsafeCell::new([0; AP_STACK_SIZE * MAX_CPUS]));

core::arch::global_asm!(
    r#"
    .section .text.ap_trampoline, "ax"
    .balign 16
    .global ap_trampoline_start
    .code16
ap_trampoline_start:
    # Data first, at fixed offsets (a memory operand cannot name two
    # symbols): the GDT at 8, its pointer at 40, the alive byte at 46.
    .byte 0xeb, 46
    .balign 8
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
    .word 31
    .long 0x8008
    .global ap_tramp_alive
ap_tramp_alive:
    .byte 0
    .balign 16
    cli
    xor ax, ax
    mov ds, ax
    mov byte ptr [0x8000 + 46], 1
    lgdt [0x8000 + 40]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    .byte 0x66, 0xea
    .long 0x8000 + ap_tramp_32 - ap_trampoline_start
    .word 0x18

    .code32
ap_tramp_32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset pml4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0x9fffffff
    or eax, 0x80000001
    mov cr0, eax
    .byte 0xea
    .long ap_long_entry
    .word 0x08

    .balign 16
    .global ap_trampoline_end
ap_trampoline_end:

    .section .text, "ax"
    .code64
ap_long_entry:
    lgdt [rip + gdt_ptr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, 1
    lock xadd dword ptr [rip + AP_SLOT_NEXT], eax
    cmp eax, {max_cpus}
    jae 2f
    lea ecx, [eax + 1]
    shl rcx, {stack_shift}
    lea rsp, [rip + AP_STACKS]
    add rsp, rcx
    mov edi, eax
    call ap_rust_entry
2:
    hlt
    jmp 2b
"#,
    max_cpus = const MAX_CPUS,
    stack_shift = const AP_STACK_SIZE.trailing_zeros(),
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_tramp_alive: u8;
}

/// Where the AP's "alive" byte lives in the copy at TRAMPOLINE.
fn alive_flag() -> *mut u8 {
    let off = &raw const ap_tramp_alive as usize - &raw const ap_trampoline_start as usize;
    (TRAMPOLINE as usize + off) as *mut u8
}

fn trampoline_len() -> u64 {
    (&raw const ap_trampoline_end as usize - &raw const ap_trampoline_start as usize) as u64
}

pub fn lapic_id() -> u32 {
    arch::mmio_read32(LAPIC_ID) >> 24
}

fn index_of(id: u32) -> Option<usize> {
    let n = COUNT.load(Ordering::Acquire);
    IDS.get(..n)?
        .iter()
        .position(|i| i.load(Ordering::Relaxed) == id)
}

/// CPUs the tables list (BSP included).
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire)
}

/// CPUs running (BSP included).
pub fn up() -> u32 {
    CPUS_UP.load(Ordering::Acquire)
}

/// AP `i`'s LAPIC timer ticks.
pub fn ticks(i: usize) -> u64 {
    TICKS.get(i).map_or(0, |t| t.load(Ordering::Relaxed))
}

/// Publishes the CPU table (BSP first). Before any AP runs.
pub fn init(cpus: &Cpus) {
    for (slot, &id) in IDS.iter().zip(cpus.ids()) {
        slot.store(id, Ordering::Relaxed);
    }
    if let Some(s) = STATE.first() {
        s.store(UP, Ordering::Relaxed);
    }
    COUNT.store(cpus.n.max(1), Ordering::Release);
}

/// Why the trampoline cannot go to TRAMPOLINE, if it cannot: the memory
/// map must say RAM there, and nothing the loader handed over and the
/// guest still reads may lie there.
fn trampoline_blocked(start_info: u64) -> Option<&'static str> {
    let len = trampoline_len();
    // SAFETY: start_info is the loader's hvm_start_info (or 0).
    if !unsafe { crate::cmdline::ram_covers(start_info, TRAMPOLINE, len) } {
        return Some("no RAM for the trampoline at 0x8000");
    }
    let overlaps = |addr: u64, size: u64| {
        addr != 0 && addr < TRAMPOLINE + len && addr.saturating_add(size) > TRAMPOLINE
    };
    let si = start_info;
    let nr_modules = u64::from(read32(si + 12));
    let busy = overlaps(si, 56)
        || overlaps(read64(si + 24), 4096)
        || overlaps(read64(si + 40), 24 * u64::from(read32(si + 48)))
        || overlaps(read64(si + 16), 32 * nr_modules)
        || crate::initrd::module0(si).is_some_and(|(a, s)| overlaps(a, s));
    busy.then_some("boot data at 0x8000, no room for the trampoline")
}

/// Starts every AP the tables list, except the held ones. The caller
/// printed the table line; this prints a line per AP that does not come up.
pub fn start_all(start_info: u64, held: &dyn Fn(u32) -> bool) {
    let n = count();
    if n <= 1 {
        return;
    }
    if let Some(why) = trampoline_blocked(start_info) {
        let mut line = TextBuf::<96>::new();
        line.str("APs not started: ").str(why);
        crate::serial::line(line.as_bytes());
        return;
    }
    let src = &raw const ap_trampoline_start;
    for i in 0..trampoline_len() as usize {
        // SAFETY: both ranges are valid: the trampoline's bytes in our
        // image, and RAM at TRAMPOLINE that nothing else uses (checked).
        unsafe { core::ptr::write_volatile((TRAMPOLINE as usize + i) as *mut u8, *src.add(i)) };
    }
    TRAMPOLINE_READY.store(1, Ordering::Release);
    for i in 1..n {
        let id = IDS.get(i).map_or(0, |x| x.load(Ordering::Relaxed));
        let mut line = TextBuf::<64>::new();
        line.str("cpu ").dec(u64::from(id));
        if held(id) && id <= XAPIC_MAX_ID {
            if let Some(s) = STATE.get(i) {
                s.store(HELD, Ordering::Release);
            }
            line.str(" held");
            crate::serial::line(line.as_bytes());
            continue;
        }
        if let Err(why) = start_one(i, id) {
            line.str(": ").str(why);
            crate::serial::line(line.as_bytes());
        }
    }
}

/// Starts the AP with APIC id `id` that `testguest.hold_ap` held back.
pub fn start_held(id: u32) -> Result<(), &'static str> {
    let i = index_of(id).filter(|&i| i > 0).ok_or("no such ap")?;
    match STATE.get(i).map(|s| s.load(Ordering::Acquire)) {
        Some(HELD) => start_one(i, id),
        Some(UP) => Err("already up"),
        _ => Err("not held"),
    }
}

/// Polls `done` until it holds or the BSP's LAPIC timer, armed one-shot
/// and masked with `counts`, runs out. Only the BSP waits, and only after
/// the calibration, so the timer is free.
fn wait_until(counts: u32, done: impl Fn() -> bool) -> bool {
    arch::mmio_write32(LAPIC_TIMER_DIV, TIMER_DIVIDERS[0]);
    arch::mmio_write32(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TICK_VECTOR));
    arch::mmio_write32(LAPIC_TIMER_INIT, counts);
    let ok = loop {
        if done() {
            break true;
        }
        if arch::mmio_read32(LAPIC_TIMER_CUR) == 0 {
            break done();
        }
        core::hint::spin_loop();
    };
    arch::mmio_write32(LAPIC_TIMER_INIT, 0);
    ok
}

fn send_ipi(id: u32, low: u32) {
    arch::mmio_write32(LAPIC_ICR_HI, id << 24);
    arch::mmio_write32(LAPIC_ICR_LO, low);
    wait_until(WAIT_ALIVE, || {
        arch::mmio_read32(LAPIC_ICR_LO) & ICR_BUSY == 0
    });
}

/// INIT, SIPI, and a second SIPI only if the AP is not alive yet; then
/// waits for it to reach Rust.
fn start_one(i: usize, id: u32) -> Result<(), &'static str> {
    if id > XAPIC_MAX_ID {
        return Err("x2APIC id, the xAPIC cannot start it");
    }
    if TRAMPOLINE_READY.load(Ordering::Acquire) == 0 {
        return Err("no trampoline");
    }
    let state = STATE.get(i).ok_or("no such ap")?;
    state.store(STARTING, Ordering::Release);
    let alive = alive_flag();
    // SAFETY: the flag is a byte of our trampoline copy in RAM.
    unsafe { core::ptr::write_volatile(alive, 0) };
    // SAFETY: as above.
    let is_alive = || unsafe { core::ptr::read_volatile(alive) } != 0;
    send_ipi(id, ICR_INIT);
    send_ipi(id, ICR_STARTUP | SIPI_VECTOR);
    if !wait_until(WAIT_ALIVE, is_alive) {
        send_ipi(id, ICR_STARTUP | SIPI_VECTOR);
    }
    if wait_until(WAIT_UP, || state.load(Ordering::Acquire) == UP) {
        Ok(())
    } else {
        state.store(FAILED, Ordering::Release);
        Err(if is_alive() {
            "started but did not reach long mode"
        } else {
            "did not answer INIT-SIPI-SIPI"
        })
    }
}

#[unsafe(no_mangle)]
extern "C" fn ap_rust_entry(_slot: u32) -> ! {
    crate::intr::init_ap();
    let id = lapic_id();
    let Some(i) = index_of(id) else {
        // Not a CPU the tables list: stay out of the way.
        loop {
            arch::sti_hlt();
        }
    };
    let mut line = TextBuf::<32>::new();
    line.str("cpu ").dec(u64::from(id)).str(" up");
    crate::serial::line(line.as_bytes());
    let count = TIMER_COUNT.load(Ordering::Acquire);
    if count != 0 {
        arch::mmio_write32(LAPIC_TIMER_DIV, TIMER_DIVIDE.load(Ordering::Relaxed));
        arch::mmio_write32(LAPIC_LVT_TIMER, LVT_PERIODIC | u32::from(TICK_VECTOR));
        arch::mmio_write32(LAPIC_TIMER_INIT, count);
    }
    CPUS_UP.fetch_add(1, Ordering::AcqRel);
    if let Some(s) = STATE.get(i) {
        s.store(UP, Ordering::Release);
    }
    loop {
        arch::sti_hlt();
    }
}

/// The LAPIC timer interrupt (TICK_VECTOR) on an AP.
pub fn on_tick() {
    if let Some(t) = index_of(lapic_id()).and_then(|i| TICKS.get(i)) {
        t.fetch_add(1, Ordering::Relaxed);
    }
}

/// Measures the LAPIC timer against the next two PIT interrupts (on the BSP).
pub fn calibrate_start() {
    CAL_STATE.store(CAL_ARMED, Ordering::Release);
}

/// The PIT interrupt on the BSP: the calibration's two edges.
pub fn on_pit_irq() {
    match CAL_STATE.load(Ordering::Acquire) {
        CAL_ARMED => {
            arch::mmio_write32(LAPIC_TIMER_DIV, TIMER_DIVIDERS[0]);
            arch::mmio_write32(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TICK_VECTOR));
            arch::mmio_write32(LAPIC_TIMER_INIT, u32::MAX);
            CAL_STATE.store(CAL_COUNTING, Ordering::Release);
        }
        CAL_COUNTING => {
            let left = arch::mmio_read32(LAPIC_TIMER_CUR);
            arch::mmio_write32(LAPIC_TIMER_INIT, 0);
            CAL_COUNTS.store(u32::MAX - left, Ordering::Release);
            CAL_STATE.store(CAL_DONE, Ordering::Release);
        }
        _ => {}
    }
}

/// Waits (interrupts on) for the calibration, then sets the APs' timer to
/// `pit_irqs` PIT periods. False if the PIT never gave two edges.
pub fn calibrate_finish(pit_irqs: u64) -> bool {
    let mut done = false;
    for _ in 0..WAIT_CALIBRATION_WAKEUPS {
        arch::cli();
        done = CAL_STATE.load(Ordering::Acquire) == CAL_DONE;
        if done {
            arch::sti();
            break;
        }
        arch::sti_hlt();
    }
    let total = u64::from(CAL_COUNTS.load(Ordering::Acquire)).saturating_mul(pit_irqs);
    if !done || total == 0 {
        return false;
    }
    let shift = (0..TIMER_DIVIDERS.len())
        .find(|&s| total >> s <= u64::from(u32::MAX))
        .unwrap_or(TIMER_DIVIDERS.len() - 1);
    let count = u32::try_from(total >> shift).unwrap_or(u32::MAX).max(1);
    TIMER_DIVIDE.store(
        TIMER_DIVIDERS.get(shift).copied().unwrap_or(0b1010),
        Ordering::Relaxed,
    );
    TIMER_COUNT.store(count, Ordering::Release);
    true
}
