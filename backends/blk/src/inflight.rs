//! The in-flight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (vhost-user spec,
//! "Inflight I/O tracking"), split-ring layout.
//!
//! The backend creates the region (GET_INFLIGHT_FD), the frontend keeps its fd and hands
//! it back to every later backend (SET_INFLIGHT_FD). Before a request is executed its
//! head descriptor is marked in flight with an increasing counter; once it is in the used
//! ring the mark is cleared. A backend started after a crash resubmits the marked heads in
//! counter order, so no request the dead backend had taken from the avail ring is lost.
//!
//! The layout is taken from the spec, not from `vhost::vhost_user::message::
//! QueueRegionSplit`, whose fields are in the wrong order (rust-vmm/vhost#88):
//!
//! ```text
//! queue region: features u64 | version u16 | desc_num u16 | last_batch_head u16 |
//!               used_idx u16 | desc[desc_num]
//! desc:         inflight u8 | padding [u8; 5] | next u16 | counter u64     (16 bytes)
//! ```
//!
//! Queue regions follow each other, each rounded up to 64 bytes.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

/// Size of a queue region's header.
const HEADER_LEN: usize = 16;
/// Size of one `DescStateSplit`.
const DESC_LEN: usize = 16;
/// Queue regions start on this boundary.
const ALIGN: usize = 64;
/// `version` of a region this backend understands.
const VERSION: u16 = 1;

