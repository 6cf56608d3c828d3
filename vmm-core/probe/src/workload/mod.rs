//! The workloads (`probe.workload=`). Each is a module with a
//! `run(&mut Env) -> ExitCode`; new ones go beside them.

pub mod blk_abuse;
pub mod blk_bench;
pub mod blk_verify;
pub mod net_echo;
pub mod rng_read;

use crate::cmdline::{Config, MmioDevice, Workload};
use crate::console::{Chain, ExitCode};
use crate::memory::PhysAlloc;
use crate::serial_println;
use crate::time::Clock;
use crate::virtio::blk::{BlkDevice, DEVICE_ID_BLOCK};
use crate::virtio::mmio::MmioTransport;

/// What every workload gets.
#[derive(Debug)]
pub struct Env {
    /// The parsed command line.
    pub config: Config,
    /// TSC clock.
    pub clock: Clock,
    /// Free guest RAM.
    pub alloc: PhysAlloc,
    /// End of the highest e820 RAM entry.
    pub ram_end: u64,
}

/// Runs the configured workload.
pub fn run(env: &mut Env) -> ExitCode {
    serial_println!(
        "probe: workload {} seed {} seconds {}",
        env.config.workload.name(),
        env.config.seed,
        env.config.seconds
    );
    match env.config.workload {
        Workload::BlkVerify => blk_verify::run(env),
        Workload::BlkAbuse => blk_abuse::run(env),
        Workload::BlkBench => blk_bench::run(env),
        Workload::NetEcho => net_echo::run(env),
        Workload::RngRead => rng_read::run(env),
    }
}

/// Lowest address the identity map does not cover.
const MAPPED_END: u64 = 4 << 30;
/// Registers of the version 2 layout plus the first config bytes.
const MIN_WINDOW: u64 = 0x200;

/// A transport for `device`, if its window is somewhere MMIO can be (page aligned,
/// mapped, not RAM): a typo on the command line must not make the probe scribble
/// on its own memory.
fn transport_for(env: &Env, device: &MmioDevice) -> Option<MmioTransport> {
    let end = device.base.checked_add(device.size)?;
    let sane = device.base.is_multiple_of(4096)
        && device.size >= MIN_WINDOW
        && end <= MAPPED_END
        && device.base >= env.ram_end.min(3 << 30);
    // SAFETY: the window is page aligned, inside the identity map, and above all RAM
    // below 4 GiB, so it is MMIO (or unbacked) and no Rust object lives there.
    sane.then(|| unsafe { MmioTransport::new(device.base) })
}

/// The transport of `device` and its DeviceID, or `None` (said on the console) when
/// the window is implausible or does not answer like a virtio-mmio device.
fn open_window(env: &Env, device: &MmioDevice) -> Option<(MmioTransport, u32)> {
    let Some(transport) = transport_for(env, device) else {
        serial_println!(
            "probe: ignoring virtio-mmio window {:#x}+{:#x}: not a plausible MMIO address",
            device.base,
            device.size
        );
        return None;
    };
    match transport.device_id() {
        Ok(id) => Some((transport, id)),
        Err(error) => {
            serial_println!("probe: virtio-mmio {:#x}: {error}", device.base);
            None
        }
    }
}

/// Opens the first block device on the command line.
pub fn open_block_device(env: &mut Env) -> Option<BlkDevice> {
    open_block_device_with(env, 0)
}

/// Opens the first block device on the command line, also accepting the optional
/// feature bits `extra` where the device offers them.
pub fn open_block_device_with(env: &mut Env, extra: u64) -> Option<BlkDevice> {
    let config = env.config.clone();
    for device in config.devices() {
        let Some((transport, id)) = open_window(env, &device) else {
            continue;
        };
        serial_println!(
            "probe: virtio-mmio {:#x} irq {}: device id {id}",
            device.base,
            device.irq
        );
        if id != DEVICE_ID_BLOCK {
            continue;
        }
        match BlkDevice::open_with(transport, &mut env.alloc, env.clock, extra) {
            Ok(blk) => {
                serial_println!(
                    "probe: block device {:#x}: {} sectors, queue size {}, features {:#x}",
                    device.base,
                    blk.capacity(),
                    blk.queue_size(),
                    blk.features()
                );
                return Some(blk);
            }
            Err(error) => {
                serial_println!("probe: block device {:#x}: {}", device.base, Chain(&error))
            }
        }
    }
    serial_println!("probe: error: no usable virtio block device");
    None
}

/// The transport of the first device on the command line with DeviceID `id`. Called
/// once per run: the transport owns the window.
pub fn find_transport(env: &Env, id: u32) -> Option<MmioTransport> {
    for device in env.config.devices() {
        match open_window(env, &device) {
            Some((transport, found)) if found == id => {
                serial_println!(
                    "probe: virtio-mmio {:#x} irq {}: device id {id}",
                    device.base,
                    device.irq
                );
                return Some(transport);
            }
            _ => {}
        }
    }
    None
}
