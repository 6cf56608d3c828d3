//! The probe guest binary: start-up assembly, panic handler, and the jump into
//! [`plexvm_probe::run`] at CPL3. Loaded by the core like a 64-bit Linux kernel
//! (docs/platform.md); linked at 1 MiB by `probe.ld`.

#![no_std]
#![no_main]

mod mem;
mod start;

use plexvm_probe::console::{exit, ExitCode};
use plexvm_probe::serial_println;

extern "C" {
    /// First byte after the image and its stack (`probe.ld`).
    static _end: u8;
}

/// Called by the start code at CPL3 with the zero page address the core passed and
/// the TSC frequency it read at CPL0 (0 = unknown).
#[no_mangle]
extern "C" fn probe_main(boot_params: u64, tsc_khz: u64) -> ! {
    let image_end = core::ptr::addr_of!(_end) as u64;
    plexvm_probe::run(boot_params, image_end, tsc_khz)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    serial_println!("probe: panic: {info}");
    exit(ExitCode::Panic)
}
