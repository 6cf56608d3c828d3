//! [`VirtioMmioTransport`]: one virtio-mmio device whose backend is a vhost-user process.
//!
//! The data path never passes through here: QueueNotify is a KVM ioeventfd per queue handed
//! to the backend as its kick fd, and the backend's call fd is turned into InterruptStatus
//! plus an irqfd pulse by the event loop ([`super::event_loop`]). What passes through here
//! is the control path: register accesses that exit to the core as KVM_EXIT_MMIO.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use plexvm_protocol::api::{BackendState, DeviceInfo};
use plexvm_protocol::spec::{DeviceConfig, DeviceKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::DeviceEventHandler;
use super::interrupt::InterruptLine;
use super::registers::{DeviceOps, MmioRegisters};
use super::ring_tracker::RingTracker;
use super::state::DeviceState;
use super::{
    DeviceType, SharedBackendState, QUEUE_NOTIFY_OFFSET, QUEUE_SIZE_MAX, TRANSPORT_MASKED_FEATURES,
};
use crate::backend::{Backend, BackendExitWatch};
use crate::devices::MmioDevice;
use crate::memory::GuestMemory;
use crate::stall::RingProgress;
use crate::vhost_user::{FrontendError, InflightBuffer, VhostUserFrontend};

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

/// Largest config space the transport remembers (the vhost-user config size limit).
const CONFIG_CACHE_MAX: usize = 256;

/// How long a swap waits for the old backend to put in the used ring the requests it had
/// already taken when GET_VRING_BASE stopped its rings (QEMU's backends finish them after
/// answering).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The per-queue eventfds and everything else the register file's side effects need.
///
/// The backend may be gone (`frontend` is `None`) while the guest keeps touching the
/// device: config reads then return the last config seen, writes and activation are
/// kept in the [`DeviceState`] for the next backend, and queue notifications wait in the
/// kick eventfds, which the next backend gets.
#[derive(Debug)]
struct VhostUserDevice {
    frontend: Option<VhostUserFrontend>,
    mem: GuestMemory,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
    interrupt: Arc<InterruptLine>,
    inflight: Option<InflightBuffer>,
    /// Outstanding requests of a backend without an in-flight buffer.
    tracker: Arc<Mutex<RingTracker>>,
    config_cache: Vec<u8>,
    /// The config space the frontend serves itself ([`DeviceType::config`]): read from
    /// here, writes ignored (the fs tag and the vsock CID are read-only, 5.10.4, 5.11.4).
    frontend_config: Option<Vec<u8>>,
    /// Wakes the thread that runs activations ([`VirtioMmioTransport::set_activator`]);
    /// without one, DRIVER_OK activates on the writing vCPU.
    activator: Option<Arc<EventFd>>,
    /// DRIVER_OK was accepted and the rings still have to be handed to the backend.
    activation_pending: bool,
}

impl VhostUserDevice {
    fn tracker(&self) -> std::sync::MutexGuard<'_, RingTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the backend is gone (not attached, or its connection has ended).
    fn backend_gone(&self) -> bool {
        self.frontend
            .as_ref()
            .is_none_or(|f| f.broken().is_some() || f.is_hung_up())
    }

    /// Starts the ready rings on the attached backend, with the device's in-flight
    /// buffer when the backend tracks in-flight requests (created on first use).
    fn start_rings(&mut self, state: &mut DeviceState) -> Result<(), FrontendError> {
        let Some(frontend) = self.frontend.as_mut() else {
            return Ok(());
        };
        if !frontend.supports_inflight() {
            self.inflight = None;
        } else if self.inflight.is_none() {
            self.inflight = Some(frontend.get_inflight(state.queues.len(), QUEUE_SIZE_MAX)?);
        }
        // A backend without an in-flight buffer: the core keeps track itself, from before
        // the backend can complete anything.
        let tracker = match self.inflight {
            Some(_) => RingTracker::default(),
            None => RingTracker::start(&state.queues, &self.mem),
        };
        *self.tracker.lock().unwrap_or_else(|e| e.into_inner()) = tracker;
        frontend.activate(
            state,
            &self.mem,
            &self.kicks,
            &self.calls,
            self.inflight.as_ref(),
        )?;
        // Once the backend has enabled the rings (the barrier), one kick each: a
        // notification it dropped while a ring was still disabled is not lost (see
        // `VhostUserFrontend::barrier`); a spurious one is harmless (virtio 1.2, 2.7.13).
        frontend.barrier()?;
        for (i, _) in state.queues.iter().enumerate().filter(|(_, q)| q.started) {
            if let Some(kick) = self.kicks.get(i) {
                let _ = kick.write(1);
            }
        }
        Ok(())
    }

    fn remember_config(&mut self, offset: u32, data: &[u8]) {
        let end = offset as usize + data.len();
        if end > CONFIG_CACHE_MAX {
            return;
        }
        if self.config_cache.len() < end {
            self.config_cache.resize(end, 0);
        }
        self.config_cache[offset as usize..end].copy_from_slice(data);
    }

    fn cached_config(&self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        if let Some(tail) = self.config_cache.get(offset as usize..) {
            let n = tail.len().min(data.len());
            data[..n].copy_from_slice(&tail[..n]);
        }
    }
}

impl DeviceOps for VhostUserDevice {
    type Error = FrontendError;

    fn read_config(&mut self, offset: u32, data: &mut [u8]) -> Result<(), FrontendError> {
        if let Some(config) = &self.frontend_config {
            data.fill(0);
            if let Some(tail) = config.get(offset as usize..) {
                let n = tail.len().min(data.len());
                data[..n].copy_from_slice(&tail[..n]);
            }
            return Ok(());
        }
        let result = match self.frontend.as_mut() {
            Some(frontend) => frontend.read_config(offset, data),
            None => {
                self.cached_config(offset, data);
                return Ok(());
            }
        };
        match result {
            Ok(()) => {
                self.remember_config(offset, data);
                Ok(())
            }
            Err(_) if self.backend_gone() => {
                self.cached_config(offset, data);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        if self.frontend_config.is_some() {
            return Ok(());
        }
        match self.frontend.as_mut() {
            Some(frontend) => match frontend.write_config(offset, data) {
                Err(_) if self.backend_gone() => Ok(()),
                result => result,
            },
            None => Ok(()),
        }
    }

    fn activate(&mut self, state: &mut DeviceState) -> Result<(), FrontendError> {
        if let Some(activator) = &self.activator {
            // No round trip on the vCPU: what the guest can get wrong is checked here,
            // the backend is told on the supervisor thread (activate_pending).
            crate::vhost_user::check_rings(state, &self.mem)?;
            self.activation_pending = self.frontend.is_some();
            let _ = activator.write(1);
            return Ok(());
        }
        match self.start_rings(state) {
            // The backend died under the driver: the supervisor replays the activation
            // to the next one, the driver need not know.
            Err(_) if self.backend_gone() => Ok(()),
            result => result,
        }
    }

    fn stop(&mut self, state: &mut DeviceState) {
        // A reset device starts with fresh rings: in-flight entries of the old ones must
        // never be resubmitted.
        self.inflight = None;
        self.activation_pending = false;
        *self.tracker() = RingTracker::default();
        match self.frontend.as_mut() {
            Some(frontend) => frontend.stop(state),
            None => state.queues.iter_mut().for_each(|q| q.started = false),
        }
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

/// What the supervisor watches to notice a backend going away: a duplicate of the
/// vhost-user socket (hang-up) and, for a spawned backend, its pidfd (exit).
#[derive(Debug)]
pub struct BackendWatch {
    /// The socket.
    pub socket: OwnedFd,
    /// The process, when the core spawned it.
    pub exit: Option<BackendExitWatch>,
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
    fn register(
        kicks: &[EventFd],
        device: &str,
        vm: &VmFd,
        mmio_base: u64,
    ) -> Result<(), TransportError> {
        let notify = IoEventAddress::Mmio(mmio_base + QUEUE_NOTIFY_OFFSET);
        for (queue, kick) in kicks.iter().enumerate() {
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
    backend: Option<Backend>,
    socket: PathBuf,
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
        frontend: VhostUserFrontend,
    ) -> Result<Self, TransportError> {
        let mut transport = Self::new_unwired(config, mem, backend, frontend)?;
        let id = &transport.id;
        QueueEventFds::register(&transport.device.kicks, id, vm, mmio_base)?;
        vm.register_irqfd(transport.device.interrupt.irq_eventfd(), gsi)
            .map_err(|source| TransportError::IrqFd {
                device: id.clone(),
                gsi,
                source,
            })?;
        transport.mmio_base = mmio_base;
        transport.gsi = gsi;
        Ok(transport)
    }

    /// The device without its virtio-mmio wiring, for the virtio-pci transport
    /// ([`crate::pci::VirtioPciFunction`]), which drives the same register file through
    /// [`MmioDevice`] and registers its own notify ioeventfds ([`Self::kick_eventfds`])
    /// and MSI routes ([`Self::call_eventfds`]; the [`Self::interrupt`] eventfd is then
    /// not an irqfd but tells it about configuration interrupts).
    pub fn new_unwired(
        config: &DeviceConfig,
        mem: GuestMemory,
        backend: Backend,
        mut frontend: VhostUserFrontend,
    ) -> Result<Self, TransportError> {
        let id = config.id.clone();
        frontend.set_reply_timeout(config.restart.reply_timeout);
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
        frontend
            .set_vring_eventfds(&fds.calls, &fds.errs)
            .map_err(|source| TransportError::Frontend {
                device: id.clone(),
                source,
            })?;
        snapshot_config(&mut frontend, config.kind);
        let device_type = DeviceType::of(config);
        let masked = TRANSPORT_MASKED_FEATURES | device_type.masked_features;
        let features = frontend.virtio_features() & !masked;
        let state = DeviceState::new(features, queue_count, QUEUE_SIZE_MAX);
        let registers = MmioRegisters::new(&id, device_type.device_id, state, interrupt.status());
        Ok(VirtioMmioTransport {
            id,
            kind: config.kind,
            mmio_base: 0,
            gsi: 0,
            registers,
            device: VhostUserDevice {
                frontend: Some(frontend),
                mem,
                kicks: fds.kicks,
                calls: fds.calls,
                errs: fds.errs,
                interrupt,
                inflight: None,
                tracker: Arc::default(),
                config_cache: Vec::new(),
                frontend_config: device_type.config,
                activator: None,
                activation_pending: false,
            },
            socket: backend.socket().to_path_buf(),
            backend: Some(backend),
            backend_state: SharedBackendState::new(BackendState::Up),
        })
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The virtio device ID (the device-type table's, or a generic device's own).
    pub fn device_id(&self) -> u32 {
        self.registers.device_id()
    }

    /// The device's kind in the spec.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Per queue, the kick eventfd the backend waits on (an ioeventfd on the notify
    /// address).
    pub fn kick_eventfds(&self) -> &[EventFd] {
        &self.device.kicks
    }

    /// Per queue, the call eventfd the backend signals; the core's own, so it stays the
    /// same across reconnects and swaps (anything registered on it stays valid).
    pub fn call_eventfds(&self) -> &[EventFd] {
        &self.device.calls
    }

    /// Per queue, the error eventfd the backend signals.
    pub fn err_eventfds(&self) -> &[EventFd] {
        &self.device.errs
    }

    /// Sets where the control API says the device is (a PCI function's BAR; no GSI).
    pub fn set_location(&mut self, base: u64, irq: u32) {
        self.mmio_base = base;
        self.gsi = irq;
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
            socket: self.socket.clone(),
            backend_pid: self.backend.as_ref().and_then(Backend::pid),
            state: self.backend_state.get(),
            activated: self.registers.state().activated,
            restarts: 0,
            failed_restarts: 0,
            last_exit: None,
            down_ms: 0,
            last_stall_ms: None,
            stalled_ms: None,
            inflight_tracking: self
                .device
                .frontend
                .as_ref()
                .is_some_and(VhostUserFrontend::supports_inflight),
            inflight_state_known: true,
        }
    }

    /// The backend's socket path (the last one when it is down).
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// The connection state the API reports, shared with the supervisor.
    pub fn backend_state(&self) -> SharedBackendState {
        self.backend_state.clone()
    }

    /// The outstanding-request tracker (active while a backend without an in-flight
    /// buffer serves started rings) and the memory to sample it with.
    pub fn ring_tracker(&self) -> (Arc<Mutex<RingTracker>>, GuestMemory) {
        (self.device.tracker.clone(), self.device.mem.clone())
    }

    /// One sample of the started rings for the stall detector
    /// ([`crate::stall::StallDetector`]): `None` when no backend serves started rings.
    pub fn progress(&self) -> Option<RingProgress> {
        self.device.frontend.as_ref()?;
        let mem = &self.device.mem;
        let mut sample = RingProgress::default();
        for (i, q) in self.state().queues.iter().enumerate() {
            if !q.started {
                continue;
            }
            let used = q.used_index(mem)?;
            sample.used.push(used);
            let avail = q.avail_index(mem)?;
            let unread = || self.device.kicks.get(i).is_some_and(kick_unread);
            if avail != used && (!crate::stall::is_input_queue(self.kind, i) || unread()) {
                sample.waiting = true;
            }
        }
        (!sample.used.is_empty()).then_some(sample)
    }

    /// Why the connection to the attached backend was ended (a missed round-trip
    /// deadline, a reply that broke the protocol), if it was: the backend may live on,
    /// but it counts as gone.
    pub fn broken(&self) -> Option<String> {
        self.device
            .frontend
            .as_ref()
            .and_then(VhostUserFrontend::broken)
    }

    /// Sets the round-trip deadline of the attached backend (the spec's
    /// `reply_timeout_ms` is applied when the transport is made).
    pub fn set_reply_timeout(&self, timeout: Duration) {
        if let Some(frontend) = &self.device.frontend {
            frontend.set_reply_timeout(timeout);
        }
    }

    /// Lets `activator` run activations: from now on a DRIVER_OK write only checks the
    /// rings and wakes it, and it calls [`Self::activate_pending`] — so no vCPU waits
    /// on the backend's round trips.
    pub fn set_activator(&mut self, activator: Arc<EventFd>) {
        self.device.activator = Some(activator);
    }

    /// Hands the rings to the backend if the driver set DRIVER_OK since the last call
    /// (off the vCPU threads). A backend that refuses fails the device
    /// (DEVICE_NEEDS_RESET); one that is gone gets the activation in the replay to the
    /// next one.
    pub fn activate_pending(&mut self) {
        if !std::mem::take(&mut self.device.activation_pending) {
            return;
        }
        let state = self.registers.state_mut();
        if !state.activated {
            return;
        }
        match self.device.start_rings(state) {
            // Notifications the driver gave before the backend had the rings wait in
            // the kick eventfds; one more makes sure the backend looks.
            Ok(()) => {
                let started = state.queues.iter().enumerate().filter(|(_, q)| q.started);
                for (i, _) in started {
                    if let Some(kick) = self.device.kicks.get(i) {
                        let _ = kick.write(1);
                    }
                }
            }
            Err(_) if self.device.backend_gone() => {}
            Err(e) => self.registers.fail_device(&mut self.device, &e),
        }
    }

    /// Whether a backend is attached.
    pub fn is_attached(&self) -> bool {
        self.device.frontend.is_some()
    }

    /// What to watch to notice the attached backend going away.
    pub fn watch(&self) -> std::io::Result<Option<BackendWatch>> {
        let Some(frontend) = &self.device.frontend else {
            return Ok(None);
        };
        let exit = match &self.backend {
            Some(b) => b.exit_watch()?,
            None => None,
        };
        Ok(Some(BackendWatch {
            socket: dup_fd(frontend.socket_fd())?,
            exit,
        }))
    }

    /// The backend went away: forget the connection (its queues stall, the kick
    /// eventfds keep collecting notifications) and hand back the backend to reap.
    pub fn detach(&mut self) -> Option<Backend> {
        self.device.frontend = None;
        for q in &mut self.registers.state_mut().queues {
            q.started = false;
        }
        self.backend_state.set(BackendState::Down);
        self.backend.take()
    }

    /// Why `frontend` cannot take over this device, if it cannot: it must offer every
    /// feature the driver accepted and serve every queue the driver set up.
    pub fn check_compatible(&self, frontend: &VhostUserFrontend) -> Result<(), String> {
        let state = self.registers.state();
        let wanted = if state.activated || state.status & super::status::FEATURES_OK != 0 {
            state.driver_features
        } else {
            0
        };
        let missing = wanted & !frontend.virtio_features();
        if missing != 0 {
            return Err(format!(
                "the backend does not offer features {missing:#x} that the driver uses"
            ));
        }
        let queues = state.ready_queues().map(|(i, _)| i + 1).max().unwrap_or(0);
        if frontend.queue_count() < queues {
            return Err(format!(
                "the backend serves {} queues, the driver uses {queues}",
                frontend.queue_count()
            ));
        }
        Ok(())
    }

    /// Hands the device to the backend behind `frontend` (brought up by
    /// [`VhostUserFrontend::connect`]) after the previous one went away or was
    /// quiesced: the call and error eventfds, and when the driver had started the
    /// device the whole activation — features, in-flight buffer, memory table, and per
    /// ring its size, addresses, kick and call fds, and as base the used index the guest
    /// sees — then each ring is kicked once so the backend looks at it. Requests the
    /// previous backend had taken and not completed are resubmitted by the new backend
    /// from the in-flight buffer or, when the previous one had none, laid out from the
    /// used index on by the [`RingTracker`]. Returns whether the outstanding requests
    /// were known (false: replayed from the used index, some may repeat or be missed).
    pub fn attach(&mut self, mut frontend: VhostUserFrontend) -> Result<bool, FrontendError> {
        frontend.set_vring_eventfds(&self.device.calls, &self.device.errs)?;
        snapshot_config(&mut frontend, self.kind);
        self.device.frontend = Some(frontend);
        // The replay below starts the rings the driver set up.
        self.device.activation_pending = false;
        let state = self.registers.state_mut();
        if !state.activated {
            self.backend_state.set(BackendState::Up);
            return Ok(true);
        }
        let tracked = {
            let mut tracker = self.device.tracker();
            let new_tracks = self
                .device
                .frontend
                .as_ref()
                .is_some_and(VhostUserFrontend::supports_inflight);
            if tracker.is_active() {
                tracker.rewrite_outstanding(&self.device.mem)
            } else {
                self.device.inflight.is_some() && new_tracks
            }
        };
        for q in state.queues.iter_mut().filter(|q| q.ready) {
            q.base = q.used_index(&self.device.mem).unwrap_or(q.base);
            q.started = false;
        }
        if let Err(e) = self.device.start_rings(state) {
            self.device.frontend = None;
            return Err(e);
        }
        for (i, _) in state.queues.iter().enumerate().filter(|(_, q)| q.started) {
            if let Some(kick) = self.device.kicks.get(i) {
                let _ = kick.write(1);
            }
            // The previous backend may have published used entries and died before it
            // signalled its call eventfd: a driver that sleeps until an interrupt
            // (Linux) would then wait for those completions forever if it submits
            // nothing more (a `dd ... conv=fsync` waiting for its last write). One
            // signal on the queue's call eventfd makes it look, through whichever path
            // the transport routes it (virtio-mmio: InterruptStatus + irqfd; virtio-pci:
            // the queue's MSI-X vector); a spurious one is harmless (virtio 1.2 section
            // 2.7.7.2: the driver checks the used ring).
            if let Some(call) = self.device.calls.get(i) {
                let _ = call.write(1);
            }
        }
        self.backend_state.set(BackendState::Up);
        Ok(tracked)
    }

    /// Makes `backend` the device's backend (after [`Self::attach`]); returns the one it
    /// replaces, for the caller to stop outside the device lock.
    pub fn install_backend(&mut self, backend: Backend) -> Option<Backend> {
        self.socket = backend.socket().to_path_buf();
        self.backend.replace(backend)
    }

    /// Stops the attached backend's rings for a swap (GET_VRING_BASE) and waits up to
    /// [`DRAIN_TIMEOUT`] until the used ring shows every request it had taken. The
    /// in-flight buffer is dropped: the next backend starts a fresh one. Returns whether
    /// the backend drained (if not, [`Self::attach`] lays out what is still outstanding
    /// when the [`RingTracker`] knows it, else the next backend replays from the used
    /// index).
    pub fn quiesce(&mut self) -> bool {
        let Some(frontend) = self.device.frontend.as_mut() else {
            self.device.inflight = None;
            return true;
        };
        let state = self.registers.state_mut();
        let started: Vec<usize> = (0..state.queues.len())
            .filter(|&i| state.queues[i].started)
            .collect();
        frontend.stop(state);
        if frontend.broken().is_some() {
            // Stuck: its rings did not stop. The caller fences it; what it had in
            // flight stays in the in-flight buffer for the next backend.
            return false;
        }
        self.device.inflight = None;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let drained = started.iter().all(|&i| {
                let q = &state.queues[i];
                q.used_index(&self.device.mem) == Some(q.base)
            });
            if drained {
                return true;
            }
            if Instant::now() >= deadline {
                let rings: Vec<String> = started
                    .iter()
                    .map(|&i| {
                        let q = &state.queues[i];
                        let used = q.used_index(&self.device.mem);
                        format!("queue {i}: base {} used {used:?}", q.base)
                    })
                    .collect();
                tracing::warn!(
                    "device {}: the old backend did not complete its requests within {DRAIN_TIMEOUT:?} ({}); they will be fetched again",
                    self.id,
                    rings.join(", ")
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The interrupt line (InterruptStatus and irqfd).
    pub fn interrupt(&self) -> Arc<InterruptLine> {
        self.device.interrupt.clone()
    }

    /// The subscriber to add to the core's [`super::EventLoop`]: it turns this device's
    /// call eventfds into interrupts and logs error eventfds.
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

/// How much config space the core copies when it connects: the part of each device
/// type's config (virtio 1.2, 5.2.4 and 5.1.4) that a driver reads for the features
/// our backends offer. Reads past it go to the backend (and the copy grows).
fn config_snapshot_size(kind: DeviceKind) -> usize {
    match kind {
        // capacity .. num_queues, discard and write-zeroes limits: 60 bytes, which
        // qemu-storage-daemon 7.2 (it refuses reads past its struct) serves too.
        DeviceKind::Blk => 60,
        // mac, status, max_virtqueue_pairs, mtu.
        DeviceKind::Net => 12,
        _ => 0,
    }
}

/// Takes the core's copy of config space on a connection being brought up (never on
/// a vCPU thread). A backend that refuses is asked again when the guest reads.
fn snapshot_config(frontend: &mut VhostUserFrontend, kind: DeviceKind) {
    let wants_config = frontend
        .protocol_features()
        .contains(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG);
    if !wants_config {
        return;
    }
    if let Err(e) = frontend.fetch_config(config_snapshot_size(kind)) {
        tracing::debug!(
            "device {}: no config space copy: {}",
            frontend.device(),
            crate::error_chain(&e)
        );
    }
}

/// Whether the eventfd has a count nobody has read yet (without reading it).
fn kick_unread(kick: &EventFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(kick),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n > 0 && fds[0].revents & libc::POLLIN != 0
}

/// A new descriptor for the same open socket, owned by the supervisor.
fn dup_fd(fd: std::os::fd::RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: `fd` is the frontend's socket, open for as long as the transport that calls
    // this (which holds the frontend while it runs); the borrow ends before this
    // function returns.
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
