//! The interposer hooks plexvm's backends need: in-flight messages, early enables.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use super::{
    FrontendReplies, Message, RequestHook, GET_INFLIGHT_FD, SET_FEATURES, SET_INFLIGHT_FD,
    SET_VRING_ENABLE,
};

const INFLIGHT_LEN: usize = 24;
/// VHOST_USER_F_PROTOCOL_FEATURES, bit 30 of the virtio feature word.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

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
    /// Parses the payload of GET/SET_INFLIGHT_FD.
    pub fn parse(p: &[u8]) -> Option<Self> {
        let p = p.get(..INFLIGHT_LEN)?;
        Some(InflightGeometry {
            mmap_size: u64::from_le_bytes(p[0..8].try_into().ok()?),
            mmap_offset: u64::from_le_bytes(p[8..16].try_into().ok()?),
            num_queues: u16::from_le_bytes(p[16..18].try_into().ok()?),
            queue_size: u16::from_le_bytes(p[18..20].try_into().ok()?),
        })
    }

    /// The payload form.
    pub fn bytes(&self) -> [u8; INFLIGHT_LEN] {
        let mut b = [0u8; INFLIGHT_LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }
}

/// What a device needs to provide for the in-flight messages.
pub trait InflightHandler: Send + Sync {
    /// GET_INFLIGHT_FD: create a region for `num_queues` queues of `queue_size`
    /// entries; returns its fd and size.
    fn get_inflight_fd(&self, num_queues: u16, queue_size: u16) -> io::Result<(File, u64)>;
    /// SET_INFLIGHT_FD: use the region in `file` described by `geometry`.
    fn set_inflight_fd(&self, file: File, geometry: InflightGeometry) -> io::Result<()>;
}

/// Answers GET_INFLIGHT_FD and SET_INFLIGHT_FD (vhost-user spec, "Inflight I/O
/// tracking") through an [`InflightHandler`]; vhost-user-backend 0.24 answers both with
/// an error. Everything else passes through.
#[derive(Clone)]
pub struct InflightMessages(pub Arc<dyn InflightHandler>);

impl std::fmt::Debug for InflightMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InflightMessages")
    }
}

impl RequestHook for InflightMessages {
    fn on_request(&mut self, msg: Message, frontend: &FrontendReplies) -> io::Result<Vec<Message>> {
        match msg.request {
            GET_INFLIGHT_FD => self.get(msg, frontend)?,
            SET_INFLIGHT_FD => self.set(msg, frontend)?,
            _ => return Ok(vec![msg]),
        }
        Ok(Vec::new())
    }
}

impl InflightMessages {
    fn get(&self, msg: Message, frontend: &FrontendReplies) -> io::Result<()> {
        let reply = InflightGeometry::parse(&msg.payload)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short payload"))
            .and_then(|g| {
                self.0
                    .get_inflight_fd(g.num_queues, g.queue_size)
                    .map(|r| (g, r))
            });
        match reply {
            Ok((g, (file, size))) => {
                let g = InflightGeometry {
                    mmap_size: size,
                    mmap_offset: 0,
                    ..g
                };
                frontend.reply(GET_INFLIGHT_FD, g.bytes().to_vec(), vec![file])
            }
            Err(e) => {
                crate::host_warn!("GET_INFLIGHT_FD failed: {e}");
                // A zero-size region and no fd: the frontend sees the failure.
                frontend.reply(GET_INFLIGHT_FD, vec![0; INFLIGHT_LEN], Vec::new())
            }
        }
    }

    fn set(&self, msg: Message, frontend: &FrontendReplies) -> io::Result<()> {
        let needs_reply = msg.needs_reply();
        let result = match (
            InflightGeometry::parse(&msg.payload),
            msg.files.into_iter().next(),
        ) {
            (Some(g), Some(file)) => self.0.set_inflight_fd(file, g),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "SET_INFLIGHT_FD without a region",
            )),
        };
        if let Err(e) = &result {
            crate::host_warn!("SET_INFLIGHT_FD failed: {e}");
        }
        if needs_reply {
            frontend.ack(SET_INFLIGHT_FD, result.is_ok())?;
        }
        Ok(())
    }
}

/// Hides one incompatibility between QEMU's vhost-user-net and rust-vmm's `vhost`
/// crate.
///
/// QEMU (7.2, seen here) sends SET_VRING_ENABLE for a vhost-user-net device as soon as
/// virtio-net resets or the driver writes its features (`peer_attach` in
/// `hw/net/virtio-net.c`), before SET_FEATURES: it only checks that the backend
/// *offers* `VHOST_USER_F_PROTOCOL_FEATURES`, and it does not send the enable again
/// after SET_FEATURES. The `vhost` crate's request handler answers such an early message
/// with `InactiveFeature` and drops the connection. So this hook holds back (and, when a
/// reply is wanted, acknowledges) every SET_VRING_ENABLE that arrives before
/// SET_FEATURES, remembering the last state asked for each ring, and replays those right
/// after a SET_FEATURES that acks `VHOST_USER_F_PROTOCOL_FEATURES` (without it the rings
/// start enabled anyway).
#[derive(Debug, Default)]
pub struct EarlyVringEnable {
    features_set: bool,
    held_back: BTreeMap<u32, u32>,
}

impl RequestHook for EarlyVringEnable {
    fn on_request(&mut self, msg: Message, frontend: &FrontendReplies) -> io::Result<Vec<Message>> {
        if msg.request == SET_VRING_ENABLE && !self.features_set {
            if let (Some(index), Some(state)) = (msg.payload_u32(0), msg.payload_u32(4)) {
                tracing::debug!("holding back SET_VRING_ENABLE sent before SET_FEATURES");
                self.held_back.insert(index, state);
                if msg.needs_reply() {
                    frontend.ack(msg.request, true)?;
                }
                return Ok(Vec::new());
            }
        }
        if msg.request != SET_FEATURES {
            return Ok(vec![msg]);
        }
        let Some(features) = msg.payload_u64(0) else {
            return Ok(vec![msg]);
        };
        self.features_set = true;
        let held_back = std::mem::take(&mut self.held_back);
        let mut forward = vec![msg];
        if features & PROTOCOL_FEATURES_BIT != 0 {
            for (index, state) in held_back {
                tracing::debug!(
                    index,
                    state,
                    "replaying SET_VRING_ENABLE after SET_FEATURES"
                );
                let payload = [index.to_le_bytes(), state.to_le_bytes()].concat();
                forward.push(Message::new(SET_VRING_ENABLE, payload));
            }
        }
        Ok(forward)
    }
}
