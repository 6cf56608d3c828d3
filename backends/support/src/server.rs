//! The serving loop every backend has: a socket bound once, connections accepted one
//! after another until shutdown, one vhost-user daemon per connection behind an
//! [`Interposer`], and SIGTERM/SIGINT turned into shutdown.
//!
//! The socket is bound once and kept for the life of the process: a frontend that
//! reconnects finds the same path, and nobody can slip in between (rust-vmm/vhost#321
//! describes what goes wrong when a backend re-creates its socket). Each connection
//! gets a new daemon, because the vhost-user-backend handler accepts SET_OWNER only
//! once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::interposer::{Interposer, RequestHook};
use crate::{StaleSocketError, WorkerExitEvents};

/// Errors of the serving loop that end the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something that is not a socket is in the way of the socket path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The socket cannot be bound.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for events failed.
    #[error("cannot wait for events")]
    Poll(#[source] io::Error),
    /// vhost-user-backend failed to set up a daemon. (Its error type implements only
    /// `Display`, so the cause is carried as text.)
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// Signal handling or a thread cannot be set up.
    #[error("cannot set up signal handling or threads")]
    Threads(#[source] io::Error),
}

/// Asks a running backend to stop: every registered connection is closed, every loop
/// waiting through a [`Readiness`] returns. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    requested: AtomicBool,
    /// Never read, so once written it stays readable and wakes every poller.
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

    /// Requests shutdown; returns at once.
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        // A full counter (EAGAIN) already means "wake up".
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

    /// Registers the live connection of `slot` (one per socket); closes it at once if
    /// shutdown already began.
    fn set_connection(&self, slot: usize, handle: Option<ShutdownHandle>) {
        let mut slots = self.lock_connections();
        if slots.len() <= slot {
            slots.resize_with(slot + 1, || None);
        }
        slots[slot] = handle;
        if self.is_requested() {
            if let Some(handle) = slots[slot].as_ref() {
                handle.shutdown();
            }
        }
    }
}

/// Waits until one descriptor is readable or shutdown is triggered.
#[derive(Debug)]
pub struct Readiness {
    epoll: Epoll,
}

const READY_TOKEN: u64 = 0;
const SHUTDOWN_TOKEN: u64 = 1;

impl Readiness {
    /// Watches `fd` and `shutdown`.
    pub fn new(fd: RawFd, shutdown: &Shutdown) -> Result<Readiness, ServeError> {
        let epoll = Epoll::new().map_err(ServeError::Poll)?;
        for (fd, token) in [
            (fd, READY_TOKEN),
            (shutdown.inner.wake.as_raw_fd(), SHUTDOWN_TOKEN),
        ] {
            let event = EpollEvent::new(EventSet::IN, token);
            epoll
                .ctl(ControlOperation::Add, fd, event)
                .map_err(ServeError::Poll)?;
        }
        Ok(Readiness { epoll })
    }

    /// True when the descriptor is readable; false when shutdown was signalled (or a
    /// signal interrupted the wait: check [`Shutdown::is_requested`]).
    pub fn wait(&self) -> Result<bool, ServeError> {
        let mut events = [EpollEvent::default(); 2];
        let count = match self.epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(ServeError::Poll(e)),
        };
        Ok(events[..count].iter().any(|e| e.data() == READY_TOKEN))
    }
}

