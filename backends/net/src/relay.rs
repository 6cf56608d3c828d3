//! A relay between the frontend's connection and the vhost-user daemon that hides one
//! incompatibility between QEMU's vhost-user-net and rust-vmm's `vhost` crate.
//!
//! QEMU (7.2, seen here) sends VHOST_USER_SET_VRING_ENABLE for a vhost-user-net device
//! as soon as virtio-net resets or the driver writes its features (`peer_attach` in
//! `hw/net/virtio-net.c`), before VHOST_USER_SET_FEATURES: it only checks that the
//! backend *offers* `VHOST_USER_F_PROTOCOL_FEATURES`, and it does not send the enable
//! again after SET_FEATURES. The `vhost` crate's request handler answers such an early
//! message with `InactiveFeature` and drops the connection. So the relay holds back
//! (and, when a reply is wanted, acknowledges) every SET_VRING_ENABLE that arrives before
//! SET_FEATURES, remembering the last state asked for each ring, and replays those right
//! after a SET_FEATURES that acks `VHOST_USER_F_PROTOCOL_FEATURES` (without it the rings
//! start enabled anyway). Everything else passes through unchanged, file descriptors
//! included. Only the control channel goes through
//! the relay; kicks, calls and guest memory are shared directly with the daemon.
//!
//! The daemon listens on an abstract Unix socket private to the process (vhost-user-
//! backend accepts connections only from a listener); the relay connects to it for each
//! frontend connection.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (all little-endian u32).
const HEADER_LEN: usize = 12;
/// Largest payload accepted (the `vhost` crate's MAX_MSG_SIZE).
const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors one message carries (VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_FDS: usize = 8;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// A listener on a fresh abstract socket for the daemon side of the relay.
pub fn private_listener(tag: &str) -> io::Result<(UnixListener, SocketAddr)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("plexvm-net-{}-{n}-{tag}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    Ok((listener, addr))
}

/// The two relay threads of one connection.
#[derive(Debug)]
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
    frontend: UnixStream,
}

impl Relay {
    /// Connects to the daemon's listener at `inner` and relays between it and
    /// `frontend` until either side closes.
    pub fn start(frontend: UnixStream, inner: &SocketAddr) -> io::Result<Relay> {
        let daemon = UnixStream::connect_addr(inner)?;
        let control = frontend.try_clone()?;
        let front_writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let back_reader = daemon.try_clone()?;
        let to_daemon = {
            let writer = front_writer.clone();
            spawn("relay-in", move || {
                frontend_to_daemon(&frontend, &daemon, &writer)
            })?
        };
        let to_frontend = spawn("relay-out", move || {
            daemon_to_frontend(&back_reader, &front_writer)
        })?;
        Ok(Relay {
            threads: vec![to_daemon, to_frontend],
            frontend: control,
        })
    }

    /// Closes the frontend's connection (when the daemon could not be started); both
    /// directions then end.
    pub fn abort(&self) {
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
    }

    /// Waits for both directions to end (after either side closed).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Frontend → daemon: whole messages with their descriptors, minus early enables.
fn frontend_to_daemon(frontend: &UnixStream, daemon: &UnixStream, writer: &Mutex<UnixStream>) {
    let mut features_set = false;
    let mut held_back: std::collections::BTreeMap<u32, u32> = Default::default();
    let result = (|| -> io::Result<()> {
        loop {
            let Some((header, files)) = recv_header(frontend)? else {
                return Ok(());
            };
            let size = le32(&header, 8) as usize;
            if size > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "oversized vhost-user message",
                ));
            }
            let mut payload = vec![0u8; size];
            (&*frontend).read_exact(&mut payload)?;
            let (request, flags) = (le32(&header, 0), le32(&header, 4));
            tracing::trace!(request, flags, size, fds = files.len(), "frontend message");
            if request == SET_VRING_ENABLE && !features_set && size >= 8 {
                tracing::debug!("holding back SET_VRING_ENABLE sent before SET_FEATURES");
                held_back.insert(le32(&payload, 0), le32(&payload, 4));
                if flags & FLAG_NEED_REPLY != 0 {
                    ack(writer, request)?;
                }
                continue;
            }
            let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
            let message: Vec<u8> = header.iter().chain(&payload).copied().collect();
            if fds.is_empty() {
                (&*daemon).write_all(&message)?;
            } else {
                let sent = daemon
                    .send_with_fds(&[&message[..]], &fds)
                    .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
                (&*daemon).write_all(&message[sent..])?;
            }
            // `files` closes our copies; the daemon received its own.
            if request == SET_FEATURES && size >= 8 {
                let features = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
                features_set = true;
                if features & PROTOCOL_FEATURES_BIT != 0 {
                    for (index, state) in std::mem::take(&mut held_back) {
                        replay_enable(daemon, index, state)?;
                    }
                }
                held_back.clear();
            }
        }
    })();
    if let Err(e) = result {
        tracing::debug!("frontend relay ended: {e}");
    }
    let _ = daemon.shutdown(std::net::Shutdown::Both);
    let _ = frontend.shutdown(std::net::Shutdown::Both);
}

/// Reads one message header and the descriptors sent with it; `None` at end of stream.
fn recv_header(stream: &UnixStream) -> io::Result<Option<([u8; HEADER_LEN], Vec<File>)>> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [0 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points to `header`, which is live and writable for its length.
    let (read, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just created these descriptors; they are owned by nobody else.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if read == 0 {
        return Ok(None);
    }
    if read < HEADER_LEN {
        (&*stream).read_exact(&mut header[read..])?;
    }
    Ok(Some((header, files)))
}

/// Sends SET_VRING_ENABLE(`index`, `state`) to the daemon, asking for no reply.
fn replay_enable(daemon: &UnixStream, index: u32, state: u32) -> io::Result<()> {
    let mut msg = [0u8; HEADER_LEN + 8];
    for (i, v) in [SET_VRING_ENABLE, FLAG_VERSION_1, 8, index, state]
        .iter()
        .enumerate()
    {
        msg[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    tracing::debug!(
        index,
        state,
        "replaying SET_VRING_ENABLE after SET_FEATURES"
    );
    (&*daemon).write_all(&msg)
}

/// Acknowledges a held-back request (REPLY_ACK: a u64 0 means success).
fn ack(writer: &Mutex<UnixStream>, request: u32) -> io::Result<()> {
    let mut reply = [0u8; HEADER_LEN + 8];
    reply[0..4].copy_from_slice(&request.to_le_bytes());
    reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    let stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
    (&*stream).write_all(&reply)
}

/// Daemon → frontend: whole replies (they never carry descriptors with the protocol
/// features this backend offers), written under the lock `ack` also takes.
fn daemon_to_frontend(daemon: &UnixStream, writer: &Mutex<UnixStream>) {
    let result = (|| -> io::Result<()> {
        let mut header = [0u8; HEADER_LEN];
        loop {
            match (&*daemon).read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let size = le32(&header, 8) as usize;
            if size > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "oversized reply",
                ));
            }
            let mut message = header.to_vec();
            message.resize(HEADER_LEN + size, 0);
            (&*daemon).read_exact(&mut message[HEADER_LEN..])?;
            let stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
            (&*stream).write_all(&message)?;
        }
    })();
    if let Err(e) = result {
        tracing::debug!("daemon relay ended: {e}");
    }
    let stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = daemon.shutdown(std::net::Shutdown::Both);
}
