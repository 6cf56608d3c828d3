//! [`VhostUserFrontend`]: bring-up, activation and stop of one vhost-user backend.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::deadline::RoundTripClock;
use crate::memory::GuestMemory;
use crate::virtio::state::{DeviceState, QueueState};
use crate::virtio::{MAX_QUEUES, VHOST_USER_F_PROTOCOL_FEATURES};

/// The protocol features the core uses when a backend offers them: MQ (GET_QUEUE_NUM),
/// CONFIG (config space through GET/SET_CONFIG), REPLY_ACK (every request is
/// acknowledged, so a failure is reported at the message that caused it) and
/// INFLIGHT_SHMFD (the backend keeps its in-flight requests in a buffer the core holds
/// across backend restarts, so a crash loses none).
pub const SUPPORTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);

/// The in-flight buffer of a device (vhost-user spec, "Inflight I/O tracking"): created
/// by a backend with GET_INFLIGHT_FD, kept by the core and handed to every backend that
/// serves the device after it (SET_INFLIGHT_FD). Its content is the backends' business.
pub struct InflightBuffer {
    file: File,
    info: VhostUserInflight,
}

impl std::fmt::Debug for InflightBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightBuffer")
            .field("mmap_size", &self.info.mmap_size)
            .field("num_queues", &self.info.num_queues)
            .field("queue_size", &self.info.queue_size)
            .finish_non_exhaustive()
    }
}

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A vhost-user request failed (socket error, backend refused it, bad reply).
    #[error("vhost-user {request} failed")]
    Request {
        /// The request, as the spec names it.
        request: &'static str,
        /// What the vhost crate reported.
        #[source]
        source: vhost::Error,
    },
    /// The connection was ended: the backend missed a deadline or broke the
    /// protocol. It is treated as gone and the connection is not used again.
    #[error("the backend {reason}")]
    Broken {
        /// What the backend did.
        reason: String,
    },
    /// GET_QUEUE_NUM answered 0.
    #[error("the backend serves no queues")]
    NoQueues,
    /// Config space was accessed but the backend does not offer VHOST_USER_PROTOCOL_F_CONFIG.
    #[error("the backend has no config space (no VHOST_USER_PROTOCOL_F_CONFIG)")]
    NoConfig,
    /// The guest placed a ring where there is no RAM (or across two RAM regions).
    #[error("queue {queue}: {part} at {addr:#x} ({len} bytes) is not in guest RAM")]
    RingOutsideRam {
        /// Queue index.
        queue: usize,
        /// Which part of the ring.
        part: &'static str,
        /// Guest-physical address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The socket could not be duplicated for the deadline watchdog.
    #[error("cannot watch the backend socket")]
    Socket(#[source] std::io::Error),
    /// A guest RAM region cannot be shared (not file-backed).
    #[error("guest RAM cannot be shared with the backend")]
    Memory(#[source] vhost::Error),
    /// The transport gave fewer eventfds than started queues.
    #[error("queue {0} has no kick or call eventfd")]
    MissingEventFd(usize),
    /// GET_INFLIGHT_FD answered with an empty or oversized buffer.
    #[error("the backend gave no usable in-flight buffer")]
    NoInflightBuffer,
    /// The backend's in-flight buffer could not be copied into a sealed memfd.
    #[error("cannot copy the backend's in-flight buffer")]
    InflightCopy(#[source] std::io::Error),
}

/// The largest in-flight buffer the core keeps: the spec's layout for 64 queues of
/// 32768 descriptors is far below this; a backend that asks for more is refused.
const MAX_INFLIGHT_SIZE: u64 = 256 << 20;

/// The backend's in-flight buffer, copied into a memfd of the core's that is sealed
/// against resizing ([`crate::memory::SHARED_SEALS`]). The backend made its own fd
/// and may truncate it at will; every backend after it (and this one, through
/// SET_INFLIGHT_FD) gets the core's copy, which no backend can shrink under the
/// next one.
fn sealed_copy(file: &File, info: &VhostUserInflight) -> Result<File, FrontendError> {
    use std::os::unix::fs::FileExt;
    let size = info.mmap_size;
    let copy = crate::memory::sealed_memfd("plexvm-inflight", size)
        .map_err(|e| FrontendError::InflightCopy(std::io::Error::other(crate::error_chain(&e))))?;
    // pread/pwrite: the backend's fd shares its file offset with the backend.
    let mut chunk = vec![0u8; 64 << 10];
    let mut done = 0u64;
    while done < size {
        let n = chunk.len().min((size - done) as usize);
        let at = info
            .mmap_offset
            .checked_add(done)
            .ok_or(FrontendError::NoInflightBuffer)?;
        file.read_exact_at(&mut chunk[..n], at)
            .map_err(FrontendError::InflightCopy)?;
        copy.write_all_at(&chunk[..n], done)
            .map_err(FrontendError::InflightCopy)?;
        done += n as u64;
    }
    Ok(copy)
}

/// Runs one round trip on `inner` under `clock`'s deadline. A reply that breaks the
/// protocol (wrong request code, size or flags, oversized, a partial message) ends the
/// connection like a missed deadline: the backend is then out of step with the core
/// and is treated as gone. A refusal (REPLY_ACK with an error) is not.
fn call<T>(
    clock: &RoundTripClock,
    inner: &mut Frontend,
    request: &'static str,
    op: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
) -> Result<T, FrontendError> {
    if let Some(reason) = clock.broken() {
        return Err(FrontendError::Broken { reason });
    }
    clock.run(request, || op(inner)).map_err(|source| {
        if let Some(reason) = clock.broken() {
            return FrontendError::Broken { reason };
        }
        if breaks_protocol(&source) {
            let reason = format!("answered {request} with a bad reply ({source})");
            clock.break_off(reason.clone());
            return FrontendError::Broken { reason };
        }
        FrontendError::Request { request, source }
    })
}

/// Whether a failed round trip leaves the connection unusable (see [`call`]).
fn breaks_protocol(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    match e {
        vhost::Error::VhostUserProtocol(e) => !matches!(
            e,
            E::BackendInternalError
                | E::InvalidParam
                | E::InvalidOperation(_)
                | E::InactiveFeature(_)
                | E::InactiveOperation(_)
                | E::FrontendInternalError
        ),
        _ => false,
    }
}

/// The frontend side of one vhost-user connection.
pub struct VhostUserFrontend {
    device: String,
    inner: Frontend,
    clock: Arc<RoundTripClock>,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_count: usize,
    /// The core's copy of config space from offset 0 ([`Self::fetch_config`]): guest
    /// reads inside it make no round trip.
    config: Vec<u8>,
}

impl std::fmt::Debug for VhostUserFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFrontend")
            .field("device", &self.device)
            .field(
                "backend_features",
                &format_args!("{:#x}", self.backend_features),
            )
            .field("protocol_features", &self.protocol_features)
            .field("queue_count", &self.queue_count)
            .finish_non_exhaustive()
    }
}

impl VhostUserFrontend {
    /// Brings up the connection `stream` to the backend of device `device`:
    /// GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (with MQ), SET_OWNER.
    /// `default_queues` is the queue count when the backend does not offer MQ
    /// ([`crate::virtio::default_queue_count`]).
    pub fn connect(
        device: &str,
        stream: UnixStream,
        default_queues: usize,
    ) -> Result<Self, FrontendError> {
        let default_queues = default_queues.clamp(1, MAX_QUEUES);
        let clock = RoundTripClock::new(OwnedFd::from(
            stream.try_clone().map_err(FrontendError::Socket)?,
        ));
        let mut inner = Frontend::from_stream(stream, default_queues as u64);
        let backend_features = call(&clock, &mut inner, "GET_FEATURES", |f| f.get_features())?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = call(&clock, &mut inner, "GET_PROTOCOL_FEATURES", |f| {
                f.get_protocol_features()
            })?;
            protocol_features = offered & SUPPORTED_PROTOCOL_FEATURES;
            call(&clock, &mut inner, "SET_PROTOCOL_FEATURES", |f| {
                f.set_protocol_features(protocol_features)
            })?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                inner.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut queue_count = default_queues;
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = call(&clock, &mut inner, "GET_QUEUE_NUM", |f| f.get_queue_num())?;
            if n == 0 {
                return Err(FrontendError::NoQueues);
            }
            if n > MAX_QUEUES as u64 {
                tracing::warn!(
                    "device {device}: the backend serves {n} queues, exposing {MAX_QUEUES}"
                );
            }
            queue_count = n.min(MAX_QUEUES as u64) as usize;
        }
        call(&clock, &mut inner, "SET_OWNER", |f| f.set_owner())?;
        Ok(VhostUserFrontend {
            device: device.to_string(),
            inner,
            clock,
            backend_features,
            protocol_features,
            queue_count,
            config: Vec::new(),
        })
    }

    fn call<T>(
        &mut self,
        request: &'static str,
        op: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        call(&self.clock, &mut self.inner, request, op)
    }

    /// Sets the deadline of every later round trip (`reply_timeout_ms`).
    pub fn set_reply_timeout(&self, timeout: Duration) {
        self.clock.set_timeout(timeout);
    }

    /// Why the connection was ended (a missed deadline, a reply that broke the
    /// protocol), once it was: the backend counts as gone.
    pub fn broken(&self) -> Option<String> {
        self.clock.broken()
    }

    /// The device id, for messages.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// What GET_FEATURES answered, VHOST_USER_F_PROTOCOL_FEATURES included.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// The virtio features of the device: GET_FEATURES without the vhost-user bit.
    pub fn virtio_features(&self) -> u64 {
        self.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES
    }

    /// The protocol features both sides use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The number of queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queue_count
    }

    /// The socket to the backend (to watch it for hang-up).
    pub fn socket_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }

    /// Whether the backend has closed its end of the connection (or it broke), without
    /// waiting: a failed request is then the backend's death, not a refusal.
    pub fn is_hung_up(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.inner.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n > 0 && fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Whether the backend tracks in-flight requests (INFLIGHT_SHMFD negotiated).
    pub fn supports_inflight(&self) -> bool {
        self.protocol_features
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// Asks the backend for a new in-flight buffer for `queues` queues of `queue_size`
    /// entries (GET_INFLIGHT_FD).
    pub fn get_inflight(
        &mut self,
        queues: usize,
        queue_size: u16,
    ) -> Result<InflightBuffer, FrontendError> {
        let ask = VhostUserInflight {
            num_queues: queues.min(MAX_QUEUES) as u16,
            queue_size,
            ..Default::default()
        };
        let (info, file) = self.call("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&ask))?;
        if info.mmap_size == 0 || info.mmap_size > MAX_INFLIGHT_SIZE {
            return Err(FrontendError::NoInflightBuffer);
        }
        Ok(InflightBuffer {
            file: sealed_copy(&file, &info)?,
            info: VhostUserInflight {
                mmap_offset: 0,
                ..info
            },
        })
    }
    /// Whether rings are enabled and disabled explicitly (SET_VRING_ENABLE): when
    /// VHOST_USER_F_PROTOCOL_FEATURES is negotiated (vhost-user spec, "Ring states").
    fn uses_vring_enable(&self) -> bool {
        self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Gives the backend the call and error eventfd of every queue (SET_VRING_CALL,
    /// SET_VRING_ERR), the last step of bring-up. A backend that serves more queues than
    /// the transport exposes gets eventfds for the exposed ones.
    pub fn set_vring_eventfds(
        &mut self,
        calls: &[EventFd],
        errs: &[EventFd],
    ) -> Result<(), FrontendError> {
        for i in 0..self.queue_count.min(calls.len()) {
            let (call, err) = calls
                .get(i)
                .zip(errs.get(i))
                .ok_or(FrontendError::MissingEventFd(i))?;
            self.call("SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
            self.call("SET_VRING_ERR", |f| f.set_vring_err(i, err))?;
        }
        Ok(())
    }

    /// Takes the core's copy of the first `size` bytes of config space (GET_CONFIG),
    /// off the vCPU threads while the core connects, so that the guest's config reads
    /// are served without waiting on the backend. Refreshed on every reconnect.
    pub fn fetch_config(&mut self, size: usize) -> Result<(), FrontendError> {
        if size == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; size];
        self.config.clear();
        self.read_config(0, &mut buf)?;
        self.config = buf;
        Ok(())
    }

    /// Reads `data.len()` bytes of config space at `offset`: from the core's copy when
    /// it holds them, else from the backend (and the copy grows).
    ///
    /// Always asks from offset 0: libvhost-user based backends (qemu-storage-daemon)
    /// ignore GET_CONFIG's offset and return the start of config space, as QEMU only ever
    /// asks for it whole.
    pub fn read_config(&mut self, offset: u32, data: &mut [u8]) -> Result<(), FrontendError> {
        let start = offset as usize;
        let size = start + data.len();
        if let Some(bytes) = self.config.get(start..size) {
            data.copy_from_slice(bytes);
            return Ok(());
        }
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(FrontendError::NoConfig);
        }
        let buf = vec![0u8; size];
        let (_, reply) = self.call("GET_CONFIG", |f| {
            f.get_config(0, size as u32, VhostUserConfigFlags::empty(), &buf)
        })?;
        // The vhost crate has checked that the reply is exactly `size` bytes.
        if let Some(bytes) = reply.get(start..size) {
            data.copy_from_slice(bytes);
            if reply.len() > self.config.len() {
                self.config = reply;
            }
        }
        Ok(())
    }

    /// Writes `data` to config space at `offset` (SET_CONFIG).
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(FrontendError::NoConfig);
        }
        self.call("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::empty(), data)
        })?;
        // The copy follows what the driver wrote (the backend accepted it).
        let start = offset as usize;
        if let Some(bytes) = self.config.get_mut(start..start + data.len()) {
            bytes.copy_from_slice(data);
        }
        Ok(())
    }

    /// Starts the device as the driver set it up (at DRIVER_OK, and when replaying to a
    /// reconnected backend): SET_FEATURES, SET_INFLIGHT_FD with `inflight`, SET_MEM_TABLE,
    /// then per ready queue SET_VRING_NUM/BASE/ADDR/KICK/CALL, then SET_VRING_ENABLE(1)
    /// with protocol features. Marks each queue handed to the backend as started.
    pub fn activate(
        &mut self,
        state: &mut DeviceState,
        mem: &GuestMemory,
        kicks: &[EventFd],
        calls: &[EventFd],
        inflight: Option<&InflightBuffer>,
    ) -> Result<(), FrontendError> {
        // Check every ring before sending anything, so a bad guest leaves the backend as
        // it was.
        let mut rings = Vec::new();
        for (i, q) in state.ready_queues() {
            let kick = kicks.get(i).ok_or(FrontendError::MissingEventFd(i))?;
            let call = calls.get(i).ok_or(FrontendError::MissingEventFd(i))?;
            rings.push((i, ring_config(mem, i, q)?, q.base, kick, call));
        }
        let features =
            state.driver_features | (self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES);
        self.call("SET_FEATURES", |f| f.set_features(features))?;
        if let Some(buffer) = inflight.filter(|_| self.supports_inflight()) {
            self.call("SET_INFLIGHT_FD", |f| {
                f.set_inflight_fd(&buffer.info, buffer.file.as_raw_fd())
            })?;
        }
        let table = memory_table(mem)?;
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&table))?;
        for (i, config, base, kick, call) in rings {
            self.call("SET_VRING_NUM", |f| f.set_vring_num(i, config.queue_size))?;
            self.call("SET_VRING_BASE", |f| f.set_vring_base(i, base))?;
            self.call("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
            if let Some(q) = state.queues.get_mut(i) {
                q.started = true;
            }
            self.call("SET_VRING_KICK", |f| f.set_vring_kick(i, kick))?;
            self.call("SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
        }
        if self.uses_vring_enable() {
            for (i, _) in state.queues.iter().enumerate().filter(|(_, q)| q.started) {
                self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
            }
        }
        Ok(())
    }

    /// Returns once the backend has handled every message sent so far. With REPLY_ACK
    /// each one was acknowledged already; without it one request that has a reply
    /// (GET_FEATURES) is the barrier, as a backend handles its messages in order.
    ///
    /// Needed after activation: vhost-user-backend 0.10 (rust-vmm's vhost-device-rng
    /// 0.1 and others) drains a kick that arrives between SET_VRING_KICK and
    /// SET_VRING_ENABLE and drops it, so a driver's first notification could be lost.
    pub fn barrier(&mut self) -> Result<(), FrontendError> {
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            return Ok(());
        }
        self.call("GET_FEATURES", |f| f.get_features()).map(|_| ())
    }

    /// Stops every started ring: SET_VRING_ENABLE(0) with protocol features, then
    /// GET_VRING_BASE, which is what stops a ring (vhost-user spec, "Ring states"). The
    /// returned index is kept as the queue's base. Failures are logged, not returned: a
    /// reset must always succeed for the guest.
    pub fn stop(&mut self, state: &mut DeviceState) {
        let enable = self.uses_vring_enable();
        for (i, q) in state
            .queues
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| q.started)
        {
            q.started = false;
            if enable {
                let r = call(&self.clock, &mut self.inner, "SET_VRING_ENABLE", |f| {
                    f.set_vring_enable(i, false)
                });
                if let Err(e) = r {
                    tracing::warn!(
                        "device {}: SET_VRING_ENABLE(0) of queue {i} failed: {e}",
                        self.device
                    );
                }
            }
            match call(&self.clock, &mut self.inner, "GET_VRING_BASE", |f| {
                f.get_vring_base(i)
            }) {
                Ok(base) => q.base = base as u16,
                Err(e) => {
                    tracing::warn!(
                        "device {}: GET_VRING_BASE of queue {i} failed: {e}",
                        self.device
                    )
                }
            }
        }
    }
}

