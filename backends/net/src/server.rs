//! The running switch: one listener thread per VM port, one reader thread per tap,
//! signal handling (SIGTERM/SIGINT end it, SIGUSR1 prints the counters) and shutdown.
//!
//! Each socket is bound once and kept for the life of the process, so a VM that
//! reconnects finds the same path and nobody can slip in between (rust-vmm/vhost#321).
//! Each accepted connection gets a fresh [`VhostUserNet`] and `VhostUserDaemon` (the
//! handler accepts SET_OWNER only once) and a fresh [`GuestLink`]; while it lasts the
//! port's link points to it, and when it ends the port goes down: its learned addresses
//! are forgotten and frames for it are no longer delivered. Other ports never notice.

use plexvm_backend_support::StaleSocketError;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use std::os::unix::net::SocketAddr;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::NetConfig;
use crate::frame::Packet;
use crate::mac_table::PortId;
use crate::port::{GuestLink, GuestPort};
use crate::relay::{private_listener, Relay};
use crate::switch::{ForwardCtx, Port, PortKind, Switch};
use crate::tap::{Tap, TapError};
use crate::vhu_net::{DeviceLayout, VhostUserNet, VhostUserNetError};

/// Errors that end the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something that is not a socket is in the way of a socket path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A socket cannot be bound.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A tap cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Waiting for events failed.
    #[error("cannot wait for events")]
    Poll(#[source] io::Error),
    /// The per-connection backend cannot be created.
    #[error("cannot create the connection's backend")]
    Backend(#[from] VhostUserNetError),
    /// vhost-user-backend failed to set up a daemon (its error type implements only
    /// `Display`, so the cause is carried as text).
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// Signal handling or a thread cannot be set up.
    #[error("cannot set up signal handling or threads")]
    Threads(#[source] io::Error),
}

/// Asks the running switch to stop: every connection is closed, every loop returns.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    requested: AtomicBool,
    wake: EventFd,
    connections: Mutex<Vec<Option<ShutdownHandle>>>,
}

impl std::fmt::Debug for ShutdownInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownInner")
            .field("requested", &self.requested)
            .finish_non_exhaustive()
    }
}

impl Shutdown {
    /// Creates a shutdown trigger.
    pub fn new() -> io::Result<Shutdown> {
        Ok(Shutdown {
            inner: Arc::new(ShutdownInner {
                requested: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                connections: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Requests shutdown; returns at once. The wake eventfd is never read, so it stays
    /// readable and wakes every loop that polls it.
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        let _ = self.inner.wake.write(1);
        for handle in self.lock_connections().iter().flatten() {
            handle.shutdown();
        }
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, Vec<Option<ShutdownHandle>>> {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers port `port`'s live connection; closes it at once if shutdown began.
    fn set_connection(&self, port: PortId, handle: Option<ShutdownHandle>) {
        let mut slots = self.lock_connections();
        if slots.len() <= port {
            slots.resize_with(port + 1, || None);
        }
        slots[port] = handle;
        if self.is_requested() {
            if let Some(handle) = slots[port].as_ref() {
                handle.shutdown();
            }
        }
    }
}

/// The switch with its sockets bound and taps open, not yet serving.
pub struct NetServer {
    switch: Arc<Switch>,
    listeners: Vec<(PortId, UnixListener)>,
    sockets: Vec<PathBuf>,
    queue_pairs: u16,
    queue_size: u16,
    mtu: Option<u16>,
}

impl NetServer {
    /// Binds every socket and opens every tap of `config`.
    pub fn new(config: &NetConfig) -> Result<NetServer, ServerError> {
        let mut ports = Vec::new();
        let mut listeners = Vec::new();
        let mut sockets = Vec::new();
        for (index, (socket, mac)) in config.sockets.iter().enumerate() {
            remove_stale_socket(socket)?;
            let listener = UnixListener::bind(socket).map_err(|source| ServerError::Listen {
                path: socket.clone(),
                source,
            })?;
            sockets.push(socket.clone());
            listeners.push((index, listener));
            let name = socket.file_name().map_or_else(
                || format!("vm{index}"),
                |n| n.to_string_lossy().into_owned(),
            );
            ports.push(Port::new(
                &name,
                PortKind::Guest(GuestPort::new(socket.clone(), *mac)),
            ));
        }
        for name in &config.taps {
            let tap = Tap::open(name)?;
            let name = tap.name().to_string();
            ports.push(Port::new(&name, PortKind::Tap(tap)));
        }
        Ok(NetServer {
            switch: Arc::new(Switch::new(ports, config.ageing)),
            listeners,
            sockets,
            queue_pairs: config.queue_pairs,
            queue_size: config.queue_size,
            mtu: config.mtu,
        })
    }

    /// The switch.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Serves every port until `shutdown` is triggered, then joins all threads.
    pub fn serve(&mut self, shutdown: &Shutdown) -> Result<(), ServerError> {
        let mut threads: Vec<JoinHandle<Result<(), ServerError>>> = Vec::new();
        for (port, listener) in self.listeners.drain(..) {
            let switch = self.switch.clone();
            let shutdown = shutdown.clone();
            let Some(guest) = switch.ports().get(port).and_then(Port::guest) else {
                continue;
            };
            let layout = DeviceLayout {
                queue_pairs: self.queue_pairs,
                queue_size: self.queue_size,
                mtu: self.mtu,
                mac: guest.mac,
            };
            threads.push(spawn(&format!("port{port}"), move || {
                serve_port(&switch, port, listener, layout, &shutdown)
            })?);
        }
        for port in 0..self.switch.ports().len() {
            if matches!(self.switch.ports()[port].kind, PortKind::Tap(_)) {
                let switch = self.switch.clone();
                let shutdown = shutdown.clone();
                threads.push(spawn(&format!("tap{port}"), move || {
                    read_tap(&switch, port, &shutdown)
                })?);
            }
        }
        let mut result = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    shutdown.trigger();
                    result = Err(e);
                }
                Err(_) => shutdown.trigger(),
            }
        }
        result
    }
}

impl std::fmt::Debug for NetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetServer")
            .field("switch", &self.switch)
            .field("sockets", &self.sockets)
            .finish_non_exhaustive()
    }
}

impl Drop for NetServer {
    fn drop(&mut self) {
        for socket in &self.sockets {
            let _ = remove_stale_socket(socket);
        }
    }
}

fn spawn(
    name: &str,
    f: impl FnOnce() -> Result<(), ServerError> + Send + 'static,
) -> Result<JoinHandle<Result<(), ServerError>>, ServerError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(ServerError::Threads)
}

