//! [`VhostUserFrontend`]: bring-up, activation and stop of one vhost-user backend.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

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
    /// A guest RAM region cannot be shared (not file-backed).
    #[error("guest RAM cannot be shared with the backend")]
    Memory(#[source] vhost::Error),
    /// The transport gave fewer eventfds than started queues.
    #[error("queue {0} has no kick or call eventfd")]
    MissingEventFd(usize),
    /// GET_INFLIGHT_FD answered with an empty buffer.
    #[error("the backend gave no in-flight buffer")]
    NoInflightBuffer,
}

fn request<T>(request: &'static str, r: vhost::Result<T>) -> Result<T, FrontendError> {
    r.map_err(|source| FrontendError::Request { request, source })
}

/// The frontend side of one vhost-user connection.
pub struct VhostUserFrontend {
    device: String,
    inner: Frontend,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_count: usize,
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
        let mut inner = Frontend::from_stream(stream, default_queues as u64);
        let backend_features = request("GET_FEATURES", inner.get_features())?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = request("GET_PROTOCOL_FEATURES", inner.get_protocol_features())?;
            protocol_features = offered & SUPPORTED_PROTOCOL_FEATURES;
            request(
                "SET_PROTOCOL_FEATURES",
                inner.set_protocol_features(protocol_features),
            )?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                inner.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut queue_count = default_queues;
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = request("GET_QUEUE_NUM", inner.get_queue_num())?;
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
        request("SET_OWNER", inner.set_owner())?;
        Ok(VhostUserFrontend {
            device: device.to_string(),
            inner,
            backend_features,
            protocol_features,
            queue_count,
        })
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
        let (info, file) = request("GET_INFLIGHT_FD", self.inner.get_inflight_fd(&ask))?;
        if info.mmap_size == 0 {
            return Err(FrontendError::NoInflightBuffer);
        }
        Ok(InflightBuffer { file, info })
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
            request("SET_VRING_CALL", self.inner.set_vring_call(i, call))?;
            request("SET_VRING_ERR", self.inner.set_vring_err(i, err))?;
        }
        Ok(())
    }

    /// Reads `data.len()` bytes of config space at `offset`.
    ///
    /// Always asks from offset 0: libvhost-user based backends (qemu-storage-daemon)
    /// ignore GET_CONFIG's offset and return the start of config space, as QEMU only ever
    /// asks for it whole.
    pub fn read_config(&mut self, offset: u32, data: &mut [u8]) -> Result<(), FrontendError> {
        if !self
            .protocol_features
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(FrontendError::NoConfig);
        }
        let start = offset as usize;
        let size = start + data.len();
        let buf = vec![0u8; size];
        let (_, reply) = request(
            "GET_CONFIG",
            self.inner
                .get_config(0, size as u32, VhostUserConfigFlags::empty(), &buf),
        )?;
        // The vhost crate has checked that the reply is exactly `size` bytes.
        if let Some(bytes) = reply.get(start..size) {
            data.copy_from_slice(bytes);
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
        request(
            "SET_CONFIG",
            self.inner
                .set_config(offset, VhostUserConfigFlags::empty(), data),
        )
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
        request("SET_FEATURES", self.inner.set_features(features))?;
        if let Some(buffer) = inflight.filter(|_| self.supports_inflight()) {
            request(
                "SET_INFLIGHT_FD",
                self.inner
                    .set_inflight_fd(&buffer.info, buffer.file.as_raw_fd()),
            )?;
        }
        request(
            "SET_MEM_TABLE",
            self.inner.set_mem_table(&memory_table(mem)?),
        )?;
        for (i, config, base, kick, call) in rings {
            request(
                "SET_VRING_NUM",
                self.inner.set_vring_num(i, config.queue_size),
            )?;
            request("SET_VRING_BASE", self.inner.set_vring_base(i, base))?;
            request("SET_VRING_ADDR", self.inner.set_vring_addr(i, &config))?;
            if let Some(q) = state.queues.get_mut(i) {
                q.started = true;
            }
            request("SET_VRING_KICK", self.inner.set_vring_kick(i, kick))?;
            request("SET_VRING_CALL", self.inner.set_vring_call(i, call))?;
        }
        if self.uses_vring_enable() {
            for (i, _) in state.queues.iter().enumerate().filter(|(_, q)| q.started) {
                request("SET_VRING_ENABLE", self.inner.set_vring_enable(i, true))?;
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
        request("GET_FEATURES", self.inner.get_features()).map(|_| ())
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
                if let Err(e) = self.inner.set_vring_enable(i, false) {
                    tracing::warn!(
                        "device {}: SET_VRING_ENABLE(0) of queue {i} failed: {e}",
                        self.device
                    );
                }
            }
            match self.inner.get_vring_base(i) {
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
