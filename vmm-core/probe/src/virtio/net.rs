//! The virtio network device (virtio 1.2, 5.1), driven by polling.
//!
//! One queue pair (receive queue 0, transmit queue 1): the core has no control queue, so
//! neither `VIRTIO_NET_F_MQ` nor `VIRTIO_NET_F_CTRL_VQ` is accepted, and no offloads or
//! `VIRTIO_NET_F_MRG_RXBUF` either, so every frame travels in one buffer behind a plain
//! 12-byte header (5.1.6: with `VIRTIO_F_VERSION_1` the header always has `num_buffers`).
//!
//! Every receive buffer is posted at start-up and posted again as soon as its frame has
//! been copied out, so the ring stays full. Transmit buffers are taken from a free list
//! and return to it when the device hands their chain back. Like blk-bench, the driver
//! asks for no used-buffer notifications (it polls) and writes QueueNotify only when the
//! device asks for it (`avail_event` with `VIRTIO_F_EVENT_IDX`, else
//! `VIRTQ_USED_F_NO_NOTIFY`; 2.7.10).

use super::mmio::MmioError;
use super::queue::{
    Buffer, QueueError, SplitQueue, AVAIL_F_NO_INTERRUPT, MAX_QUEUE_SIZE, USED_F_NO_NOTIFY,
};
use super::transport::Transport;
use crate::memory::{OutOfMemory, PhysAlloc};
use thiserror::Error;

