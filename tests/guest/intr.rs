//! Interrupts: IDT with stubs that save every GPR, the LAPIC (enable, EOI),
//! IOAPIC redirection entries, the 8259 PIC masked, and the PIT as the
//! heartbeat timer. Handlers only count and record; the main loop acts.
//! APs share the IDT and take only their LAPIC timer (`smp.rs`).

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::arch;

const LAPIC: usize = 0xfee0_0000;
const LAPIC_TPR: usize = LAPIC + 0x80;
const LAPIC_EOI: usize = LAPIC + 0xb0;
const LAPIC_SVR: usize = LAPIC + 0xf0;
const IOAPIC_SELECT: usize = 0xfec0_0000;
const IOAPIC_WINDOW: usize = 0xfec0_0010;

/// Vectors with stubs: 0x20..0x40 (see the asm below) plus the spurious one.
const STUB_FIRST: u8 = 0x20;
const STUB_COUNT: u8 = 32;
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The PIT's GSI 0 reaches IOAPIC pin 0 with KVM's default routing (our
/// vmm) and pin 2 on QEMU; both pins are programmed with their own vector
/// and the first that fires masks the other.
const TIMER_VECTOR_PIN0: u8 = 0x20;
const TIMER_VECTOR_PIN2: u8 = 0x22;
/// virtio-mmio device i interrupts on DEVICE_VECTOR_BASE + i.
pub const DEVICE_VECTOR_BASE: u8 = 0x30;
pub const MAX_DEVICE_VECTORS: u8 = 16;

const PIT_HZ: u64 = 1_193_182;

/// Timer interrupts delivered since the PIT was started.
pub static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
/// Bit i set: device vector DEVICE_VECTOR_BASE + i fired since last taken.
pub static DEVICE_PENDING: AtomicU32 = AtomicU32::new(0);
/// Device interrupts taken (diagnostics).
pub static DEVICE_IRQS: AtomicU64 = AtomicU64::new(0);
/// virtio-mmio base of device slot i (0: none); the handler acknowledges
/// the device's InterruptStatus there before EOI.
static DEVICE_MMIO: [AtomicUsize; MAX_DEVICE_VECTORS as usize] =
    [const { AtomicUsize::new(0) }; MAX_DEVICE_VECTORS as usize];
/// IOAPIC pin of the timer once known (0xff: not yet).
static TIMER_PIN: AtomicU32 = AtomicU32::new(0xff);

core::arch::global_asm!(
    r#"
    .section .text
    .balign 16
    .global guest_irq_stubs
guest_irq_stubs:
    .set stub_vector, 0x20
    .rept 32
    .balign 16
    .byte 0x6a, stub_vector
    jmp guest_irq_common
    .set stub_vector, stub_vector + 1
    .endr

    .balign 16
    .global guest_irq_spurious
guest_irq_spurious:
    iretq

guest_irq_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, [rsp + 120]
    mov rbp, rsp
    and rsp, -16
    cld
    call guest_irq_dispatch
    mov rsp, rbp
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 8
    iretq
"#
);

unsafe extern "C" {
    static guest_irq_stubs: u8;
    static guest_irq_spurious: u8;
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

struct IdtCell(core::cell::UnsafeCell<Idt>);
// SAFETY: written once by the BSP before interrupts are enabled and before
// any AP starts; read-only afterwards (APs only load its address).
unsafe impl Sync for IdtCell {}
static IDT: IdtCell = IdtCell(core::cell::UnsafeCell::new(Idt([0; 512])));

fn set_gate(idt: &mut Idt, vector: u8, handler: u64) {
    let lo = (handler & 0xffff)
        | (0x08 << 16) // kernel code selector
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | ((handler >> 16) & 0xffff) << 48;
    let hi = handler >> 32;
    let i = usize::from(vector) * 2;
    if let Some(s) = idt.0.get_mut(i..i + 2) {
        s.copy_from_slice(&[lo, hi]);
    }
}

/// Installs the IDT, masks the 8259s, enables the LAPIC. Interrupts stay off.
pub fn init() {
    {
        // SAFETY: the BSP alone, interrupts off, before any AP runs: no
        // other reference to IDT exists.
        let idt = unsafe { &mut *IDT.0.get() };
        let stubs = &raw const guest_irq_stubs as u64;
        for k in 0..STUB_COUNT {
            set_gate(idt, STUB_FIRST + k, stubs + u64::from(k) * 16);
        }
        set_gate(idt, SPURIOUS_VECTOR, &raw const guest_irq_spurious as u64);
    }
    load_idt();

    // KVM wires the PIC to LINT0 as ExtINT: mask it before any sti.
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    lapic_enable();
}

/// An AP's share of [`init`]: the BSP's IDT (complete before any AP
/// starts) and its own LAPIC.
pub fn init_ap() {
    load_idt();
    lapic_enable();
}

fn lapic_enable() {
    arch::mmio_write32(LAPIC_TPR, 0);
    arch::mmio_write32(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}

fn load_idt() {
    let ptr: [u16; 5] = {
        let base = IDT.0.get() as u64;
        [
            (512 * 8 - 1) as u16,
            base as u16,
            (base >> 16) as u16,
            (base >> 32) as u16,
            (base >> 48) as u16,
        ]
    };
    // SAFETY: the IDT is static and its gates point at the stubs above.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(nostack, readonly)) };
}

/// Routes IOAPIC `pin` to `vector` on the boot CPU: fixed, physical,
/// active high, edge (virtio-mmio and the PIT both raise edges we ack).
pub fn ioapic_route(pin: u32, vector: u8) {
    ioapic_write(0x11 + 2 * pin, 0);
    ioapic_write(0x10 + 2 * pin, u32::from(vector));
}

fn ioapic_mask(pin: u32) {
    ioapic_write(0x10 + 2 * pin, 1 << 16);
}

fn ioapic_write(reg: u32, value: u32) {
    arch::mmio_write32(IOAPIC_SELECT, reg);
    arch::mmio_write32(IOAPIC_WINDOW, value);
}

/// Starts the PIT (channel 0, rate generator) with `period_ms` (1..=54).
pub fn start_pit(period_ms: u32) {
    let reload = (PIT_HZ * u64::from(period_ms.clamp(1, 54)) / 1000).clamp(1, 0xffff) as u16;
    ioapic_route(0, TIMER_VECTOR_PIN0);
    ioapic_route(2, TIMER_VECTOR_PIN2);
    arch::outb(0x43, 0x34);
    arch::outb(0x40, reload as u8);
    arch::outb(0x40, (reload >> 8) as u8);
}

/// Routes IOAPIC `pin` to device slot `slot`'s vector; its handler will
/// acknowledge the virtio-mmio device at `base`.
pub fn register_virtio_mmio(slot: u8, base: usize, pin: u32) {
    if let Some(b) = DEVICE_MMIO.get(usize::from(slot)) {
        b.store(base, Ordering::Release);
        ioapic_route(pin, DEVICE_VECTOR_BASE + slot);
    }
}

/// Takes the set of device slots that interrupted since the last call.
pub fn take_device_pending() -> u32 {
    DEVICE_PENDING.swap(0, Ordering::AcqRel)
}

#[unsafe(no_mangle)]
extern "C" fn guest_irq_dispatch(vector: u64) {
    match vector as u8 {
        v @ (TIMER_VECTOR_PIN0 | TIMER_VECTOR_PIN2) => {
            let pin = u32::from(v - TIMER_VECTOR_PIN0);
            if TIMER_PIN.load(Ordering::Relaxed) == 0xff {
                TIMER_PIN.store(pin, Ordering::Relaxed);
                ioapic_mask(2 - pin);
            }
            TIMER_IRQS.fetch_add(1, Ordering::AcqRel);
            crate::smp::on_pit_irq();
        }
        crate::smp::TICK_VECTOR => crate::smp::on_tick(),
        v if (DEVICE_VECTOR_BASE..DEVICE_VECTOR_BASE + MAX_DEVICE_VECTORS).contains(&v) => {
            let slot = v - DEVICE_VECTOR_BASE;
            let base = DEVICE_MMIO
                .get(usize::from(slot))
                .map_or(0, |b| b.load(Ordering::Acquire));
            if base != 0 {
                // Acknowledge (used-buffer and config bits alike; acking a
                // clear bit is harmless, and skipping the InterruptStatus
                // read saves an exit) before the main loop looks at the
                // rings, so anything the device adds later raises a new edge.
                arch::mmio_write32(base + 0x64, 0x3);
            }
            DEVICE_PENDING.fetch_or(1 << slot, Ordering::AcqRel);
            DEVICE_IRQS.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    arch::mmio_write32(LAPIC_EOI, 0);
}
