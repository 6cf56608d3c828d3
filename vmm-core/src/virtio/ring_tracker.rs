//! [`RingTracker`]: which requests are outstanding on a device whose backend does not
//! track them itself (no VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so a crash of such a
//! backend loses none and repeats none.
//!
//! Rolling a ring back to the used index the guest sees (what QEMU does) is right only
//! when the backend completes requests in order. qemu-storage-daemon does not: with
//! several requests in flight, a later one often completes first. Then the used index
//! says nothing about *which* requests are done, and a rollback both repeats completed
//! requests (the driver gets a buffer it does not own) and skips unfinished ones (the
//! driver waits for ever).
//!
//! The core cannot see what a backend takes from the avail ring, but it can see what
//! the driver makes available and what the backend returns. The supervisor samples both
//! rings every few milliseconds: every new avail entry is appended to the outstanding
//! list, every new used entry removes the oldest outstanding entry with its head (a head
//! is not reused before it is returned). This is exact as long as fewer than a ring's
//! worth of entries pass between two samples; otherwise the tracker says so, and
//! becomes exact again the next time nothing is outstanding.
//!
//! After a crash, the outstanding heads, in the order the driver made them available,
//! are what the new backend must process. A vhost-user backend processes the avail ring
//! from one index on (SET_VRING_BASE), so the core writes the outstanding heads into the
//! avail ring slots from the used index up to the avail index — exactly as many slots as
//! entries outstanding — and starts the backend at the used index. Those slots belong to
//! entries the driver has already published and never reads back; the driver writes
//! only slots past its avail index, which cannot wrap onto them while the requests are
//! outstanding (virtio 1.2, 2.7.6: the driver never has more than the queue size
//! outstanding).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress};

use super::state::QueueState;
use crate::memory::GuestMemory;

/// Offset of `idx` in both rings, and of the first ring entry.
const IDX: u64 = 2;
const RING: u64 = 4;

/// One queue's outstanding requests.
#[derive(Debug, Clone)]
struct QueueTracker {
    size: u16,
    avail: GuestAddress,
    used: GuestAddress,
    /// The avail index up to which entries were appended.
    avail_seen: u16,
    /// The used index up to which entries were removed.
    used_seen: u16,
    /// (avail position, head), in avail order.
    outstanding: VecDeque<(u16, u16)>,
    exact: bool,
}

impl QueueTracker {
    /// Starts tracking `q` whose backend processes the avail ring from the used index on:
    /// everything between the used and the avail index is outstanding.
    fn new(q: &QueueState, mem: &GuestMemory) -> Option<Self> {
        let mut t = QueueTracker {
            size: q.size,
            avail: GuestAddress(q.avail_ring),
            used: GuestAddress(q.used_ring),
            avail_seen: 0,
            used_seen: 0,
            outstanding: VecDeque::new(),
            exact: true,
        };
        let used = t.read_u16(mem, t.used, IDX)?;
        t.used_seen = used;
        t.avail_seen = used;
        t.sample(mem);
        Some(t)
    }

    fn read_u16(&self, mem: &GuestMemory, base: GuestAddress, offset: u64) -> Option<u16> {
        let addr = base.checked_add(offset)?;
        mem.read_obj::<u16>(addr).ok().map(u16::from_le)
    }

    fn avail_head(&self, mem: &GuestMemory, pos: u16) -> Option<u16> {
        let slot = u64::from(pos % self.size);
        self.read_u16(mem, self.avail, RING + 2 * slot)
    }

    fn used_head(&self, mem: &GuestMemory, pos: u16) -> Option<u16> {
        let slot = u64::from(pos % self.size);
        let addr = self.used.checked_add(RING + 8 * slot)?;
        let id = mem.read_obj::<u32>(addr).ok().map(u32::from_le)?;
        u16::try_from(id).ok()
    }

    /// Forgets the outstanding list; says why the first time (until exact again).
    fn lose_track(&mut self, why: std::fmt::Arguments<'_>) {
        if self.exact {
            tracing::warn!(
                "ring tracker (avail ring {:#x}): lost track of the outstanding requests: {why}",
                self.avail.0
            );
        }
        self.exact = false;
        self.outstanding.clear();
    }

