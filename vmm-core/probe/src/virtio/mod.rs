//! A polling virtio driver: the virtio-mmio version 2 and virtio-pci modern transports
//! ([`transport::Transport`] is either), split virtqueues,
//! the block, network and entropy devices. Virtio 1.2 spec sections are cited where behaviour is
//! defined by it.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod transport;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// `VIRTIO_F_VERSION_1` (virtio 1.2, 6): required by the modern interface.
pub const F_VERSION_1: u64 = 1 << 32;