/// Checks that every ready ring lies in guest RAM, without a round trip: what
/// [`VhostUserFrontend::activate`] checks first.
pub fn check_rings(state: &DeviceState, mem: &GuestMemory) -> Result<(), FrontendError> {
    for (i, q) in state.ready_queues() {
        ring_config(mem, i, q)?;
    }
    Ok(())
}

/// The memory table: every RAM region with the core's own mapping address and its memfd.
fn memory_table(mem: &GuestMemory) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(FrontendError::Memory)
        })
        .collect()
}

/// SET_VRING_ADDR carries the frontend's own virtual addresses (vhost-user spec,
/// "Vring address description"): each ring must lie inside one RAM region.
fn ring_config(
    mem: &GuestMemory,
    queue: usize,
    q: &QueueState,
) -> Result<VringConfigData, FrontendError> {
    let host = |part: &'static str, addr: u64, len: u64| {
        host_address(mem, addr, len).ok_or(FrontendError::RingOutsideRam {
            queue,
            part,
            addr,
            len,
        })
    };
    Ok(VringConfigData {
        queue_max_size: q.max_size,
        queue_size: q.size,
        flags: 0,
        desc_table_addr: host("descriptor table", q.desc_table, q.desc_table_len())?,
        used_ring_addr: host("used ring", q.used_ring, q.used_ring_len())?,
        avail_ring_addr: host("available ring", q.avail_ring, q.avail_ring_len())?,
        log_addr: None,
    })
}

