//! Guest RAM for rings and buffers: a bump allocator over the free RAM after the
//! probe image (`_end`). Guest physical = virtual (identity map), so an address
//! handed to a device is the pointer the probe uses.

use thiserror::Error;

/// Page size used for alignment of rings and buffers.
pub const PAGE_SIZE: u64 = 4096;

/// Out of guest RAM.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error("out of guest RAM: {wanted} bytes wanted, {left} left")]
pub struct OutOfMemory {
    /// Bytes asked for.
    pub wanted: u64,
    /// Bytes left in the region.
    pub left: u64,
}

/// Hands out never-reused pieces of one free RAM region.
#[derive(Debug)]
pub struct PhysAlloc {
    next: u64,
    end: u64,
}

impl PhysAlloc {
    /// An allocator over `[start, end)`.
    ///
    /// # Safety
    /// The range must be RAM that nothing else uses for the rest of the program,
    /// mapped at the same virtual address, and valid for reads and writes.
    pub unsafe fn new(start: u64, end: u64) -> Self {
        PhysAlloc {
            next: start,
            end: end.max(start),
        }
    }

    /// Bytes still free (ignoring alignment).
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }

    /// Reserves `size` bytes aligned to `align` (a power of two) and returns the address.
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64, OutOfMemory> {
        debug_assert!(align.is_power_of_two());
        let oom = OutOfMemory {
            wanted: size,
            left: self.remaining(),
        };
        let start = self.next.checked_add(align - 1).ok_or(oom)? & !(align - 1);
        let end = start.checked_add(size).ok_or(oom)?;
        if end > self.end {
            return Err(oom);
        }
        self.next = end;
        Ok(start)
    }

    /// Zeroed bytes, page aligned.
    pub fn alloc_bytes(&mut self, len: usize) -> Result<&'static mut [u8], OutOfMemory> {
        let addr = self.alloc(len as u64, PAGE_SIZE)?;
        // SAFETY: `new`'s contract makes [addr, addr + len) exclusively ours, mapped
        // and writable; the bump pointer never hands the same bytes out twice.
        let bytes = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) };
        bytes.fill(0);
        Ok(bytes)
    }

    /// Zeroed `u32`s, page aligned.
    pub fn alloc_u32s(&mut self, len: usize) -> Result<&'static mut [u32], OutOfMemory> {
        let bytes = u64::try_from(len)
            .ok()
            .and_then(|n| n.checked_mul(4))
            .ok_or(OutOfMemory {
                wanted: u64::MAX,
                left: self.remaining(),
            })?;
        let addr = self.alloc(bytes, PAGE_SIZE)?;
        // SAFETY: as in `alloc_bytes`; the address is page aligned, so aligned for u32,
        // and every bit pattern is a valid u32.
        let words = unsafe { core::slice::from_raw_parts_mut(addr as *mut u32, len) };
        words.fill(0);
        Ok(words)
    }

    /// `len` copies of `value` as `u64`s, page aligned.
    pub fn alloc_u64s(
        &mut self,
        len: usize,
        value: u64,
    ) -> Result<&'static mut [u64], OutOfMemory> {
        let bytes = u64::try_from(len)
            .ok()
            .and_then(|n| n.checked_mul(8))
            .ok_or(OutOfMemory {
                wanted: u64::MAX,
                left: self.remaining(),
            })?;
        let addr = self.alloc(bytes, PAGE_SIZE)?;
        // SAFETY: as in `alloc_bytes`; the address is page aligned, so aligned for u64,
        // and every bit pattern is a valid u64.
        let words = unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, len) };
        words.fill(value);
        Ok(words)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An allocator over leaked host memory (the tests' stand-in for guest RAM).
    pub(crate) fn host_alloc(bytes: usize) -> PhysAlloc {
        let region: &'static mut [u8] =
            Box::leak(vec![0u8; bytes + PAGE_SIZE as usize].into_boxed_slice());
        let start = region.as_mut_ptr() as u64;
        // SAFETY: the leaked region is ours alone for the rest of the test process.
        unsafe { PhysAlloc::new(start, start + region.len() as u64) }
    }

    #[test]
    fn aligned_disjoint_and_bounded() {
        let mut alloc = host_alloc(4 * PAGE_SIZE as usize);
        let a = alloc.alloc(10, 16).unwrap();
        let b = alloc.alloc(10, PAGE_SIZE).unwrap();
        assert_eq!(b % PAGE_SIZE, 0);
        assert!(b >= a + 10);
        let words = alloc.alloc_u32s(100).unwrap();
        assert!(words.iter().all(|&w| w == 0));
        let longs = alloc.alloc_u64s(10, 7).unwrap();
        assert!(longs.iter().all(|&w| w == 7));
        assert!(alloc.alloc_bytes(10 * PAGE_SIZE as usize).is_err());
        assert!(alloc.alloc(u64::MAX, 1).is_err());
        assert!(alloc.alloc_u32s(usize::MAX).is_err());
        assert!(alloc.alloc_u64s(usize::MAX, 0).is_err());
    }
}