/// DeviceID of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// `VIRTIO_NET_F_MAC`: the config space holds the device's MAC address (5.1.3).
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_F_EVENT_IDX` (virtio 1.2, 6 and 2.7.10).
pub const F_EVENT_IDX: u64 = 1 << 29;
/// `struct virtio_net_hdr` with `VIRTIO_F_VERSION_1` (5.1.6): 12 bytes.
pub const NET_HDR_SIZE: usize = 12;
/// Largest Ethernet frame (without FCS) the buffers hold: 1500-byte MTU + header.
pub const MAX_FRAME: usize = 1514;
/// Bytes per buffer: header plus the largest frame, rounded up.
const BUF_SIZE: usize = 2048;
/// `used_event` this far ahead of the used index is never reached (see blk.rs).
const USED_EVENT_FAR: u16 = 0x8000;
const RX: u16 = 0;
const TX: u16 = 1;
/// Marks a descriptor that heads no chain of ours.
const NO_BUF: u16 = u16::MAX;

/// Network device failures.
#[derive(Debug, Error)]
pub enum NetError {
    /// Transport trouble.
    #[error("virtio-mmio")]
    Mmio(#[from] MmioError),
    /// Virtqueue trouble.
    #[error("virtqueue")]
    Queue(#[from] QueueError),
    /// Not enough RAM for rings or buffers.
    #[error("memory")]
    Memory(#[from] OutOfMemory),
    /// A queue is missing or too small to be useful.
    #[error("queue {queue} has size {size}, at least 4 needed")]
    QueueTooSmall {
        /// Queue index.
        queue: u16,
        /// Largest size the device allows.
        size: u16,
    },
    /// The device returned a chain that heads no buffer of ours.
    #[error("queue {queue}: completion for unknown chain {head}")]
    UnknownChain {
        /// Queue index.
        queue: u16,
        /// Head descriptor.
        head: u16,
    },
    /// A frame to send is longer than a buffer.
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    FrameTooLong(usize),
}

/// One queue with its buffers (`count` of `BUF_SIZE` bytes each).
#[derive(Debug)]
struct BufferRing {
    index: u16,
    queue: SplitQueue,
    bufs: &'static mut [u8],
    count: u16,
    /// Buffer of the chain headed by each descriptor, or `NO_BUF`.
    buf_of_head: [u16; MAX_QUEUE_SIZE as usize],
    /// Available index at the last notification decision.
    kicked: u16,
}

impl BufferRing {
    fn new(
        transport: &mut Transport,
        alloc: &mut PhysAlloc,
        index: u16,
    ) -> Result<BufferRing, NetError> {
        let max = transport.queue_max(index).min(MAX_QUEUE_SIZE);
        // Split queue sizes are powers of two (2.7): take the largest that fits.
        let size = if max == 0 { 0 } else { 1 << max.ilog2() };
        if size < 4 {
            return Err(NetError::QueueTooSmall { queue: index, size });
        }
        let queue = SplitQueue::new(alloc, size)?;
        transport.setup_queue(index, size, queue.addresses())?;
        Ok(BufferRing {
            index,
            bufs: alloc.alloc_bytes(usize::from(size) * BUF_SIZE)?,
            queue,
            count: size,
            buf_of_head: [NO_BUF; MAX_QUEUE_SIZE as usize],
            kicked: 0,
        })
    }

    fn addr(&self, buf: u16) -> u64 {
        self.bufs[usize::from(buf) * BUF_SIZE..].as_ptr() as u64
    }

    fn buf(&mut self, buf: u16) -> &mut [u8] {
        let start = usize::from(buf) * BUF_SIZE;
        &mut self.bufs[start..start + BUF_SIZE]
    }

    /// Makes `buf` available as one descriptor of `len` bytes.
    fn post(&mut self, buf: u16, len: usize, writable: bool) -> Result<(), NetError> {
        let desc = Buffer {
            addr: self.addr(buf),
            len: len as u32,
            writable,
        };
        let head = self.queue.add_chain(&[desc])?;
        self.buf_of_head[usize::from(head)] = buf;
        Ok(())
    }

    /// The next returned buffer and the used length, if any.
    fn pop(&mut self) -> Result<Option<(u16, u32)>, NetError> {
        let Some(used) = self.queue.pop_used()? else {
            return Ok(None);
        };
        let slot = &mut self.buf_of_head[usize::from(used.head)];
        let buf = core::mem::replace(slot, NO_BUF);
        if buf == NO_BUF {
            return Err(NetError::UnknownChain {
                queue: self.index,
                head: used.head,
            });
        }
        Ok(Some((buf, used.len)))
    }

    /// Whether the device wants to hear of the chains made available since the last
    /// call (2.7.10 with EVENT_IDX, 2.7.7 without).
    fn notify_needed(&mut self, event_idx: bool) -> bool {
        let new = self.queue.avail_idx();
        let old = core::mem::replace(&mut self.kicked, new);
        if new == old {
            return false;
        }
        // `add_chain` fenced after publishing the index, so the suppression state read
        // here is not older than the index.
        if event_idx {
            let event = self.queue.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.queue.used_flags() & USED_F_NO_NOTIFY == 0
        }
    }

    /// Asks for no used-buffer notifications: the probe polls.
    fn quiet(&mut self, event_idx: bool) {
        if event_idx {
            // 2.7.7.1: with EVENT_IDX the flags stay 0; `used_event` out of reach instead.
            let far = self.queue.last_used().wrapping_add(USED_EVENT_FAR);
            self.queue.set_used_event(far);
        } else {
            self.queue.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        }
    }
}

/// A network device with one receive and one transmit queue.
#[derive(Debug)]
pub struct NetDevice {
    transport: Transport,
    features: u64,
    mac: Option<[u8; 6]>,
    rx: BufferRing,
    tx: BufferRing,
    /// Transmit buffers not in flight.
    tx_free: [u16; MAX_QUEUE_SIZE as usize],
    tx_free_count: usize,
    notifies: u64,
}

impl NetDevice {
    /// Initialises the device behind `transport` (virtio 1.2, 3.1.1, 4.2.3 and 5.1.5)
    /// and posts a receive buffer in every receive descriptor.
    pub fn open(mut transport: Transport, alloc: &mut PhysAlloc) -> Result<NetDevice, NetError> {
        let features = transport.negotiate(0, F_MAC | F_EVENT_IDX)?;
        let mac = if features & F_MAC != 0 {
            Some(read_mac(&transport)?)
        } else {
            None
        };
        let rings = BufferRing::new(&mut transport, alloc, RX)
            .and_then(|rx| Ok((rx, BufferRing::new(&mut transport, alloc, TX)?)));
        let (rx, tx) = match rings {
            Ok(rings) => rings,
            Err(error) => {
                transport.fail();
                return Err(error);
            }
        };
        let mut tx_free = [0u16; MAX_QUEUE_SIZE as usize];
        for (i, slot) in tx_free.iter_mut().enumerate().take(usize::from(tx.count)) {
            *slot = i as u16;
        }
        let mut device = NetDevice {
            transport,
            features,
            mac,
            tx_free_count: usize::from(tx.count),
            rx,
            tx,
            tx_free,
            notifies: 0,
        };
        let event_idx = device.event_idx();
        device.rx.quiet(event_idx);
        device.tx.quiet(event_idx);
        // 3.1.1 step 7 and 5.1.5: the receive queue is filled before DRIVER_OK; the
        // device hears of it with the first notification below.
        for buf in 0..device.rx.count {
            device.rx.post(buf, BUF_SIZE, true)?;
        }
        device.transport.driver_ok();
        device.kick();
        Ok(device)
    }

    fn event_idx(&self) -> bool {
        self.features & F_EVENT_IDX != 0
    }

    /// Negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The MAC address from the config space, if the device offered `VIRTIO_NET_F_MAC`.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    /// Receive and transmit queue sizes.
    pub fn queue_sizes(&self) -> (u16, u16) {
        (self.rx.count, self.tx.count)
    }

    /// QueueNotify writes made so far.
    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    /// Copies the next received frame (without the virtio-net header) into `out` and
    /// posts its buffer again (the device hears of it at the next [`NetDevice::kick`]).
    /// Returns the frame's length, which is 0 for a used length shorter than the header
    /// and at most `out.len()` (longer frames are cut: the caller sees a wrong length).
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<usize>, NetError> {
        let Some((buf, used_len)) = self.rx.pop()? else {
            return Ok(None);
        };
        let len = (used_len as usize)
            .saturating_sub(NET_HDR_SIZE)
            .min(BUF_SIZE - NET_HDR_SIZE)
            .min(out.len());
        // The device wrote the buffer before publishing the used element, and
        // `pop_used` fenced after reading the index (2.7.14), as for blk read data.
        out[..len].copy_from_slice(&self.rx.buf(buf)[NET_HDR_SIZE..NET_HDR_SIZE + len]);
        self.rx.post(buf, BUF_SIZE, true)?;
        self.rx.quiet(self.event_idx());
        Ok(Some(len))
    }

    /// Takes back the transmit buffers the device has finished with; returns how many.
    pub fn reap_tx(&mut self) -> Result<usize, NetError> {
        let mut n = 0;
        while let Some((buf, _)) = self.tx.pop()? {
            self.tx_free[self.tx_free_count] = buf;
            self.tx_free_count += 1;
            n += 1;
        }
        if n > 0 {
            self.tx.quiet(self.event_idx());
        }
        Ok(n)
    }

    /// Transmit buffers free right now (call [`NetDevice::reap_tx`] first).
    pub fn tx_free(&self) -> usize {
        self.tx_free_count
    }

    /// Transmit buffers in flight.
    pub fn tx_in_flight(&self) -> usize {
        usize::from(self.tx.count) - self.tx_free_count
    }

    /// Queues `frame` for sending behind a zeroed header (no offloads: 5.1.6.2 flags 0,
    /// `gso_type` NONE); the device hears of it at the next [`NetDevice::kick`].
    /// Returns false when no transmit buffer is free.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        if frame.len() > MAX_FRAME {
            return Err(NetError::FrameTooLong(frame.len()));
        }
        if self.tx_free_count == 0 {
            return Ok(false);
        }
        let buf = self.tx_free[self.tx_free_count - 1];
        let data = self.tx.buf(buf);
        data[..NET_HDR_SIZE].fill(0);
        data[NET_HDR_SIZE..NET_HDR_SIZE + frame.len()].copy_from_slice(frame);
        self.tx.post(buf, NET_HDR_SIZE + frame.len(), false)?;
        self.tx_free_count -= 1;
        Ok(true)
    }

    /// Notifies the device of the buffers made available on either queue since the last
    /// call, where it asked to be told.
    pub fn kick(&mut self) {
        let event_idx = self.event_idx();
        for (index, ring) in [(RX, &mut self.rx), (TX, &mut self.tx)] {
            if ring.notify_needed(event_idx) {
                self.transport.notify(index);
                self.notifies += 1;
            }
        }
    }

    /// The device Status register (for diagnostics).
    pub fn device_status(&self) -> u32 {
        self.transport.status()
    }
}

/// `mac` from the config space (5.1.4), read under the ConfigGeneration check.
fn read_mac(transport: &Transport) -> Result<[u8; 6], MmioError> {
    let raw = transport.config_u64(0)?.to_le_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&raw[..6]);
    Ok(mac)
}
