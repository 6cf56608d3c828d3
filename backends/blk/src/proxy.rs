//! A message filter in front of vhost-user-backend's request handler, for the two
//! messages it cannot be taught: GET_INFLIGHT_FD and SET_INFLIGHT_FD.
//!
//! vhost-user-backend 0.24 answers both with an error and offers no hook, and its
//! handler type is private, so it cannot be wrapped. Instead each frontend connection
//! passes through [`ConnectionProxy`]: one thread reads the frontend's messages (with
//! their fds), answers the in-flight ones through an [`InflightHandler`] and forwards
//! everything else, unchanged and in order, to the daemon over a private socket pair;
//! a second thread copies the daemon's replies back. Replies are written whole under one
//! lock, so a reply of ours never lands inside one of the daemon's. Only the control path
//! passes here; the rings, kicks and calls never do.

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

/// VHOST_USER_GET_INFLIGHT_FD.
pub const GET_INFLIGHT_FD: u32 = 31;
/// VHOST_USER_SET_INFLIGHT_FD.
pub const SET_INFLIGHT_FD: u32 = 32;
const HEADER_LEN: usize = 12;
const INFLIGHT_LEN: usize = 24;
/// Largest payload accepted (the vhost crate's MAX_MSG_SIZE is 4 KiB).
const MAX_PAYLOAD: usize = 0x1000;
const MAX_FDS: usize = 32;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// `VhostUserInflight` (vhost-user spec, "Inflight description").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightGeometry {
    /// Bytes of the region.
    pub mmap_size: u64,
    /// Offset of the region in the fd.
    pub mmap_offset: u64,
    /// Number of queues.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
}

impl InflightGeometry {
    fn parse(p: &[u8]) -> Option<Self> {
        let p = p.get(..INFLIGHT_LEN)?;
        Some(InflightGeometry {
            mmap_size: u64::from_le_bytes(p[0..8].try_into().ok()?),
            mmap_offset: u64::from_le_bytes(p[8..16].try_into().ok()?),
            num_queues: u16::from_le_bytes(p[16..18].try_into().ok()?),
            queue_size: u16::from_le_bytes(p[18..20].try_into().ok()?),
        })
    }

    fn bytes(&self) -> [u8; INFLIGHT_LEN] {
        let mut b = [0u8; INFLIGHT_LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }
}

/// What the proxy needs from the device for the in-flight messages.
pub trait InflightHandler: Send + Sync {
    /// GET_INFLIGHT_FD: create a region for `num_queues` queues of `queue_size`
    /// entries; returns its fd and size.
    fn get_inflight_fd(&self, num_queues: u16, queue_size: u16) -> io::Result<(File, u64)>;
    /// SET_INFLIGHT_FD: use the region in `file` described by `geometry`.
    fn set_inflight_fd(&self, file: File, geometry: InflightGeometry) -> io::Result<()>;
}

/// One vhost-user message with the fds that came with it.
#[derive(Debug)]
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    files: Vec<File>,
}

/// Reads one whole message; `None` at a clean end of stream.
fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
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

fn send_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
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

/// The frontend's side of the connection, shared by both threads for writing.
type Writer = Arc<Mutex<UnixStream>>;

fn send_reply(writer: &Writer, request: u32, payload: Vec<u8>, files: Vec<File>) -> io::Result<()> {
    let msg = Message {
        request,
        flags: FLAG_VERSION | FLAG_REPLY,
        payload,
        files,
    };
    send_message(&writer.lock().unwrap_or_else(PoisonError::into_inner), &msg)
}

/// Answers one in-flight message.
fn answer(handler: &dyn InflightHandler, writer: &Writer, msg: Message) -> io::Result<()> {
    let geometry = InflightGeometry::parse(&msg.payload);
    if msg.request == GET_INFLIGHT_FD {
        let reply = geometry
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short payload"))
            .and_then(|g| {
                handler
                    .get_inflight_fd(g.num_queues, g.queue_size)
                    .map(|r| (g, r))
            });
        return match reply {
            Ok((g, (file, size))) => {
                let g = InflightGeometry {
                    mmap_size: size,
                    mmap_offset: 0,
                    ..g
                };
                send_reply(writer, GET_INFLIGHT_FD, g.bytes().to_vec(), vec![file])
            }
            Err(e) => {
                tracing::warn!("GET_INFLIGHT_FD failed: {e}");
                // A zero-size region and no fd: the frontend sees the failure.
                send_reply(writer, GET_INFLIGHT_FD, vec![0; INFLIGHT_LEN], Vec::new())
            }
        };
    }
    let result = match (geometry, msg.files.into_iter().next()) {
        (Some(g), Some(file)) => handler.set_inflight_fd(file, g),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SET_INFLIGHT_FD without a region",
        )),
    };
    if let Err(e) = &result {
        tracing::warn!("SET_INFLIGHT_FD failed: {e}");
    }
    if msg.flags & FLAG_NEED_REPLY != 0 {
        let status = u64::from(result.is_err());
        send_reply(
            writer,
            SET_INFLIGHT_FD,
            status.to_le_bytes().to_vec(),
            Vec::new(),
        )?;
    }
    Ok(())
}

/// Frontend → daemon, answering the in-flight messages on the way.
fn pump_requests(
    frontend: UnixStream,
    daemon: UnixStream,
    writer: Writer,
    handler: Arc<dyn InflightHandler>,
) {
    loop {
        let msg = match recv_message(&frontend) {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("frontend connection: {e}");
                break;
            }
        };
        let result = match msg.request {
            GET_INFLIGHT_FD | SET_INFLIGHT_FD => answer(&*handler, &writer, msg),
            _ => send_message(&daemon, &msg),
        };
        if let Err(e) = result {
            tracing::debug!("forwarding a request: {e}");
            break;
        }
    }
    // The daemon sees the frontend go away and ends the connection.
    let _ = daemon.shutdown(Shutdown::Both);
}

