//! Split virtqueues, driver side (virtio 1.2, 2.7).
//!
//! The rings live in guest RAM shared with the device. The driver writes
//! descriptors and the available ring and reads the used ring, all with volatile
//! accesses, and publishes an index only after what it covers (2.7.13).
//! The free list is kept in driver memory (`links`), never read back from the
//! shared descriptor table, so a device scribbling on it cannot corrupt the driver.

use super::mmio::QueueAddresses;
use crate::memory::{OutOfMemory, PhysAlloc, PAGE_SIZE};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};
use thiserror::Error;

/// Largest queue the driver sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;
const RING_HEADER: u64 = 4; // flags + idx

/// `VIRTQ_AVAIL_F_NO_INTERRUPT` (2.7.7): the driver does not want used-buffer
/// notifications (without VIRTIO_F_EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTQ_USED_F_NO_NOTIFY` (2.7.10): the device does not want available-buffer
/// notifications (without VIRTIO_F_EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Virtqueue failures.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    /// Size is 0, not a power of two (2.7) or above [`MAX_QUEUE_SIZE`].
    #[error("bad queue size {0}")]
    BadSize(u16),
    /// No RAM for the rings.
    #[error("no RAM for the rings")]
    Memory(#[from] OutOfMemory),
    /// Not enough free descriptors for the chain.
    #[error("queue full: {needed} descriptors needed, {free} free")]
    Full {
        /// Chain length.
        needed: usize,
        /// Free descriptors.
        free: u16,
    },
    /// A chain needs at least one buffer.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The device put an id on the used ring that is not a descriptor index.
    #[error("device returned used id {0}, beyond the queue")]
    BadUsedId(u32),
    /// The device returned a chain the driver had not made available (or twice).
    #[error("device returned chain {0}, which is not outstanding")]
    NotOutstanding(u16),
    /// The used index moved by more than the queue size.
    #[error("used index jumped from {from} to {to}")]
    UsedIndexJump {
        /// Last index seen.
        from: u16,
        /// Index read.
        to: u16,
    },
}

/// One buffer of a chain, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`), else device-readable.
    pub writable: bool,
}

impl Buffer {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            writable: true,
        }
    }
}

/// One element taken off the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor of the returned chain.
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// A split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free_head: u16,
    num_free: u16,
    /// Free-list links; for a chain in flight they still give its order.
    links: [u16; MAX_QUEUE_SIZE as usize],
    /// Length of the chain headed by each descriptor while it is in flight, else 0.
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
    avail_idx: u16,
    last_used: u16,
}