/// A listening socket bound for the life of the backend; its file is removed on drop.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl BoundSocket {
    /// Binds `path`, first removing a socket an earlier run left there (but nothing
    /// else).
    pub fn bind(path: &Path) -> Result<BoundSocket, ServeError> {
        let listen_error = |source| ServeError::Listen {
            path: path.to_owned(),
            source,
        };
        crate::remove_stale_socket(path).map_err(|e| match e {
            StaleSocketError::NotASocket => ServeError::NotASocket(path.to_owned()),
            StaleSocketError::Io(source) => listen_error(source),
        })?;
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        Ok(BoundSocket {
            path: path.to_owned(),
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections one after another and hands each to `serve`, until
    /// `shutdown`; an error from `serve` ends the loop. A failed accept is logged.
    pub fn serve_each<E: From<ServeError>>(
        &self,
        shutdown: &Shutdown,
        mut serve: impl FnMut(UnixStream) -> Result<(), E>,
    ) -> Result<(), E> {
        let ready = Readiness::new(self.listener.as_raw_fd(), shutdown)?;
        while !shutdown.is_requested() {
            if !ready.wait()? || shutdown.is_requested() {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => serve(stream)?,
                Err(e) => {
                    crate::host_warn!(socket = %self.path.display(), "cannot accept a connection: {e}")
                }
            }
        }
        Ok(())
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        // The socket file is ours (bound in `bind`); leave nothing stale behind.
        let _ = crate::remove_stale_socket(&self.path);
    }
}

/// Guest memory as the daemon and the vrings share it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A device backend the kit can run a daemon on.
pub trait DaemonBackend: Send + Sync + 'static {
    /// The guest memory object the daemon and this backend share.
    fn memory(&self) -> GuestMemory;
    /// The exit events handed to vhost-user-backend's workers.
    fn exit_events(&self) -> &WorkerExitEvents;
}

/// One frontend connection to serve: whose, what the interposer does, and what the
/// backend does while it is up.
#[derive(Debug)]
pub struct Connection<'a, H> {
    /// The daemon's (and its thread's) name, e.g. the program name.
    pub name: &'a str,
    /// The connection's slot in `shutdown` (one per socket the backend serves).
    pub slot: usize,
    /// The interposer hook for this connection.
    pub hook: H,
    /// The shutdown that closes the connection.
    pub shutdown: &'a Shutdown,
}

/// Serves `stream` with a fresh daemon on `backend` until the frontend goes away or
/// shutdown: `up` runs once the daemon took the connection, `down` once it ended. A
/// connection that ends with a protocol error is logged, not an error.
pub fn serve_connection<B, H>(
    backend: Arc<B>,
    stream: UnixStream,
    connection: Connection<'_, H>,
    up: impl FnOnce(),
    down: impl FnOnce(),
) -> Result<(), ServeError>
where
    B: DaemonBackend + VhostUserBackend<Bitmap = ()>,
    B::Vring: Clone + Send + Sync,
    H: RequestHook,
{
    let Connection {
        name,
        slot,
        hook,
        shutdown,
    } = connection;
    let (interposer, daemon_side) = Interposer::start(stream, hook).map_err(ServeError::Threads)?;
    let mut daemon = VhostUserDaemon::new(name.to_owned(), backend.clone(), backend.memory())
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    let result = match daemon.start(&mut Listener::from(daemon_side)) {
        Ok(()) => {
            tracing::info!(slot, "frontend connected");
            up();
            shutdown.set_connection(slot, daemon.shutdown_handle());
            let result = daemon.wait();
            shutdown.set_connection(slot, None);
            down();
            result
        }
        Err(e) => Err(e),
    };
    drop(interposer);
    // Dropping the daemon stops and joins the queue workers.
    drop(daemon);
    // SAFETY: the daemon built on `backend` is dropped, so its workers are joined.
    unsafe { backend.exit_events().close_taken() };
    match result {
        Ok(())
        | Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => tracing::info!(slot, "frontend disconnected"),
        Err(e) => crate::host_warn!(slot, "connection ended: {e}"),
    }
    Ok(())
}

/// Blocks SIGTERM, SIGINT and `also` in the calling thread (and so in every thread it
/// starts later) and starts a thread that turns the first two into `shutdown.trigger()`
/// and passes the others to `on_signal`. Call before any other thread is started.
pub fn handle_signals(
    shutdown: Shutdown,
    also: &[libc::c_int],
    on_signal: impl Fn(libc::c_int) + Send + 'static,
) -> Result<(), ServeError> {
    let signals: Vec<libc::c_int> = [libc::SIGTERM, libc::SIGINT]
        .into_iter()
        .chain(also.iter().copied())
        .collect();
    let sigset = vmm_sys_util::signal::create_sigset(&signals)
        .map_err(|e| ServeError::Threads(io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: `sigset` is a valid, initialised signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigset, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(ServeError::Threads(io::Error::from_raw_os_error(rc)));
    }
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: both pointers refer to live locals of the right types.
            if unsafe { libc::sigwait(&sigset, &mut signal) } != 0 {
                continue;
            }
            if signal == libc::SIGTERM || signal == libc::SIGINT {
                tracing::info!(signal, "termination signal: exiting");
                shutdown.trigger();
            } else {
                on_signal(signal);
            }
        })
        .map_err(ServeError::Threads)?;
    Ok(())
}
