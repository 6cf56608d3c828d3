//! The VM's virtio devices: for each `[[device]]`, its backend (spawned or attached),
//! vhost-user frontend and virtio-mmio transport, placed on the MMIO bus and announced on
//! the kernel command line; plus the one event thread that serves them all and the
//! supervisor that restarts, reconnects and swaps their backends.

use std::path::Path;
use std::sync::{Arc, Mutex};

use plexvm_protocol::api::DeviceInfo;
use plexvm_protocol::spec::{BackendSource, DeviceConfig, Transport, VmConfigResolved};

use crate::backend::{self, BackendError};
use crate::devices::bus::{Bus, BusError};
use crate::devices::{MmioDevice, PioDevice};
use crate::pci::acpi::PciHostLayout;
use crate::pci::platform::{InstalledPci, PciPlatform};
use crate::pci::PciError;
use crate::supervisor::{BackendSupervisor, SupervisedDevice, SupervisorError};
use crate::vhost_user::{FrontendError, VhostUserFrontend};
use crate::virtio::{
    self, EventLoop, EventLoopError, TransportError, VirtioMmioTransport, MMIO_WINDOW_SIZE,
};
use crate::vm::Vm;

/// Guest-physical base of the first virtio-mmio window (docs/platform.md).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first device.
pub const FIRST_GSI: u32 = 5;
/// The IOAPIC has 24 pins; GSIs 5..=23 are free for virtio devices.
pub const MAX_DEVICES: usize = 19;

/// Errors setting devices up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// More virtio-mmio devices than interrupt lines.
    #[error("at most {MAX_DEVICES} virtio-mmio devices are supported, the spec has {0}")]
    TooMany(usize),
    /// The PCI bus could not take a device.
    #[error("device {id}: PCI")]
    Pci {
        /// Device id.
        id: String,
        /// Cause.
        #[source]
        source: PciError,
    },
    /// The event thread could not start or take a device.
    #[error("device event loop")]
    EventLoop(#[from] EventLoopError),
    /// The backend could not be started or reached.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The vhost-user bring-up failed.
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    /// The transport could not be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The backend supervisor could not start.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// The MMIO window collides with another device.
    #[error("device {id}: MMIO window")]
    Bus {
        /// Device id.
        id: String,
        /// Cause.
        #[source]
        source: BusError,
    },
}

/// All virtio devices of a VM. Dropping it stops the backends the core spawned and the
/// event thread.
#[derive(Debug)]
pub struct VirtioDevices {
    // Field order is drop order: the supervisor first (so nothing is restarted while the
    // VM ends), then the transports (and their backends), then the event thread.
    supervisor: Option<BackendSupervisor>,
    transports: Vec<Arc<Mutex<VirtioMmioTransport>>>,
    windows: Vec<(u64, u32)>,
    pci: Option<InstalledPci>,
    /// Whether a device is on PCI (then the bus is there).
    pci_devices: bool,
    _events: Option<EventLoop>,
}

