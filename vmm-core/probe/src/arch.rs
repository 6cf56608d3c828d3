//! The few x86 instructions the probe uses at CPL3.
//!
//! The start code runs the probe with RFLAGS.IOPL = 3, so `out` is legal at CPL3;
//! `rdtsc` is unprivileged while CR4.TSD is clear (docs/platform.md).
//! (`cpuid` is not used at CPL3: under PVM it bypasses the core's CPUID table; the
//! start code reads the one leaf the probe needs at CPL0.)
//! On the host (unit tests) these are never called.

use core::arch::asm;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory; in the guest IOPL = 3 permits it at CPL3, and
    // the only ports used are the serial and exit ports of docs/platform.md.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only reads the TSC into edx:eax.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`; used for the PCI configuration ports 0xCF8/0xCFC.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` touches no memory; IOPL = 3 permits it at CPL3 (PCI CONFIG_DATA).
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}
