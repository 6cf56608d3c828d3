//! virtio-blk request parsing and execution (virtio 1.2, section 5.2.6).
//!
//! A request is one descriptor chain: a device-readable 16-byte header, data buffers, and
//! a device-writable status byte at the very end. The layout rules (VIRTIO_F_VERSION_1
//! implies "any layout", 2.7.4) are applied the way QEMU does: the header is the first 16
//! bytes of the first descriptor, the status is the last byte of the last descriptor, and
//! everything in between is data. Every address is checked against guest memory before
//! it is touched, so a malformed chain completes with an error status and never makes the
//! backend read or write outside the request's own buffers.

use plexvm_backend_support::guest_warn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::MAX_SERIAL_LEN;
use crate::disk::{Disk, GuestBuf, SECTOR_SIZE};

/// Size of `struct virtio_blk_req`'s header: le32 type, le32 reserved, le64 sector.
pub const HEADER_LEN: u32 = 16;

/// Size of one `virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_LEN: usize = 16;

/// Most segments one DISCARD or WRITE_ZEROES request may carry (config `max_discard_seg`
/// and `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB; config
/// `max_discard_sectors` and `max_write_zeroes_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// Why a request failed. Each variant is also a counter in [`RequestStats`].
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No device-writable byte at the end of the chain: no status can be written.
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    /// The chain does not start with a device-readable descriptor.
    #[error("descriptor chain does not start with a device-readable header")]
    MissingHeader,
    /// The header descriptor is shorter than 16 bytes.
    #[error("request header descriptor is shorter than 16 bytes")]
    ShortHeader,
    /// A descriptor points (partly) outside guest memory.
    #[error("descriptor points outside guest memory")]
    BadAddress,
    /// A data buffer has the wrong direction (device-readable for IN, writable for OUT).
    #[error("data buffer has the wrong direction for the request type")]
    WrongDirection,
    /// The data length is not a multiple of 512 bytes.
    #[error("data length is not a multiple of 512 bytes")]
    UnalignedLength,
    /// The request reaches past the end of the disk.
    #[error("request reaches past the end of the disk")]
    OutOfRange,
    /// A write-type request on a read-only disk.
    #[error("write-type request on a read-only disk")]
    ReadOnly,
    /// A DISCARD/WRITE_ZEROES payload that is empty, not whole segments, too many
    /// segments, or a segment that is too large.
    #[error("malformed discard/write-zeroes segments")]
    BadSegment,
    /// Flags this device does not implement in a DISCARD/WRITE_ZEROES segment.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// The image I/O failed.
    #[error("image I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// Number of counters (one per variant).
    pub const KINDS: usize = 12;

    /// Index of this error's counter in [`RequestStats`].
    pub fn kind(&self) -> usize {
        match self {
            RequestError::NoStatus => 0,
            RequestError::MissingHeader => 1,
            RequestError::ShortHeader => 2,
            RequestError::BadAddress => 3,
            RequestError::WrongDirection => 4,
            RequestError::UnalignedLength => 5,
            RequestError::OutOfRange => 6,
            RequestError::ReadOnly => 7,
            RequestError::BadSegment => 8,
            RequestError::UnsupportedFlags(_) => 9,
            RequestError::UnsupportedType(_) => 10,
            RequestError::Io(_) => 11,
        }
    }

    /// The status byte the driver sees (5.2.6: UNSUPP for what the device does not
    /// implement, IOERR for everything else).
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Counters of completed and failed requests, shared by all queues. Failures are logged
/// when their count reaches a power of two, so a guest flooding bad requests costs a
/// log line per doubling, not per request.
#[derive(Debug, Default)]
pub struct RequestStats {
    completed: AtomicU64,
    failed: [AtomicU64; RequestError::KINDS],
}

impl RequestStats {
    /// Requests that completed with status OK.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Requests that failed with the error kind `kind` (see [`RequestError::kind`]).
    pub fn failed(&self, kind: usize) -> u64 {
        self.failed
            .get(kind)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// All failed requests.
    pub fn failed_total(&self) -> u64 {
        self.failed.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn record_ok(&self) {
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    fn record_error(&self, error: &RequestError) {
        let count = self.failed[error.kind()].fetch_add(1, Ordering::Relaxed) + 1;
        guest_warn!(count = count; "guest request failed: {error}");
    }
}

/// How a request ended: what goes into the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into device-writable buffers (data + status byte).
    pub used_len: u32,
    /// The status byte written, or `None` when the chain had no place for it.
    pub status: Option<u8>,
}

/// One descriptor of a chain, or the data part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

impl From<Descriptor> for Segment {
    fn from(desc: Descriptor) -> Segment {
        Segment {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        }
    }
}

impl Segment {
    /// The part of this segment from `skip` bytes in, for `len` bytes.
    fn part(&self, skip: u32, len: u32) -> Option<Segment> {
        let addr = self.addr.0.checked_add(u64::from(skip))?;
        Some(Segment {
            addr: GuestAddress(addr),
            len,
            writable: self.writable,
        })
    }
}

/// The parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    request_type: u32,
    sector: u64,
}

/// The block device model: the image plus what GET_ID and the counters need. Shared by
/// every queue and every connection of the process.
#[derive(Debug)]
pub struct BlockDevice {
    disk: Disk,
    serial: [u8; MAX_SERIAL_LEN],
    stats: RequestStats,
}

impl BlockDevice {
    /// Wraps an open image.
    pub fn new(disk: Disk, serial: [u8; MAX_SERIAL_LEN]) -> BlockDevice {
        BlockDevice {
            disk,
            serial,
            stats: RequestStats::default(),
        }
    }

