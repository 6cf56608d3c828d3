//! The virtio block device (virtio 1.2, 5.2), driven by polling.
//!
//! [`BlkDevice`] brings the device up and moves chains; [`RequestSlots`] keeps up to
//! [`MAX_SLOTS`] well-formed requests in flight, each with its own header, status
//! byte and data buffer, and turns "no completion for 10 s" into an error that names
//! the request that hung.

use super::mmio::MmioError;
use super::queue::{
    Buffer, QueueError, SplitQueue, Used, AVAIL_F_NO_INTERRUPT, MAX_QUEUE_SIZE, USED_F_NO_NOTIFY,
};
use super::transport::Transport;
use crate::memory::{OutOfMemory, PhysAlloc};
use crate::pattern::SECTOR_SIZE;
use crate::time::{Clock, Deadline};
use core::fmt;
use thiserror::Error;

/// DeviceID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// `VIRTIO_BLK_T_IN`: read (5.2.6).
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_S_OK` (5.2.6).
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;
/// Status byte value before the device writes it.
pub const STATUS_UNSET: u8 = 0xff;
/// `VIRTIO_BLK_F_RO`.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`.
pub const F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_F_EVENT_IDX` (virtio 1.2, 6 and 2.7.10).
pub const F_EVENT_IDX: u64 = 1 << 29;
/// How far ahead of the used index `used_event` is put to mean "no notification":
/// more than a queue's worth of completions never reaches it (2.7.10).
const USED_EVENT_FAR: u16 = 0x8000;
/// Size of the request header `{type: u32, reserved: u32, sector: u64}`.
pub const HEADER_SIZE: u32 = 16;
/// Largest data buffer of one request.
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;
/// Most requests in flight.
pub const MAX_SLOTS: usize = 16;

const REQUEST_TIMEOUT_MS: u64 = 10_000;
const IRQ_WAIT_MS: u64 = 1_000;
const QUEUE: u16 = 0;

/// Block device failures.
#[derive(Debug, Error)]
pub enum BlkError {
    /// Transport trouble.
    #[error("virtio-mmio")]
    Mmio(#[from] MmioError),
    /// Virtqueue trouble.
    #[error("virtqueue")]
    Queue(#[from] QueueError),
    /// Not enough RAM for rings or buffers.
    #[error("memory")]
    Memory(#[from] OutOfMemory),
    /// The device's queue is too small for even one request.
    #[error("queue size {0} is too small")]
    QueueTooSmall(u16),
    /// No completion for 10 s.
    #[error("no completion for {ms} ms; oldest request in flight: {request}")]
    Timeout {
        /// How long the probe waited.
        ms: u64,
        /// The request that hung.
        request: Request,
    },
    /// The device returned a chain no slot owns.
    #[error("completion for unknown chain {0}")]
    UnknownChain(u16),
    /// Waiting with nothing in flight.
    #[error("nothing in flight")]
    Idle,
    /// A request that does not fit a slot.
    #[error("request {0} does not fit a slot")]
    TooLarge(Request),
}

/// What the probe has learned about the device's interrupt (InterruptStatus bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqState {
    /// No completion yet.
    Unchecked,
    /// Bit 0 was set after a completion.
    Seen,
    /// Bit 0 stayed clear.
    Missing,
}

impl IrqState {
    /// `seen` / `missing` for result lines.
    pub fn word(self) -> &'static str {
        match self {
            IrqState::Seen => "seen",
            IrqState::Unchecked | IrqState::Missing => "missing",
        }
    }
}

/// A block device with its one request queue.
#[derive(Debug)]
pub struct BlkDevice {
    transport: Transport,
    queue: SplitQueue,
    capacity: u64,
    features: u64,
    irq: IrqState,
    clock: Clock,
    /// Available index at the last [`BlkDevice::kick`].
    kicked: u16,
    /// QueueNotify writes made by [`BlkDevice::kick`].
    notifies: u64,
    /// Whether [`BlkDevice::rearm`] asks for used-buffer notifications.
    want_irq: bool,
}

impl BlkDevice {
    /// Initialises the device behind `transport` (virtio 1.2, 3.1.1 and 4.2.3).
    pub fn open(
        transport: Transport,
        alloc: &mut PhysAlloc,
        clock: Clock,
    ) -> Result<BlkDevice, BlkError> {
        Self::open_with(transport, alloc, clock, 0)
    }

    /// As [`BlkDevice::open`], also accepting whatever of `extra` (e.g.
    /// [`F_EVENT_IDX`]) the device offers.
    pub fn open_with(
        mut transport: Transport,
        alloc: &mut PhysAlloc,
        clock: Clock,
        extra: u64,
    ) -> Result<BlkDevice, BlkError> {
        let features = transport.negotiate(0, F_FLUSH | F_RO | extra)?;
        let capacity = transport.config_u64(0)?;
        let max = transport.queue_max(QUEUE).min(MAX_QUEUE_SIZE);
        // Split queue sizes are powers of two (2.7): take the largest that fits.
        let size = if max == 0 { 0 } else { 1 << max.ilog2() };
        if size < 4 {
            transport.fail();
            return Err(BlkError::QueueTooSmall(max));
        }
        let queue = SplitQueue::new(alloc, size)?;
        transport.setup_queue(QUEUE, size, queue.addresses())?;
        transport.driver_ok();
        Ok(BlkDevice {
            transport,
            queue,
            capacity,
            features,
            irq: IrqState::Unchecked,
            clock,
            kicked: 0,
            notifies: 0,
            want_irq: true,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether FLUSH was negotiated.
    pub fn has_flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Queue size.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// The clock used for timeouts.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Makes a chain available and notifies the device; returns the head.
    pub fn submit(&mut self, chain: &[Buffer]) -> Result<u16, BlkError> {
        let head = self.queue.add_chain(chain)?;
        self.transport.notify(QUEUE);
        self.kicked = self.queue.avail_idx();
        Ok(head)
    }

    /// Makes a chain available without notifying the device (see [`BlkDevice::kick`]).
    pub fn add(&mut self, chain: &[Buffer]) -> Result<u16, BlkError> {
        Ok(self.queue.add_chain(chain)?)
    }

    /// Notifies the device of chains added since the last kick, unless it said it
    /// does not need to know (`avail_event` with EVENT_IDX, else `USED_F_NO_NOTIFY`;
    /// virtio 1.2, 2.7.10 and 2.7.13.4). Returns whether QueueNotify was written.
    pub fn kick(&mut self) -> bool {
        let new = self.queue.avail_idx();
        let old = core::mem::replace(&mut self.kicked, new);
        if new == old {
            return false;
        }
        // `add_chain` fenced after publishing the index, so the device's
        // suppression state read here is not older than our index.
        let needed = if self.features & F_EVENT_IDX != 0 {
            let event = self.queue.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.queue.used_flags() & USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.transport.notify(QUEUE);
            self.notifies += 1;
        }
        needed
    }

    /// QueueNotify writes made by [`BlkDevice::kick`].
    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    /// Whether to ask for used-buffer notifications; takes effect at once (virtio
    /// 1.2, 2.7.7 and 2.7.10). The probe polls either way: this only decides whether
    /// the device (and the core's interrupt path) does the work of notifying.
    pub fn set_interrupts(&mut self, on: bool) {
        self.want_irq = on;
        // 2.7.7.1: with EVENT_IDX the driver must leave the flags at 0 and use
        // `used_event` instead (see `rearm`).
        if self.features & F_EVENT_IDX == 0 {
            let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
            self.queue.set_avail_flags(flags);
        }
        self.rearm();
    }

    /// With EVENT_IDX, moves `used_event` along after completions were taken: to
    /// the next completion when interrupts are wanted, else out of reach.
    pub fn rearm(&mut self) {
        if self.features & F_EVENT_IDX != 0 {
            let last = self.queue.last_used();
            let event = if self.want_irq {
                last
            } else {
                last.wrapping_add(USED_EVENT_FAR)
            };
            self.queue.set_used_event(event);
        }
    }

    /// The next used element, if any, without the interrupt check of [`BlkDevice::poll`].
    pub fn pop(&mut self) -> Result<Option<Used>, BlkError> {
        Ok(self.queue.pop_used()?)
    }

    /// The next used element, if any. The first one also checks the interrupt.
    pub fn poll(&mut self) -> Result<Option<Used>, BlkError> {
        let used = self.queue.pop_used()?;
        if used.is_some() && self.irq == IrqState::Unchecked {
            self.check_irq(IRQ_WAIT_MS);
        }
        Ok(used)
    }

    /// Waits up to `ms` for InterruptStatus bit 0 (the device signalled its call
    /// eventfd and the core latched it), then acknowledges it.
    pub fn check_irq(&mut self, ms: u64) -> IrqState {
        if self.irq == IrqState::Seen {
            return self.irq;
        }
        let deadline = Deadline::after(&self.clock, ms);
        self.irq = loop {
            let status = self.transport.interrupt_status();
            if status & 1 != 0 {
                self.transport.interrupt_ack(status);
                break IrqState::Seen;
            }
            if deadline.passed(&self.clock) {
                break IrqState::Missing;
            }
        };
        self.irq
    }

    /// What is known about the interrupt.
    pub fn irq(&self) -> IrqState {
        self.irq
    }

    /// The device Status register (for diagnostics).
    pub fn device_status(&self) -> u32 {
        self.transport.status()
    }
}

/// Kind of a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
}

/// A well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What it does.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Data bytes (a multiple of 512; 0 for flush).
    pub bytes: u32,
}

impl Request {
    /// Sectors covered.
    pub fn sectors(&self) -> u64 {
        u64::from(self.bytes) / SECTOR_SIZE as u64
    }

    /// Whether the sector ranges of two requests overlap.
    pub fn overlaps(&self, other: &Request) -> bool {
        self.sector < other.sector + other.sectors() && other.sector < self.sector + self.sectors()
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
        };
        write!(f, "{kind} sector={} bytes={}", self.sector, self.bytes)
    }
}

/// A finished request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// Slot it ran in (its data buffer holds read data).
    pub slot: usize,
    /// The request.
    pub request: Request,
    /// Status byte as the device left it.
    pub status: u8,
    /// Used length the device reported.
    pub used_len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    head: u16,
    request: Request,
    /// Submission order, to name the oldest request when one hangs.
    seq: u64,
}

/// Request buffers and book-keeping for requests in flight.
#[derive(Debug)]
pub struct RequestSlots {
    /// Header (16 B) and status byte of slot i at `i * 32` and `i * 32 + 16`.
    control: &'static mut [u8],
    data: &'static mut [u8],
    pending: [Option<Pending>; MAX_SLOTS],
    count: usize,
    submitted: u64,
}

impl RequestSlots {
    /// Up to [`MAX_SLOTS`] slots, fewer if the queue cannot hold 3 descriptors each.
    pub fn new(alloc: &mut PhysAlloc, device: &BlkDevice) -> Result<RequestSlots, BlkError> {
        let count = MAX_SLOTS.min(usize::from(device.queue_size()) / 3);
        Ok(RequestSlots {
            control: alloc.alloc_bytes(count * 32)?,
            data: alloc.alloc_bytes(count * MAX_REQUEST_BYTES)?,
            pending: [None; MAX_SLOTS],
            count,
            submitted: 0,
        })
    }

    /// Number of slots.
    pub fn count(&self) -> usize {
        self.count
    }

    /// A slot with nothing in flight.
    pub fn free_slot(&self) -> Option<usize> {
        self.pending[..self.count].iter().position(Option::is_none)
    }

    /// Number of requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.iter().flatten().count()
    }

    /// The requests in flight.
    pub fn pending(&self) -> impl Iterator<Item = &Request> {
        self.pending.iter().flatten().map(|p| &p.request)
    }

    /// Data buffer of `slot` (fill it before submitting a write).
    pub fn data_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.data[slot * MAX_REQUEST_BYTES..(slot + 1) * MAX_REQUEST_BYTES]
    }

    /// Data buffer of `slot`.
    pub fn data(&self, slot: usize) -> &[u8] {
        &self.data[slot * MAX_REQUEST_BYTES..(slot + 1) * MAX_REQUEST_BYTES]
    }

    /// Starts `request` in free `slot` (5.2.6: header, data, status).
    pub fn submit(
        &mut self,
        device: &mut BlkDevice,
        slot: usize,
        request: Request,
    ) -> Result<(), BlkError> {
        if request.bytes as usize > MAX_REQUEST_BYTES || slot >= self.count {
            return Err(BlkError::TooLarge(request));
        }
        let kind = match request.kind {
            RequestKind::Read => T_IN,
            RequestKind::Write => T_OUT,
            RequestKind::Flush => T_FLUSH,
        };
        let control = &mut self.control[slot * 32..slot * 32 + 32];
        control[0..4].copy_from_slice(&kind.to_le_bytes());
        control[4..8].fill(0);
        control[8..16].copy_from_slice(&request.sector.to_le_bytes());
        control[16] = STATUS_UNSET;
        let header = control.as_ptr() as u64;
        let data = Buffer {
            addr: self.data[slot * MAX_REQUEST_BYTES..].as_ptr() as u64,
            len: request.bytes,
            writable: request.kind == RequestKind::Read,
        };
        let status = Buffer::writable(header + 16, 1);
        let header = Buffer::readable(header, HEADER_SIZE);
        let head = if request.bytes == 0 {
            device.submit(&[header, status])?
        } else {
            device.submit(&[header, data, status])?
        };
        self.pending[slot] = Some(Pending {
            head,
            request,
            seq: self.submitted,
        });
        self.submitted += 1;
        Ok(())
    }

    /// Waits for any request to finish; an error if none does for 10 s.
    pub fn wait_any(&mut self, device: &mut BlkDevice) -> Result<Completion, BlkError> {
        let clock = *device.clock();
        let start = clock.now();
        let deadline = Deadline::after(&clock, REQUEST_TIMEOUT_MS);
        loop {
            if let Some(used) = device.poll()? {
                return self.complete(used);
            }
            if self.in_flight() == 0 {
                return Err(BlkError::Idle);
            }
            if deadline.passed(&clock) {
                let oldest = self.pending.iter().flatten().min_by_key(|p| p.seq);
                let request = oldest.map(|p| p.request);
                return Err(BlkError::Timeout {
                    ms: clock.millis(clock.now() - start),
                    request: request.ok_or(BlkError::Idle)?,
                });
            }
            core::hint::spin_loop();
        }
    }

    fn complete(&mut self, used: Used) -> Result<Completion, BlkError> {
        let slot = self
            .pending
            .iter()
            .position(|p| p.is_some_and(|p| p.head == used.head))
            .ok_or(BlkError::UnknownChain(used.head))?;
        let pending = self.pending[slot]
            .take()
            .ok_or(BlkError::UnknownChain(used.head))?;
        // The status byte was written by the device before it published the element.
        // SAFETY: the byte lies in `control`, which this struct owns; volatile because
        // the device wrote it behind the compiler's back.
        let status = unsafe { core::ptr::read_volatile(&self.control[slot * 32 + 16]) };
        Ok(Completion {
            slot,
            request: pending.request,
            status,
            used_len: used.len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap() {
        let w = |sector, bytes| Request {
            kind: RequestKind::Write,
            sector,
            bytes,
        };
        assert!(w(0, 1024).overlaps(&w(1, 512)));
        assert!(!w(0, 1024).overlaps(&w(2, 512)));
        assert!(w(2, 512).overlaps(&w(0, 2048)));
        assert!(!w(5, 512).overlaps(&w(0, 2560)));
        assert_eq!(w(7, 4096).to_string(), "write sector=7 bytes=4096");
    }
}
