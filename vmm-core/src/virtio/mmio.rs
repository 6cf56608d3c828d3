//! [`VirtioMmioTransport`]: one virtio-mmio device whose backend is a vhost-user process.
//!
//! The data path never passes through here: QueueNotify is a KVM ioeventfd per queue handed
//! to the backend as its kick fd, and the backend's call fd is turned into InterruptStatus
//! plus an irqfd pulse by the event loop ([`super::event_loop`]). What passes through here
//! is the control path: register accesses that exit to the core as KVM_EXIT_MMIO.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use plexvm_protocol::api::{BackendState, DeviceInfo};
use plexvm_protocol::spec::{DeviceConfig, DeviceKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::DeviceEventHandler;
use super::interrupt::InterruptLine;
use super::registers::{DeviceOps, MmioRegisters};
use super::state::DeviceState;
use super::{SharedBackendState, QUEUE_NOTIFY_OFFSET, QUEUE_SIZE_MAX, TRANSPORT_MASKED_FEATURES};
use crate::backend::Backend;
use crate::devices::MmioDevice;
use crate::memory::GuestMemory;
use crate::vhost_user::{FrontendError, VhostUserFrontend};

/// Errors setting up a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// eventfd creation or duplication failed.
    #[error("device {device}: cannot create an eventfd")]
    EventFd {
        /// Device id.
        device: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the QueueNotify ioeventfd.
    #[error("device {device}: cannot register the ioeventfd of queue {queue}")]
    IoEvent {
        /// Device id.
        device: String,
        /// Queue index.
        queue: usize,
        /// KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused the irqfd (is there an in-kernel irqchip?).
    #[error("device {device}: cannot register the irqfd of GSI {gsi}")]
    IrqFd {
        /// Device id.
        device: String,
        /// The GSI.
        gsi: u32,
        /// KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The last bring-up step (SET_VRING_CALL/ERR) failed.
    #[error("device {device}: backend bring-up failed")]
    Frontend {
        /// Device id.
        device: String,
        /// What failed.
        #[source]
        source: FrontendError,
    },
}

/// The per-queue eventfds and everything else the register file's side effects need.
#[derive(Debug)]
struct VhostUserDevice {
    frontend: VhostUserFrontend,
    mem: GuestMemory,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
    interrupt: Arc<InterruptLine>,
}

impl DeviceOps for VhostUserDevice {
    type Error = FrontendError;

    fn read_config(&mut self, offset: u32, data: &mut [u8]) -> Result<(), FrontendError> {
        self.frontend.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        self.frontend.write_config(offset, data)
    }

    fn activate(&mut self, state: &mut DeviceState) -> Result<(), FrontendError> {
        self.frontend
            .activate(state, &self.mem, &self.kicks, &self.calls)
    }

    fn stop(&mut self, state: &mut DeviceState) {
        self.frontend.stop(state);
    }

    fn queue_notify(&mut self, queue: u32) {
        if let Some(kick) = self.kicks.get(queue as usize) {
            // EAGAIN means the counter is full: the backend has a kick pending anyway.
            let _ = kick.write(1);
        }
    }

    fn interrupt(&mut self, bits: u32) {
        self.interrupt.signal(bits);
    }
}

/// The eventfds of every queue: kick (QueueNotify ioeventfd), call and error.
struct QueueEventFds {
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
}

impl QueueEventFds {
    fn new(queue_count: usize) -> std::io::Result<Self> {
        // Non-blocking, as QEMU's event notifiers: whoever reads after a spurious wake-up
        // gets EAGAIN instead of hanging.
        let new_fds = || -> std::io::Result<Vec<EventFd>> {
            (0..queue_count)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect()
        };
        Ok(QueueEventFds {
            kicks: new_fds()?,
            calls: new_fds()?,
            errs: new_fds()?,
        })
    }

    /// One ioeventfd per queue on QueueNotify, matching a 32-bit write of the queue index
    /// (docs/platform.md), so a notify never exits to the core.
    fn register(&self, device: &str, vm: &VmFd, mmio_base: u64) -> Result<(), TransportError> {
        let notify = IoEventAddress::Mmio(mmio_base + QUEUE_NOTIFY_OFFSET);
        for (queue, kick) in self.kicks.iter().enumerate() {
            vm.register_ioevent(kick, &notify, queue as u32)
                .map_err(|source| TransportError::IoEvent {
                    device: device.to_string(),
                    queue,
                    source,
                })?;
        }
        Ok(())
    }
}

/// A virtio-mmio device (docs/platform.md) backed by a vhost-user backend.
#[derive(Debug)]
pub struct VirtioMmioTransport {
    id: String,
    kind: DeviceKind,
    mmio_base: u64,
    gsi: u32,
    registers: MmioRegisters,
    device: VhostUserDevice,
    backend: Backend,
    backend_state: SharedBackendState,
}

impl VirtioMmioTransport {
    /// A transport for device `config` at `mmio_base` raising `gsi`, whose backend is
    /// `backend` reached through `frontend` (brought up by
    /// [`VhostUserFrontend::connect`]). Registers one ioeventfd per queue at
    /// QueueNotify and an irqfd on `vm` (which needs its irqchip), and finishes the
    /// bring-up by giving the backend the call and error eventfds.
    pub fn new(
        config: &DeviceConfig,
        mmio_base: u64,
        gsi: u32,
        vm: &VmFd,
        mem: GuestMemory,
        backend: Backend,
        mut frontend: VhostUserFrontend,
    ) -> Result<Self, TransportError> {
        let id = config.id.clone();
        let queue_count = frontend.queue_count();
        let fds = QueueEventFds::new(queue_count).map_err(|source| TransportError::EventFd {
            device: id.clone(),
            source,
        })?;
        let interrupt =
            Arc::new(
                InterruptLine::new().map_err(|source| TransportError::EventFd {
                    device: id.clone(),
                    source,
                })?,
            );
        fds.register(&id, vm, mmio_base)?;
        vm.register_irqfd(interrupt.irq_eventfd(), gsi)
            .map_err(|source| TransportError::IrqFd {
                device: id.clone(),
                gsi,
                source,
            })?;
        frontend
            .set_vring_eventfds(&fds.calls, &fds.errs)
            .map_err(|source| TransportError::Frontend {
                device: id.clone(),
                source,
            })?;
        let features = frontend.virtio_features() & !TRANSPORT_MASKED_FEATURES;
        let state = DeviceState::new(features, queue_count, QUEUE_SIZE_MAX);
        let registers = MmioRegisters::new(&id, config.kind.virtio_id(), state, interrupt.status());
        Ok(VirtioMmioTransport {
            id,
            kind: config.kind,
            mmio_base,
            gsi,
            registers,
            device: VhostUserDevice {
                frontend,
                mem,
                kicks: fds.kicks,
                calls: fds.calls,
                errs: fds.errs,
                interrupt,
            },
            backend,
            backend_state: SharedBackendState::new(BackendState::Up),
        })
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the guest programmed (features, status, queues): the state a reconnect replays.
    pub fn state(&self) -> &DeviceState {
        self.registers.state()
    }

    /// The device as the control API reports it.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.id.clone(),
            kind: self.kind,
            mmio_base: self.mmio_base,
            irq: self.gsi,
            socket: self.backend.socket().to_path_buf(),
            backend_pid: self.backend.pid(),
            state: self.backend_state.get(),
            activated: self.registers.state().activated,
        }
    }

    /// The backend's socket path.
    pub fn socket(&self) -> PathBuf {
        self.backend.socket().to_path_buf()
    }

    /// The interrupt line (InterruptStatus and irqfd).
    pub fn interrupt(&self) -> Arc<InterruptLine> {
        self.device.interrupt.clone()
    }

    /// The subscriber to add to the core's [`super::EventLoop`]: it turns this device's
    /// call eventfds into interrupts, logs error eventfds, and notices the backend going
    /// away (socket hang-up, process exit).
    pub fn event_handler(&self) -> Result<DeviceEventHandler, TransportError> {
        let err = |source| TransportError::EventFd {
            device: self.id.clone(),
            source,
        };
        let clone_all = |fds: &[EventFd]| -> std::io::Result<Vec<EventFd>> {
            fds.iter().map(EventFd::try_clone).collect()
        };
        Ok(DeviceEventHandler::new(
            self.id.clone(),
            clone_all(&self.device.calls).map_err(err)?,
            clone_all(&self.device.errs).map_err(err)?,
            self.device.interrupt.clone(),
            dup_fd(self.device.frontend.socket_fd()).map_err(err)?,
            self.backend.exit_watch().map_err(err)?,
            self.backend_state.clone(),
        ))
    }
}

impl Drop for VirtioMmioTransport {
    fn drop(&mut self) {
        // The backend is stopped on purpose (its process, if ours, is killed as the
        // `backend` field drops): the event loop must not report that as a failure.
        self.backend_state.retire();
    }
}

/// A new descriptor for the same open socket, owned by the event loop.
fn dup_fd(fd: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: `fd` is the frontend's socket, open for as long as the transport that calls
    // this; the borrow ends before this function returns.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned()
}

impl MmioDevice for VirtioMmioTransport {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.registers.read(&mut self.device, offset, data);
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.registers.write(&mut self.device, offset, data);
    }
}
