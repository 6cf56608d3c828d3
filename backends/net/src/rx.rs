//! Writing a frame into a guest's receive queue (virtio 1.2, 5.1.6.3 and 5.1.6.4).
//!
//! The frame is copied straight from the switch's buffer into the guest's device-writable
//! buffers, header first. With `VIRTIO_NET_F_MRG_RXBUF` one frame may fill several
//! buffers (descriptor chains); `num_buffers` in the header says how many. All used
//! elements of one frame are written first and the used index is published once, as
//! QEMU's `virtqueue_flush` does: Linux's driver reads `num_buffers` and then expects all
//! of them to be there, and reports "rx error: N buffers missing" (and mis-parses what
//! follows) when it sees only some. That is why this module fills the used ring itself
//! instead of calling `Queue::add_used` per chain, and therefore also decides on its own
//! whether the driver wants an interrupt (2.7.10, `used_event` / `VRING_AVAIL_F_NO_INTERRUPT`).
//!
//! Nothing is ever written outside a chain's device-writable descriptors. A chain the
//! device cannot use (a device-readable descriptor, a descriptor outside guest memory, no
//! space at all) is returned to the driver empty (`len` 0, which Linux drops as a short
//! packet) when it is at the head of the ring, so a bad buffer can never wedge the queue.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::frame::VnetHdr;

/// How the receiving driver wants its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxFormat {
    /// virtio-net header length (10 or 12).
    pub hdr_len: usize,
    /// `VIRTIO_NET_F_MRG_RXBUF` negotiated.
    pub mergeable: bool,
}

/// What happened to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into `buffers` receive buffers.
    Delivered {
        /// Descriptor chains used.
        buffers: u16,
    },
    /// The driver has not posted (enough) receive buffers: the frame was dropped.
    NoBuffers,
    /// The next buffer is too small for the frame (no MRG_RXBUF): the frame was dropped
    /// and the buffer left for a smaller frame.
    TooSmall,
    /// The queue's rings cannot be accessed: the frame was dropped.
    RingError,
}

/// Result of [`deliver`]: the outcome, how many unusable buffers were returned empty,
/// and whether the driver must be notified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxReport {
    /// What happened to the frame.
    pub outcome: RxOutcome,
    /// Unusable buffers returned to the driver with length 0.
    pub bad_buffers: u32,
    /// The driver asked for an interrupt for the used elements just added.
    pub notify: bool,
}

/// One usable receive buffer: its head and its device-writable descriptors.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    head: u16,
    first: usize,
    count: usize,
}

/// Scratch space reused between frames so the data path does not allocate.
#[derive(Debug, Default)]
pub struct RxScratch {
    descs: Vec<(GuestAddress, usize)>,
    buffers: Vec<Buffer>,
    used: Vec<(u16, u32)>,
}

/// Writes one frame (header `hdr`, Ethernet bytes `frame`) into `queue`.
pub fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    format: RxFormat,
    hdr: &VnetHdr,
    frame: &[u8],
    scratch: &mut RxScratch,
) -> RxReport {
    let needed = format.hdr_len + frame.len();
    let mut report = RxReport {
        outcome: RxOutcome::NoBuffers,
        bad_buffers: 0,
        notify: false,
    };
    scratch.descs.clear();
    scratch.buffers.clear();
    scratch.used.clear();
    let old_used = queue.next_used();
    let capacity = gather(queue, mem, format, needed, scratch, &mut report);
    if capacity < needed {
        report.outcome = if scratch.buffers.is_empty() {
            RxOutcome::NoBuffers
        } else {
            RxOutcome::TooSmall
        };
        // Leave the buffers for later frames: roll back to the first one gathered (they
        // were popped last, one after another, after any unusable ones).
        let unused = scratch.buffers.len() as u16;
        queue.set_next_avail(queue.next_avail().wrapping_sub(unused));
    } else {
        let mut h = *hdr;
        h.num_buffers = scratch.buffers.len() as u16;
        let mut raw = [0u8; crate::frame::VNET_HDR_LEN];
        h.write(&mut raw[..format.hdr_len]);
        write_buffers(mem, &raw[..format.hdr_len], frame, scratch);
        report.outcome = RxOutcome::Delivered {
            buffers: h.num_buffers,
        };
    }
    if scratch.used.is_empty() {
        return report;
    }
    match publish_used(queue, mem, &scratch.used, old_used) {
        Ok(notify) => report.notify = notify,
        Err(()) => report.outcome = RxOutcome::RingError,
    }
    report
}

