//! [`BackendSupervisor`]: notices a device backend going away, restarts or reconnects
//! it under the device's restart policy, and swaps a device's backend on request.
//!
//! One thread per VM, off the vCPU threads and the event thread. It watches every
//! attached backend's vhost-user socket (hang-up) and, for a spawned backend, its pidfd
//! (exit), so a backend's end is noticed at once. Then:
//!
//! 1. the transport forgets the connection ([`VirtioMmioTransport::detach`]): the
//!    device's queues stall, the guest's notifications wait in the kick eventfds, config
//!    reads return the last config seen, the VM and the other devices run on;
//! 2. the dead backend is reaped and why it ended is logged once (exit code or signal,
//!    last stderr lines) and kept for the API;
//! 3. after a back-off (none for the first failure, then 50 ms doubling up to 5 s; a
//!    backend that served for [`HEALTHY_UPTIME`] starts over) an `exec` backend is
//!    spawned again with the same arguments, a `socket` backend's path is connected
//!    again; `restart = "never"` or `restart_max` failures in a row leave it failed;
//! 4. the new backend is brought up and the transport replays the driver's set-up to it
//!    ([`VirtioMmioTransport::attach`]).
//!
//! A swap ([`BackendSupervisor::swap`], swap.rs) starts the new backend first, then
//! quiesces the old one (GET_VRING_BASE, waiting for its last requests), hands the state
//! over the same way and stops the old one afterwards.
//!
//! A backend that lives but does not serve (containment.rs): every started ring is
//! sampled for stalls ([`crate::stall`]); a stalled `exec` backend is fenced — SIGKILL
//! and reap — before the restart path above gives its rings to a new one
//! (`on_stall = "restart"`), or waited for (`"wait"`). A backend that misses a
//! round-trip deadline or breaks the protocol has its connection shut down, which this
//! thread sees as a hang-up; it is then fenced the same way. The thread also runs the
//! activation round trips the guest's DRIVER_OK asks for, so that no vCPU waits on a
//! backend.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plexvm_protocol::api::{BackendState, DeviceInfo};
use plexvm_protocol::spec::{BackendSource, DeviceConfig, RestartConfig, RestartPolicy};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod containment;
mod swap;

use containment::Loss;

use crate::backend::{self, Backend};
use crate::error_chain;
use crate::memory::GuestMemory;
use crate::stall::StallDetector;
use crate::vhost_user::VhostUserFrontend;
use crate::virtio::{self, BackendWatch, RingTracker, SharedBackendState, VirtioMmioTransport};

/// A backend that served this long before it went away is restarted without delay.
pub const HEALTHY_UPTIME: Duration = Duration::from_millis(500);
/// The delay before the second restart in a row.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest delay between two restart attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a swap request may take before the API gives up waiting for it.
pub const SWAP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the rings of a backend without an in-flight buffer are sampled
/// ([`RingTracker`]) while they move, and for [`QUIET_SAMPLES`] samples after: a
/// ring's worth of entries (256) may pass in a millisecond only above 256k requests
/// per second and queue.
pub const SAMPLE_BUSY: Duration = Duration::from_millis(1);
/// How often they are sampled once they have been still for a while. A guest that
/// starts at full speed right after a still moment (a benchmark, a restarted backend
/// serving its backlog) must not pass a ring's worth before the next sample either:
/// 2 ms allows 128k requests per second from a standing start.
pub const SAMPLE_IDLE: Duration = Duration::from_millis(2);
/// Samples in a row that saw nothing pass before sampling slows down to
/// [`SAMPLE_IDLE`] (a quarter of a second).
const QUIET_SAMPLES: u32 = 250;

/// The delay before a restart after `streak` failures in a row.
pub fn backoff(streak: u32) -> Duration {
    match streak {
        0 => Duration::ZERO,
        n => BACKOFF_FIRST
            .saturating_mul(1 << (n - 1).min(16))
            .min(BACKOFF_MAX),
    }
}

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The thread or its epoll set could not be created.
    #[error("cannot start the backend supervisor")]
    Start(#[source] std::io::Error),
    /// No device has this id.
    #[error("no device {0:?}")]
    NoDevice(String),
    /// The new backend could not be started or cannot serve the device; the old one
    /// (if any) keeps serving.
    #[error("device {device}: {reason}")]
    Refused {
        /// Device id.
        device: String,
        /// Why.
        reason: String,
    },
    /// The supervisor has stopped (the VM is ending).
    #[error("the VM is stopping")]
    Stopped,
}

