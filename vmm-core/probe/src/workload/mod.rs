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
use crate::virtio::pci::{scan as scan_pci, PciFunction, PciTransport};
use crate::virtio::transport::Transport;

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
fn open_window(env: &Env, device: &MmioDevice) -> Option<(Transport, u32)> {
    let Some(transport) = transport_for(env, device) else {
        serial_println!(
            "probe: ignoring virtio-mmio window {:#x}+{:#x}: not a plausible MMIO address",
            device.base,
            device.size
        );
        return None;
    };
    match transport.device_id() {
        Ok(id) => {
            serial_println!(
                "probe: virtio-mmio {:#x} irq {}: device id {id}",
                device.base,
                device.irq
            );
            Some((Transport::Mmio(transport), id))
        }
        Err(error) => {
            serial_println!("probe: virtio-mmio {:#x}: {error}", device.base);
            None
        }
    }
}

/// A device the probe may drive: a virtio-mmio window from the command line or a
/// virtio-pci function found on bus 0.
#[derive(Debug, Clone, Copy)]
enum DeviceRef {
    Mmio(MmioDevice),
    Pci(PciFunction),
}

/// Most virtio-pci functions the probe looks at (bus 0 has 31 device slots).
const MAX_PCI: usize = 32;

/// The command line's virtio-mmio devices, then the virtio-pci functions in slot order.
/// The PCI bus is scanned only when the command line does not say `pci=off`.
fn device_refs(env: &Env) -> impl Iterator<Item = DeviceRef> + '_ {
    let mut pci = [None; MAX_PCI];
    let n = if env.config.pci_off {
        0
    } else {
        scan_pci(&mut pci)
    };
    env.config
        .devices()
        .map(DeviceRef::Mmio)
        .chain(pci.into_iter().take(n).flatten().map(DeviceRef::Pci))
}

/// Opens `device`: its transport and DeviceID.
fn open_device(env: &Env, device: DeviceRef) -> Option<(Transport, u32)> {
    match device {
        DeviceRef::Mmio(d) => open_window(env, &d),
        DeviceRef::Pci(f) => {
            let Some(t) = PciTransport::open(f) else {
                serial_println!(
                    "probe: virtio-pci 00:{:02x}.0: unusable BAR 0 or capabilities",
                    f.slot
                );
                return None;
            };
            serial_println!(
                "probe: virtio-pci 00:{:02x}.0: device id {}",
                f.slot,
                f.device_id
            );
            Some((Transport::Pci(t), f.device_id))
        }
    }
}

/// Opens the first block device.
pub fn open_block_device(env: &mut Env) -> Option<BlkDevice> {
    open_block_device_with(env, 0)
}

/// Opens the first block device, also accepting the optional feature bits `extra`
/// where the device offers them.
pub fn open_block_device_with(env: &mut Env, extra: u64) -> Option<BlkDevice> {
    let refs: heapless_refs::Refs = heapless_refs::collect(device_refs(env));
    for device in refs.iter() {
        let Some((transport, id)) = open_device(env, device) else {
            continue;
        };
        if id != DEVICE_ID_BLOCK {
            continue;
        }
        match BlkDevice::open_with(transport, &mut env.alloc, env.clock, extra) {
            Ok(blk) => {
                serial_println!(
                    "probe: block device: {} sectors, queue size {}, features {:#x}",
                    blk.capacity(),
                    blk.queue_size(),
                    blk.features()
                );
                return Some(blk);
            }
            Err(error) => serial_println!("probe: block device: {}", Chain(&error)),
        }
    }
    serial_println!("probe: error: no usable virtio block device");
    None
}

/// The transport of the first device with DeviceID `id`. Called once per run: the
/// transport owns the window.
pub fn find_transport(env: &Env, id: u32) -> Option<Transport> {
    let refs: heapless_refs::Refs = heapless_refs::collect(device_refs(env));
    let found = refs
        .iter()
        .filter_map(|d| open_device(env, d))
        .find(|(_, found)| *found == id)
        .map(|(t, _)| t);
    found
}

/// A fixed-size list of device references (the probe has no heap).
mod heapless_refs {
    use super::{DeviceRef, MAX_PCI};
    use crate::cmdline::MAX_DEVICES;

    /// Up to all mmio plus all PCI devices.
    pub struct Refs {
        items: [Option<DeviceRef>; MAX_DEVICES + MAX_PCI],
    }

    impl Refs {
        /// The references in order.
        pub fn iter(&self) -> impl Iterator<Item = DeviceRef> + '_ {
            self.items.iter().flatten().copied()
        }
    }

    /// Collects `it` (the excess is dropped: it cannot exceed the capacity).
    pub fn collect(it: impl Iterator<Item = DeviceRef>) -> Refs {
        let mut items = [None; MAX_DEVICES + MAX_PCI];
        for (slot, d) in items.iter_mut().zip(it) {
            *slot = Some(d);
        }
        Refs { items }
    }
}
