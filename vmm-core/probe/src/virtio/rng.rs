//! The virtio entropy device (virtio 1.2, 5.4), driven by polling.
//!
//! One request queue (5.4.2), no feature bits (5.4.3) and no config space (5.4.4): the
//! driver posts device-writable buffers and the device fills them with random bytes,
//! possibly fewer than asked (5.4.6: "the device MAY write fewer bytes"). One buffer is
//! in flight at a time; the driver notifies after each post and polls the used ring.

use super::mmio::MmioError;
use super::transport::Transport;
use super::queue::{Buffer, QueueError, SplitQueue, AVAIL_F_NO_INTERRUPT};
use crate::memory::{OutOfMemory, PhysAlloc};
use crate::time::{Clock, Deadline};
use thiserror::Error;

/// DeviceID of an entropy device.
pub const DEVICE_ID_RNG: u32 = 4;
/// Bytes asked for per request.
pub const REQUEST_BYTES: usize = 1024;
/// A request the device does not answer within this is a device error.
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Ring entries: one buffer is in flight at a time, so the smallest split ring will do.
const QUEUE_SIZE: u16 = 4;

/// Entropy device failures.
#[derive(Debug, Error)]
pub enum RngError {
    /// Transport trouble.
    #[error("virtio-mmio")]
    Mmio(#[from] MmioError),
    /// Virtqueue trouble.
    #[error("virtqueue")]
    Queue(#[from] QueueError),
    /// Not enough RAM for the ring or the buffer.
    #[error("memory")]
    Memory(#[from] OutOfMemory),
    /// The request queue is missing or too small.
    #[error("request queue has size {0}, at least {QUEUE_SIZE} needed")]
    QueueTooSmall(u16),
    /// The device did not answer in time.
    #[error("no completion within {REQUEST_TIMEOUT_MS} ms")]
    Timeout,
    /// The device claims to have written more than the buffer holds.
    #[error("device wrote {written} bytes into a {len}-byte buffer")]
    Overlong {
        /// What the used element says.
        written: u32,
        /// The buffer's length.
        len: usize,
    },
    /// The device returned a chain we did not post.
    #[error("completion for unknown chain {0}")]
    UnknownChain(u16),
}

/// An opened entropy device.
#[derive(Debug)]
pub struct RngDevice {
    transport: Transport,
    queue: SplitQueue,
    buf: &'static mut [u8],
    clock: Clock,
    requests: u64,
}

impl RngDevice {
    /// Negotiates (VERSION_1 only), sets up the request queue and starts the device.
    pub fn open(
        mut transport: Transport,
        alloc: &mut PhysAlloc,
        clock: Clock,
    ) -> Result<RngDevice, RngError> {
        transport.negotiate(0, 0)?;
        let queue = transport.queue_max(0);
        if queue < QUEUE_SIZE {
            transport.fail();
            return Err(RngError::QueueTooSmall(queue));
        }
        let mut queue = SplitQueue::new(alloc, QUEUE_SIZE)?;
        transport.setup_queue(0, QUEUE_SIZE, queue.addresses())?;
        // Polled: no used-buffer notifications wanted.
        queue.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        let buf = alloc.alloc_bytes(REQUEST_BYTES)?;
        transport.driver_ok();
        Ok(RngDevice {
            transport,
            queue,
            buf,
            clock,
            requests: 0,
        })
    }

    /// The little-endian u32 at `offset` of the config space (virtio-rng has none:
    /// only for devices described as `kind = "generic"` with config bytes).
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.transport.config_u32(offset)
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// One request of up to `out.len()` (at most [`REQUEST_BYTES`]) bytes: the bytes
    /// the device wrote are copied to the front of `out`; returns how many.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, RngError> {
        let len = out.len().min(REQUEST_BYTES);
        // Stale bytes must not pass for the device's.
        self.buf[..len].fill(0);
        let desc = Buffer::writable(self.buf.as_ptr() as u64, len as u32);
        let head = self.queue.add_chain(&[desc])?;
        self.transport.notify(0);
        self.requests += 1;
        let deadline = Deadline::after(&self.clock, REQUEST_TIMEOUT_MS);
        let used = loop {
            if let Some(used) = self.queue.pop_used()? {
                break used;
            }
            if deadline.passed(&self.clock) {
                return Err(RngError::Timeout);
            }
            core::hint::spin_loop();
        };
        if used.head != head {
            return Err(RngError::UnknownChain(used.head));
        }
        let written = used.len as usize;
        if written > len {
            return Err(RngError::Overlong {
                written: used.len,
                len,
            });
        }
        out[..written].copy_from_slice(&self.buf[..written]);
        Ok(written)
    }
}
