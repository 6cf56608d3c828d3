//! The vhost-user side of a VM port: features, config space and the queue workers.
//!
//! One [`VhostUserNet`] exists per frontend connection (vhost-user-backend's handler
//! refuses a second SET_OWNER, rust-vmm/vhost#321). Queues come in pairs (receive 2i,
//! transmit 2i+1, virtio 1.2, 5.1.2) and each pair has its own worker thread
//! (`queues_per_thread` holds the pair's two bits). A transmit kick makes the worker
//! read every waiting chain and forward it through the switch; receive queues are
//! filled by whichever thread forwards a frame to this port, so a receive kick needs no
//! work: the worker turns receive notifications off for good.
//!
//! The control queue is not served here: as with QEMU and Cloud Hypervisor, a frontend
//! that offers `VIRTIO_NET_F_CTRL_VQ` (which `VIRTIO_NET_F_MQ` requires) handles it
//! itself and turns `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` into SET_VRING_ENABLE messages.

use plexvm_backend_support::server::DaemonBackend;
use plexvm_backend_support::{guest_warn, WorkerExitEvents};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::frame::{vnet_hdr_len, Packet};
use crate::mac_table::{MacAddr, PortId};
use crate::port::{GuestLink, GuestMemory, GuestVring};
use crate::switch::{ForwardCtx, Switch};
use crate::tx::read_chain;

/// Length of the config space this device fills: `mac`, `status`,
/// `max_virtqueue_pairs` and `mtu` of `struct virtio_net_config` (virtio 1.2, 5.1.4).
pub const CONFIG_SPACE_LEN: usize = 12;

/// Largest config space read answered (VHOST_USER_CONFIG_SIZE).
const MAX_CONFIG_READ: u32 = 256;

/// Errors creating the per-connection backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    /// The eventfd that stops a queue worker cannot be created.
    #[error("cannot create a worker exit eventfd")]
    ExitEvent(#[source] io::Error),
}

/// Device settings shared by every connection of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLayout {
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// MTU offered, if any.
    pub mtu: Option<u16>,
    /// MAC address in the config space.
    pub mac: MacAddr,
}

/// The virtio features the device offers (see README, DEVICE).
pub fn device_features(layout: &DeviceLayout) -> u64 {
    let mut features = 1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_F_ANY_LAYOUT
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_STATUS
        | 1 << VIRTIO_NET_F_MAC
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if layout.queue_pairs > 1 {
        features |= 1 << VIRTIO_NET_F_MQ;
    }
    if layout.mtu.is_some() {
        features |= 1 << VIRTIO_NET_F_MTU;
    }
    features
}

/// The `struct virtio_net_config` bytes (little-endian).
pub fn config_space(layout: &DeviceLayout) -> [u8; CONFIG_SPACE_LEN] {
    let mut cfg = [0u8; CONFIG_SPACE_LEN];
    cfg[..6].copy_from_slice(&layout.mac.0);
    cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    cfg[8..10].copy_from_slice(&layout.queue_pairs.to_le_bytes());
    cfg[10..12].copy_from_slice(&layout.mtu.unwrap_or(0).to_le_bytes());
    cfg
}

/// Per-worker scratch state (each worker locks only its own, so never contended).
#[derive(Debug, Default)]
struct Worker {
    pkt: Packet,
    ctx: ForwardCtx,
}

/// The `VhostUserBackend` of one connection to a VM port.
#[derive(Debug)]
pub struct VhostUserNet {
    switch: Arc<Switch>,
    port: PortId,
    link: Arc<GuestLink>,
    layout: DeviceLayout,
    workers: Vec<Mutex<Worker>>,
    exit_events: WorkerExitEvents,
}

impl VhostUserNet {
    /// The backend for one connection of `port`, whose state lives in `link`.
    pub fn new(
        switch: Arc<Switch>,
        port: PortId,
        link: Arc<GuestLink>,
        layout: DeviceLayout,
    ) -> Result<Self, VhostUserNetError> {
        let pairs = usize::from(layout.queue_pairs);
        let exit_events = WorkerExitEvents::new(pairs).map_err(VhostUserNetError::ExitEvent)?;
        Ok(VhostUserNet {
            switch,
            port,
            link,
            layout,
            workers: (0..pairs).map(|_| Mutex::new(Worker::default())).collect(),
            exit_events,
        })
    }

