//! Guest RAM: memfd-backed regions mapped into the core and shared with backends.
//!
//! Every region is a memfd so that vhost-user backends can map the same pages
//! (SET_MEM_TABLE passes the fds). RAM below the 32-bit MMIO hole is one region;
//! what does not fit below 3 GiB goes to a second region at 4 GiB (docs/platform.md).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

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
    /// F_ADD_SEALS failed.
    #[error("cannot seal a memfd against resizing")]
    Seal(#[source] std::io::Error),
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

/// The seals every memfd the core shares gets: its size is fixed, and the seals
/// themselves cannot be changed. A backend holds the fd (SET_MEM_TABLE,
/// SET_INFLIGHT_FD); unsealed, an `ftruncate` by it would turn the guest's (or the
/// core's) next access to the pages past the new end into SIGBUS. Writes stay allowed:
/// backends must write into guest RAM.
pub const SHARED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A memfd of `size` bytes sealed with [`SHARED_SEALS`], safe to hand to a backend.
pub fn sealed_memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: memfd_create takes a valid NUL-terminated string and flags; the returned
    // fd is checked before use.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, owned file descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Size { size, source })?;
    // SAFETY: fcntl(F_ADD_SEALS) on our own open fd with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SHARED_SEALS) } != 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Creates guest RAM of `size` bytes as shared memfd mappings.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (i, (addr, len)) in ram_ranges(size).into_iter().enumerate() {
        let file = sealed_memfd(&format!("plexvm-ram{i}"), len)?;
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

    #[test]
    fn guest_ram_cannot_be_resized_by_whoever_holds_its_fd() {
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress(0x3000))
            .unwrap();
        let region = mem.iter().next().unwrap();
        let file = region.file_offset().unwrap().file();
        // What a backend holding the fd from SET_MEM_TABLE would try.
        let dup = file.try_clone().unwrap();
        let err = dup.set_len(0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        let err = dup.set_len(8 << 20).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        // SAFETY: fcntl(F_GET_SEALS) on an open fd with no argument.
        let seals = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & SHARED_SEALS, SHARED_SEALS);
        // Removing a seal or adding one is refused (F_SEAL_SEAL).
        // SAFETY: as above, with an integer argument.
        let r = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1);
        assert_eq!(dup.metadata().unwrap().len(), 4 << 20);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0x1234_5678
        );
    }
}
