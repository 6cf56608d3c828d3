//! The listening socket, one vhost-user daemon per connection, and shutdown.
//!
//! The socket is bound once and kept for the life of the process: a frontend that
//! reconnects finds the same path, and nobody can slip in between (rust-vmm/vhost#321
//! describes what goes wrong when a backend re-creates its socket). Each accepted
//! connection gets a new [`VhostUserBlk`] and `VhostUserDaemon`, because the
//! vhost-user-backend handler accepts SET_OWNER only once. After a connection ends the
//! image is flushed and the next connection is awaited, as qemu-storage-daemon does.

use plexvm_backend_support::StaleSocketError;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::BlockConfig;
use crate::disk::{Disk, DiskError, DiskOptions};
use crate::proxy::ConnectionProxy;
use crate::request::BlockDevice;
use crate::vhu_blk::{QueueLayout, VhostUserBlk, VhostUserBlkError, WorkerOptions};

/// Errors that end the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The image cannot be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
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
    /// Waiting for connections failed.
    #[error("cannot wait for connections")]
    Poll(#[source] io::Error),
    /// The per-connection backend cannot be created.
    #[error("cannot create the connection's backend")]
    Backend(#[from] VhostUserBlkError),
    /// vhost-user-backend failed to set up a daemon. (Its error type implements only
    /// `Display`, so the cause is carried as text.)
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// Signal handling cannot be set up.
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    /// The final flush of the image failed.
    #[error("cannot flush the image")]
    Flush(#[source] io::Error),
}

/// Asks a running [`BlockServer::serve`] to stop: it closes the current connection,
/// stops waiting for new ones, flushes the image and returns. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    requested: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
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
                connection: Mutex::new(None),
            }),
        })
    }

    /// Requests shutdown; returns at once.
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        // A full counter (EAGAIN) already means "wake up".
        let _ = self.inner.wake.write(1);
        if let Some(handle) = self.lock_connection().as_ref() {
            handle.shutdown();
        }
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.inner
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the live connection; closes it at once if shutdown already began.
    fn set_connection(&self, handle: Option<ShutdownHandle>) {
        let mut slot = self.lock_connection();
        *slot = handle;
        if self.is_requested() {
            if let Some(handle) = slot.as_ref() {
                handle.shutdown();
            }
        }
    }
}

/// A bound socket serving one block device to one frontend at a time.
pub struct BlockServer {
    socket: PathBuf,
    listener: Listener,
    device: Arc<BlockDevice>,
    layout: QueueLayout,
    options: WorkerOptions,
}

impl BlockServer {
    /// Opens the image and binds the socket described by `config`.
    pub fn new(config: &BlockConfig) -> Result<BlockServer, ServerError> {
        let disk = Disk::open(
            &config.image,
            DiskOptions {
                readonly: config.readonly,
                direct: config.direct,
            },
        )?;
        let device = Arc::new(BlockDevice::new(disk, config.serial));
        let layout = QueueLayout {
            queues: config.queues,
            queue_size: config.queue_size,
        };
        let mut server = BlockServer::bind(&config.socket, device, layout)?;
        server.set_worker_options(WorkerOptions {
            poll_max: config.poll_max,
            io_threads: config.io_threads,
            ..WorkerOptions::default()
        });
        Ok(server)
    }

    /// Binds `socket` (removing a stale socket file there first) for `device`.
    pub fn bind(
        socket: &Path,
        device: Arc<BlockDevice>,
        layout: QueueLayout,
    ) -> Result<BlockServer, ServerError> {
        remove_stale_socket(socket)?;
        let listener = UnixListener::bind(socket).map_err(|source| ServerError::Listen {
            path: socket.to_owned(),
            source,
        })?;
        Ok(BlockServer {
            socket: socket.to_owned(),
            listener: Listener::from(listener),
            device,
            layout,
            options: WorkerOptions::default(),
        })
    }

    /// How queue workers serve their rings (the default of [`BlockServer::bind`]: no
    /// polling, no I/O threads); applies from the next connection.
    pub fn set_worker_options(&mut self, options: WorkerOptions) {
        self.options = options;
    }

    /// The device served.
    pub fn device(&self) -> &Arc<BlockDevice> {
        &self.device
    }

