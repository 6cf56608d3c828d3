//! Switch ports that lead into a guest: the long-lived port slot ([`GuestPort`]) and
//! the state of its current vhost-user connection ([`GuestLink`]).
//!
//! Any thread may deliver a frame into a guest: the transmit worker of another guest
//! port, or a tap's reader. It finds the link through the port, picks one of the
//! guest's receive queues, and writes the frame under that vring's lock (so several
//! senders to one guest never interleave within a frame). The receive vrings are those
//! vhost-user-backend created for the connection; a link learns them from the first
//! event its worker threads see for a queue pair (a ring's first event arrives as soon
//! as the frontend starts and enables it), since the library does not hand them out
//! otherwise.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::frame::{vnet_hdr_len, Gso, VnetHdr};
use crate::mac_table::MacAddr;
use crate::rx::{self, RxFormat, RxOutcome, RxReport, RxScratch};

/// Guest memory as the vring workers see it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A guest's vring.
pub type GuestVring = VringRwLock<GuestMemory>;

/// Which offloads a receiver takes as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxCaps {
    /// Partial checksums (`VIRTIO_NET_F_GUEST_CSUM`).
    pub csum: bool,
    /// TCP/IPv4 super-frames (`GUEST_TSO4`).
    pub tso4: bool,
    /// TCP/IPv6 super-frames (`GUEST_TSO6`).
    pub tso6: bool,
}

impl RxCaps {
    /// A receiver that takes everything (a tap: the kernel completes offloads itself).
    pub const ALL: RxCaps = RxCaps {
        csum: true,
        tso4: true,
        tso6: true,
    };

    /// What a guest that acked `features` takes.
    pub fn from_features(features: u64) -> RxCaps {
        let has = |bit: u32| features & (1 << bit) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        RxCaps {
            csum,
            tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
        }
    }

    /// Whether a frame with `hdr` can be handed over with its header unchanged.
    pub fn accepts(&self, hdr: &VnetHdr) -> bool {
        match hdr.gso() {
            Ok(None) => !hdr.needs_csum() || self.csum,
            Ok(Some(Gso::Tcp4 { .. })) => self.tso4,
            Ok(Some(Gso::Tcp6 { .. })) => self.tso6,
            Err(_) => false,
        }
    }

    /// The header a receiver with these capabilities gets for a frame it accepts:
    /// without `GUEST_CSUM` no checksum flag at all (virtio 1.2, 5.1.6.3.1).
    pub fn header_for(&self, hdr: &VnetHdr) -> VnetHdr {
        let mut h = *hdr;
        if !self.csum {
            h.flags = 0;
        }
        h
    }
}

/// Signals owed to guests after a burst of deliveries: one per receive queue, however
/// many frames went into it.
#[derive(Debug, Default)]
pub struct PendingSignals {
    queues: Vec<(Arc<GuestLink>, usize)>,
}

impl PendingSignals {
    fn add(&mut self, link: &Arc<GuestLink>, queue: usize) {
        if !self
            .queues
            .iter()
            .any(|(l, q)| *q == queue && Arc::ptr_eq(l, link))
        {
            self.queues.push((link.clone(), queue));
        }
    }

    /// Signals every queue that received frames, and forgets them.
    pub fn flush(&mut self) {
        for (link, queue) in self.queues.drain(..) {
            if let Some(vring) = link.rx.get(queue).and_then(OnceLock::get) {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::debug!("cannot signal receive queue {queue}: {e}");
                }
            }
        }
    }
}

/// The state of one vhost-user connection of a guest port.
pub struct GuestLink {
    mem: GuestMemory,
    features: AtomicU64,
    rx: Vec<OnceLock<GuestVring>>,
}

impl std::fmt::Debug for GuestLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let started = self.rx.iter().filter(|r| r.get().is_some()).count();
        f.debug_struct("GuestLink")
            .field("features", &format_args!("{:#x}", self.features()))
            .field("rx_queues_started", &started)
            .finish_non_exhaustive()
    }
}

