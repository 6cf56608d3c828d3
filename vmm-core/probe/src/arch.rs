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