/// What the API reports about a device's backend history.
#[derive(Debug, Clone)]
pub struct DeviceHealth {
    restarts: u64,
    failed_restarts: u64,
    last_exit: Option<String>,
    down_since: Option<Instant>,
    down_total: Duration,
    last_stall: Option<Duration>,
    inflight_state_known: bool,
    stalled_since: Option<Instant>,
}

impl Default for DeviceHealth {
    fn default() -> Self {
        DeviceHealth {
            restarts: 0,
            failed_restarts: 0,
            last_exit: None,
            down_since: None,
            down_total: Duration::ZERO,
            last_stall: None,
            inflight_state_known: true,
            stalled_since: None,
        }
    }
}

impl DeviceHealth {
    /// Copies the history into `info`.
    pub fn fill(&self, info: &mut DeviceInfo) {
        let current = self.down_since.map_or(Duration::ZERO, |t| t.elapsed());
        info.restarts = self.restarts;
        info.failed_restarts = self.failed_restarts;
        info.last_exit = self.last_exit.clone();
        info.down_ms = (self.down_total + current).as_millis() as u64;
        info.last_stall_ms = self.last_stall.map(|d| d.as_millis() as u64);
        info.inflight_state_known = self.inflight_state_known;
        if info.state == BackendState::Stalled {
            info.stalled_ms = self.stalled_since.map(|t| t.elapsed().as_millis() as u64);
        }
    }
}

/// A device handed to the supervisor.
#[derive(Debug)]
pub struct SupervisedDevice {
    /// Its transport (shared with the MMIO bus).
    pub transport: Arc<Mutex<VirtioMmioTransport>>,
    /// Its spec entry: id, kind, backend, restart policy.
    pub config: DeviceConfig,
}

enum Command {
    Swap {
        device: usize,
        source: BackendSource,
        reply: Sender<Result<(), SupervisorError>>,
    },
}

/// The supervisor thread. Dropping it stops the thread (before the devices go).
#[derive(Debug)]
pub struct BackendSupervisor {
    commands: Option<Sender<Command>>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    health: Vec<(String, Arc<Mutex<DeviceHealth>>)>,
}

impl BackendSupervisor {
    /// Starts supervising `devices` (all attached). Spawned backends get sockets in
    /// `runtime_dir`; programs and relative paths resolve against `base_dir`.
    pub fn start(
        devices: Vec<SupervisedDevice>,
        runtime_dir: PathBuf,
        base_dir: PathBuf,
    ) -> Result<Self, SupervisorError> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(SupervisorError::Start)?);
        let epoll = Epoll::new().map_err(SupervisorError::Start)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, WAKE),
            )
            .map_err(SupervisorError::Start)?;
        let (tx, rx) = channel();
        let mut health = Vec::new();
        let mut supervised = Vec::new();
        for d in devices {
            lock(&d.transport).set_activator(wake.clone());
            let h = Arc::new(Mutex::new(DeviceHealth::default()));
            health.push((d.config.id.clone(), h.clone()));
            supervised.push(Device::new(d, h, &runtime_dir));
        }
        let mut inner = Supervisor {
            epoll,
            wake: wake.clone(),
            commands: rx,
            devices: supervised,
            runtime_dir,
            base_dir,
            quiet_samples: 0,
            next_sample: Instant::now(),
            next_stall_check: Instant::now(),
        };
        for i in 0..inner.devices.len() {
            inner.watch(i);
        }
        let thread = std::thread::Builder::new()
            .name("plexvm-supervisor".into())
            .spawn(move || inner.run())
            .map_err(SupervisorError::Start)?;
        Ok(BackendSupervisor {
            commands: Some(tx),
            wake,
            thread: Some(thread),
            health,
        })
    }

    /// The history of device `index`.
    pub fn health(&self, index: usize) -> DeviceHealth {
        self.health
            .get(index)
            .map(|(_, h)| lock(h).clone())
            .unwrap_or_default()
    }

    /// Hands device `id` to the backend `source` and stops the old backend; returns
    /// once the new backend serves (or the swap failed and the old one still does).
    pub fn swap(&self, id: &str, source: BackendSource) -> Result<(), SupervisorError> {
        let device = self
            .health
            .iter()
            .position(|(d, _)| d == id)
            .ok_or_else(|| SupervisorError::NoDevice(id.to_string()))?;
        let (reply, answer) = channel();
        let commands = self.commands.as_ref().ok_or(SupervisorError::Stopped)?;
        commands
            .send(Command::Swap {
                device,
                source,
                reply,
            })
            .map_err(|_| SupervisorError::Stopped)?;
        let _ = self.wake.write(1);
        answer
            .recv_timeout(SWAP_TIMEOUT)
            .map_err(|_| SupervisorError::Stopped)?
    }
}

