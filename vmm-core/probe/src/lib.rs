//! plexvm's built-in guest: a tiny `no_std` x86_64 program that the core loads like
//! a 64-bit Linux kernel and that drives virtio-mmio devices from CPL3 by polling.
//!
//! The start-up assembly and the panic handler live in the `plexvm-probe` binary
//! (`main.rs`, `start.rs`); everything else is here so that the parts that do not
//! touch hardware (command line, boot params, PRNG, sector model, virtqueue
//! book-keeping) are unit-tested on the host:
//! `cargo test --manifest-path vmm-core/probe/Cargo.toml --lib`.
//!
//! The guest-visible platform is described in `docs/platform.md`.

#![cfg_attr(not(test), no_std)]

pub mod arch;
pub mod bootparams;
pub mod cmdline;
pub mod console;
pub mod histogram;
pub mod memory;
pub mod netframe;
pub mod pattern;
pub mod rng;
pub mod time;
pub mod virtio;
pub mod workload;

use bootparams::{BootParams, BOOT_PARAMS_SIZE};
use console::{exit, Chain, ExitCode};
use memory::{PhysAlloc, PAGE_SIZE};
use time::Clock;

/// Room the platform reserves for the command line (docs/platform.md).
const CMDLINE_MAX: u64 = 4096;

/// The probe proper, entered at CPL3 by the start code.
///
/// `boot_params` is the zero page address the core passed in RSI; `image_end` is the
/// first byte after the probe image (`_end`); `tsc_khz` is CPUID 0x4000_0010 EAX as
/// the start code read it at CPL0 (0 = unknown).
pub fn run(boot_params: u64, image_end: u64, tsc_khz: u64) -> ! {
    serial_println!("probe: plexvm probe guest started at CPL3");
    // SAFETY: the 64-bit boot protocol passes the 4 KiB zero page in RSI; it is RAM
    // below 1 GiB, identity mapped by the start code, and nothing writes it.
    let raw = unsafe { &*(boot_params as *const [u8; BOOT_PARAMS_SIZE]) };
    let boot = BootParams::new(raw);
    let cmdline = read_cmdline(&boot);
    serial_println!("probe: command line: {cmdline}");
    let config = match cmdline::parse(cmdline) {
        Ok(config) => config,
        Err(error) => {
            serial_println!("probe: error: bad command line: {}", Chain(&error));
            exit(ExitCode::BadCmdline);
        }
    };
    let clock = Clock::with_khz(tsc_khz);
    if clock.assumed() {
        serial_println!("probe: TSC frequency unknown (CPUID 0x40000010 EAX = 0), assuming 1 GHz");
    } else {
        serial_println!("probe: TSC frequency {} kHz", clock.tsc_khz());
    }
    let free = image_end.next_multiple_of(PAGE_SIZE);
    let Some(ram) = boot.ram_containing(free) else {
        serial_println!("probe: error: no e820 RAM after the probe image ({free:#x})");
        exit(ExitCode::DeviceError);
    };
    // SAFETY: [free, ram.end()) is e820 RAM after the probe image and its stack
    // (`_end` is past both); nothing else in the guest uses it, and the start code
    // identity-maps 0..4 GiB (RAM ends at or below 3 GiB under 4 GiB).
    let alloc = unsafe { PhysAlloc::new(free, ram.end().min(4 << 30)) };
    let mut env = workload::Env {
        config,
        clock,
        alloc,
        ram_end: boot.ram_end(),
    };
    exit(workload::run(&mut env))
}

/// The command line at `hdr.cmd_line_ptr`, or exit 3 when it is unusable.
fn read_cmdline(boot: &BootParams<'_>) -> &'static str {
    let ptr = u64::from(boot.cmd_line_ptr());
    if ptr == 0 {
        return "";
    }
    let Some(ram) = boot.ram_containing(ptr) else {
        serial_println!("probe: error: command line at {ptr:#x} is not in RAM");
        exit(ExitCode::BadCmdline);
    };
    let len = CMDLINE_MAX.min(ram.end() - ptr) as usize;
    // SAFETY: [ptr, ptr + len) is e820 RAM below 4 GiB (cmd_line_ptr is 32-bit),
    // identity mapped; the core wrote the command line there and nothing changes it.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len) };
    match bootparams::cmdline_from_bytes(bytes) {
        Ok(text) => text,
        Err(error) => {
            serial_println!("probe: error: bad command line: {error}");
            exit(ExitCode::BadCmdline);
        }
    }
}