const READY_TOKEN: u64 = 0;
const SHUTDOWN_TOKEN: u64 = 1;

/// An epoll set with `fd` (token READY) and the shutdown eventfd (token SHUTDOWN).
fn poller(fd: i32, shutdown: &Shutdown) -> Result<Epoll, ServerError> {
    let epoll = Epoll::new().map_err(ServerError::Poll)?;
    for (fd, token) in [
        (fd, READY_TOKEN),
        (shutdown.inner.wake.as_raw_fd(), SHUTDOWN_TOKEN),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(ServerError::Poll)?;
    }
    Ok(epoll)
}

/// Waits until the watched fd is ready (true) or shutdown is signalled (false).
fn wait_ready(epoll: &Epoll) -> Result<bool, ServerError> {
    let mut events = [EpollEvent::default(); 2];
    let count = match epoll.wait(-1, &mut events) {
        Ok(count) => count,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
        Err(e) => return Err(ServerError::Poll(e)),
    };
    Ok(events[..count].iter().any(|e| e.data() == READY_TOKEN))
}

/// Serves the VM port `port`: its connections, one after another. Each goes through
/// a [`Relay`] to the daemon's private listener.
fn serve_port(
    switch: &Arc<Switch>,
    port: PortId,
    listener: UnixListener,
    layout: DeviceLayout,
    shutdown: &Shutdown,
) -> Result<(), ServerError> {
    let (inner, inner_addr) =
        private_listener(&format!("port{port}")).map_err(ServerError::Threads)?;
    let mut inner = Listener::from(inner);
    let epoll = poller(listener.as_raw_fd(), shutdown)?;
    while !shutdown.is_requested() {
        if !wait_ready(&epoll)? || shutdown.is_requested() {
            continue;
        }
        let frontend = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(port, "cannot accept a connection: {e}");
                continue;
            }
        };
        serve_connection(
            switch,
            port,
            frontend,
            (&mut inner, &inner_addr),
            layout,
            shutdown,
        )?;
    }
    Ok(())
}

/// Serves the frontend connection `frontend` of `port` until it ends.
fn serve_connection(
    switch: &Arc<Switch>,
    port: PortId,
    frontend: UnixStream,
    (listener, inner_addr): (&mut Listener, &SocketAddr),
    layout: DeviceLayout,
    shutdown: &Shutdown,
) -> Result<(), ServerError> {
    let Some(guest) = switch.ports().get(port).and_then(Port::guest) else {
        return Ok(());
    };
    let link = Arc::new(GuestLink::new(usize::from(layout.queue_pairs)));
    let backend = Arc::new(VhostUserNet::new(
        switch.clone(),
        port,
        link.clone(),
        layout,
    )?);
    let mut daemon =
        VhostUserDaemon::new("plexvm-net".to_owned(), backend.clone(), backend.memory())
            .map_err(|e| ServerError::Daemon(e.to_string()))?;
    let relay = Relay::start(frontend, inner_addr).map_err(ServerError::Threads)?;
    let result = match daemon.start(listener) {
        Ok(()) => {
            tracing::info!(port, "frontend connected");
            guest.set_link(Some(link));
            shutdown.set_connection(port, daemon.shutdown_handle());
            let result = daemon.wait();
            shutdown.set_connection(port, None);
            guest.set_link(None);
            switch.port_down(port);
            result
        }
        Err(e) => {
            relay.abort();
            Err(e)
        }
    };
    // Dropping the daemon stops and joins the queue workers; the relay ends with it.
    drop(daemon);
    relay.join();
    // SAFETY: the daemon built on `backend` is dropped, so its workers are joined.
    unsafe { backend.close_exit_fds() };
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => tracing::info!(port, "frontend disconnected"),
        Err(e) => tracing::warn!(port, "connection ended: {e}"),
    }
    Ok(())
}