/// Daemon → frontend.
fn pump_replies(daemon: UnixStream, writer: Writer) {
    while let Ok(Some(msg)) = recv_message(&daemon) {
        let sent = send_message(&writer.lock().unwrap_or_else(PoisonError::into_inner), &msg);
        if sent.is_err() {
            break;
        }
    }
    let _ = writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .shutdown(Shutdown::Both);
}

/// The two threads of one connection; dropping it closes both sides and joins them.
#[derive(Debug)]
pub struct ConnectionProxy {
    frontend: UnixStream,
    daemon: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl ConnectionProxy {
    /// Starts proxying `frontend`. Returns the proxy and a listener holding the daemon's
    /// end as its one pending connection: pass it to `VhostUserDaemon::start`.
    pub fn start(
        frontend: UnixStream,
        handler: Arc<dyn InflightHandler>,
    ) -> io::Result<(ConnectionProxy, UnixListener)> {
        // An abstract socket: no file to clean up. The daemon accepts the first pending
        // connection, which is ours, made before the listener is handed over.
        let name = format!(
            "plexvm-blk.{}.{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?;
        let daemon = UnixStream::connect_addr(&listener.local_addr()?)?;
        let writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let (f, d, w) = (frontend.try_clone()?, daemon.try_clone()?, writer.clone());
        let requests = std::thread::Builder::new()
            .name("vhost-requests".into())
            .spawn(move || pump_requests(f, d, w, handler))?;
        let d = daemon.try_clone()?;
        let replies = std::thread::Builder::new()
            .name("vhost-replies".into())
            .spawn(move || pump_replies(d, writer))?;
        Ok((
            ConnectionProxy {
                frontend,
                daemon,
                threads: vec![requests, replies],
            },
            listener,
        ))
    }
}

impl Drop for ConnectionProxy {
    fn drop(&mut self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.daemon.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(Default)]
    struct Recorder {
        set: AtomicBool,
    }

    impl InflightHandler for Recorder {
        fn get_inflight_fd(&self, q: u16, size: u16) -> io::Result<(File, u64)> {
            let f = tempfile::tempfile()?;
            f.set_len(u64::from(q) * u64::from(size))?;
            Ok((f, u64::from(q) * u64::from(size)))
        }
        fn set_inflight_fd(&self, _file: File, g: InflightGeometry) -> io::Result<()> {
            assert_eq!(g.num_queues, 2);
            self.set.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    fn request(code: u32, flags: u32, payload: Vec<u8>, files: Vec<File>) -> Message {
        Message {
            request: code,
            flags: FLAG_VERSION | flags,
            payload,
            files,
        }
    }

    #[test]
    fn inflight_messages_are_answered_and_others_forwarded_with_fds() {
        let (core, frontend) = UnixStream::pair().unwrap();
        let handler = Arc::new(Recorder::default());
        let (proxy, listener) = ConnectionProxy::start(frontend, handler.clone()).unwrap();
        let (daemon, _) = listener.accept().unwrap();
        let g = InflightGeometry {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 8,
        };
        send_message(
            &core,
            &request(GET_INFLIGHT_FD, 0, g.bytes().to_vec(), vec![]),
        )
        .unwrap();
        let reply = recv_message(&core).unwrap().unwrap();
        assert_eq!(reply.request, GET_INFLIGHT_FD);
        assert_eq!(reply.flags, FLAG_VERSION | FLAG_REPLY);
        assert_eq!(
            InflightGeometry::parse(&reply.payload).unwrap().mmap_size,
            16
        );
        assert_eq!(reply.files.len(), 1);
        let file = reply.files.into_iter().next().unwrap();
        send_message(
            &core,
            &request(
                SET_INFLIGHT_FD,
                FLAG_NEED_REPLY,
                g.bytes().to_vec(),
                vec![file],
            ),
        )
        .unwrap();
        let ack = recv_message(&core).unwrap().unwrap();
        assert_eq!(ack.payload, 0u64.to_le_bytes());
        assert!(handler.set.load(Ordering::SeqCst));
        // SET_VRING_KICK (12) with an fd goes to the daemon unchanged.
        let kick = tempfile::tempfile().unwrap();
        send_message(
            &core,
            &request(12, 0, 7u64.to_le_bytes().to_vec(), vec![kick]),
        )
        .unwrap();
        let fwd = recv_message(&daemon).unwrap().unwrap();
        assert_eq!((fwd.request, fwd.files.len()), (12, 1));
        assert_eq!(fwd.payload, 7u64.to_le_bytes());
        // A daemon reply comes back to the frontend.
        send_message(
            &daemon,
            &request(1, FLAG_REPLY, 42u64.to_le_bytes().to_vec(), vec![]),
        )
        .unwrap();
        assert_eq!(
            recv_message(&core).unwrap().unwrap().payload,
            42u64.to_le_bytes()
        );
        // The frontend hanging up ends the daemon's side too.
        drop(core);
        assert!(recv_message(&daemon).unwrap().is_none());
        drop(proxy);
    }

    #[test]
    fn oversized_messages_end_the_connection() {
        let (core, frontend) = UnixStream::pair().unwrap();
        let (_proxy, listener) =
            ConnectionProxy::start(frontend, Arc::new(Recorder::default())).unwrap();
        let (daemon, _) = listener.accept().unwrap();
        let mut header = Vec::new();
        for w in [1u32, 1, 1 << 20] {
            header.extend_from_slice(&w.to_le_bytes());
        }
        (&core).write_all(&header).unwrap();
        assert!(recv_message(&daemon).unwrap().is_none());
    }
}