    /// Takes in what changed since the last sample; returns how many ring entries
    /// passed (avail plus used), so the caller can sample more often when busy.
    fn sample(&mut self, mem: &GuestMemory) -> u16 {
        let Some((used, avail)) = self.indices(mem) else {
            self.lose_track(format_args!("the ring indices cannot be read"));
            return 0;
        };
        let new_avail = avail.wrapping_sub(self.avail_seen);
        let new_used = used.wrapping_sub(self.used_seen);
        let size = self.size;
        if new_avail > size || new_used > size {
            // Ring slots were reused before they were seen.
            self.lose_track(format_args!(
                "{new_avail} entries made available and {new_used} returned between two \
                 samples, ring size {size}"
            ));
        } else if self.exact {
            self.take_in(mem, avail, used);
            if self.exact {
                self.check_unchanged(mem);
            }
        }
        self.avail_seen = avail;
        self.used_seen = used;
        if !self.exact && avail == used {
            // Nothing outstanding: exact again.
            self.exact = true;
            self.outstanding.clear();
        }
        new_avail.saturating_add(new_used)
    }

    /// The used and the avail index, read in that order: every entry the used index
    /// covers was made available before it was returned, so before the avail index
    /// read next.
    fn indices(&self, mem: &GuestMemory) -> Option<(u16, u16)> {
        let used = self.read_u16(mem, self.used, IDX)?;
        let avail = self.read_u16(mem, self.avail, IDX)?;
        fence(Ordering::Acquire);
        Some((used, avail))
    }

    /// After [`Self::take_in`] read the ring slots from the last seen indices on: the
    /// driver and the backend went on meanwhile, and a slot one of them rewrote for an
    /// entry a ring's length further on would have been read as the older entry. When
    /// the indices read now say that may have happened (this thread was preempted while
    /// reading), the list is not trusted.
    fn check_unchanged(&mut self, mem: &GuestMemory) {
        fence(Ordering::Acquire);
        let Some((used, avail)) = self.indices(mem) else {
            return self.lose_track(format_args!("the ring indices cannot be read"));
        };
        let (from_avail, from_used) = (self.avail_seen, self.used_seen);
        if overtaken(self.size, from_avail, from_used, avail, used) {
            let size = self.size;
            self.lose_track(format_args!(
                "the rings moved from avail {from_avail} used {from_used} to avail {avail} \
                 used {used} while they were read, ring size {size}"
            ));
        }
    }

    fn take_in(&mut self, mem: &GuestMemory, avail: u16, used: u16) {
        let mut pos = self.avail_seen;
        while pos != avail {
            match self.avail_head(mem, pos) {
                Some(head) => self.outstanding.push_back((pos, head)),
                None => {
                    return self.lose_track(format_args!("avail slot {pos} cannot be read"));
                }
            }
            pos = pos.wrapping_add(1);
        }
        let mut pos = self.used_seen;
        while pos != used {
            let head = self.used_head(mem, pos);
            let found = head.and_then(|h| self.outstanding.iter().position(|&(_, o)| o == h));
            match found {
                Some(i) => {
                    self.outstanding.remove(i);
                }
                // The backend returned something that was not outstanding: whatever
                // it did, the list no longer describes the ring.
                None => {
                    return self.lose_track(format_args!(
                        "used entry {pos} returns head {head:?}, which was not outstanding"
                    ));
                }
            }
            pos = pos.wrapping_add(1);
        }
    }
}

