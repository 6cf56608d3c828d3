//! Guest RAM: memfd-backed regions mapped into the core and shared with backends.
//!
//! Every region is a memfd so that vhost-user backends can map the same pages
//! (SET_MEM_TABLE passes the fds). RAM below the 32-bit MMIO hole is one region;
//! what does not fit below 3 GiB goes to a second region at 4 GiB (docs/platform.md).

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory as the whole core sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole; RAM stops here and resumes at [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// Where RAM above the hole starts.
pub const HIGH_RAM_START: u64 = 4 << 30;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create a memfd for guest RAM")]
    Memfd(#[source] std::io::Error),
    /// ftruncate failed.
    #[error("cannot size guest RAM to {size} bytes")]
    Size {
        /// Requested size.
        size: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest RAM")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// Regions overlap or are otherwise invalid.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// The (guest address, size) ranges of RAM for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(HIGH_RAM_START), size - MMIO_HOLE_START),
        ]
    }
}

fn memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: memfd_create takes a valid NUL-terminated string and flags; the returned
    // fd is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, owned file descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;
    Ok(file)
}

/// Creates guest RAM of `size` bytes as shared memfd mappings.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (i, (addr, len)) in ram_ranges(size).into_iter().enumerate() {
        let file = memfd(&format!("plexvm-ram{i}"), len)?;
        let mmap = MmapRegion::<()>::build(
            Some(FileOffset::new(file, 0)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(MemoryError::Mmap)?;
        regions.push(GuestRegionMmap::new(mmap, addr).ok_or(MemoryError::Layout(
            vm_memory::GuestRegionCollectionError::NoMemoryRegion,
        ))?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _, GuestMemoryRegion};

    #[test]
    fn ram_is_split_around_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
    }

    #[test]
    fn memory_is_memfd_backed_and_writable() {
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        assert!(mem.read_obj::<u32>(GuestAddress(4 << 20)).is_err());
    }
}