    /// Forwards every waiting transmit chain; returns whether any was used.
    fn process_tx(&self, vring: &GuestVring, worker: &mut Worker) -> bool {
        let mem = self.link.memory().memory();
        let hdr_len = vnet_hdr_len(self.link.features());
        let mut used_any = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let read = read_chain(&mem, chain, hdr_len, &mut worker.pkt);
            if let Err(e) = vring.add_used(head, 0) {
                guest_warn!("cannot put used element {head}: {e}");
                break;
            }
            used_any = true;
            match read {
                Ok(_) => self.switch.forward(self.port, &worker.pkt, &mut worker.ctx),
                Err(e) => self.switch.malformed(self.port, &e),
            }
        }
        worker.ctx.signals.flush();
        used_any
    }

    /// Drains a transmit queue with the EVENT_IDX loop (virtio 1.2, 2.7.10): with
    /// notifications off, drain; turn them on and drain again if more arrived.
    fn handle_tx(&self, vring: &GuestVring, worker: &mut Worker) {
        let event_idx = vring.get_ref().get_queue().event_idx_enabled();
        let mut used_any = false;
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            used_any |= self.process_tx(vring, worker);
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    guest_warn!("cannot enable transmit notifications: {e}");
                    break;
                }
            }
        }
        if used_any && vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::debug!("cannot signal transmit queue: {e}");
            }
        }
    }
}

impl DaemonBackend for VhostUserNet {
    fn memory(&self) -> GuestMemory {
        self.link.memory()
    }

    fn exit_events(&self) -> &WorkerExitEvents {
        &self.exit_events
    }
}

impl VhostUserBackend for VhostUserNet {
    type Bitmap = ();
    type Vring = GuestVring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.layout.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.layout.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(&self.layout)
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(port = self.port, "features acked: {features:#x}");
        self.link.set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each queue knows it (`Queue::event_idx_enabled`); the receive path reads it
        // there under the vring lock.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        let cfg = config_space(&self.layout);
        if let Some(tail) = cfg.get(offset as usize..) {
            let count = tail.len().min(out.len());
            out[..count].copy_from_slice(&tail[..count]);
        }
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Legacy drivers may write `mac`; the switch learns addresses from traffic, so
        // the write is accepted and has no effect.
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // The handler updates the atomic we handed it in `memory()`, which the link owns.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.layout.queue_pairs)
            .map(|pair| 0b11u64 << (2 * pair))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.take(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error here ends the worker thread for good, so nothing the guest can cause
        // is returned as one. `vrings` is this thread's pair: [receive, transmit], and
        // `device_event` indexes it.
        if evset != EventSet::IN {
            guest_warn!("unexpected event set {evset:?} on queue event {device_event}");
            return Ok(());
        }
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        self.link.publish_rx(thread_id, rx);
        match device_event {
            0 => {
                // Receive buffers are taken when frames arrive; kicks are not needed.
                let _ = rx.disable_notification();
            }
            1 => {
                let Some(worker) = self.workers.get(thread_id) else {
                    return Ok(());
                };
                let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
                self.handle_tx(tx, &mut worker);
            }
            other => guest_warn!("event for unknown queue {other}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::{Port, PortKind, DEFAULT_AGEING};

    fn layout(pairs: u16, mtu: Option<u16>) -> DeviceLayout {
        DeviceLayout {
            queue_pairs: pairs,
            queue_size: 256,
            mtu,
            mac: MacAddr([0x52, 0x54, 0, 1, 2, 3]),
        }
    }

    fn backend(pairs: u16) -> VhostUserNet {
        let port = crate::port::GuestPort::new("/tmp/x".into(), MacAddr::local(1));
        let switch = Arc::new(Switch::new(
            vec![Port::new("vm0", PortKind::Guest(port))],
            DEFAULT_AGEING,
        ));
        let link = Arc::new(GuestLink::new(usize::from(pairs)));
        VhostUserNet::new(switch, 0, link, layout(pairs, None)).unwrap()
    }

    #[test]
    fn features_follow_layout() {
        let one = device_features(&layout(1, None));
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MAC,
        ] {
            assert_ne!(one & 1 << bit, 0, "bit {bit}");
        }
        assert_eq!(one & 1 << VIRTIO_NET_F_MQ, 0);
        assert_eq!(one & 1 << VIRTIO_NET_F_MTU, 0);
        let many = device_features(&layout(4, Some(9000)));
        assert_ne!(many & 1 << VIRTIO_NET_F_MQ, 0);
        assert_ne!(many & 1 << VIRTIO_NET_F_MTU, 0);
    }

    #[test]
    fn config_space_fields() {
        let cfg = config_space(&layout(4, Some(1400)));
        assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 4);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400);
        let b = backend(1);
        assert_eq!(b.get_config(6, 2), vec![1, 0]);
        assert_eq!(b.get_config(10, 8), vec![0; 8]);
        assert_eq!(b.get_config(300, 4), vec![0; 4]);
        assert!(b.set_config(0, &[1, 2, 3]).is_ok());
    }

    #[test]
    fn one_thread_per_queue_pair() {
        let b = backend(3);
        assert_eq!(b.num_queues(), 6);
        assert_eq!(b.queues_per_thread(), vec![0b11, 0b1100, 0b11_0000]);
        assert!(b.exit_event(0).is_some());
        assert!(b.exit_event(0).is_none());
        assert!(b.exit_event(3).is_none());
    }
}
