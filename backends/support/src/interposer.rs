//! A vhost-user message filter in front of vhost-user-backend's request handler, with
//! hooks, for what a backend must do that the handler cannot be taught.
//!
//! vhost-user-backend 0.24's handler type is private and offers no hook, so it cannot be
//! wrapped. Instead each frontend connection passes through an [`Interposer`]: one
//! thread reads the frontend's messages (with their fds) and hands each to the
//! connection's [`RequestHook`], which may answer it itself (through [`FrontendReplies`])
//! and returns what goes on to the daemon over a private socket pair, in order; a second
//! thread copies the daemon's replies back. Replies are written whole under one lock, so
//! a reply of ours never lands inside one of the daemon's. Only the control path passes
//! here; the rings, kicks and calls never do.
//!
//! Two hooks are here because they are about the protocol, not one device:
//! [`InflightMessages`] (GET/SET_INFLIGHT_FD, which the handler refuses) and
//! [`EarlyVringEnable`] (QEMU's SET_VRING_ENABLE before SET_FEATURES).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

mod hooks;
pub use hooks::{EarlyVringEnable, InflightGeometry, InflightHandler, InflightMessages};

/// VHOST_USER_SET_FEATURES.
pub const SET_FEATURES: u32 = 2;
/// VHOST_USER_SET_VRING_ENABLE.
pub const SET_VRING_ENABLE: u32 = 18;
/// VHOST_USER_GET_INFLIGHT_FD.
pub const GET_INFLIGHT_FD: u32 = 31;
/// VHOST_USER_SET_INFLIGHT_FD.
pub const SET_INFLIGHT_FD: u32 = 32;
/// Header flags (vhost-user spec, "Header"): version 1, a reply, reply wanted.
pub const FLAG_VERSION: u32 = 0x1;
/// This message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// The frontend wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER_LEN: usize = 12;
/// Largest payload accepted (the `vhost` crate's MAX_MSG_SIZE is 4 KiB).
const MAX_PAYLOAD: usize = 0x1000;
/// Descriptors one recvmsg takes; more than any message carries (a memory table has at
/// most VHOST_MEMORY_BASELINE_NREGIONS = 8).
const MAX_FDS: usize = 32;

/// One vhost-user message with the fds that came with it.
#[derive(Debug)]
pub struct Message {
    /// The request code.
    pub request: u32,
    /// The header flags.
    pub flags: u32,
    /// The payload (at most 4 KiB).
    pub payload: Vec<u8>,
    /// The descriptors sent with it.
    pub files: Vec<File>,
}

impl Message {
    /// A request of ours (version 1, no reply wanted) without descriptors.
    pub fn new(request: u32, payload: Vec<u8>) -> Message {
        Message {
            request,
            flags: FLAG_VERSION,
            payload,
            files: Vec::new(),
        }
    }

