//! The running switch: one listener thread per VM port, one reader thread per tap,
//! signal handling (SIGTERM/SIGINT end it, SIGUSR1 prints the counters) and shutdown,
//! on the kit's serving loop (`plexvm_backend_support::server`).
//!
//! Each accepted connection gets a fresh [`VhostUserNet`] and daemon (the handler
//! accepts SET_OWNER only once), behind an interposer that holds back QEMU's early
//! SET_VRING_ENABLE ([`EarlyVringEnable`]), and a fresh [`GuestLink`]; while it lasts
//! the port's link points to it, and when it ends the port goes down: its learned
//! addresses are forgotten and frames for it are no longer delivered. Other ports never
//! notice.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use plexvm_backend_support::interposer::EarlyVringEnable;
use plexvm_backend_support::server::{
    handle_signals, serve_connection, BoundSocket, Connection, Readiness, ServeError,
};
use plexvm_backend_support::{guest_warn, host_warn};

pub use plexvm_backend_support::server::Shutdown;

use crate::config::NetConfig;
use crate::frame::Packet;
use crate::mac_table::PortId;
use crate::port::{GuestLink, GuestPort};
use crate::switch::{ForwardCtx, Port, PortKind, Switch};
use crate::tap::{Tap, TapError};
use crate::vhu_net::{DeviceLayout, VhostUserNet, VhostUserNetError};

/// Errors that end the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket, the serving loop, a thread or signal handling failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A tap cannot be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The per-connection backend cannot be created.
    #[error("cannot create the connection's backend")]
    Backend(#[from] VhostUserNetError),
}

/// The switch with its sockets bound and taps open, not yet serving.
pub struct NetServer {
    switch: Arc<Switch>,
    listeners: Vec<(PortId, Arc<BoundSocket>)>,
    queue_pairs: u16,
    queue_size: u16,
    mtu: Option<u16>,
}

impl NetServer {
    /// Binds every socket and opens every tap of `config`.
    pub fn new(config: &NetConfig) -> Result<NetServer, ServerError> {
        let mut ports = Vec::new();
        let mut listeners = Vec::new();
        for (index, (socket, mac)) in config.sockets.iter().enumerate() {
            listeners.push((index, Arc::new(BoundSocket::bind(socket)?)));
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
        for (port, listener) in self.listeners.clone() {
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
                listener.serve_each(&shutdown, |stream| {
                    serve_guest(&switch, port, stream, layout, &shutdown)
                })
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
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

fn spawn(
    name: &str,
    f: impl FnOnce() -> Result<(), ServerError> + Send + 'static,
) -> Result<JoinHandle<Result<(), ServerError>>, ServerError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| ServeError::Threads(e).into())
}

/// Serves one frontend connection of the VM port `port` until it ends.
fn serve_guest(
    switch: &Arc<Switch>,
    port: PortId,
    stream: UnixStream,
    layout: DeviceLayout,
    shutdown: &Shutdown,
) -> Result<(), ServerError> {
    let Some(guest) = switch.ports().get(port).and_then(Port::guest) else {
        return Ok(());
    };
    let link = Arc::new(GuestLink::new(usize::from(layout.queue_pairs)));
    let backend = VhostUserNet::new(switch.clone(), port, link.clone(), layout)?;
    let connection = Connection {
        name: "plexvm-net",
        slot: port,
        hook: EarlyVringEnable::default(),
        shutdown,
    };
    let up = || guest.set_link(Some(link));
    let down = || {
        guest.set_link(None);
        switch.port_down(port);
    };
    serve_connection(Arc::new(backend), stream, connection, up, down)?;
    Ok(())
}

/// Reads frames from the tap of port `port` and forwards them, until shutdown.
fn read_tap(switch: &Arc<Switch>, port: PortId, shutdown: &Shutdown) -> Result<(), ServerError> {
    let Some(PortKind::Tap(tap)) = switch.ports().get(port).map(|p| &p.kind) else {
        return Ok(());
    };
    let ready = Readiness::new(tap.fd(), shutdown)?;
    let mut pkt = Packet::default();
    let mut ctx = ForwardCtx::default();
    while !shutdown.is_requested() {
        if !ready.wait()? {
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
                    guest_warn!(tap = tap.name(), "tap read failed: {e}");
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
        host_warn!("cannot write {}: {e}", path.display());
    }
}

/// Runs the switch described by `config` until SIGTERM or SIGINT.
pub fn run(config: NetConfig) -> Result<(), ServerError> {
    let shutdown = Shutdown::new().map_err(ServeError::Threads)?;
    let mut server = NetServer::new(&config)?;
    let (switch, stats_file) = (server.switch().clone(), config.stats_file.clone());
    // SIGUSR1 prints the counters (and writes the stats file).
    handle_signals(shutdown.clone(), &[libc::SIGUSR1], move |_| {
        report_stats(&switch, stats_file.as_deref())
    })?;
    tracing::info!(ports = server.switch().ports().len(), "serving");
    let result = server.serve(&shutdown);
    if let Some(path) = &config.stats_file {
        write_stats_file(server.switch(), path);
    }
    result
}