/// Whether slots read from avail position `from_avail` and used position `from_used`
/// on may have been rewritten before the indices became `avail` and `used`.
///
/// Avail slot p is rewritten when the driver writes position p + size, which a driver
/// that publishes each entry as it adds it (Linux, the probe) does while the published
/// index is p + size, and only with a free descriptor, i.e. once the used index has
/// passed p. Used slot q is rewritten when the backend writes position q + size, which
/// a backend that publishes each return (qemu-storage-daemon, plexvm-blk) does while
/// the published index is q + size. A full ring seen for the first time (avail = used +
/// size, nothing returned) is therefore not overtaken, nor is a full receive ring that
/// moves. Drivers or backends that write several entries before publishing them are
/// caught only when a ring's worth was published.
fn overtaken(size: u16, from_avail: u16, from_used: u16, avail: u16, used: u16) -> bool {
    let avail_ahead = avail.wrapping_sub(from_avail);
    let used_past_from_avail = used.wrapping_sub(from_avail);
    let driver_may_have = avail_ahead > size
        || (avail_ahead == size && used_past_from_avail != 0 && used_past_from_avail <= size);
    let backend_may_have = used.wrapping_sub(from_used) >= size;
    driver_may_have || backend_may_have
}

/// The trackers of a device's queues (see the module docs).
#[derive(Debug, Default)]
pub struct RingTracker {
    queues: Vec<Option<QueueTracker>>,
}

impl RingTracker {
    /// Starts tracking the ready queues of a device whose backend is about to be given
    /// the rings with the used index as base (before it can complete anything).
    pub fn start(queues: &[QueueState], mem: &GuestMemory) -> Self {
        RingTracker {
            queues: queues
                .iter()
                .map(|q| q.ready.then(|| QueueTracker::new(q, mem)).flatten())
                .collect(),
        }
    }

    /// Whether any queue is tracked.
    pub fn is_active(&self) -> bool {
        self.queues.iter().any(Option::is_some)
    }

    /// Takes in the rings' progress; returns the most ring entries one queue moved.
    pub fn sample(&mut self, mem: &GuestMemory) -> u16 {
        self.queues
            .iter_mut()
            .flatten()
            .map(|q| q.sample(mem))
            .max()
            .unwrap_or(0)
    }