/// Reads frames from the tap of port `port` and forwards them, until shutdown.
fn read_tap(switch: &Arc<Switch>, port: PortId, shutdown: &Shutdown) -> Result<(), ServerError> {
    let Some(PortKind::Tap(tap)) = switch.ports().get(port).map(|p| &p.kind) else {
        return Ok(());
    };
    let epoll = poller(tap.fd(), shutdown)?;
    let mut pkt = Packet::default();
    let mut ctx = ForwardCtx::default();
    let mut errors = 0u64;
    while !shutdown.is_requested() {
        if !wait_ready(&epoll)? {
            continue;
        }
        loop {
            match tap.read_frame(&mut pkt) {
                Ok(false) => break,
                Ok(true) => match pkt.hdr.validate(pkt.frame().len()) {
                    Ok(_) => switch.forward(port, &pkt, &mut ctx),
                    Err(e) => switch.malformed(port, &e),
                },
                Err(e) => {
                    errors += 1;
                    if errors.is_power_of_two() {
                        tracing::warn!(tap = tap.name(), errors, "tap read failed: {e}");
                    }
                    // Do not spin on a device that keeps failing.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    break;
                }
            }
        }
        ctx.signals.flush();
    }
    Ok(())
}

/// Removes a socket left behind by an earlier run; refuses to remove anything else.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    plexvm_backend_support::remove_stale_socket(path).map_err(|e| match e {
        StaleSocketError::NotASocket => ServerError::NotASocket(path.to_owned()),
        StaleSocketError::Io(source) => ServerError::Listen {
            path: path.to_owned(),
            source,
        },
    })
}

/// Prints one line per port on stderr and, with `stats_file`, writes the JSON document
/// there (written beside it and renamed, so readers never see half a file).
pub fn report_stats(switch: &Switch, stats_file: Option<&Path>) {
    let stats = switch.stats();
    for port in &stats.ports {
        eprintln!("plexvm-net: {}", port.line());
    }
    if let Some(path) = stats_file {
        write_stats_file(switch, path);
    }
}

/// Writes the JSON statistics to `path` (beside it, then renamed).
pub fn write_stats_file(switch: &Switch, path: &Path) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = std::fs::write(&tmp, switch.stats().to_json() + "\n")
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!("cannot write {}: {e}", path.display());
    }
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 in the calling thread (and so in every thread it
/// starts later) and starts a thread that turns the first two into `shutdown.trigger()`
/// and SIGUSR1 into [`report_stats`]. Call before any other thread is started.
fn handle_signals(
    shutdown: Shutdown,
    switch: Arc<Switch>,
    stats_file: Option<PathBuf>,
) -> Result<(), ServerError> {
    let sigset = vmm_sys_util::signal::create_sigset(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1])
        .map_err(|e| ServerError::Threads(io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: `sigset` is a valid, initialised signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigset, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(ServerError::Threads(io::Error::from_raw_os_error(rc)));
    }
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: both pointers refer to live locals of the right types.
            if unsafe { libc::sigwait(&sigset, &mut signal) } != 0 {
                continue;
            }
            if signal == libc::SIGUSR1 {
                report_stats(&switch, stats_file.as_deref());
            } else {
                tracing::info!(signal, "termination signal: exiting");
                shutdown.trigger();
            }
        })
        .map_err(ServerError::Threads)?;
    Ok(())
}

/// Runs the switch described by `config` until SIGTERM or SIGINT.
pub fn run(config: NetConfig) -> Result<(), ServerError> {
    let shutdown = Shutdown::new().map_err(ServerError::Threads)?;
    let mut server = NetServer::new(&config)?;
    handle_signals(
        shutdown.clone(),
        server.switch().clone(),
        config.stats_file.clone(),
    )?;
    tracing::info!(ports = server.switch().ports().len(), "serving");
    let result = server.serve(&shutdown);
    if let Some(path) = &config.stats_file {
        write_stats_file(server.switch(), path);
    }
    result
}