    /// The image.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Request counters.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// Executes the request in `descriptors` and writes its status byte. Never fails:
    /// errors become a status byte (or, without a status byte, a zero used length).
    pub fn process<I>(&self, mem: &GuestMemoryMmap, descriptors: I) -> Completion
    where
        I: IntoIterator<Item = Descriptor>,
    {
        let segments: Vec<Segment> = descriptors.into_iter().map(Segment::from).collect();
        let Some(status_addr) = status_address(mem, &segments) else {
            self.stats.record_error(&RequestError::NoStatus);
            return Completion {
                used_len: 0,
                status: None,
            };
        };
        let (status, written) = match self.execute(mem, &segments) {
            Ok(written) => {
                self.stats.record_ok();
                (VIRTIO_BLK_S_OK as u8, written)
            }
            Err(error) => {
                self.stats.record_error(&error);
                (error.status(), 0)
            }
        };
        // status_address() checked that this byte is in guest memory.
        if mem.write_obj(status, status_addr).is_err() {
            return Completion {
                used_len: 0,
                status: None,
            };
        }
        Completion {
            used_len: written.saturating_add(1),
            status: Some(status),
        }
    }

    /// Runs the request; returns the bytes written into the guest's data buffers.
    fn execute(&self, mem: &GuestMemoryMmap, segments: &[Segment]) -> Result<u32, RequestError> {
        let header = read_header(mem, segments)?;
        let data = data_segments(segments);
        match header.request_type {
            VIRTIO_BLK_T_IN => self.read(mem, header.sector, &data),
            VIRTIO_BLK_T_OUT => self.write(mem, header.sector, &data).map(|()| 0),
            VIRTIO_BLK_T_FLUSH => self.disk.flush().map(|()| 0).map_err(RequestError::Io),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, &data),
            VIRTIO_BLK_T_DISCARD => self.discard_or_zero(mem, &data, false).map(|()| 0),
            VIRTIO_BLK_T_WRITE_ZEROES => self.discard_or_zero(mem, &data, true).map(|()| 0),
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    fn read(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
    ) -> Result<u32, RequestError> {
        let (bufs, len) = guest_bufs(mem, data, true)?;
        let offset = self.byte_range(sector, u64::from(len))?;
        self.disk
            .read_into(offset, &bufs)
            .map_err(RequestError::Io)?;
        Ok(len)
    }

    fn write(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Segment],
    ) -> Result<(), RequestError> {
        if self.disk.is_read_only() {
            return Err(RequestError::ReadOnly);
        }
        let (bufs, len) = guest_bufs(mem, data, false)?;
        let offset = self.byte_range(sector, u64::from(len))?;
        self.disk
            .write_from(offset, &bufs)
            .map_err(RequestError::Io)
    }

    /// GET_ID (5.2.6.1): up to 20 bytes of serial, zero-padded, into the data buffer.
    fn get_id(&self, mem: &GuestMemoryMmap, data: &[Segment]) -> Result<u32, RequestError> {
        let mut written = 0usize;
        for seg in data {
            if !seg.writable {
                return Err(RequestError::WrongDirection);
            }
        }
        let (bufs, _) = collect_slices(mem, data)?;
        for buf in bufs {
            if written == MAX_SERIAL_LEN {
                break;
            }
            let count = buf.len().min(MAX_SERIAL_LEN - written);
            let part = buf
                .subslice(0, count)
                .map_err(|_| RequestError::BadAddress)?;
            part.copy_from(&self.serial[written..written + count]);
            written += count;
        }
        Ok(written as u32)
    }

    /// DISCARD and WRITE_ZEROES (5.2.6): validate every segment, then execute them all.
    fn discard_or_zero(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Segment],
        zero: bool,
    ) -> Result<(), RequestError> {
        if self.disk.is_read_only() {
            return Err(RequestError::ReadOnly);
        }
        if data.iter().any(|seg| seg.writable) {
            return Err(RequestError::WrongDirection);
        }
        let (bufs, len) = collect_slices(mem, data)?;
        let len = len as usize;
        let count = len / DISCARD_SEGMENT_LEN;
        if len == 0 || len % DISCARD_SEGMENT_LEN != 0 || count > MAX_DISCARD_SEGMENTS as usize {
            return Err(RequestError::BadSegment);
        }
        let mut raw = vec![0u8; len];
        let mut pos = 0;
        for buf in &bufs {
            pos += buf.copy_to(&mut raw[pos..]);
        }
        let mut ranges = Vec::with_capacity(count);
        for seg in raw.chunks_exact(DISCARD_SEGMENT_LEN) {
            ranges.push(self.parse_discard_segment(seg, zero)?);
        }
        for (offset, bytes, unmap) in ranges {
            let result = if zero {
                self.disk.write_zeroes(offset, bytes, unmap)
            } else {
                self.disk.discard(offset, bytes)
            };
            result.map_err(RequestError::Io)?;
        }
        Ok(())
    }

