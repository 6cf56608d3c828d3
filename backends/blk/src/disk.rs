//! The raw image file and the I/O primitives the request logic needs.
//!
//! Guest buffers reach this module as [`VolatileSlice`]s of guest memory. Buffered I/O goes
//! straight between the page cache and guest memory with `preadv`/`pwritev`; with O_DIRECT
//! the guest's buffers are not aligned the way the kernel demands, so data goes through an
//! aligned bounce buffer, at most [`BOUNCE_CHUNK`] bytes at a time.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// Size of a virtio-blk sector; offsets in requests count these (virtio 1.2, 5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Largest piece of a request staged in the O_DIRECT bounce buffer at once.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// Alignment of the O_DIRECT bounce buffer (a page: enough for every Linux file system).
const BOUNCE_ALIGN: usize = 4096;

/// Most iovecs one `preadv`/`pwritev` call takes (Linux UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;

/// A guest buffer: one contiguous piece of guest memory.
pub type GuestBuf<'a> = VolatileSlice<'a, ()>;

/// Errors while opening the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("cannot open image {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The size of the image cannot be found.
    #[error("cannot determine the size of image {path}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// O_DIRECT reads of single 512-byte sectors fail on this file.
    #[error("image {path} does not support 512-byte O_DIRECT I/O (drop --direct)")]
    DirectAlignment {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How to open the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Open read-only; every write is refused.
    pub readonly: bool,
    /// Open with O_DIRECT.
    pub direct: bool,
}

/// An open raw image. Shared by all queues and all connections of one process.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    options: DiskOptions,
}