impl SplitQueue {
    /// Allocates and zeroes rings for `size` entries (one page each part).
    pub fn new(alloc: &mut PhysAlloc, size: u16) -> Result<SplitQueue, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(size));
        }
        // 256 entries: desc 4096 B, avail 518 B, used 2054 B: a page each is enough.
        let region = alloc.alloc_bytes(3 * PAGE_SIZE as usize)?;
        let base = region.as_ptr() as u64;
        let mut links = [0u16; MAX_QUEUE_SIZE as usize];
        for (i, link) in links.iter_mut().enumerate().take(usize::from(size)) {
            *link = (i as u16 + 1) % size;
        }
        Ok(SplitQueue {
            size,
            desc: base,
            avail: base + PAGE_SIZE,
            used: base + 2 * PAGE_SIZE,
            free_head: 0,
            num_free: size,
            links,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring addresses for the transport.
    pub fn addresses(&self) -> QueueAddresses {
        QueueAddresses {
            desc: self.desc,
            driver: self.avail,
            device: self.used,
        }
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains made available and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// The available index the driver last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used index up to which the driver has taken elements.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Writes the available ring's `flags` (2.7.6).
    pub fn set_avail_flags(&mut self, flags: u16) {
        // SAFETY: `flags` is at offset 0 of the avail page this queue owns.
        unsafe { write_volatile(self.avail as *mut u16, flags) };
    }

    /// Writes `used_event` (VIRTIO_F_EVENT_IDX, 2.7.10): the device notifies once
    /// the used index passes it.
    pub fn set_used_event(&mut self, idx: u16) {
        let at = self.avail + RING_HEADER + 2 * u64::from(self.size);
        // SAFETY: `used_event` follows the `size` ring entries, within the avail page
        // (4 + 2 * 256 + 2 bytes at most).
        unsafe { write_volatile(at as *mut u16, idx) };
    }

    /// The used ring's `flags` as the device left them (2.7.8).
    pub fn used_flags(&self) -> u16 {
        // SAFETY: `flags` is at offset 0 of the used page this queue owns.
        unsafe { read_volatile(self.used as *const u16) }
    }

    /// `avail_event` (VIRTIO_F_EVENT_IDX, 2.7.10): the device wants a notification
    /// once the available index passes it.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + RING_HEADER + USED_ELEM_SIZE * u64::from(self.size);
        // SAFETY: `avail_event` follows the `size` used elements, within the used
        // page (4 + 8 * 256 + 2 bytes at most).
        unsafe { read_volatile(at as *const u16) }
    }

    fn write_desc(&mut self, id: u16, buf: &Buffer, next: Option<u16>) {
        let flags = if buf.writable { DESC_F_WRITE } else { 0 } | next.map_or(0, |_| DESC_F_NEXT);
        let at = self.desc + u64::from(id) * DESC_SIZE;
        // SAFETY: `id < size`, so the 16-byte descriptor lies in the descriptor page
        // this queue owns; the device only reads it.
        unsafe {
            write_volatile(at as *mut u64, buf.addr);
            write_volatile((at + 8) as *mut u32, buf.len);
            write_volatile((at + 12) as *mut u16, flags);
            write_volatile((at + 14) as *mut u16, next.unwrap_or(0));
        }
    }

    /// Writes `bufs` as one chain and makes it available; returns its head.
    /// The caller notifies the device.
    pub fn add_chain(&mut self, bufs: &[Buffer]) -> Result<u16, QueueError> {
        if bufs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if bufs.len() > usize::from(self.num_free) {
            return Err(QueueError::Full {
                needed: bufs.len(),
                free: self.num_free,
            });
        }
        let head = self.free_head;
        let mut id = head;
        for (i, buf) in bufs.iter().enumerate() {
            let next = self.links[usize::from(id)];
            self.write_desc(id, buf, (i + 1 < bufs.len()).then_some(next));
            id = next;
        }
        self.free_head = id;
        self.num_free -= bufs.len() as u16;
        self.chain_len[usize::from(head)] = bufs.len() as u16;
        let slot = u64::from(self.avail_idx % self.size);
        // SAFETY: the available ring (4 + 2 * size bytes) lies in this queue's avail page.
        unsafe { write_volatile((self.avail + RING_HEADER + 2 * slot) as *mut u16, head) };
        // 2.7.13: the ring entry and descriptors are visible before the index moves.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: `idx` is at offset 2 of the avail page.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.avail_idx) };
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Takes the next element off the used ring, if the device has put one there,
    /// and frees its descriptors.
    pub fn pop_used(&mut self) -> Result<Option<Used>, QueueError> {
        // SAFETY: `idx` is at offset 2 of the used page this queue owns.
        let used_idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.size {
            return Err(QueueError::UsedIndexJump {
                from: self.last_used,
                to: used_idx,
            });
        }
        // The element is read only after the index that covers it (2.7.14).
        fence(Ordering::SeqCst);
        let at = self.used + RING_HEADER + USED_ELEM_SIZE * u64::from(self.last_used % self.size);
        // SAFETY: the element (8 bytes, index < size) lies in the used page.
        let (id, len) = unsafe {
            (
                read_volatile(at as *const u32),
                read_volatile((at + 4) as *const u32),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size)
            .ok_or(QueueError::BadUsedId(id))?;
        self.free_chain(head)?;
        Ok(Some(Used { head, len }))
    }

    fn free_chain(&mut self, head: u16) -> Result<(), QueueError> {
        let len = self.chain_len[usize::from(head)];
        if len == 0 {
            return Err(QueueError::NotOutstanding(head));
        }
        let mut last = head;
        for _ in 1..len {
            last = self.links[usize::from(last)];
        }
        self.links[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += len;
        self.chain_len[usize::from(head)] = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::host_alloc;

    /// (address, length, flags) of each descriptor of a chain.
    type Chain = Vec<(u64, u32, u16)>;

    /// Plays the device: takes the next available head and returns it with `len`.
    struct FakeDevice {
        next_avail: u16,
        used_idx: u16,
    }

    impl FakeDevice {
        fn take(&mut self, q: &SplitQueue) -> Option<(u16, Chain)> {
            // SAFETY: (test) addresses come from the queue's own host allocation.
            unsafe {
                let idx = read_volatile((q.avail + 2) as *const u16);
                if idx == self.next_avail {
                    return None;
                }
                let slot = u64::from(self.next_avail % q.size);
                let head = read_volatile((q.avail + 4 + 2 * slot) as *const u16);
                self.next_avail = self.next_avail.wrapping_add(1);
                let mut chain = Vec::new();
                let mut id = head;
                loop {
                    let at = q.desc + 16 * u64::from(id);
                    let (addr, len) = (
                        read_volatile(at as *const u64),
                        read_volatile((at + 8) as *const u32),
                    );
                    let (flags, next) = (
                        read_volatile((at + 12) as *const u16),
                        read_volatile((at + 14) as *const u16),
                    );
                    chain.push((addr, len, flags));
                    if flags & DESC_F_NEXT == 0 {
                        break;
                    }
                    id = next;
                }
                Some((head, chain))
            }
        }

        fn put(&mut self, q: &SplitQueue, id: u32, len: u32) {
            // SAFETY: (test) as above.
            unsafe {
                let at = q.used + 4 + 8 * u64::from(self.used_idx % q.size);
                write_volatile(at as *mut u32, id);
                write_volatile((at + 4) as *mut u32, len);
                self.used_idx = self.used_idx.wrapping_add(1);
                write_volatile((q.used + 2) as *mut u16, self.used_idx);
            }
        }
    }

    #[test]
    fn chains_round_trip_and_descriptors_are_reused() {
        let mut alloc = host_alloc(64 * 1024);
        let mut q = SplitQueue::new(&mut alloc, 8).unwrap();
        let mut dev = FakeDevice {
            next_avail: 0,
            used_idx: 0,
        };
        for round in 0..20u64 {
            let bufs = [
                Buffer::readable(0x1000 + round, 16),
                Buffer::writable(0x2000, 512),
                Buffer::writable(0x3000, 1),
            ];
            let head = q.add_chain(&bufs).unwrap();
            let (seen_head, chain) = dev.take(&q).unwrap();
            assert_eq!(seen_head, head);
            assert_eq!(
                chain,
                [
                    (0x1000 + round, 16, DESC_F_NEXT),
                    (0x2000, 512, DESC_F_NEXT | DESC_F_WRITE),
                    (0x3000, 1, DESC_F_WRITE)
                ]
            );
            assert_eq!(q.num_free(), 5);
            assert_eq!(q.pop_used(), Ok(None));
            dev.put(&q, u32::from(head), 513);
            assert_eq!(q.pop_used(), Ok(Some(Used { head, len: 513 })));
            assert_eq!(q.num_free(), 8);
            assert_eq!(q.in_flight(), 0);
        }
    }

    #[test]
    fn out_of_order_completion() {
        let mut alloc = host_alloc(64 * 1024);
        let mut q = SplitQueue::new(&mut alloc, 8).unwrap();
        let mut dev = FakeDevice {
            next_avail: 0,
            used_idx: 0,
        };
        let a = q
            .add_chain(&[Buffer::readable(1, 1), Buffer::writable(2, 1)])
            .unwrap();
        let b = q
            .add_chain(&[
                Buffer::readable(3, 1),
                Buffer::writable(4, 1),
                Buffer::writable(5, 1),
            ])
            .unwrap();
        let c = q.add_chain(&[Buffer::writable(6, 1)]).unwrap();
        assert_eq!(q.num_free(), 2);
        assert!(matches!(
            q.add_chain(&[Buffer::readable(0, 1); 3]),
            Err(QueueError::Full { needed: 3, free: 2 })
        ));
        for _ in 0..3 {
            dev.take(&q).unwrap();
        }
        for head in [b, c, a] {
            dev.put(&q, u32::from(head), 0);
            assert_eq!(q.pop_used().unwrap().unwrap().head, head);
        }
        assert_eq!(q.num_free(), 8);
        // All 8 descriptors are usable again as one chain.
        let head = q.add_chain(&[Buffer::readable(0, 1); 8]).unwrap();
        assert_eq!(dev.take(&q).unwrap().1.len(), 8);
        dev.put(&q, u32::from(head), 0);
        assert!(q.pop_used().unwrap().is_some());
    }

    #[test]
    fn misbehaving_device_is_reported() {
        let mut alloc = host_alloc(64 * 1024);
        let mut q = SplitQueue::new(&mut alloc, 4).unwrap();
        let mut dev = FakeDevice {
            next_avail: 0,
            used_idx: 0,
        };
        let head = q.add_chain(&[Buffer::readable(1, 1)]).unwrap();
        dev.put(&q, 99, 0);
        assert_eq!(q.pop_used(), Err(QueueError::BadUsedId(99)));
        dev.put(&q, u32::from(head) + 1, 0);
        assert_eq!(q.pop_used(), Err(QueueError::NotOutstanding(head + 1)));
        dev.used_idx = dev.used_idx.wrapping_add(10);
        dev.put(&q, 0, 0);
        assert!(matches!(
            q.pop_used(),
            Err(QueueError::UsedIndexJump { .. })
        ));
        assert_eq!(q.add_chain(&[]), Err(QueueError::EmptyChain));
    }

    #[test]
    fn event_fields_sit_after_the_rings() {
        let mut alloc = host_alloc(64 * 1024);
        let mut q = SplitQueue::new(&mut alloc, 8).unwrap();
        q.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        q.set_used_event(0x1234);
        // SAFETY: (test) addresses come from the queue's own host allocation.
        unsafe {
            assert_eq!(read_volatile(q.avail as *const u16), 1);
            assert_eq!(read_volatile((q.avail + 4 + 16) as *const u16), 0x1234);
            write_volatile((q.used + 4 + 64) as *mut u16, 0x4321);
            write_volatile(q.used as *mut u16, USED_F_NO_NOTIFY);
        }
        assert_eq!(q.avail_event(), 0x4321);
        assert_eq!(q.used_flags(), USED_F_NO_NOTIFY);
        q.add_chain(&[Buffer::readable(1, 1)]).unwrap();
        assert_eq!((q.avail_idx(), q.last_used()), (1, 0));
    }

    #[test]
    fn sizes_are_checked() {
        let mut alloc = host_alloc(64 * 1024);
        for size in [0, 3, 512] {
            assert_eq!(
                SplitQueue::new(&mut alloc, size).unwrap_err(),
                QueueError::BadSize(size)
            );
        }
    }
}
