//! Putting PCI into a VM: [`PciPlatform`] collects the virtio-pci functions while the
//! devices are created, then installs the root complex on the buses.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::acpi::PciHostLayout;
use super::root::SharedFunction;
use super::{
    BarAllocator, MsiRouter, PciBarWindow, PciConfigIo, PciConfigMmio, PciError, PciInterrupts,
    PciRoot, VirtioPciFunction, ECAM_BASE, ECAM_SIZE,
};
use crate::devices::bus::{Bus, BusError};
use crate::devices::MmioDevice;
use crate::memory::GuestMemory;
use crate::virtio::VirtioMmioTransport;
use crate::vm::Vm;

/// The root complex being built.
#[derive(Debug)]
pub struct PciPlatform {
    root: PciRoot,
    bars: BarAllocator,
    router: Arc<MsiRouter>,
}

/// The root complex once on the MMIO bus: what the port bus and ACPI still need.
#[derive(Debug)]
pub struct InstalledPci {
    /// Configuration mechanism #1, for the port bus at [`super::CONFIG_IO_PORT`].
    pub config_io: Arc<Mutex<PciConfigIo>>,
    /// The windows, for the DSDT.
    pub layout: PciHostLayout,
}

fn ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

impl PciPlatform {
    /// A bus with only the host bridge, for `vm`.
    pub fn new(vm: &Vm) -> Result<Self, PciError> {
        Ok(PciPlatform {
            root: PciRoot::new(),
            bars: BarAllocator::new(ram_end(vm.memory()))?,
            router: Arc::new(MsiRouter::new(vm.fd().clone())),
        })
    }

    /// Puts `transport` on the bus as a virtio-pci function; returns its slot and
    /// interrupts (whose event handler the caller adds to the event loop).
    pub fn add_virtio(
        &mut self,
        transport: Arc<Mutex<VirtioMmioTransport>>,
    ) -> Result<(usize, Arc<PciInterrupts>), PciError> {
        if self.root.next_slot().is_none() {
            return Err(super::root::RootError::BusFull.into());
        }
        let (function, interrupts) =
            VirtioPciFunction::new(transport, &mut self.bars, self.router.clone())?;
        let shared: SharedFunction = Arc::new(Mutex::new(function));
        let slot = self.root.add(shared)?;
        Ok((slot, interrupts))
    }

    /// Puts ECAM and both BAR windows on `mmio`.
    pub fn install(self, mmio: &mut Bus<dyn MmioDevice>) -> Result<InstalledPci, BusError> {
        let layout = PciHostLayout {
            window32: self.bars.window32(),
            window64: self.bars.window64(),
        };
        let root = Arc::new(self.root);
        let ecam: Arc<Mutex<dyn MmioDevice>> =
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone())));
        mmio.insert(ECAM_BASE, ECAM_SIZE, ecam)?;
        for (base, size) in [layout.window32, layout.window64] {
            let window: Arc<Mutex<dyn MmioDevice>> =
                Arc::new(Mutex::new(PciBarWindow::new(root.clone(), base)));
            mmio.insert(base, size, window)?;
        }
        Ok(InstalledPci {
            config_io: Arc::new(Mutex::new(PciConfigIo::new(root))),
            layout,
        })
    }
}