    /// One `virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors, le32 flags.
    /// Returns (byte offset, byte length, unmap).
    fn parse_discard_segment(
        &self,
        seg: &[u8],
        zero: bool,
    ) -> Result<(u64, u64, bool), RequestError> {
        let sector =
            u64::from_le_bytes(seg[0..8].try_into().map_err(|_| RequestError::BadSegment)?);
        let sectors = u32::from_le_bytes(
            seg[8..12]
                .try_into()
                .map_err(|_| RequestError::BadSegment)?,
        );
        let flags = u32::from_le_bytes(
            seg[12..16]
                .try_into()
                .map_err(|_| RequestError::BadSegment)?,
        );
        // 5.2.6.2: UNMAP is only defined for WRITE_ZEROES; a device MUST answer UNSUPP to
        // a DISCARD with it set, and to any flag it does not know.
        let allowed = if zero {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::BadSegment);
        }
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        let offset = self.byte_range(sector, bytes)?;
        Ok((
            offset,
            bytes,
            flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        ))
    }

    /// Byte offset of `sector`, checking that `len` bytes from there fit on the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange)?;
        let end = offset.checked_add(len).ok_or(RequestError::OutOfRange)?;
        if end > self.disk.capacity_bytes() {
            return Err(RequestError::OutOfRange);
        }
        Ok(offset)
    }
}

/// Address of the status byte: the last byte of the last descriptor, which must be
/// device-writable, non-empty and inside guest memory.
fn status_address(mem: &GuestMemoryMmap, segments: &[Segment]) -> Option<GuestAddress> {
    let last = segments.last()?;
    if !last.writable || last.len == 0 {
        return None;
    }
    let addr = GuestAddress(last.addr.0.checked_add(u64::from(last.len) - 1)?);
    mem.check_range(addr, 1).then_some(addr)
}

/// Reads the header from the first 16 bytes of the first descriptor.
fn read_header(mem: &GuestMemoryMmap, segments: &[Segment]) -> Result<Header, RequestError> {
    let first = match segments.first() {
        // A single descriptor is the status byte (status_address() accepted it), so the
        // header is missing.
        Some(first) if !first.writable && segments.len() > 1 => first,
        _ => return Err(RequestError::MissingHeader),
    };
    if first.len < HEADER_LEN {
        return Err(RequestError::ShortHeader);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, first.addr)
        .map_err(|_| RequestError::BadAddress)?;
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    Ok(Header {
        request_type,
        sector: u64::from_le_bytes(sector),
    })
}

/// The data part of a chain: after the header's 16 bytes, before the status byte.
/// Requires at least two segments (read_header() checked that).
fn data_segments(segments: &[Segment]) -> Vec<Segment> {
    let mut data = Vec::with_capacity(segments.len());
    let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
        return data;
    };
    if first.len > HEADER_LEN {
        data.extend(first.part(HEADER_LEN, first.len - HEADER_LEN));
    }
    if segments.len() > 2 {
        data.extend_from_slice(&segments[1..segments.len() - 1]);
    }
    if last.len > 1 {
        data.extend(last.part(0, last.len - 1));
    }
    data.retain(|seg| seg.len > 0);
    data
}

/// Guest buffers for a data transfer: every segment must have the direction `writable`
/// and lie in guest memory, and the total length must be whole sectors.
fn guest_bufs<'m>(
    mem: &'m GuestMemoryMmap,
    data: &[Segment],
    writable: bool,
) -> Result<(Vec<GuestBuf<'m>>, u32), RequestError> {
    if data.iter().any(|seg| seg.writable != writable) {
        return Err(RequestError::WrongDirection);
    }
    let (bufs, len) = collect_slices(mem, data)?;
    if u64::from(len) % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength);
    }
    Ok((bufs, len))
}

/// Volatile slices covering `data` (a segment may span memory regions).
fn collect_slices<'m>(
    mem: &'m GuestMemoryMmap,
    data: &[Segment],
) -> Result<(Vec<GuestBuf<'m>>, u32), RequestError> {
    let mut bufs = Vec::with_capacity(data.len());
    let mut total = 0u32;
    for seg in data {
        if !mem.check_range(seg.addr, seg.len as usize) {
            return Err(RequestError::BadAddress);
        }
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            bufs.push(slice.map_err(|_| RequestError::BadAddress)?);
        }
        // A chain never carries more than 2^32 bytes in total (2.7.5.2, enforced by
        // virtio-queue's iterator), but do not trust that here.
        total = total.checked_add(seg.len).ok_or(RequestError::BadSegment)?;
    }
    Ok((bufs, total))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