    /// Whether the sender asked for a REPLY_ACK.
    pub fn needs_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// The little-endian u32 at `at` of the payload, if the payload is that long.
    pub fn payload_u32(&self, at: usize) -> Option<u32> {
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// The little-endian u64 at `at` of the payload, if the payload is that long.
    pub fn payload_u64(&self, at: usize) -> Option<u64> {
        let b = self.payload.get(at..at + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// Reads one whole message; `None` at a clean end of stream.
pub fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which lives across the call and may take any
    // bytes.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files = fds[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut header[n..])?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let size = word(8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut payload = vec![0u8; size];
    (&*sock).read_exact(&mut payload)?;
    Ok(Some(Message {
        request: word(0),
        flags: word(4),
        payload,
        files,
    }))
}

/// Writes one whole message with its descriptors.
pub fn send_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + msg.payload.len());
    bytes.extend_from_slice(&msg.request.to_le_bytes());
    bytes.extend_from_slice(&msg.flags.to_le_bytes());
    bytes.extend_from_slice(&(msg.payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&msg.payload);
    let fds: Vec<RawFd> = msg.files.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = sock
        .send_with_fds(&[&bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*sock).write_all(&bytes[sent..])
}

/// The frontend's side of one connection, for hooks to answer on.
#[derive(Debug, Clone)]
pub struct FrontendReplies {
    stream: Arc<Mutex<UnixStream>>,
}

impl FrontendReplies {
    /// Sends a reply to `request`.
    pub fn reply(&self, request: u32, payload: Vec<u8>, files: Vec<File>) -> io::Result<()> {
        let msg = Message {
            request,
            flags: FLAG_VERSION | FLAG_REPLY,
            payload,
            files,
        };
        self.send(&msg)
    }

    /// Sends a REPLY_ACK for `request`: a u64, 0 for success (vhost-user spec,
    /// "REPLY_ACK").
    pub fn ack(&self, request: u32, ok: bool) -> io::Result<()> {
        self.reply(request, u64::from(!ok).to_le_bytes().to_vec(), Vec::new())
    }

    fn send(&self, msg: &Message) -> io::Result<()> {
        send_message(
            &self.stream.lock().unwrap_or_else(PoisonError::into_inner),
            msg,
        )
    }

    fn close(&self) {
        let stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// What a backend does with the frontend's messages before the daemon sees them. One
/// hook value serves one connection, so it may keep per-connection state.
pub trait RequestHook: Send + 'static {
    /// Sees `msg`; returns the messages that go on to the daemon, in order (`msg` itself
    /// to pass it through, nothing when answered here through `frontend`). An error ends
    /// the connection.
    fn on_request(&mut self, msg: Message, frontend: &FrontendReplies) -> io::Result<Vec<Message>>;
}

/// Passes every message through unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct Passthrough;

impl RequestHook for Passthrough {
    fn on_request(&mut self, msg: Message, _: &FrontendReplies) -> io::Result<Vec<Message>> {
        Ok(vec![msg])
    }
}

/// Frontend → hook → daemon.
fn pump_requests(
    frontend: UnixStream,
    daemon: UnixStream,
    replies: FrontendReplies,
    mut hook: impl RequestHook,
) {
    let result = (|| -> io::Result<()> {
        while let Some(msg) = recv_message(&frontend)? {
            for forward in hook.on_request(msg, &replies)? {
                send_message(&daemon, &forward)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!("frontend connection ended: {e}");
    }
    // The daemon sees the frontend go away and ends the connection.
    let _ = daemon.shutdown(Shutdown::Both);
    let _ = frontend.shutdown(Shutdown::Both);
}

/// Daemon → frontend.
fn pump_replies(daemon: UnixStream, replies: FrontendReplies) {
    loop {
        match recv_message(&daemon) {
            Ok(Some(msg)) if replies.send(&msg).is_ok() => {}
            Ok(_) => break,
            Err(e) => {
                tracing::debug!("daemon connection ended: {e}");
                break;
            }
        }
    }
    replies.close();
    let _ = daemon.shutdown(Shutdown::Both);
}

/// The two threads of one connection; dropping it closes both sides and joins them.
#[derive(Debug)]
pub struct Interposer {
    frontend: UnixStream,
    daemon: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Interposer {
    /// Starts filtering `frontend` through `hook`. Returns the interposer and a
    /// listener holding the daemon's end as its one pending connection: pass it to
    /// `VhostUserDaemon::start`.
    pub fn start(
        frontend: UnixStream,
        hook: impl RequestHook,
    ) -> io::Result<(Interposer, UnixListener)> {
        // An abstract socket: no file to clean up. The daemon accepts the first pending
        // connection, which is ours, made before the listener is handed over.
        let name = format!(
            "plexvm-backend.{}.{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?;
        let daemon = UnixStream::connect_addr(&listener.local_addr()?)?;
        let replies = FrontendReplies {
            stream: Arc::new(Mutex::new(frontend.try_clone()?)),
        };
        let (f, d, r) = (frontend.try_clone()?, daemon.try_clone()?, replies.clone());
        let requests = std::thread::Builder::new()
            .name("vhost-requests".into())
            .spawn(move || pump_requests(f, d, r, hook))?;
        let d = daemon.try_clone()?;
        let replies = std::thread::Builder::new()
            .name("vhost-replies".into())
            .spawn(move || pump_replies(d, replies))?;
        Ok((
            Interposer {
                frontend,
                daemon,
                threads: vec![requests, replies],
            },
            listener,
        ))
    }
}

impl Drop for Interposer {
    fn drop(&mut self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.daemon.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