    /// After the backend died (its used ring no longer moves): makes the avail ring of
    /// every tracked queue list exactly its outstanding requests from the used index on,
    /// so a backend started at the used index processes them and nothing else. Returns
    /// false when a queue's outstanding requests are not known (then the ring is left
    /// alone and the replay from the used index may repeat or miss requests).
    pub fn rewrite_outstanding(&mut self, mem: &GuestMemory) -> bool {
        let mut all_known = true;
        for (index, q) in self.queues.iter_mut().enumerate() {
            let Some(q) = q else { continue };
            q.sample(mem);
            let count = q.avail_seen.wrapping_sub(q.used_seen);
            if !q.exact || q.outstanding.len() != usize::from(count) {
                tracing::warn!(
                    "queue {index}: the outstanding requests are not known; replaying from the used index"
                );
                all_known = false;
                continue;
            }
            let in_place = q
                .outstanding
                .iter()
                .enumerate()
                .all(|(i, &(pos, _))| pos == q.used_seen.wrapping_add(i as u16));
            if in_place {
                continue;
            }
            tracing::info!(
                "queue {index}: {} outstanding requests completed out of order; laid out again from used index {}",
                q.outstanding.len(),
                q.used_seen
            );
            for (i, &(_, head)) in q.outstanding.iter().enumerate() {
                let slot = u64::from(q.used_seen.wrapping_add(i as u16) % q.size);
                let Some(addr) = q.avail.checked_add(RING + 2 * slot) else {
                    all_known = false;
                    break;
                };
                if mem.write_obj(head.to_le(), addr).is_err() {
                    all_known = false;
                }
            }
            fence(Ordering::Release);
        }
        all_known
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    struct Ring {
        mem: GuestMemory,
        avail: u16,
        used: u16,
    }

    impl Ring {
        fn new() -> Ring {
            Ring {
                mem: create_guest_memory(1 << 20).unwrap(),
                avail: 0,
                used: 0,
            }
        }
        fn make_available(&mut self, head: u16) {
            let slot = u64::from(self.avail % 8);
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail = self.avail.wrapping_add(1);
            self.mem
                .write_obj(self.avail, GuestAddress(AVAIL + 2))
                .unwrap();
        }
        fn complete(&mut self, head: u16) {
            let slot = u64::from(self.used % 8);
            self.mem
                .write_obj(u32::from(head), GuestAddress(USED + 4 + 8 * slot))
                .unwrap();
            self.used = self.used.wrapping_add(1);
            self.mem
                .write_obj(self.used, GuestAddress(USED + 2))
                .unwrap();
        }
        fn slot(&self, pos: u16) -> u16 {
            let slot = u64::from(pos % 8);
            self.mem
                .read_obj(GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap()
        }
        fn queue(&self) -> QueueState {
            let mut q = QueueState::new(8);
            q.size = 8;
            q.avail_ring = AVAIL;
            q.used_ring = USED;
            q.ready = true;
            q
        }
    }

    #[test]
    fn out_of_order_completions_are_rewritten_as_the_outstanding_list() {
        let mut r = Ring::new();
        let mut t = RingTracker::start(&[r.queue()], &r.mem);
        for head in [3, 5, 6, 1] {
            r.make_available(head);
        }
        t.sample(&r.mem);
        // The backend finished 5 and 1 before 3 and 6, then died.
        r.complete(5);
        r.complete(1);
        r.make_available(5);
        assert!(t.rewrite_outstanding(&r.mem));
        // Used index 2, avail index 5: slots 2, 3, 4 now hold 3, 6, 5 in avail order.
        assert_eq!([r.slot(2), r.slot(3), r.slot(4)], [3, 6, 5]);
    }

    #[test]
    fn in_order_progress_leaves_the_ring_alone() {
        let mut r = Ring::new();
        let mut t = RingTracker::start(&[r.queue()], &r.mem);
        for head in [7, 2, 4] {
            r.make_available(head);
        }
        r.complete(7);
        t.sample(&r.mem);
        r.make_available(0);
        r.complete(2);
        assert!(t.rewrite_outstanding(&r.mem));
        assert_eq!([r.slot(2), r.slot(3)], [4, 0]);
    }

    #[test]
    fn losing_track_is_reported_and_healed_when_idle() {
        let mut r = Ring::new();
        let mut t = RingTracker::start(&[r.queue()], &r.mem);
        // More than a ring's worth between two samples.
        for i in 0..9u16 {
            r.make_available(i % 8);
            r.complete(i % 8);
        }
        r.make_available(2);
        t.sample(&r.mem);
        assert!(!t.rewrite_outstanding(&r.mem));
        r.complete(2);
        t.sample(&r.mem);
        r.make_available(4);
        assert!(
            t.rewrite_outstanding(&r.mem),
            "exact again after an idle moment"
        );
    }

    #[test]
    fn rings_overtaken_while_read_are_told_from_rings_that_only_moved() {
        // A full ring seen the first time, nothing returned: not overtaken.
        assert!(!overtaken(256, 10, 10, 266, 10));
        // ... but once something was returned the driver may be writing position 266,
        // whose slot is position 10's.
        assert!(overtaken(256, 10, 10, 266, 11));
        // The driver published past a ring's length: overtaken.
        assert!(overtaken(256, 10, 10, 267, 20));
        // Ordinary progress, across the u16 wrap too.
        assert!(!overtaken(256, 100, 90, 140, 120));
        assert!(!overtaken(256, 65530, 65520, 20, 10));
        // A full receive ring that moves: not overtaken.
        assert!(!overtaken(256, 266, 10, 276, 20));
        // The backend may be writing position from_used + size: overtaken.
        assert!(overtaken(256, 290, 40, 297, 296));
    }

    #[test]
    fn a_head_returned_twice_loses_track() {
        let mut r = Ring::new();
        let mut t = RingTracker::start(&[r.queue()], &r.mem);
        for head in [1, 2, 3] {
            r.make_available(head);
        }
        r.complete(1);
        r.complete(1);
        t.sample(&r.mem);
        assert!(!t.rewrite_outstanding(&r.mem));
    }
}