/// The core's address of `len` bytes of guest RAM at `addr`, when they lie in one region.
fn host_address(mem: &GuestMemory, addr: u64, len: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(addr))?;
    let offset = addr.checked_sub(region.start_addr().0)?;
    if offset.checked_add(len)? > region.len() {
        return None;
    }
    let ptr = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
    Some(ptr as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn the_inflight_buffer_is_kept_as_a_sealed_copy() {
        use std::os::unix::fs::FileExt;
        // An ordinary (unsealed) memfd of the backend, with the buffer at an offset.
        let backend = tempfile::tempfile().unwrap();
        backend.set_len(8192).unwrap();
        backend.write_all_at(b"inflight", 4096).unwrap();
        let info = VhostUserInflight {
            mmap_size: 4096,
            mmap_offset: 4096,
            num_queues: 1,
            queue_size: 256,
        };
        let copy = sealed_copy(&backend, &info).unwrap();
        let mut head = [0u8; 8];
        copy.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"inflight");
        assert_eq!(
            copy.set_len(0).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert_eq!(copy.metadata().unwrap().len(), 4096);
        // A buffer announced larger than the fd holds is refused, not padded.
        let short = VhostUserInflight {
            mmap_size: 8192,
            ..info
        };
        assert!(matches!(
            sealed_copy(&backend, &short),
            Err(FrontendError::InflightCopy(_))
        ));
    }

    #[test]
    fn host_address_requires_the_whole_range_in_one_region() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let base = host_address(&mem, 0, 1).unwrap();
        assert_eq!(host_address(&mem, 0x1000, 16), Some(base + 0x1000));
        assert_eq!(
            host_address(&mem, (1 << 20) - 16, 16),
            Some(base + (1 << 20) - 16)
        );
        assert_eq!(host_address(&mem, (1 << 20) - 16, 17), None);
        assert_eq!(host_address(&mem, 1 << 20, 1), None);
        assert_eq!(host_address(&mem, u64::MAX, 2), None);
    }

    #[test]
    fn ring_config_names_the_part_outside_ram() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let mut q = QueueState::new(256);
        q.size = 16;
        q.desc_table = 0x1000;
        q.avail_ring = 0x2000;
        q.used_ring = 0xf_fff0;
        let Err(err) = ring_config(&mem, 3, &q) else {
            panic!("a used ring past RAM must be refused");
        };
        assert!(
            matches!(
                err,
                FrontendError::RingOutsideRam {
                    queue: 3,
                    part: "used ring",
                    ..
                }
            ),
            "{err}"
        );
        q.used_ring = 0x3000;
        let c = ring_config(&mem, 3, &q).unwrap();
        let base = host_address(&mem, 0, 1).unwrap();
        assert_eq!(c.desc_table_addr, base + 0x1000);
        assert_eq!(c.avail_ring_addr, base + 0x2000);
        assert_eq!(c.used_ring_addr, base + 0x3000);
        assert_eq!(c.queue_size, 16);
    }

    #[test]
    fn memory_table_shares_every_region_with_its_memfd() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let table = memory_table(&mem).unwrap();
        assert_eq!(table.len(), 1);
        assert_eq!(table[0].guest_phys_addr, 0);
        assert_eq!(table[0].memory_size, 1 << 20);
        assert_eq!(table[0].userspace_addr, host_address(&mem, 0, 1).unwrap());
        assert!(table[0].mmap_handle >= 0);
    }
}
