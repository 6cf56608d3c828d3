//! The transport a device driver uses: virtio-mmio or virtio-pci, one set of calls.

use super::mmio::{MmioError, MmioTransport, QueueAddresses};
use super::pci::PciTransport;

/// A device's transport.
#[derive(Debug)]
pub enum Transport {
    /// virtio-mmio version 2.
    Mmio(MmioTransport),
    /// virtio-pci modern.
    Pci(PciTransport),
}

macro_rules! both {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            Transport::Mmio($t) => $e,
            Transport::Pci($t) => $e,
        }
    };
}

impl Transport {
    /// Device initialisation up to FEATURES_OK; returns the accepted features.
    pub fn negotiate(&mut self, required: u64, optional: u64) -> Result<u64, MmioError> {
        both!(self, t => t.negotiate(required, optional))
    }
    /// The device status.
    pub fn status(&self) -> u32 {
        both!(self, t => t.status())
    }
    /// Sets FAILED.
    pub fn fail(&mut self) {
        both!(self, t => t.fail())
    }
    /// Largest size of queue `index` (0: unavailable).
    pub fn queue_max(&mut self, index: u16) -> u16 {
        both!(self, t => t.queue_max(index))
    }
    /// Sets up and enables queue `index`.
    pub fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        a: QueueAddresses,
    ) -> Result<(), MmioError> {
        both!(self, t => t.setup_queue(index, size, a))
    }
    /// Sets DRIVER_OK.
    pub fn driver_ok(&mut self) {
        both!(self, t => t.driver_ok())
    }
    /// Notifies queue `index`.
    pub fn notify(&self, index: u16) {
        both!(self, t => t.notify(index))
    }
    /// Interrupt bits (mmio InterruptStatus; pci ISR, which reading clears).
    pub fn interrupt_status(&self) -> u32 {
        both!(self, t => t.interrupt_status())
    }
    /// Acknowledges interrupt bits (nothing to do on PCI: the ISR read did it).
    pub fn interrupt_ack(&self, bits: u32) {
        if let Transport::Mmio(t) = self {
            t.interrupt_ack(bits)
        }
    }
    /// A 32-bit device config field.
    pub fn config_u32(&self, offset: usize) -> u32 {
        both!(self, t => t.config_u32(offset))
    }
    /// A 64-bit device config field.
    pub fn config_u64(&self, offset: usize) -> Result<u64, MmioError> {
        both!(self, t => t.config_u64(offset))
    }
}
