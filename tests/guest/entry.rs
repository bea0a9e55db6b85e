//! PVH entry: 32-bit protected mode → long mode with identity-mapped 2 MiB
//! pages over 0..4 GiB (RAM, the MMIO hole, IOAPIC and LAPIC), then Rust.
//!
//! The page tables and GDT are prebuilt data in the ELF, so the entry path
//! writes no memory before paging is on (page-table set-up loops are slow
//! under this host's nested KVM). The first serial byte ('t', the start of
//! the `testguest: start` line) goes out before anything else, for the boot
//! benchmark.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .section .text.entry, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    mov dx, 0x3f8
    mov al, 0x74
    out dx, al
    lgdt [gdt_ptr]
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
    or eax, 0x80000001
    mov cr0, eax
    .byte 0xea
    .long long_mode_entry
    .word 0x08

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + guest_stack_top]
    mov edi, ebx
    call rust_main
3:
    cli
    hlt
    jmp 3b

    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3
    .quad pd + 0x1003
    .quad pd + 0x2003
    .quad pd + 0x3003
    .fill 508, 8, 0
pd:
    .set pde_index, 0
    .rept 2048
    .quad (pde_index << 21) | 0x83
    .set pde_index, pde_index + 1
    .endr

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .bss.stack, "aw", @nobits
    .balign 16
    .skip 65536
guest_stack_top:
"#
);
