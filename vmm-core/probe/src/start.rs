//! Start-up: entered in long mode at CPL0 with RSI = boot_params (the Linux 64-bit
//! boot protocol, docs/platform.md). Every CPL0 instruction is emulated at about
//! 2 M instructions/s on the nested machines (DESIGN.md), so this does the least
//! possible there: read the TSC frequency (CPUID 0x4000_0010), enable SSE, switch to page tables and a GDT that were built at
//! link time, and `iretq` to CPL3 with IOPL = 3 and interrupts off. There is no IDT
//! and no TSS: nothing ever returns to CPL0, and an exception is a triple fault that
//! the core reports.
//!
//! Page tables: PML4 -> one PDPT -> four PDs of 2 MiB pages identity-mapping
//! 0..4 GiB, with U/S set at every level so CPL3 reaches RAM and the virtio-mmio
//! windows at 0xd000_0000. GDT: 0x08 code64 DPL0, 0x10 data DPL0, 0x18 data DPL3,
//! 0x20 code64 DPL3 (the Linux `__USER_DS`/`__USER_CS` descriptor values).

core::arch::global_asm!(
    r#"
    .section .text.start, "ax"
    .global _start
    .code64
_start:
    mov r12, rsi                     /* boot_params, kept across iretq */
    /* TSC kHz from the hypervisor timing leaf, read here at CPL0: under PVM a
       CPL3 `cpuid` runs natively and returns the outer host's leaves, not the
       table the core set with KVM_SET_CPUID2. */
    xor r13d, r13d
    mov eax, 0x40000000
    cpuid
    cmp eax, 0x40000010
    jb 1f
    mov eax, 0x40000010
    xor ecx, ecx
    cpuid
    mov r13d, eax
1:
    mov rax, cr0
    and rax, ~0x4                    /* CR0.EM = 0 */
    or rax, 0x2                      /* CR0.MP = 1 */
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600                    /* CR4.OSFXSR | CR4.OSXMMEXCPT */
    mov cr4, rax
    lea rax, [rip + boot_pml4]
    mov cr3, rax
    lgdt [rip + boot_gdtr]
    /* iretq frame: SS, RSP, RFLAGS, CS, RIP; selectors with RPL 3. */
    push 0x1b                        /* SS = user data (0x18 | 3) */
    lea rax, [rip + __stack_top]
    push rax                         /* RSP */
    push 0x3002                      /* RFLAGS = IOPL 3 | reserved bit 1, IF = 0 */
    push 0x23                        /* CS = user code (0x20 | 3) */
    lea rax, [rip + probe_user_entry]
    push rax                         /* RIP */
    iretq

    /* CPL3 from here on: native speed. */
probe_user_entry:
    cld
    fninit
    ldmxcsr [rip + boot_mxcsr]
    mov ax, 0x1b
    mov ds, ax
    mov es, ax
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb                        /* zero .bss (the stack is outside it) */
    mov rdi, r12                     /* probe_main(boot_params, tsc_khz) */
    mov rsi, r13
    call {main}
    ud2

    .section .data.boot, "aw"
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x7            /* P | RW | US */
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set boot_pd_addr, 0
    .rept 2048
    .quad boot_pd_addr + 0x87        /* P | RW | US | PS (2 MiB) */
    .set boot_pd_addr, boot_pd_addr + 0x200000
    .endr

    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff         /* 0x08: code64, DPL0 */
    .quad 0x00cf93000000ffff         /* 0x10: data, DPL0 */
    .quad 0x00cff3000000ffff         /* 0x18: data, DPL3 */
    .quad 0x00affb000000ffff         /* 0x20: code64, DPL3 */
boot_gdt_end:
    .balign 8
    .word 0, 0, 0
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
boot_mxcsr:
    .long 0x1f80                     /* power-on default: all SSE exceptions masked */
    "#,
    main = sym crate::probe_main,
);
