//! A virtio-mmio device's interrupt: the InterruptStatus register and the KVM irqfd.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// InterruptStatus plus the irqfd that raises the device's GSI.
///
/// Shared by the transport (InterruptStatus reads, InterruptACK) and the event loop (which
/// sets bits when a backend signals its call eventfd). The interrupt is edge-style: each
/// signal is one pulse on the GSI, as Firecracker injects virtio-mmio interrupts.
#[derive(Debug)]
pub struct InterruptLine {
    status: Arc<AtomicU32>,
    irq: EventFd,
}

impl InterruptLine {
    /// A line with InterruptStatus 0 and a fresh irq eventfd; the caller registers
    /// [`Self::irq_eventfd`] with `VmFd::register_irqfd`.
    pub fn new() -> std::io::Result<Self> {
        Ok(InterruptLine {
            status: Arc::new(AtomicU32::new(0)),
            irq: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> Arc<AtomicU32> {
        self.status.clone()
    }

    /// The eventfd to register as the device's irqfd.
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// Sets `bits` in InterruptStatus, then raises the interrupt. The order matters: the
    /// guest's handler reads InterruptStatus and must see the bit.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        // A full eventfd counter (EAGAIN) already means a pending interrupt; nothing is lost.
        if let Err(e) = self.irq.write(1) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::error!("cannot raise a virtio interrupt: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_sets_status_then_fires_the_irq_eventfd() {
        let line = InterruptLine::new().unwrap();
        line.signal(1);
        line.signal(2);
        assert_eq!(line.status().load(Ordering::Acquire), 3);
        assert_eq!(line.irq_eventfd().read().unwrap(), 2);
    }
}