impl VirtioDevices {
    /// Starts or attaches every backend (taking those already spawned from `early`),
    /// brings each connection up and creates the transports on `mmio`.
    pub fn create(
        config: &VmConfigResolved,
        vm: &Vm,
        runtime_dir: &Path,
        mmio: &mut Bus<dyn MmioDevice>,
        early: &mut backend::EarlyBackends,
    ) -> Result<VirtioDevices, DeviceSetupError> {
        let mmio_count = config
            .devices
            .iter()
            .filter(|d| d.transport == Transport::Mmio)
            .count();
        if mmio_count > MAX_DEVICES {
            return Err(DeviceSetupError::TooMany(mmio_count));
        }
        if config.devices.is_empty() {
            return Ok(VirtioDevices {
                supervisor: None,
                transports: Vec::new(),
                windows: Vec::new(),
                pci: None,
                pci_devices: false,
                _events: None,
            });
        }
        let events = EventLoop::start()?;
        let mut transports = Vec::with_capacity(config.devices.len());
        let mut windows = Vec::with_capacity(config.devices.len());
        let mut pci = None;
        for dev in &config.devices {
            let (backend, stream) = backend::start(dev, runtime_dir, &config.base_dir, early)?;
            let queues = virtio::DeviceType::of(dev).backend_queues;
            let frontend = VhostUserFrontend::connect(&dev.id, stream, queues)?;
            if dev.transport == Transport::Pci {
                let transport =
                    VirtioMmioTransport::new_unwired(dev, vm.memory().clone(), backend, frontend)?;
                let transport = Arc::new(Mutex::new(transport));
                add_pci(dev, vm, &mut pci, &events, transport.clone())?;
                transports.push(transport);
                continue;
            }
            let i = windows.len();
            let base = MMIO_BASE + MMIO_WINDOW_SIZE * i as u64;
            let gsi = FIRST_GSI + i as u32;
            let transport = VirtioMmioTransport::new(
                dev,
                base,
                gsi,
                vm.fd(),
                vm.memory().clone(),
                backend,
                frontend,
            )?;
            events.add(transport.event_handler()?)?;
            let transport = Arc::new(Mutex::new(transport));
            let on_bus: Arc<Mutex<dyn MmioDevice>> = transport.clone();
            mmio.insert(base, MMIO_WINDOW_SIZE, on_bus)
                .map_err(|source| DeviceSetupError::Bus {
                    id: dev.id.clone(),
                    source,
                })?;
            transports.push(transport);
            windows.push((base, gsi));
        }
        let pci_devices = pci.is_some();
        let pci = match pci {
            Some(platform) => {
                Some(
                    platform
                        .install(mmio)
                        .map_err(|source| DeviceSetupError::Bus {
                            id: "pci".into(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let supervised = transports
            .iter()
            .zip(&config.devices)
            .map(|(t, d)| SupervisedDevice {
                transport: t.clone(),
                config: d.clone(),
            })
            .collect();
        let supervisor = BackendSupervisor::start(
            supervised,
            runtime_dir.to_path_buf(),
            config.base_dir.clone(),
        )?;
        Ok(VirtioDevices {
            supervisor: Some(supervisor),
            transports,
            windows,
            pci,
            pci_devices,
            _events: Some(events),
        })
    }

    /// Whether any device is on PCI.
    pub fn uses_pci(&self) -> bool {
        self.pci_devices
    }

    /// Configuration mechanism #1 (ports 0xCF8..0xCFF), when a device is on PCI.
    pub fn pci_config_io(&self) -> Option<Arc<Mutex<dyn PioDevice>>> {
        self.pci.as_ref().map(|p| {
            let io: Arc<Mutex<dyn PioDevice>> = p.config_io.clone();
            io
        })
    }

    /// The PCI windows the ACPI tables describe, when a device is on PCI.
    pub fn pci_layout(&self) -> Option<&PciHostLayout> {
        self.pci
            .as_ref()
            .filter(|_| self.pci_devices)
            .map(|p| &p.layout)
    }

    /// (MMIO base, GSI) of each device, in guest order.
    pub fn windows(&self) -> &[(u64, u32)] {
        &self.windows
    }

    /// `virtio_mmio.device=` entries for the kernel command line (the Linux format).
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.windows
            .iter()
            .map(|(base, gsi)| format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
            .collect()
    }

    /// What the control API reports per device.
    pub fn info(&self) -> Vec<DeviceInfo> {
        self.transports
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut info = t.lock().unwrap_or_else(|e| e.into_inner()).info();
                if let Some(s) = &self.supervisor {
                    s.health(i).fill(&mut info);
                }
                info
            })
            .collect()
    }

    /// Hands device `id` to the backend `source` (`PUT /devices/{id}/backend`) and
    /// returns the device as it is then.
    pub fn swap_backend(
        &self,
        id: &str,
        source: BackendSource,
    ) -> Result<DeviceInfo, SupervisorError> {
        let supervisor = self
            .supervisor
            .as_ref()
            .ok_or_else(|| SupervisorError::NoDevice(id.to_string()))?;
        supervisor.swap(id, source)?;
        self.info()
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| SupervisorError::NoDevice(id.to_string()))
    }
}

/// Puts `transport` on the PCI bus (created on first use) and its interrupts on the
/// event thread.
fn add_pci(
    dev: &DeviceConfig,
    vm: &Vm,
    pci: &mut Option<PciPlatform>,
    events: &EventLoop,
    transport: Arc<Mutex<VirtioMmioTransport>>,
) -> Result<(), DeviceSetupError> {
    let pci_err = |source| DeviceSetupError::Pci {
        id: dev.id.clone(),
        source,
    };
    let platform = match pci {
        Some(p) => p,
        None => pci.insert(PciPlatform::new(vm).map_err(pci_err)?),
    };
    let (errs, config_irq) = {
        let t = transport.lock().unwrap_or_else(|e| e.into_inner());
        let errs: std::io::Result<Vec<_>> =
            t.err_eventfds().iter().map(|e| e.try_clone()).collect();
        (errs, t.interrupt().irq_eventfd().try_clone())
    };
    let (_, interrupts) = platform.add_virtio(transport).map_err(pci_err)?;
    let handler = errs
        .and_then(|errs| interrupts.event_handler(errs, config_irq?))
        .map_err(|e| pci_err(PciError::EventFd(e)))?;
    events.add(handler)?;
    Ok(())
}