/// Pops chains until their space covers `needed` bytes (one chain without MRG_RXBUF).
/// Unusable chains at the head are queued in `scratch.used` with length 0. Returns the
/// space gathered (an unreadable avail ring reads as empty).
fn gather(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    format: RxFormat,
    needed: usize,
    scratch: &mut RxScratch,
    report: &mut RxReport,
) -> usize {
    let mut capacity = 0usize;
    while capacity < needed && (format.mergeable || scratch.buffers.is_empty()) {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let first = scratch.descs.len();
        let mut space = 0usize;
        let mut usable = true;
        for desc in chain {
            let len = desc.len() as usize;
            if !desc.is_write_only() || !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                usable = false;
                break;
            }
            if len > 0 {
                scratch.descs.push((desc.addr(), len));
                space += len;
            }
        }
        if usable && space > 0 {
            scratch.buffers.push(Buffer {
                head,
                first,
                count: scratch.descs.len() - first,
            });
            capacity += space;
            continue;
        }
        scratch.descs.truncate(first);
        if scratch.buffers.is_empty() {
            // At the head of the ring: hand it back empty so it cannot block the queue.
            scratch.used.push((head, 0));
            report.bad_buffers += 1;
        } else {
            // Behind usable buffers of this frame: leave it for the next frame, which
            // will find it at the head.
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
            break;
        }
    }
    capacity
}

/// Copies `hdr` then `frame` across the gathered buffers, filling each in turn, and
/// records each buffer's used length.
fn write_buffers(mem: &GuestMemoryMmap, hdr: &[u8], frame: &[u8], scratch: &mut RxScratch) {
    let mut parts = [hdr, frame];
    let mut part = 0usize;
    for buffer in &scratch.buffers {
        let mut written = 0usize;
        for &(addr, len) in &scratch.descs[buffer.first..buffer.first + buffer.count] {
            let mut done = 0usize;
            while done < len && part < parts.len() {
                let src = parts[part];
                let n = src.len().min(len - done);
                // The range was checked in `gather`; a failure here would mean the
                // memory map changed under a snapshot we hold, which cannot happen.
                let _ = mem.write_slice(&src[..n], GuestAddress(addr.0 + done as u64));
                done += n;
                parts[part] = &src[n..];
                if parts[part].is_empty() {
                    part += 1;
                }
            }
            written += done;
            if part == parts.len() {
                break;
            }
        }
        scratch.used.push((buffer.head, written as u32));
    }
}

/// Writes `elems` into the used ring and publishes them with one index update. Returns
/// whether the driver wants to be notified (virtio 1.2, 2.7.10).
fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    elems: &[(u16, u32)],
    old_used: u16,
) -> Result<bool, ()> {
    let size = queue.size();
    if size == 0 {
        return Err(());
    }
    let used_ring = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in elems {
        let slot = u64::from(next.0 % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(used_ring.0 + 4 + 8 * slot))
            .map_err(|_| ())?;
        next += Wrapping(1);
    }
    mem.store(
        u16::to_le(next.0),
        GuestAddress(used_ring.0 + 2),
        Ordering::Release,
    )
    .map_err(|_| ())?;
    queue.set_next_used(next.0);
    // The used index must be visible before the driver's wishes are read.
    fence(Ordering::SeqCst);
    let avail_ring = queue.avail_ring();
    if queue.event_idx_enabled() {
        let used_event: u16 = mem
            .load(
                GuestAddress(avail_ring + 4 + 2 * u64::from(size)),
                Ordering::Acquire,
            )
            .map(u16::from_le)
            .map_err(|_| ())?;
        let (new, old, event) = (next, Wrapping(old_used), Wrapping(used_event));
        Ok(new - event - Wrapping(1) < new - old)
    } else {
        let flags: u16 = mem
            .load(GuestAddress(avail_ring), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| ())?;
        Ok(u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

#[cfg(test)]
#[path = "rx_tests.rs"]
mod tests;
