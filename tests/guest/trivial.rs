//! The smallest PVH guest: its 32-bit entry writes one byte to the serial
//! port, builds identity page tables (2 MiB pages), enters long mode, prints a
//! line and powers off through the debug-exit port 0x501. It measures VMM
//! start-up (bench_boot) and proves the PVH entry path. Everything is
//! assembly: no SSE, no exceptions, no stack needed.
#![no_std]
#![no_main]

use core::arch::global_asm;

global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4                     /* name size */
    .long 4                     /* desc size */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .p2align 2

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    mov dx, 0x3f8
    mov al, 0x54                /* 'T': the first serial byte */
    out dx, al
    mov eax, offset pdpt
    or eax, 3
    mov dword ptr [pml4], eax
    mov eax, offset pd
    or eax, 3
    mov dword ptr [pdpt], eax
    xor ecx, ecx
.Lfill:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83                /* present, writable, 2 MiB page */
    mov dword ptr [pd + ecx*8], eax
    mov dword ptr [pd + ecx*8 + 4], 0
    inc ecx
    cmp ecx, 512
    jb .Lfill
    mov eax, offset pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                /* PAE */
    mov cr4, eax
    mov ecx, 0xC0000080         /* EFER */
    rdmsr
    or eax, 0x100               /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001          /* PG | PE */
    mov cr0, eax
    lgdt [gdt_ptr]
    .byte 0xea                  /* ljmp 0x08:long_entry */
    .long long_entry
    .word 0x08

    .code64
long_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rsi, [rip + message]
    mov dx, 0x3f8
.Lprint:
    mov al, byte ptr [rsi]
    test al, al
    jz .Ldone
    out dx, al
    inc rsi
    jmp .Lprint
.Ldone:
    mov dx, 0x501
    xor al, al
    out dx, al
.Lhalt:
    hlt
    jmp .Lhalt

    .section .rodata.boot, "a"
    .p2align 3
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
gdt_ptr:
    .word 23
    .long gdt
message:
    .asciz "rivial: long mode\n"

    .section .bss.boot, "aw", @nobits
    .p2align 12
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
"#
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
