//! The API server: one thread that accepts connections on the VM's Unix socket and
//! answers one request per connection, one connection at a time.
//!
//! A client cannot wedge it: every request must arrive whole within the request timeout
//! (a client that connects and sends nothing is dropped when it expires), heads and
//! bodies have size limits (see `http.rs`), and writes time out. The VM never waits for
//! this thread; the thread calls into the VM only through [`VmController`].

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, Response};
use super::{router, VmController};

/// How long a client has to send a whole request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing a response may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After an answer, how long and how much unread input is drained before closing, so
/// the client reads our answer instead of a reset (a "lingering close").
const LINGER_TIME: Duration = Duration::from_millis(250);
const LINGER_BYTES: usize = 256 * 1024;

const TOKEN_STOP: u64 = 0;
const TOKEN_LISTENER: u64 = 1;

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process answers on the socket.
    #[error("another server is already listening on {}", .0.display())]
    InUse(PathBuf),
    /// The path exists and is something other than a socket; it is left alone.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale socket {}", .path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot bind the API socket {}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating the thread's event plumbing or the thread failed.
    #[error("cannot set up the API server thread")]
    Setup(#[source] io::Error),
}

/// State shared by the server thread and its handle.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    stop_event: EventFd,
    /// A clone of the connection whose request is still being read, so that stopping
    /// can cut a slow client short. Cleared once the request is in: a request that
    /// arrived whole (`stop` itself, typically) always gets its answer before the
    /// handle's Drop finishes joining the thread.
    current: Mutex<Option<UnixStream>>,
}

/// Starts API servers; see [`ApiServer::start`].
#[derive(Debug)]
pub struct ApiServer;

impl ApiServer {
    /// Binds `path` and serves the control API for `controller` on a new thread until the
    /// returned handle is dropped. A stale socket file at `path` (nobody listening) is
    /// replaced; a live one is an error.
    pub fn start(
        path: &Path,
        controller: Arc<dyn VmController>,
    ) -> Result<ApiServerHandle, ServerError> {
        Self::start_with_timeout(path, controller, DEFAULT_REQUEST_TIMEOUT)
    }

    /// [`ApiServer::start`] with a chosen request timeout: the time a client has to send
    /// a whole request.
    pub fn start_with_timeout(
        path: &Path,
        controller: Arc<dyn VmController>,
        request_timeout: Duration,
    ) -> Result<ApiServerHandle, ServerError> {
        let listener = bind(path)?;
        // Record which file we created, so that Drop removes only our own socket.
        let inode = std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            stop_event: EventFd::new(EFD_NONBLOCK).map_err(ServerError::Setup)?,
            current: Mutex::new(None),
        });
        let epoll = setup_epoll(&listener, &shared.stop_event).map_err(ServerError::Setup)?;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("plexvm-api".into())
            .spawn(move || {
                serve(
                    &listener,
                    &epoll,
                    &thread_shared,
                    &*controller,
                    request_timeout,
                )
            })
            .map_err(ServerError::Setup)?;
        tracing::info!(socket = %path.display(), "control API listening");
        Ok(ApiServerHandle {
            path: path.to_owned(),
            inode,
            shared,
            thread: Some(thread),
        })
    }
}

/// A running API server. Dropping it stops the thread (cutting short a connection being
/// served) and removes the socket file.
#[derive(Debug)]
pub struct ApiServerHandle {
    path: PathBuf,
    inode: Option<(u64, u64)>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        // Dropped from a handler on the API thread itself (e.g. a controller that tears
        // the VM down on stop): the connection being served still gets its answer, and
        // joining would deadlock; the thread ends after that connection.
        let on_api_thread = self
            .thread
            .as_ref()
            .is_some_and(|t| t.thread().id() == std::thread::current().id());
        // Order matters: the thread checks `stop` after publishing `current`, so either
        // it sees the flag or we see (and shut down) its connection.
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.stop_event.write(1) {
            tracing::warn!("cannot wake the API thread: {e}");
        }
        if !on_api_thread {
            if let Some(stream) = lock_current(&self.shared).as_ref() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            if let Some(thread) = self.thread.take() {
                if thread.join().is_err() {
                    tracing::error!("API thread panicked");
                }
            }
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && self.inode == Some((m.dev(), m.ino())));
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), "cannot remove API socket: {e}");
            }
        }
    }
}

fn lock_current(shared: &Shared) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
    // The guarded value is a plain Option; a panic while holding it leaves nothing broken.
    shared
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Binds `path`, replacing a stale socket file but never a live socket or another file.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_owned()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::debug!(socket = %path.display(), "removing stale API socket");
                std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?;
            }
            // Permission denied and the like: let bind report it.
            Err(_) => {}
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // Non-blocking so that a wake-up whose connection has gone cannot block accept.
    listener.set_nonblocking(true).map_err(ServerError::Setup)?;
    Ok(listener)
}

fn setup_epoll(listener: &UnixListener, stop: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_STOP),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        listener.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
    )?;
    Ok(epoll)
}

/// The server thread: waits for a connection or the stop event.
fn serve(
    listener: &UnixListener,
    epoll: &Epoll,
    shared: &Shared,
    controller: &dyn VmController,
    request_timeout: Duration,
) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("control API stopped: epoll failed: {e}");
                return;
            }
        };
        if shared.stop.load(Ordering::SeqCst)
            || events[..ready].iter().any(|e| e.data() == TOKEN_STOP)
        {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if !publish_current(shared, &stream) {
                    return;
                }
                serve_connection(&stream, shared, controller, request_timeout);
                *lock_current(shared) = None;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning on epoll.
                tracing::warn!("control API accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Makes `stream` visible to the handle's Drop; false when stopping has begun.
fn publish_current(shared: &Shared, stream: &UnixStream) -> bool {
    match stream.try_clone() {
        Ok(clone) => *lock_current(shared) = Some(clone),
        Err(e) => tracing::warn!("cannot clone API connection: {e}"),
    }
    !shared.stop.load(Ordering::SeqCst)
}

/// Reads one request, answers it and closes the connection.
fn serve_connection(
    stream: &UnixStream,
    shared: &Shared,
    controller: &dyn VmController,
    timeout: Duration,
) {
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
    {
        tracing::warn!("cannot set up API connection: {e}");
        return;
    }
    let request = http::read_request(stream, Instant::now() + timeout);
    // From here on the answer is bounded by WRITE_TIMEOUT and LINGER_TIME, so stopping
    // waits for it instead of cutting the connection (a client asking for `stop` used
    // to see the connection closed before its answer).
    *lock_current(shared) = None;
    let response = match request {
        Ok(request) => {
            let response = router::route(&request, controller);
            tracing::debug!(
                method = %request.method,
                target = %request.target,
                status = response.status(),
                "API request"
            );
            response
        }
        Err(e) => match e.status() {
            Some(status) => {
                tracing::debug!(status, "bad API request: {e}");
                Response::error(status, e.to_string())
            }
            None => {
                tracing::debug!("API connection ended: {e}");
                return;
            }
        },
    };
    if let Err(e) = response.write_to(&mut &*stream) {
        tracing::debug!("cannot write API response: {e}");
        return;
    }
    linger(stream);
}

/// Half-closes and drains what the client still sends (bounded in time and bytes), so
/// that closing with unread input does not turn into a reset the client sees before our
/// answer (e.g. after refusing a large body).
fn linger(stream: &UnixStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&mut &*stream).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}
