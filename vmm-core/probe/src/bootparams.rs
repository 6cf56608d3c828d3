//! Reading the Linux `boot_params` ("zero page") the core fills (docs/platform.md):
//! the command-line pointer and the e820 memory map.

use thiserror::Error;

/// Size of `struct boot_params`.
pub const BOOT_PARAMS_SIZE: usize = 4096;

const CMD_LINE_PTR: usize = 0x228;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;
/// `E820_MAX_ENTRIES_ZEROPAGE` in Linux: the table has room for 128 entries.
const E820_MAX_ENTRIES: usize = 128;
const E820_RAM: u32 = 1;

/// Problems with the boot information.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// The command line is not NUL-terminated within 4096 bytes.
    #[error("command line is not NUL-terminated within {0} bytes")]
    CmdlineUnterminated(usize),
    /// The command line is not UTF-8.
    #[error("command line is not UTF-8")]
    CmdlineNotUtf8,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type; 1 = RAM.
    pub kind: u32,
}

impl E820Entry {
    /// End address (exclusive), saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    /// Whether this is usable RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == E820_RAM
    }
}

/// A view of `boot_params`.
#[derive(Debug, Clone, Copy)]
pub struct BootParams<'a> {
    raw: &'a [u8; BOOT_PARAMS_SIZE],
}

impl<'a> BootParams<'a> {
    /// Wraps the 4 KiB zero page.
    pub fn new(raw: &'a [u8; BOOT_PARAMS_SIZE]) -> Self {
        BootParams { raw }
    }

    fn u64_at(&self, offset: usize) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.raw[offset..offset + 8]);
        u64::from_le_bytes(bytes)
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&self.raw[offset..offset + 4]);
        u32::from_le_bytes(bytes)
    }

    /// `hdr.cmd_line_ptr`: guest-physical address of the command line (0 = none).
    pub fn cmd_line_ptr(&self) -> u32 {
        self.u32_at(CMD_LINE_PTR)
    }

    /// The e820 entries (at most 128, however many the count claims).
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + 'a {
        let raw = self.raw;
        let count = usize::from(raw[E820_ENTRIES]).min(E820_MAX_ENTRIES);
        (0..count).map(move |i| {
            let view = BootParams { raw };
            let offset = E820_TABLE + i * E820_ENTRY_SIZE;
            E820Entry {
                addr: view.u64_at(offset),
                size: view.u64_at(offset + 8),
                kind: view.u32_at(offset + 16),
            }
        })
    }

    /// The RAM entry containing `addr`.
    pub fn ram_containing(&self, addr: u64) -> Option<E820Entry> {
        self.e820()
            .find(|e| e.is_ram() && e.addr <= addr && addr < e.end())
    }

    /// End of the highest RAM entry.
    pub fn ram_end(&self) -> u64 {
        self.e820()
            .filter(E820Entry::is_ram)
            .map(|e| e.end())
            .max()
            .unwrap_or(0)
    }
}

/// The NUL-terminated command line in `bytes` (the 4 KiB the core reserves for it).
pub fn cmdline_from_bytes(bytes: &[u8]) -> Result<&str, BootParamsError> {
    let len = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(BootParamsError::CmdlineUnterminated(bytes.len()))?;
    core::str::from_utf8(&bytes[..len]).map_err(|_| BootParamsError::CmdlineNotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_page(entries: &[(u64, u64, u32)], count: u8) -> Box<[u8; BOOT_PARAMS_SIZE]> {
        let mut raw = Box::new([0u8; BOOT_PARAMS_SIZE]);
        raw[CMD_LINE_PTR..CMD_LINE_PTR + 4].copy_from_slice(&0x20000u32.to_le_bytes());
        raw[E820_ENTRIES] = count;
        for (i, (addr, size, kind)) in entries.iter().enumerate() {
            let o = E820_TABLE + i * E820_ENTRY_SIZE;
            raw[o..o + 8].copy_from_slice(&addr.to_le_bytes());
            raw[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
            raw[o + 16..o + 20].copy_from_slice(&kind.to_le_bytes());
        }
        raw
    }

    #[test]
    fn reads_platform_layout() {
        let raw = zero_page(
            &[
                (0, 0x9fc00, 1),
                (0x100000, 0x7f00000, 1),
                (0xd000_0000, 0x1000, 2),
            ],
            3,
        );
        let bp = BootParams::new(&raw);
        assert_eq!(bp.cmd_line_ptr(), 0x20000);
        assert_eq!(bp.e820().count(), 3);
        let ram = bp.ram_containing(0x200000).unwrap();
        assert_eq!((ram.addr, ram.end()), (0x100000, 0x8000000));
        assert_eq!(bp.ram_containing(0x9fc00), None);
        assert_eq!(bp.ram_containing(0xd000_0000), None);
        assert_eq!(bp.ram_end(), 0x8000000);
    }

    #[test]
    fn bogus_count_stays_in_bounds() {
        let raw = zero_page(&[], 255);
        let bp = BootParams::new(&raw);
        assert_eq!(bp.e820().count(), E820_MAX_ENTRIES);
        assert_eq!(bp.ram_end(), 0);
        let huge = zero_page(&[(u64::MAX - 1, u64::MAX, 1)], 1);
        assert_eq!(BootParams::new(&huge).ram_end(), u64::MAX);
    }

    #[test]
    fn cmdline_needs_nul_and_utf8() {
        assert_eq!(cmdline_from_bytes(b"a b\0junk"), Ok("a b"));
        assert_eq!(cmdline_from_bytes(b"\0"), Ok(""));
        assert_eq!(
            cmdline_from_bytes(b"abc"),
            Err(BootParamsError::CmdlineUnterminated(3))
        );
        assert_eq!(
            cmdline_from_bytes(b"\xff\0"),
            Err(BootParamsError::CmdlineNotUtf8)
        );
    }
}