impl Disk {
    /// Opens the image. The capacity is the file size rounded down to whole sectors: a
    /// trailing partial sector is not reachable by the guest.
    pub fn open(path: &Path, options: DiskOptions) -> Result<Disk, DiskError> {
        let mut open = OpenOptions::new();
        open.read(true).write(!options.readonly);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let mut file = open.open(path).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        // Seeking to the end works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_owned(),
                source,
            })?;
        let disk = Disk {
            file,
            capacity: size - size % SECTOR_SIZE,
            options,
        };
        if options.direct && disk.capacity > 0 {
            // Some file systems want 4 KiB alignment for O_DIRECT; find out now, not at
            // the guest's first unaligned read.
            let mut probe = AlignedBuf::new(SECTOR_SIZE as usize);
            let at = if disk.capacity >= 2 * SECTOR_SIZE {
                SECTOR_SIZE
            } else {
                0
            };
            disk.file
                .read_exact_at(&mut probe.as_mut_slice()[..SECTOR_SIZE as usize], at)
                .map_err(|source| DiskError::DirectAlignment {
                    path: path.to_owned(),
                    source,
                })?;
        }
        Ok(disk)
    }

    /// Capacity in bytes (a multiple of [`SECTOR_SIZE`]).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity / SECTOR_SIZE
    }

    /// Whether the image was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.options.direct
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.options.readonly
    }

    /// Reads `bufs`' total length from `offset` into the guest buffers.
    pub fn read_into(&self, offset: u64, bufs: &[GuestBuf<'_>]) -> io::Result<()> {
        if self.options.direct {
            self.bounce_transfer(offset, bufs, Direction::Read)
        } else {
            vectored_io(&self.file, offset, bufs, Direction::Read)
        }
    }

    /// Writes the guest buffers to the image at `offset`.
    pub fn write_from(&self, offset: u64, bufs: &[GuestBuf<'_>]) -> io::Result<()> {
        self.check_writable()?;
        if self.options.direct {
            self.bounce_transfer(offset, bufs, Direction::Write)
        } else {
            vectored_io(&self.file, offset, bufs, Direction::Write)
        }
    }

    /// Makes every completed write durable (FLUSH; also on disconnect and exit).
    pub fn flush(&self) -> io::Result<()> {
        if self.options.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset` (DISCARD). A file system without hole punching
    /// leaves the data in place, which DISCARD allows: it is only a hint.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(e.errno()) => Ok(()),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        }
    }

    /// Zeroes `len` bytes at `offset` (WRITE_ZEROES). With `unmap` the range may be
    /// deallocated (punch a hole, which reads back as zeroes); otherwise it stays
    /// allocated (ZERO_RANGE). Falls back to writing zeroes where fallocate cannot.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        let mode = if unmap {
            FallocateMode::PunchHole
        } else {
            FallocateMode::ZeroRange
        };
        match fallocate(&self.file, mode, true, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(e.errno()) => self.write_zero_bytes(offset, len),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.options.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let zeroes = AlignedBuf::new(BOUNCE_CHUNK);
        while offset < end {
            let chunk = usize::try_from(end - offset).map_or(BOUNCE_CHUNK, |n| n.min(BOUNCE_CHUNK));
            self.file
                .write_all_at(&zeroes.as_slice()[..chunk], offset)?;
            offset += chunk as u64;
        }
        Ok(())
    }

    /// O_DIRECT path: stage the data in an aligned buffer, one chunk at a time.
    fn bounce_transfer(
        &self,
        offset: u64,
        bufs: &[GuestBuf<'_>],
        dir: Direction,
    ) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut bounce = AlignedBuf::new(total.min(BOUNCE_CHUNK));
        let mut done = 0usize;
        while done < total {
            let chunk = (total - done).min(BOUNCE_CHUNK);
            let staged = &mut bounce.as_mut_slice()[..chunk];
            let file_offset = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            match dir {
                Direction::Read => {
                    self.file.read_exact_at(staged, file_offset)?;
                    copy_between(bufs, done, staged, Direction::Read);
                }
                Direction::Write => {
                    copy_between(bufs, done, staged, Direction::Write);
                    self.file.write_all_at(staged, file_offset)?;
                }
            }
            done += chunk;
        }
        Ok(())
    }
}

impl AsRawFd for Disk {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Which way data moves, seen from the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Image → guest.
    Read,
    /// Guest → image.
    Write,
}

fn is_unsupported(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::ENOTSUP || errno == libc::ENOSYS
}

/// Copies between `staged` and the guest buffers viewed as one byte stream starting at
/// `skip`: `Read` fills the guest buffers, `Write` fills `staged`.
fn copy_between(bufs: &[GuestBuf<'_>], mut skip: usize, staged: &mut [u8], dir: Direction) {
    let mut pos = 0usize;
    for buf in bufs {
        if pos == staged.len() {
            break;
        }
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        let count = (buf.len() - skip).min(staged.len() - pos);
        // `skip + count <= buf.len()` by construction, so subslice cannot fail.
        if let Ok(part) = buf.subslice(skip, count) {
            match dir {
                Direction::Read => part.copy_from(&staged[pos..pos + count]),
                Direction::Write => {
                    part.copy_to(&mut staged[pos..pos + count]);
                }
            }
        }
        pos += count;
        skip = 0;
    }
}

/// `preadv`/`pwritev` between the image and guest memory, retrying short transfers.
fn vectored_io(file: &File, offset: u64, bufs: &[GuestBuf<'_>], dir: Direction) -> io::Result<()> {
    // The guards keep the mappings valid (they matter for Xen grant mappings) until the
    // syscalls are done.
    let guards: Vec<_> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| b.ptr_guard_mut())
        .collect();
    let mut iovecs: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    let mut first = 0usize;
    let mut offset = offset;
    while first < iovecs.len() {
        let count = (iovecs.len() - first).min(MAX_IOVECS);
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let iov = iovecs[first..].as_ptr();
        let ret = match dir {
            // SAFETY: `iov` points to `count` iovecs, each describing a live mapping of
            // guest memory borrowed through `bufs` for the whole call; the kernel only
            // reads/writes within them. Guest memory may change concurrently, which is
            // the volatile access the guest agreed to by posting the buffers.
            Direction::Read => unsafe {
                libc::preadv(file.as_raw_fd(), iov, count as libc::c_int, file_offset)
            },
            // SAFETY: as above; pwritev only reads from the iovecs.
            Direction::Write => unsafe {
                libc::pwritev(file.as_raw_fd(), iov, count as libc::c_int, file_offset)
            },
        };
        let done = match ret {
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            0 if dir == Direction::Read => return Err(io::ErrorKind::UnexpectedEof.into()),
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => n as usize,
        };
        offset += done as u64;
        first = advance_iovecs(&mut iovecs, first, done);
    }
    Ok(())
}

/// Consumes `done` bytes from `iovecs[first..]`; returns the index of the first iovec with
/// bytes left.
fn advance_iovecs(iovecs: &mut [libc::iovec], mut first: usize, mut done: usize) -> usize {
    while done > 0 && first < iovecs.len() {
        let iov = &mut iovecs[first];
        if done >= iov.iov_len {
            done -= iov.iov_len;
            first += 1;
        } else {
            // Stays inside the same guest buffer: base + done < base + len.
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(done).cast();
            iov.iov_len -= done;
            done = 0;
        }
    }
    first
}

/// A zeroed byte buffer whose start is aligned to [`BOUNCE_ALIGN`], built without unsafe
/// code by over-allocating a `Vec` and starting at the first aligned byte.
#[derive(Debug)]
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        // Round the length up too: O_DIRECT wants aligned lengths for the staging area.
        let rounded = len.div_ceil(BOUNCE_ALIGN).max(1) * BOUNCE_ALIGN;
        let storage = vec![0u8; rounded + BOUNCE_ALIGN];
        let start = storage.as_ptr().align_offset(BOUNCE_ALIGN);
        AlignedBuf {
            storage,
            start,
            len: rounded,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize, fill: u8) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&vec![fill; len]).unwrap();
        file
    }

    fn guest_buf(storage: &mut [u8]) -> GuestBuf<'_> {
        VolatileSlice::from(storage)
    }

    #[test]
    fn capacity_rounds_down_to_sectors() {
        let file = image(4096 + 100, 0);
        let disk = Disk::open(file.path(), DiskOptions::default()).unwrap();
        assert_eq!(disk.capacity_bytes(), 4096);
        assert_eq!(disk.capacity_sectors(), 8);
    }

    #[test]
    fn missing_image_is_an_open_error() {
        let err =
            Disk::open(Path::new("/nonexistent/plexvm.raw"), DiskOptions::default()).unwrap_err();
        assert!(matches!(err, DiskError::Open { .. }));
    }

    fn round_trip(options: DiskOptions) {
        let file = image(8192, 0xaa);
        let disk = Disk::open(file.path(), options).unwrap();
        let mut a = vec![1u8; 700];
        let mut b = vec![2u8; 324];
        disk.write_from(512, &[guest_buf(&mut a), guest_buf(&mut b)])
            .unwrap();
        let mut out1 = vec![0u8; 100];
        let mut out2 = vec![0u8; 1948];
        disk.read_into(0, &[guest_buf(&mut out1), guest_buf(&mut out2)])
            .unwrap();
        let mut all = out1.clone();
        all.extend_from_slice(&out2);
        assert!(all[..512].iter().all(|&x| x == 0xaa));
        assert!(all[512..1212].iter().all(|&x| x == 1));
        assert!(all[1212..1536].iter().all(|&x| x == 2));
        assert!(all[1536..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn buffered_round_trip() {
        round_trip(DiskOptions::default());
    }

    #[test]
    fn direct_round_trip() {
        round_trip(DiskOptions {
            direct: true,
            readonly: false,
        });
    }

    #[test]
    fn read_past_end_fails() {
        let file = image(1024, 0);
        let disk = Disk::open(file.path(), DiskOptions::default()).unwrap();
        let mut out = vec![0u8; 1024];
        let err = disk.read_into(512, &[guest_buf(&mut out)]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_only_refuses_writes() {
        let file = image(1024, 7);
        let disk = Disk::open(
            file.path(),
            DiskOptions {
                readonly: true,
                direct: false,
            },
        )
        .unwrap();
        let mut data = vec![0u8; 512];
        assert!(disk.write_from(0, &[guest_buf(&mut data)]).is_err());
        assert!(disk.discard(0, 512).is_err());
        assert!(disk.write_zeroes(0, 512, false).is_err());
        assert_eq!(std::fs::read(file.path()).unwrap(), vec![7u8; 1024]);
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range() {
        let file = image(3 * 4096, 0x55);
        let disk = Disk::open(file.path(), DiskOptions::default()).unwrap();
        disk.write_zeroes(4096, 4096, false).unwrap();
        disk.write_zeroes(2 * 4096, 512, true).unwrap();
        disk.discard(0, 4096).unwrap();
        let data = std::fs::read(file.path()).unwrap();
        assert_eq!(data.len(), 3 * 4096, "size kept");
        assert!(data[4096..2 * 4096 + 512].iter().all(|&x| x == 0));
        assert!(data[2 * 4096 + 512..].iter().all(|&x| x == 0x55));
    }

    #[test]
    fn zero_fallback_writes_zeroes() {
        let file = image(4096, 0x11);
        let disk = Disk::open(file.path(), DiskOptions::default()).unwrap();
        disk.write_zero_bytes(512, 1024).unwrap();
        let data = std::fs::read(file.path()).unwrap();
        assert!(data[..512].iter().all(|&x| x == 0x11));
        assert!(data[512..1536].iter().all(|&x| x == 0));
        assert!(data[1536..].iter().all(|&x| x == 0x11));
    }

    #[test]
    fn advance_iovecs_handles_partial_transfers() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 10];
        let mut iovecs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        assert_eq!(advance_iovecs(&mut iovecs, 0, 4), 0);
        assert_eq!(iovecs[0].iov_len, 6);
        assert_eq!(advance_iovecs(&mut iovecs, 0, 9), 1);
        assert_eq!(iovecs[1].iov_len, 7);
        assert_eq!(advance_iovecs(&mut iovecs, 1, 7), 2);
    }
}