impl GuestLink {
    /// A link with `pairs` queue pairs and empty guest memory.
    pub fn new(pairs: usize) -> GuestLink {
        GuestLink {
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            features: AtomicU64::new(0),
            rx: (0..pairs).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The guest memory (shared with the connection's vrings).
    pub fn memory(&self) -> GuestMemory {
        self.mem.clone()
    }

    /// Records the features the driver acked.
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Release);
    }

    /// The features the driver acked.
    pub fn features(&self) -> u64 {
        self.features.load(Ordering::Acquire)
    }

    /// Records the receive vring of queue pair `pair` (once per connection).
    pub fn publish_rx(&self, pair: usize, vring: &GuestVring) {
        if let Some(slot) = self.rx.get(pair) {
            let _ = slot.get_or_init(|| vring.clone());
        }
    }

    /// What this guest takes as it is.
    pub fn caps(&self) -> RxCaps {
        RxCaps::from_features(self.features())
    }

    /// Writes one frame into one of the guest's started receive queues, chosen by
    /// `flow` so a flow's frames stay in order on one queue.
    pub fn deliver(
        self: &Arc<Self>,
        hdr: &VnetHdr,
        frame: &[u8],
        flow: u32,
        scratch: &mut RxScratch,
        signals: &mut PendingSignals,
    ) -> RxReport {
        let features = self.features();
        let format = RxFormat {
            hdr_len: vnet_hdr_len(features),
            mergeable: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        };
        let pairs = self.rx.len();
        for k in 0..pairs {
            let queue = (flow as usize + k) % pairs;
            let Some(vring) = self.rx[queue].get() else {
                continue;
            };
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                continue;
            }
            let mem = self.mem.memory();
            let report = rx::deliver(state.get_queue_mut(), &mem, format, hdr, frame, scratch);
            drop(state);
            if report.notify {
                signals.add(self, queue);
            }
            return report;
        }
        RxReport {
            outcome: RxOutcome::NoBuffers,
            bad_buffers: 0,
            notify: false,
        }
    }
}

/// A switch port that one VM connects to over a vhost-user socket.
#[derive(Debug)]
pub struct GuestPort {
    /// The socket the port listens on.
    pub socket: PathBuf,
    /// The MAC address in the device's config space.
    pub mac: MacAddr,
    link: RwLock<Option<Arc<GuestLink>>>,
}

impl GuestPort {
    /// A port with no connection yet.
    pub fn new(socket: PathBuf, mac: MacAddr) -> GuestPort {
        GuestPort {
            socket,
            mac,
            link: RwLock::new(None),
        }
    }

    /// The current connection, if any.
    pub fn link(&self) -> Option<Arc<GuestLink>> {
        self.link
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs (Some) or removes (None) the current connection.
    pub fn set_link(&self, link: Option<Arc<GuestLink>>) {
        *self.link.write().unwrap_or_else(PoisonError::into_inner) = link;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_features() {
        let none = RxCaps::from_features(0);
        let csum_only = RxCaps::from_features(1 << VIRTIO_NET_F_GUEST_CSUM);
        let tso_without_csum = RxCaps::from_features(1 << VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(
            none,
            RxCaps {
                csum: false,
                tso4: false,
                tso6: false
            }
        );
        assert!(csum_only.csum && !csum_only.tso4);
        assert!(!tso_without_csum.tso4, "TSO needs GUEST_CSUM");
        let plain = VnetHdr::plain();
        let partial = VnetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 16,
            ..plain
        };
        let tso4 = VnetHdr {
            gso_type: 1,
            gso_size: 1448,
            ..partial
        };
        let tso6 = VnetHdr {
            gso_type: 4,
            ..tso4
        };
        assert!(none.accepts(&plain));
        assert!(!none.accepts(&partial));
        assert!(csum_only.accepts(&partial) && !csum_only.accepts(&tso4));
        assert!(RxCaps::ALL.accepts(&tso4) && RxCaps::ALL.accepts(&tso6));
        let v4_only = RxCaps {
            tso6: false,
            ..RxCaps::ALL
        };
        assert!(!v4_only.accepts(&tso6));
        let valid = VnetHdr { flags: 2, ..plain };
        assert_eq!(none.header_for(&valid).flags, 0);
        assert_eq!(csum_only.header_for(&valid).flags, 2);
    }

    #[test]
    fn a_link_without_started_queues_has_no_buffers() {
        let link = Arc::new(GuestLink::new(2));
        let report = link.deliver(
            &VnetHdr::plain(),
            &[0u8; 60],
            1,
            &mut RxScratch::default(),
            &mut PendingSignals::default(),
        );
        assert_eq!(report.outcome, RxOutcome::NoBuffers);
    }
}
