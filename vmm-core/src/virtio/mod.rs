//! Virtio transports: what a guest driver talks to.
//!
//! The core has no per-device code. A [`VirtioMmioTransport`] implements the
//! virtio-mmio version 2 register interface (virtio 1.2 spec, section 4.2.2) and forwards
//! everything device-specific (features, config space, the rings) to the device's
//! vhost-user backend through a [`crate::vhost_user::VhostUserFrontend`].
//!
//! Module map:
//! - [`device_type`]: per device type what the frontend provides (device ID, queue
//!   count rule, config space, its own queues, masked features), as data;
//! - [`registers`]: the register file and the device-status state machine, with no side
//!   effects of its own (unit-tested against a fake device);
//! - [`state`]: everything the guest programmed, kept so a backend can be reconnected;
//! - [`mmio`]: the transport that ties registers, KVM ioeventfds/irqfds and the frontend;
//! - [`interrupt`]: the InterruptStatus register shared with the event loop, and the irqfd;
//! - [`ring_tracker`]: the outstanding requests of a backend that does not track them,
//!   so its crash repeats and loses none;
//! - [`event_loop`]: the one core thread that turns backend call eventfds into guest
//!   interrupts (backends that go away are noticed by [`crate::supervisor`]).

pub mod device_type;
pub mod event_loop;
pub mod interrupt;
pub mod mmio;
pub mod registers;
pub mod ring_tracker;
pub mod state;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use plexvm_protocol::api::BackendState;

pub use device_type::{default_queue_count, DeviceType};
pub use event_loop::{DeviceEventHandler, EventLoop, EventLoopError};
pub use interrupt::InterruptLine;
pub use mmio::{BackendWatch, TransportError, VirtioMmioTransport};
pub use registers::{DeviceOps, MmioRegisters};
pub use ring_tracker::RingTracker;
pub use state::{DeviceState, QueueState};

/// The size of one virtio-mmio window (docs/platform.md).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the per-queue ioeventfds sit.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// QueueNumMax of every queue.
///
/// vhost-user has no message that tells the frontend a backend's largest ring, so this is
/// the frontend's choice, as QEMU's `queue-size` property is; 256 is what common backends
/// (rust-vmm vhost-device-*, qemu-storage-daemon, ours) all accept.
pub const QUEUE_SIZE_MAX: u16 = 256;

/// The most queues one transport exposes, however many a backend announces with
/// GET_QUEUE_NUM; every queue costs two eventfds and one ioeventfd.
pub const MAX_QUEUES: usize = 64;

/// Device-status bits (virtio 1.2 spec, section 2.1).
pub mod status {
    /// The guest OS has found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u32 = 8;
    /// The device has hit an error from which it cannot recover without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver has given up on the device.
    pub const FAILED: u32 = 128;
}

/// Feature bits the transport itself must understand to offer, and does not: they are
/// masked out of what the backend offers before the driver sees the features.
///
/// - NOTIFICATION_DATA (38) and NOTIF_CONFIG_DATA (39) change what the driver writes to
///   QueueNotify, which would defeat the ioeventfd datamatch on the queue index;
/// - RING_RESET (40) needs the QueueReset register, ADMIN_VQ (41) an admin queue,
///   SR_IOV (37) is PCI-only;
/// - RING_PACKED (34): the vring state the core keeps for reconnecting (`state`) assumes
///   split rings, whose SET_VRING_BASE is a bare index.
pub const TRANSPORT_MASKED_FEATURES: u64 =
    (1 << 34) | (1 << 37) | (1 << 38) | (1 << 39) | (1 << 40) | (1 << 41);

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit in the virtio feature space, never
/// offered to the guest.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A device's backend connection state, shared by the transport (which reports it) and
/// the event loop (which notices the backend going away).
///
/// Besides the API's states it knows "retired": the transport is being dropped and stops
/// its backend on purpose, so the hang-up that follows is not reported as a failure.
#[derive(Debug, Clone)]
pub struct SharedBackendState(Arc<AtomicU8>);

const RETIRED: u8 = 3;

impl SharedBackendState {
    /// A state that starts as `state`.
    pub fn new(state: BackendState) -> Self {
        SharedBackendState(Arc::new(AtomicU8::new(Self::encode(state))))
    }

    /// The current state (a retired backend is down).
    pub fn get(&self) -> BackendState {
        match self.0.load(Ordering::Acquire) {
            0 => BackendState::Up,
            2 => BackendState::Reconnecting,
            4 => BackendState::Failed,
            5 => BackendState::Stalled,
            _ => BackendState::Down,
        }
    }

    /// Changes the state, unless the backend is retired.
    pub fn set(&self, state: BackendState) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != RETIRED).then_some(Self::encode(state))
            });
    }

    /// Marks the backend as stopped on purpose: it reads as down from now on.
    pub fn retire(&self) {
        self.0.store(RETIRED, Ordering::Release);
    }

    /// Whether [`Self::retire`] was called.
    pub fn is_retired(&self) -> bool {
        self.0.load(Ordering::Acquire) == RETIRED
    }

    fn encode(state: BackendState) -> u8 {
        match state {
            BackendState::Up => 0,
            BackendState::Down => 1,
            BackendState::Reconnecting => 2,
            BackendState::Failed => 4,
            BackendState::Stalled => 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_state_round_trips() {
        let s = SharedBackendState::new(BackendState::Up);
        let other = s.clone();
        assert_eq!(s.get(), BackendState::Up);
        other.set(BackendState::Down);
        assert_eq!(s.get(), BackendState::Down);
        other.set(BackendState::Reconnecting);
        assert_eq!(s.get(), BackendState::Reconnecting);
        assert!(!s.is_retired());
        other.retire();
        other.set(BackendState::Up);
        assert_eq!(s.get(), BackendState::Down);
        assert!(s.is_retired());
    }

    #[test]
    fn masked_features_do_not_touch_device_or_version_bits() {
        assert_eq!(TRANSPORT_MASKED_FEATURES & (1 << 32), 0);
        assert_eq!(TRANSPORT_MASKED_FEATURES & 0xffff_ffff, 0);
    }
}