impl Drop for BackendSupervisor {
    fn drop(&mut self) {
        // A closed command channel tells the thread to end.
        self.commands = None;
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the backend supervisor panicked");
            }
        }
    }
}

/// The supervisor thread's nice value when the process may raise it (root or
/// CAP_SYS_NICE). The ring samples of backends without an in-flight buffer must keep
/// up with the guest (a ring's worth of requests between two samples and the
/// outstanding requests are no longer known, issue 6): on a loaded 2-core machine a
/// thread at the default weight was seen waiting more than that. The thread does
/// little work, so its weight costs others almost nothing. Backends it spawns get
/// the process's own nice value back (backend.rs).
const SUPERVISOR_NICE: libc::c_int = -10;

fn raise_priority() {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority on this thread's own id; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, SUPERVISOR_NICE) } != 0 {
        tracing::debug!(
            "supervisor thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// Epoll tokens: the device index in bits 40.., the watch generation in bits 8..40, the
// kind of fd in the low byte.
const WAKE: u64 = u64::MAX;
const SOCKET: u64 = 1;
const EXIT: u64 = 2;

fn token(device: usize, generation: u32, kind: u64) -> u64 {
    ((device as u64) << 40) | (u64::from(generation) << 8) | kind
}

/// The supervisor's view of one device.
struct Device {
    id: String,
    /// Queues a backend serves without VHOST_USER_PROTOCOL_F_MQ (the device-type table).
    backend_queues: usize,
    transport: Arc<Mutex<VirtioMmioTransport>>,
    state: SharedBackendState,
    source: BackendSource,
    restart: RestartConfig,
    health: Arc<Mutex<DeviceHealth>>,
    /// The socket path an `exec` backend is told to listen on.
    exec_socket: PathBuf,
    spawns: u64,
    generation: u32,
    watch: Option<BackendWatch>,
    retry_at: Option<Instant>,
    streak: u32,
    up_since: Option<Instant>,
    tracker: Arc<Mutex<RingTracker>>,
    mem: GuestMemory,
    /// Whether the attached backend lacks an in-flight buffer (its rings are sampled).
    sampled: bool,
    stall: StallDetector,
    /// A backend that could not be killed yet (uninterruptible sleep): the device is
    /// given to no other backend until it has died.
    unfenced: Option<Backend>,
    /// What the lost backend did to end its connection (a missed deadline, a bad
    /// reply), if that is how it was lost.
    missed: Option<String>,
}

impl Device {
    /// Whether its rings are sampled now: while a backend without an in-flight buffer
    /// serves it, and while a restart is pending after one went away — an attempt
    /// that failed after the rings were handed over may have left a backend that goes
    /// on completing requests until it notices.
    fn rings_sampled(&self) -> bool {
        self.sampled && (self.watch.is_some() || self.retry_at.is_some())
    }

    fn new(d: SupervisedDevice, health: Arc<Mutex<DeviceHealth>>, runtime_dir: &Path) -> Self {
        let (state, socket, (tracker, mem)) = {
            let t = lock(&d.transport);
            (t.backend_state(), t.socket(), t.ring_tracker())
        };
        let exec_socket = match d.config.backend {
            BackendSource::Exec(_) => socket,
            BackendSource::Socket(_) => backend::spawn_socket(runtime_dir, &d.config.id, 0),
        };
        Device {
            id: d.config.id.clone(),
            backend_queues: virtio::DeviceType::of(&d.config).backend_queues,
            transport: d.transport,
            state,
            source: d.config.backend,
            restart: d.config.restart,
            health,
            exec_socket,
            spawns: 1,
            generation: 0,
            watch: None,
            retry_at: None,
            streak: 0,
            up_since: Some(Instant::now()),
            tracker,
            mem,
            sampled: false,
            stall: StallDetector::default(),
            unfenced: None,
            missed: None,
        }
    }
}

struct Supervisor {
    epoll: Epoll,
    wake: Arc<EventFd>,
    commands: Receiver<Command>,
    devices: Vec<Device>,
    runtime_dir: PathBuf,
    base_dir: PathBuf,
    /// Ring samples in a row that saw nothing pass.
    quiet_samples: u32,
    next_sample: Instant,
    next_stall_check: Instant,
}

impl Supervisor {
    fn run(mut self) {
        raise_priority();
        let mut events = [EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(self.timeout_ms(), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    tracing::error!("backend supervisor stopped: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == WAKE {
                    let _ = self.wake.read();
                    if !self.take_commands() {
                        return;
                    }
                    self.activate_pending();
                } else {
                    self.on_event(event.data());
                }
            }
            self.restart_due();
            self.sample_due();
            self.check_stalls();
        }
    }

    /// Milliseconds until the next restart or ring sample is due, -1 when none is.
    fn timeout_ms(&self) -> i32 {
        let now = Instant::now();
        let sample = self
            .devices
            .iter()
            .any(Device::rings_sampled)
            .then_some(self.next_sample);
        let stalls = self
            .devices
            .iter()
            .any(|d| d.watch.is_some())
            .then_some(self.next_stall_check);
        self.devices
            .iter()
            .filter_map(|d| d.retry_at)
            .chain(sample)
            .chain(stalls)
            // Rounded up: a sample due in 0.4 ms must not become a 0 ms timeout that
            // spins until it is due.
            .map(|t| {
                let us = t.saturating_duration_since(now).as_micros();
                us.div_ceil(1000).min(60_000) as i32
            })
            .min()
            .unwrap_or(-1)
    }

    /// Samples the rings of backends without an in-flight buffer ([`RingTracker`]).
    fn sample_due(&mut self) {
        let now = Instant::now();
        if now < self.next_sample {
            return;
        }
        let mut busiest = 0;
        for d in self.devices.iter().filter(|d| d.rings_sampled()) {
            let mut tracker = lock(&d.tracker);
            if tracker.is_active() {
                busiest = busiest.max(tracker.sample(&d.mem));
            }
        }
        self.quiet_samples = if busiest == 0 {
            self.quiet_samples.saturating_add(1)
        } else {
            0
        };
        let every = if self.quiet_samples >= QUIET_SAMPLES {
            SAMPLE_IDLE
        } else {
            SAMPLE_BUSY
        };
        self.next_sample = now + every;
    }

    /// Hands the rings to the backends of devices whose driver has just set DRIVER_OK.
    fn activate_pending(&mut self) {
        for d in &self.devices {
            lock(&d.transport).activate_pending();
        }
    }

    /// Runs queued commands; false once the command channel is closed.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Swap {
                    device,
                    source,
                    reply,
                }) => {
                    let _ = reply.send(self.swap(device, source));
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn watch(&mut self, index: usize) {
        let dev = &mut self.devices[index];
        dev.generation = dev.generation.wrapping_add(1);
        let (watch, tracks) = {
            let t = lock(&dev.transport);
            (t.watch(), t.info().inflight_tracking)
        };
        dev.sampled = !tracks;
        if dev.sampled {
            // A backend just (re)attached serves the guest's backlog at once.
            self.quiet_samples = 0;
            self.next_sample = self.next_sample.min(Instant::now() + SAMPLE_BUSY);
        }
        let watch = match watch {
            Ok(Some(w)) => w,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("device {}: cannot watch the backend: {e}", dev.id);
                return;
            }
        };
        let add = |fd: i32, events: EventSet, kind: u64| {
            let ev = EpollEvent::new(events, token(index, dev.generation, kind));
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                tracing::error!("device {}: cannot watch the backend: {e}", dev.id);
            }
        };
        // Only hang-up on the socket: its replies belong to whoever sent the request.
        add(watch.socket.as_raw_fd(), EventSet::READ_HANG_UP, SOCKET);
        if let Some(exit) = &watch.exit {
            add(exit.pidfd().as_raw_fd(), EventSet::IN, EXIT);
        }
        dev.watch = Some(watch);
    }

    fn unwatch(&mut self, index: usize) {
        let Some(watch) = self.devices[index].watch.take() else {
            return;
        };
        let mut fds = vec![watch.socket.as_raw_fd()];
        fds.extend(watch.exit.as_ref().map(|e| e.pidfd().as_raw_fd()));
        for fd in fds {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn on_event(&mut self, data: u64) {
        let index = (data >> 40) as usize;
        let generation = ((data >> 8) & 0xffff_ffff) as u32;
        let current = self
            .devices
            .get(index)
            .is_some_and(|d| d.generation == generation && d.watch.is_some());
        if current {
            self.on_lost(index);
        }
    }

    /// The backend of device `index` went away.
    fn on_lost(&mut self, index: usize) {
        self.lose(index, Loss::Gone);
    }

    /// Device `index` loses its backend (gone, or stalled and to be fenced).
    fn lose(&mut self, index: usize, loss: Loss) {
        self.unwatch(index);
        let dev = &mut self.devices[index];
        if dev.state.is_retired() {
            return;
        }
        dev.stall.reset();
        let backend = {
            let mut t = lock(&dev.transport);
            dev.missed = t.broken();
            t.detach()
        };
        let reason = match backend {
            Some(b) => self.end_backend(index, b, &loss),
            None => "the backend went away".to_string(),
        };
        let dev = &mut self.devices[index];
        let healthy = dev.up_since.is_some_and(|t| t.elapsed() >= HEALTHY_UPTIME);
        dev.streak = if healthy { 0 } else { dev.streak + 1 };
        dev.up_since = None;
        {
            let mut h = lock(&dev.health);
            h.last_exit = Some(reason.clone());
            h.down_since = Some(h.stalled_since.take().unwrap_or_else(Instant::now));
        }
        let plan = self.schedule(index);
        tracing::warn!(
            "device {}: {reason}; the device's queues stall; {plan}",
            self.devices[index].id
        );
    }

    /// Plans the next restart of device `index` (down now); says what it planned.
    fn schedule(&mut self, index: usize) -> String {
        let dev = &mut self.devices[index];
        if dev.restart.policy == RestartPolicy::Never {
            dev.state.set(BackendState::Failed);
            return "restart = \"never\": the device stays down".into();
        }
        if let Some(max) = dev.restart.max_failures {
            if dev.streak >= max {
                dev.state.set(BackendState::Failed);
                return format!("giving up after {max} failed restarts in a row (restart_max)");
            }
        }
        dev.state.set(BackendState::Down);
        let delay = backoff(dev.streak);
        dev.retry_at = Some(Instant::now() + delay);
        let what = match dev.source {
            BackendSource::Exec(_) => "restarting it",
            BackendSource::Socket(_) => "reconnecting",
        };
        format!("{what} in {} ms", delay.as_millis())
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        for index in 0..self.devices.len() {
            if self.devices[index].retry_at.is_some_and(|t| t <= now) {
                self.devices[index].retry_at = None;
                self.restart(index);
            }
        }
    }

    /// Starts or connects the backend `source` of device `index` and brings it up; the
    /// device is not touched.
    fn bring_up(
        &self,
        index: usize,
        source: &BackendSource,
        socket: &Path,
    ) -> Result<(Backend, VhostUserFrontend), String> {
        let dev = &self.devices[index];
        let (backend, stream) = backend::start_source(&dev.id, source, socket, &self.base_dir)
            .map_err(|e| error_chain(&e))?;
        let frontend = VhostUserFrontend::connect(&dev.id, stream, dev.backend_queues)
            .map_err(|e| format!("vhost-user bring-up: {}", error_chain(&e)))?;
        frontend.set_reply_timeout(dev.restart.reply_timeout);
        lock(&dev.transport).check_compatible(&frontend)?;
        Ok((backend, frontend))
    }

    /// One restart attempt of device `index`, which is down.
    fn restart(&mut self, index: usize) {
        if self.devices[index].state.is_retired() {
            return;
        }
        if !self.fenced(index) {
            let dev = &mut self.devices[index];
            dev.retry_at = Some(Instant::now() + BACKOFF_MAX);
            return;
        }
        let dev = &self.devices[index];
        dev.state.set(BackendState::Reconnecting);
        let (source, socket) = (dev.source.clone(), dev.exec_socket.clone());
        let result = self
            .bring_up(index, &source, &socket)
            .and_then(|(backend, frontend)| self.attach(index, backend, frontend));
        match result {
            Ok(tracked) => self.restarted(index, tracked),
            Err(reason) => self.restart_failed(index, reason),
        }
    }

    /// Hands device `index` to a brought-up backend; returns whether in-flight requests
    /// were tracked.
    fn attach(
        &self,
        index: usize,
        backend: Backend,
        frontend: VhostUserFrontend,
    ) -> Result<bool, String> {
        let mut t = lock(&self.devices[index].transport);
        let was_active = t.state().activated;
        match t.attach(frontend) {
            Ok(tracked) => {
                if let Some(old) = t.install_backend(backend) {
                    drop(t);
                    drop(old);
                }
                Ok(tracked || !was_active)
            }
            Err(e) => Err(format!(
                "replaying the device set-up failed: {}",
                error_chain(&e)
            )),
        }
    }

    fn restarted(&mut self, index: usize, tracked: bool) {
        self.watch(index);
        let dev = &mut self.devices[index];
        dev.up_since = Some(Instant::now());
        let stall = {
            let mut h = lock(&dev.health);
            let stall = h.down_since.take().map(|t| t.elapsed()).unwrap_or_default();
            h.restarts += 1;
            h.down_total += stall;
            h.last_stall = Some(stall);
            h.inflight_state_known = tracked;
            stall
        };
        let (pid, active) = {
            let t = lock(&dev.transport);
            (t.info().backend_pid, t.state().activated)
        };
        let how = if !active {
            "the driver had not started the device yet"
        } else if tracked {
            "requests it had in flight are served again"
        } else {
            "reconnected, in-flight state unknown: requests were replayed from the used index"
        };
        let pid = pid.map_or_else(|| "attached".to_string(), |p| format!("pid {p}"));
        tracing::info!(
            "device {}: backend back after {} ms ({pid}); {how}",
            dev.id,
            stall.as_millis()
        );
    }

    fn restart_failed(&mut self, index: usize, reason: String) {
        let dev = &mut self.devices[index];
        dev.streak += 1;
        let failures = {
            let mut h = lock(&dev.health);
            h.failed_restarts += 1;
            h.last_exit = Some(reason.clone());
            h.failed_restarts
        };
        let plan = self.schedule(index);
        let id = &self.devices[index].id;
        // Once per back-off doubling at most: the delays grow, so this stays quiet.
        if failures.is_power_of_two() || self.devices[index].state.get() == BackendState::Failed {
            tracing::warn!("device {id}: restart failed: {reason}; {plan}");
        } else {
            tracing::debug!("device {id}: restart failed: {reason}; {plan}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_zero_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(4), Duration::from_millis(400));
        assert_eq!(backoff(8), Duration::from_secs(5));
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn tokens_keep_device_generation_and_kind_apart() {
        let t = token(3, 0xdead_beef, EXIT);
        assert_eq!(t >> 40, 3);
        assert_eq!((t >> 8) & 0xffff_ffff, 0xdead_beef);
        assert_eq!(t & 0xff, EXIT);
        assert_ne!(token(0, 0, SOCKET), WAKE);
    }

    #[test]
    fn health_reports_the_current_down_period() {
        let mut h = DeviceHealth {
            down_total: Duration::from_millis(30),
            down_since: Some(Instant::now() - Duration::from_millis(20)),
            ..Default::default()
        };
        let mut info = DeviceInfo {
            id: "d".into(),
            kind: plexvm_protocol::spec::DeviceKind::Blk,
            mmio_base: 0,
            irq: 5,
            socket: "s".into(),
            backend_pid: None,
            state: BackendState::Down,
            activated: true,
            restarts: 0,
            failed_restarts: 0,
            last_exit: None,
            down_ms: 0,
            last_stall_ms: None,
            stalled_ms: None,
            inflight_tracking: false,
            inflight_state_known: true,
        };
        h.fill(&mut info);
        assert!(info.down_ms >= 50, "{}", info.down_ms);
        h.down_since = None;
        h.last_stall = Some(Duration::from_millis(7));
        h.fill(&mut info);
        assert_eq!((info.down_ms, info.last_stall_ms), (30, Some(7)));
    }
}