    /// Serves connections one after another until `shutdown` is triggered, then flushes
    /// the image. A connection that ends with a protocol error is logged, not fatal.
    pub fn serve(&mut self, shutdown: &Shutdown) -> Result<(), ServerError> {
        let epoll = self.connection_poller(shutdown)?;
        while !shutdown.is_requested() {
            if !wait_for_connection(&epoll)? {
                continue;
            }
            if shutdown.is_requested() {
                break;
            }
            self.serve_connection(shutdown)?;
            if let Err(e) = self.device.disk().flush() {
                tracing::error!("cannot flush the image after disconnect: {e}");
            }
        }
        self.device.disk().flush().map_err(ServerError::Flush)
    }

    fn connection_poller(&self, shutdown: &Shutdown) -> Result<Epoll, ServerError> {
        let epoll = Epoll::new().map_err(ServerError::Poll)?;
        for (fd, token) in [
            (self.listener.as_raw_fd(), LISTENER_TOKEN),
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

    /// Accepts the pending connection and serves it until it ends. The connection goes
    /// through a [`ConnectionProxy`], which answers GET/SET_INFLIGHT_FD itself.
    fn serve_connection(&mut self, shutdown: &Shutdown) -> Result<(), ServerError> {
        let stream = match self.listener.accept() {
            Ok(Some(stream)) => stream,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!("cannot accept a connection: {e}");
                return Ok(());
            }
        };
        let backend = Arc::new(VhostUserBlk::new(
            self.device.clone(),
            self.layout,
            self.options,
        )?);
        let (proxy, daemon_side) = ConnectionProxy::start(stream, backend.clone())
            .map_err(|e| ServerError::Daemon(e.to_string()))?;
        let mut daemon =
            VhostUserDaemon::new("plexvm-blk".to_owned(), backend.clone(), backend.memory())
                .map_err(|e| ServerError::Daemon(e.to_string()))?;
        let result = match daemon.start(&mut Listener::from(daemon_side)) {
            Ok(()) => {
                tracing::info!("frontend connected");
                shutdown.set_connection(daemon.shutdown_handle());
                let result = daemon.wait();
                shutdown.set_connection(None);
                result
            }
            Err(e) => Err(e),
        };
        drop(proxy);
        // Dropping the daemon stops and joins the queue workers.
        drop(daemon);
        // SAFETY: the daemon built on `backend` is dropped, so its workers are joined.
        unsafe { backend.close_exit_fds() };
        match result {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_),
            )) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!("connection ended: {e}"),
        }
        Ok(())
    }
}

impl std::fmt::Debug for BlockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockServer")
            .field("socket", &self.socket)
            .field("device", &self.device)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Drop for BlockServer {
    fn drop(&mut self) {
        // The socket file is ours (bound in `bind`); leave nothing stale behind.
        let _ = remove_stale_socket(&self.socket);
    }
}

const LISTENER_TOKEN: u64 = 0;
const SHUTDOWN_TOKEN: u64 = 1;

/// Waits until a connection is pending (true) or shutdown is signalled (false).
fn wait_for_connection(epoll: &Epoll) -> Result<bool, ServerError> {
    let mut events = [EpollEvent::default(); 2];
    let count = match epoll.wait(-1, &mut events) {
        Ok(count) => count,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
        Err(e) => return Err(ServerError::Poll(e)),
    };
    Ok(events[..count].iter().any(|e| e.data() == LISTENER_TOKEN))
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

/// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it starts
/// later) and starts a thread that turns them into `shutdown.trigger()`. Call before
/// any other thread is started.
pub fn handle_termination_signals(shutdown: Shutdown) -> Result<(), ServerError> {
    let sigset = vmm_sys_util::signal::create_sigset(&[libc::SIGTERM, libc::SIGINT])
        .map_err(|e| ServerError::Signals(io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: `sigset` is a valid, initialised signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigset, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(ServerError::Signals(io::Error::from_raw_os_error(rc)));
    }
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: both pointers refer to live locals of the right types.
            let rc = unsafe { libc::sigwait(&sigset, &mut signal) };
            if rc == 0 {
                tracing::info!(signal, "termination signal: flushing and exiting");
                shutdown.trigger();
            }
        })
        .map_err(ServerError::Signals)?;
    Ok(())
}

/// Runs the backend described by `config` until SIGTERM or SIGINT.
pub fn run(config: BlockConfig) -> Result<(), ServerError> {
    let shutdown = Shutdown::new().map_err(ServerError::Signals)?;
    handle_termination_signals(shutdown.clone())?;
    let mut server = BlockServer::new(&config)?;
    tracing::info!(
        socket = %config.socket.display(),
        image = %config.image.display(),
        sectors = server.device().disk().capacity_sectors(),
        "serving"
    );
    server.serve(&shutdown)
}