// Offsets inside a queue region header and a descriptor state.
const VERSION_OFF: usize = 8;
const DESC_NUM_OFF: usize = 10;
const LAST_BATCH_OFF: usize = 12;
const USED_IDX_OFF: usize = 14;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Errors setting up a region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for no queues, or queues larger than a split ring allows.
    #[error("invalid in-flight geometry: {queues} queues of size {queue_size}")]
    Geometry {
        /// Queues asked for.
        queues: u16,
        /// Queue size asked for.
        queue_size: u16,
    },
    /// The region given with SET_INFLIGHT_FD is smaller than its geometry needs.
    #[error("in-flight region of {size} bytes is too small for {needed}")]
    TooSmall {
        /// Bytes given.
        size: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// The memfd could not be created or sized.
    #[error("cannot create the in-flight region")]
    Create(#[source] io::Error),
    /// The region could not be mapped.
    #[error("cannot map the in-flight region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Bytes of one queue's region.
pub fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A mapped in-flight region shared with the frontend.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion,
    queues: u16,
    queue_size: u16,
    counter: AtomicU64,
}

impl InflightRegion {
    /// Creates a zeroed region for `queues` queues of `queue_size` descriptors
    /// (GET_INFLIGHT_FD) and returns it with the fd and size to send to the frontend.
    pub fn create(queues: u16, queue_size: u16) -> Result<(Self, File, u64), InflightError> {
        check_geometry(queues, queue_size)?;
        let size = queue_region_len(queue_size) * usize::from(queues);
        // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd
        // or -1; the name is a static C string.
        let fd = unsafe { libc::memfd_create(c"plexvm-blk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(InflightError::Create)?;
        let region = Self::map(&file, 0, size, queues, queue_size)?;
        for q in 0..queues {
            let base = region.queue_base(q);
            region.put(base + VERSION_OFF, VERSION);
            region.put(base + DESC_NUM_OFF, queue_size);
        }
        Ok((region, file, size as u64))
    }

    /// Maps the region the frontend handed over (SET_INFLIGHT_FD). The global counter
    /// continues after the largest one found, so resubmission order is kept.
    pub fn open(
        file: &File,
        offset: u64,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_geometry(queues, queue_size)?;
        let needed = (queue_region_len(queue_size) * usize::from(queues)) as u64;
        if size < needed {
            return Err(InflightError::TooSmall { size, needed });
        }
        let region = Self::map(file, offset, needed as usize, queues, queue_size)?;
        let mut max = 0;
        for q in 0..queues {
            for head in 0..queue_size {
                max = max.max(region.get::<u64>(region.desc(q, head) + D_COUNTER));
            }
        }
        region.counter.store(max + 1, Ordering::Relaxed);
        Ok(region)
    }

    fn map(
        file: &File,
        offset: u64,
        size: usize,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let file = file.try_clone().map_err(InflightError::Create)?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map,
            queues,
            queue_size,
            counter: AtomicU64::new(1),
        })
    }

    /// Number of queues the region covers.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    fn queue_base(&self, queue: u16) -> usize {
        usize::from(queue) * queue_region_len(self.queue_size)
    }

    fn desc(&self, queue: u16, head: u16) -> usize {
        self.queue_base(queue) + HEADER_LEN + DESC_LEN * usize::from(head)
    }

    fn covers(&self, queue: u16, head: u16) -> bool {
        queue < self.queues && head < self.queue_size
    }

    // Offsets are in range by construction (`covers` is checked by every caller), so a
    // failed access cannot happen; it would read 0 / write nothing.
    fn get<T: vm_memory::ByteValued>(&self, offset: usize) -> T {
        self.map
            .as_volatile_slice()
            .read_obj(offset)
            .unwrap_or_else(|_| T::zeroed())
    }

    fn put<T: vm_memory::ByteValued>(&self, offset: usize, value: T) {
        let _ = self.map.as_volatile_slice().write_obj(value, offset);
    }

    /// Marks `head` of `queue` in flight ("When receiving available buffers").
    pub fn set_inflight(&self, queue: u16, head: u16) {
        if !self.covers(queue, head) {
            return;
        }
        let d = self.desc(queue, head);
        self.put(d + D_COUNTER, self.counter.fetch_add(1, Ordering::Relaxed));
        std::sync::atomic::fence(Ordering::Release);
        self.put(d + D_INFLIGHT, 1u8);
    }

    /// Before `head` is put in the used ring: it becomes the last batch (of one).
    pub fn prepare_used(&self, queue: u16, head: u16) {
        if !self.covers(queue, head) {
            return;
        }
        let base = self.queue_base(queue);
        let last = self.get::<u16>(base + LAST_BATCH_OFF);
        self.put(self.desc(queue, head) + D_NEXT, last);
        self.put(base + LAST_BATCH_OFF, head);
        std::sync::atomic::fence(Ordering::Release);
    }

    /// After the used ring's `idx` became `used_idx` with `head` in it.
    pub fn commit_used(&self, queue: u16, head: u16, used_idx: u16) {
        if !self.covers(queue, head) {
            return;
        }
        std::sync::atomic::fence(Ordering::Release);
        self.put(self.desc(queue, head) + D_INFLIGHT, 0u8);
        self.put(self.queue_base(queue) + USED_IDX_OFF, used_idx);
    }

    /// What a new backend must resubmit on `queue` whose used ring `idx` the guest sees
    /// as `guest_used_idx` ("When reconnecting"): first the last batch is settled if the
    /// dead backend published it without clearing its marks, then the heads still in
    /// flight are returned in counter order.
    pub fn recover(&self, queue: u16, guest_used_idx: u16) -> Vec<u16> {
        if queue >= self.queues {
            return Vec::new();
        }
        let base = self.queue_base(queue);
        if self.get::<u16>(base + VERSION_OFF) != VERSION {
            // A region nobody initialised: nothing is known to be in flight.
            self.put(base + VERSION_OFF, VERSION);
            self.put(base + DESC_NUM_OFF, self.queue_size);
            self.put(base + USED_IDX_OFF, guest_used_idx);
            return Vec::new();
        }
        let recorded = self.get::<u16>(base + USED_IDX_OFF);
        if recorded != guest_used_idx {
            let batch = guest_used_idx.wrapping_sub(recorded).min(self.queue_size);
            let mut head = self.get::<u16>(base + LAST_BATCH_OFF);
            for _ in 0..batch {
                if head >= self.queue_size {
                    break;
                }
                let d = self.desc(queue, head);
                self.put(d + D_INFLIGHT, 0u8);
                head = self.get::<u16>(d + D_NEXT);
            }
            self.put(base + USED_IDX_OFF, guest_used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&h| self.get::<u8>(self.desc(queue, h) + D_INFLIGHT) == 1)
            .map(|h| (self.get::<u64>(self.desc(queue, h) + D_COUNTER), h))
            .collect();
        heads.sort_unstable();
        heads.into_iter().map(|(_, h)| h).collect()
    }
}

fn check_geometry(queues: u16, queue_size: u16) -> Result<(), InflightError> {
    // Split rings have at most 32768 entries (virtio 1.2, 2.7).
    if queues == 0 || queue_size == 0 || queue_size > 32768 {
        return Err(InflightError::Geometry { queues, queue_size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_spec() {
        assert_eq!(
            queue_region_len(256),
            (16 + 16 * 256usize).next_multiple_of(64)
        );
        assert_eq!(queue_region_len(1), 64);
        let (r, file, size) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(size, 2 * 192);
        assert_eq!(file.metadata().unwrap().len(), size);
        // Header of queue 1: version 1 at byte 8, desc_num at byte 10.
        assert_eq!(r.get::<u16>(192 + 8), 1);
        assert_eq!(r.get::<u16>(192 + 10), 8);
        r.set_inflight(1, 3);
        // desc[3] of queue 1: inflight byte at 16 + 3 * 16, counter 8 bytes later.
        assert_eq!(r.get::<u8>(192 + 16 + 48), 1);
        assert_eq!(r.get::<u64>(192 + 16 + 48 + 8), 1);
    }

    #[test]
    fn resubmits_unfinished_heads_in_fetch_order_after_reopen() {
        let (r, file, size) = InflightRegion::create(1, 16).unwrap();
        for head in [5, 2, 9] {
            r.set_inflight(0, head);
        }
        r.prepare_used(0, 5);
        r.commit_used(0, 5, 1);
        drop(r);
        let r = InflightRegion::open(&file, 0, size, 1, 16).unwrap();
        assert_eq!(r.recover(0, 1), vec![2, 9]);
        // New marks continue after the old counters.
        r.set_inflight(0, 7);
        assert_eq!(r.recover(0, 1), vec![2, 9, 7]);
    }

    #[test]
    fn a_published_but_unmarked_last_batch_is_settled() {
        let (r, _file, _) = InflightRegion::create(1, 16).unwrap();
        r.set_inflight(0, 4);
        r.set_inflight(0, 6);
        // The backend put head 4 in the used ring (idx 0 -> 1) and died before clearing.
        r.prepare_used(0, 4);
        assert_eq!(r.recover(0, 1), vec![6]);
        // Nothing changed in the used ring: head 6 stays in flight.
        assert_eq!(r.recover(0, 1), vec![6]);
    }

    #[test]
    fn bad_geometry_and_out_of_range_heads_are_harmless() {
        assert!(InflightRegion::create(0, 8).is_err());
        assert!(InflightRegion::create(1, 0).is_err());
        let (r, file, _) = InflightRegion::create(1, 8).unwrap();
        r.set_inflight(0, 8);
        r.set_inflight(3, 0);
        r.commit_used(0, 200, 1);
        assert!(r.recover(0, 0).is_empty());
        assert!(r.recover(9, 0).is_empty());
        assert!(matches!(
            InflightRegion::open(&file, 0, 10, 1, 8),
            Err(InflightError::TooSmall { .. })
        ));
    }
}
