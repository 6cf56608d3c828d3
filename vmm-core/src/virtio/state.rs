//! Everything the guest programmed into a virtio device, kept in the core.
//!
//! DESIGN.md: "All vring state the guest set up lives in the core, so a backend can die
//! and be reconnected (or replaced by another implementation) without the guest
//! noticing". This is that state. Reconnecting a backend replays it: a new
//! [`crate::vhost_user::VhostUserFrontend`] repeats the bring-up (its negotiated protocol
//! features are kept by the frontend), then [`crate::vhost_user::VhostUserFrontend::activate`]
//! is called with this state — SET_FEATURES with `driver_features`, the memory table, and
//! per started queue its size, `base`, addresses, kick and call fds. For a backend that
//! died without GET_VRING_BASE, `base` is first rolled back to the used index the guest
//! can see ([`QueueState::used_index`]), as QEMU does.

use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// One virtqueue as the driver set it up (virtio 1.2 spec, section 4.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// QueueNumMax: the largest size the driver may choose.
    pub max_size: u16,
    /// QueueNum: the size the driver chose (starts at `max_size`).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc: guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// QueueDriver: guest-physical address of the available ring.
    pub avail_ring: u64,
    /// QueueDevice: guest-physical address of the used ring.
    pub used_ring: u64,
    /// The ring index the backend starts from (SET_VRING_BASE): 0 for a fresh ring, the
    /// value GET_VRING_BASE returned after a stop.
    pub base: u16,
    /// Whether the backend was given this ring at the last activation.
    pub started: bool,
}

impl QueueState {
    /// A queue in its reset state.
    pub fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            base: 0,
            started: false,
        }
    }

    /// Bytes of the descriptor table (virtio 1.2 spec, section 2.7.5).
    pub fn desc_table_len(&self) -> u64 {
        16 * u64::from(self.size)
    }

    /// Bytes of the available ring with its `used_event` field (section 2.7.6).
    pub fn avail_ring_len(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// Bytes of the used ring with its `avail_event` field (section 2.7.8).
    pub fn used_ring_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// The `idx` field of the used ring as the guest sees it, or `None` when the ring is
    /// not in guest RAM. Reconnect rolls `base` back to this.
    pub fn used_index(&self, mem: &GuestMemory) -> Option<u16> {
        let addr = GuestAddress(self.used_ring).checked_add(2)?;
        mem.read_obj::<u16>(addr).ok().map(u16::from_le)
    }

    /// The `idx` field of the available ring (how far the driver has submitted), or
    /// `None` when the ring is not in guest RAM.
    pub fn avail_index(&self, mem: &GuestMemory) -> Option<u16> {
        let addr = GuestAddress(self.avail_ring).checked_add(2)?;
        mem.read_obj::<u16>(addr).ok().map(u16::from_le)
    }
}

/// The whole device as the driver set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// DeviceFeatures: what the backend offers minus what the transport masks.
    pub device_features: u64,
    /// DriverFeatures: what the driver accepted.
    pub driver_features: u64,
    /// Set when the driver wrote a non-zero value to a DriverFeatures word above bit 63,
    /// which no device offers: FEATURES_OK is refused then.
    pub driver_features_invalid: bool,
    /// The device status register.
    pub status: u32,
    /// Whether the backend was activated (DRIVER_OK succeeded) and not reset since.
    pub activated: bool,
    /// The queues, indexed by QueueSel.
    pub queues: Vec<QueueState>,
}

impl DeviceState {
    /// The reset state of a device offering `device_features` with `queue_count` queues.
    pub fn new(device_features: u64, queue_count: usize, queue_max_size: u16) -> Self {
        DeviceState {
            device_features,
            driver_features: 0,
            driver_features_invalid: false,
            status: 0,
            activated: false,
            queues: vec![QueueState::new(queue_max_size); queue_count],
        }
    }

    /// Back to the reset state (virtio 1.2 spec, section 2.4), keeping what the device
    /// offers.
    pub fn reset(&mut self) {
        self.driver_features = 0;
        self.driver_features_invalid = false;
        self.status = 0;
        self.activated = false;
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
    }

    /// The queues the driver made ready, with their indices.
    pub fn ready_queues(&self) -> impl Iterator<Item = (usize, &QueueState)> {
        self.queues.iter().enumerate().filter(|(_, q)| q.ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn ring_lengths_follow_the_split_ring_layout() {
        let mut q = QueueState::new(256);
        q.size = 8;
        assert_eq!(q.desc_table_len(), 128);
        assert_eq!(q.avail_ring_len(), 22);
        assert_eq!(q.used_ring_len(), 70);
    }

    #[test]
    fn reset_keeps_offer_and_max_sizes() {
        let mut s = DeviceState::new(0xff, 2, 128);
        s.driver_features = 3;
        s.status = 0xf;
        s.activated = true;
        s.queues[1].ready = true;
        s.queues[1].size = 16;
        s.queues[1].base = 9;
        s.reset();
        assert_eq!(s, DeviceState::new(0xff, 2, 128));
    }

    #[test]
    fn used_index_reads_guest_memory_and_rejects_outside_ram() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let mut q = QueueState::new(16);
        q.used_ring = 0x3000;
        mem.write_obj(7u16.to_le(), GuestAddress(0x3002)).unwrap();
        assert_eq!(q.used_index(&mem), Some(7));
        q.used_ring = 1 << 30;
        assert_eq!(q.used_index(&mem), None);
        q.used_ring = u64::MAX;
        assert_eq!(q.used_index(&mem), None);
    }
}
