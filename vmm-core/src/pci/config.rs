//! One PCI function's 256-byte configuration space (PCI Local Bus 3.0, chapter 6): a
//! type 0 header, up to six BARs and a capability list.
//!
//! Every byte has a write mask, the way QEMU models config space: a guest write changes
//! only the bits its mask allows, so read-only fields (IDs, class, header type, the
//! capability pointers, a BAR's type bits and the bits below its size) stay what the
//! device says whatever the guest writes. BAR sizing falls out of the mask: writing all
//! ones reads back `!(size - 1)` plus the type bits.

/// Size of the conventional configuration space (ECAM gives 4 KiB; the rest reads 0,
/// which means "no extended capabilities").
pub const CONFIG_SIZE: usize = 256;

/// Command register bits (PCI 3.0, 6.2.2).
pub mod command {
    /// Decode I/O-space BARs.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Decode memory-space BARs.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// The function may master the bus (DMA, MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Bits software may write: I/O, memory, bus master, parity, SERR#, INTx disable.
    pub const WRITABLE: u16 = 0x0547;
}

/// Header offsets (PCI 3.0, figure 6-1).
pub mod offset {
    /// Vendor ID (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (u16).
    pub const COMMAND: usize = 0x04;
    /// Status (u16).
    pub const STATUS: usize = 0x06;
    /// Revision ID (u8).
    pub const REVISION: usize = 0x08;
    /// Programming interface, subclass, class (3 bytes).
    pub const CLASS: usize = 0x09;
    /// Cache line size (u8, scratch for software).
    pub const CACHE_LINE: usize = 0x0c;
    /// Header type (u8).
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR 0 (six u32s).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer (u8).
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line (u8, scratch for software).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (u8; 0: the function uses no INTx pin).
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Status bit 4: the capability list at [`offset::CAPABILITIES`] is valid.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// First offset a capability may use (after the type 0 header).
const FIRST_CAP: usize = 0x40;

/// The identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A memory BAR: its size (a power of two, at least 4 KiB so it never shares a page
/// with another function) and whether it is 64-bit (it then also uses the next BAR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBar {
    /// Bytes, a power of two >= 4096.
    pub size: u64,
    /// A 64-bit BAR (type 10b), taking the next BAR slot as its high half.
    pub is_64bit: bool,
    /// Prefetchable (no side effects on reads).
    pub prefetchable: bool,
}

/// Errors building a config space: programming errors of the device model, checked so a
/// bad layout is an error at VM creation, not a corrupt config space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The BAR index is out of range, taken, or a 64-bit BAR has no room for its high half.
    #[error("BAR {0} is out of range or already used")]
    BarSlot(usize),
    /// The BAR size is not a power of two of at least 4 KiB, or its address is not aligned.
    #[error("BAR of size {size:#x} at {addr:#x} is not a naturally aligned power of two >= 4 KiB")]
    BarSize {
        /// Size.
        size: u64,
        /// Address.
        addr: u64,
    },
    /// The capability does not fit in config space.
    #[error("a capability of {0} bytes does not fit in config space")]
    CapabilityFull(usize),
}

/// A function's config space: bytes, per-byte write masks and the BAR layout.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    bars: [Option<MemoryBar>; 6],
    next_cap: usize,
    last_cap_next: usize,
}

impl ConfigSpace {
    /// A type 0 header for `ids`, with no BARs, capabilities or interrupt pin.
    pub fn new(ids: PciIds) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bars: [None; 6],
            next_cap: FIRST_CAP,
            last_cap_next: offset::CAPABILITIES,
        };
        c.set_u16(offset::VENDOR_ID, ids.vendor);
        c.set_u16(offset::DEVICE_ID, ids.device);
        c.bytes[offset::REVISION] = ids.revision;
        let (class, subclass, prog_if) = ids.class;
        c.bytes[offset::CLASS..offset::CLASS + 3].copy_from_slice(&[prog_if, subclass, class]);
        c.set_u16(offset::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(offset::SUBSYSTEM_ID, ids.subsystem);
        c.wmask[offset::COMMAND..offset::COMMAND + 2]
            .copy_from_slice(&command::WRITABLE.to_le_bytes());
        c.wmask[offset::CACHE_LINE] = 0xff;
        c.wmask[offset::INTERRUPT_LINE] = 0xff;
        c
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// The u16 at `at` (`at + 2 <= 256`).
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// The u32 at `at` (`at + 4 <= 256`).
    pub fn u32_at(&self, at: usize) -> u32 {
        let b = &self.bytes[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Adds memory BAR `index` of `bar`'s size at `addr` (as firmware would assign it).
    pub fn add_bar(&mut self, index: usize, bar: MemoryBar, addr: u64) -> Result<(), ConfigError> {
        let slots = if bar.is_64bit { 2 } else { 1 };
        if index + slots > 6 || self.bars[index..index + slots].iter().any(Option::is_some) {
            return Err(ConfigError::BarSlot(index));
        }
        let fits = bar.size.is_power_of_two()
            && bar.size >= 4096
            && addr % bar.size == 0
            && (bar.is_64bit || (addr + bar.size) <= 1 << 32)
            && bar.size <= 1 << 31;
        if !fits {
            return Err(ConfigError::BarSize {
                size: bar.size,
                addr,
            });
        }
        let flags = (u32::from(bar.is_64bit) << 2) | (u32::from(bar.prefetchable) << 3);
        let at = offset::BAR0 + 4 * index;
        self.set_u32(at, addr as u32 | flags);
        let low_mask = !(bar.size as u32 - 1) & !0xf;
        self.wmask[at..at + 4].copy_from_slice(&low_mask.to_le_bytes());
        if bar.is_64bit {
            self.set_u32(at + 4, (addr >> 32) as u32);
            self.wmask[at + 4..at + 8].fill(0xff);
            self.bars[index + 1] = Some(bar);
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    /// Appends a capability: `body` starts with its ID byte and a placeholder next
    /// pointer; `writable` (no longer than `body`) gives the write masks of its bytes.
    /// Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let at = self.next_cap;
        let len = body.len().next_multiple_of(4);
        if body.len() < 2 || writable.len() > body.len() || at + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilityFull(body.len()));
        }
        self.bytes[at..at + body.len()].copy_from_slice(body);
        self.bytes[at + 1] = 0;
        self.wmask[at..at + writable.len()].copy_from_slice(writable);
        // Both pointers fit a byte: `at` < 256.
        self.bytes[self.last_cap_next] = at as u8;
        self.last_cap_next = at + 1;
        self.next_cap = at + len;
        let status = self.u16_at(offset::STATUS) | STATUS_CAP_LIST;
        self.set_u16(offset::STATUS, status);
        Ok(at)
    }

    /// Reads `data.len()` bytes at `at`; bytes past the end read as 0.
    pub fn read(&self, at: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(at + i).copied().unwrap_or(0);
        }
    }

    /// A guest write of `data` at `at`: each byte changes only where its mask allows;
    /// bytes past the end are dropped.
    pub fn write(&mut self, at: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(m) = self.wmask.get(at + i).copied() else {
                return;
            };
            let b = &mut self.bytes[at + i];
            *b = (*b & !m) | (v & m);
        }
    }

    /// The device itself sets bytes the guest cannot write (e.g. a capability's state).
    pub fn set_bytes(&mut self, at: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(offset::COMMAND)
    }

    /// The BAR layout of slot `index` (a 64-bit BAR appears at both its slots).
    pub fn bar(&self, index: usize) -> Option<MemoryBar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` holds now (the guest may have moved it), or `None` when
    /// there is no BAR there or it is the high half of a 64-bit one.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        if index > 0 && bar.is_64bit && self.bar(index - 1) == Some(bar) && self.is_high_half(index)
        {
            return None;
        }
        let at = offset::BAR0 + 4 * index;
        let low = u64::from(self.u32_at(at) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.u32_at(at + 4)) << 32
        } else {
            0
        };
        Some(high | low)
    }

    fn is_high_half(&self, index: usize) -> bool {
        // The low half of a 64-bit BAR has type bits 10b; a high half is the slot after.
        let mut i = 0;
        while i < index {
            match self.bars[i] {
                Some(b) if b.is_64bit => {
                    if i + 1 == index {
                        return true;
                    }
                    i += 2;
                }
                _ => i += 1,
            }
        }
        false
    }

    /// Where BAR `index` decodes now: its range, when memory decoding is on and the
    /// address is not being sized (an all-ones probe leaves it out of every window).
    pub fn decoded_bar(&self, index: usize) -> Option<(u64, u64)> {
        if self.command() & command::MEMORY_SPACE == 0 {
            return None;
        }
        let addr = self.bar_address(index)?;
        let size = self.bar(index)?.size;
        addr.checked_add(size).map(|_| (addr, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: (0x01, 0x00, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn bar64() -> MemoryBar {
        MemoryBar {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        }
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = ConfigSpace::new(ids());
        c.write(0, &[0xff; 64]);
        assert_eq!(c.u16_at(offset::VENDOR_ID), 0x1af4);
        assert_eq!(c.u16_at(offset::DEVICE_ID), 0x1042);
        assert_eq!(c.bytes[offset::HEADER_TYPE], 0);
        assert_eq!(c.bytes[offset::CLASS + 2], 0x01);
        assert_eq!(c.command(), command::WRITABLE);
        assert_eq!(c.u16_at(offset::STATUS), 0);
        // Interrupt pin stays 0 (MSI-only); the line is software scratch.
        assert_eq!(c.bytes[offset::INTERRUPT_PIN], 0);
        c.write(offset::INTERRUPT_LINE, &[0xaa]);
        assert_eq!(c.bytes[offset::INTERRUPT_LINE], 0xaa);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_restores() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(0, bar64(), 0x1_0000_8000).unwrap();
        assert_eq!(c.u32_at(offset::BAR0), 0x8004);
        assert_eq!(c.u32_at(offset::BAR0 + 4), 1);
        c.write(offset::BAR0, &[0xff; 8]);
        assert_eq!(c.u32_at(offset::BAR0), 0xffff_8004);
        assert_eq!(c.u32_at(offset::BAR0 + 4), 0xffff_ffff);
        c.write(offset::BAR0, &0x8000u32.to_le_bytes());
        c.write(offset::BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_0000_8000));
        assert_eq!(c.bar_address(1), None);
        // Unused BARs read 0 and stay 0: "not implemented".
        c.write(offset::BAR0 + 8, &[0xff; 16]);
        assert_eq!(c.u32_at(offset::BAR0 + 8), 0);
        assert_eq!(c.decoded_bar(0), None);
        c.write(offset::COMMAND, &command::MEMORY_SPACE.to_le_bytes());
        assert_eq!(c.decoded_bar(0), Some((0x1_0000_8000, 0x8000)));
    }

    #[test]
    fn bad_bar_layouts_are_errors() {
        let mut c = ConfigSpace::new(ids());
        assert!(c.add_bar(5, bar64(), 0).is_err());
        assert!(c.add_bar(0, bar64(), 0x1000).is_err());
        let small = MemoryBar {
            size: 0x800,
            ..bar64()
        };
        assert!(c.add_bar(0, small, 0).is_err());
        let bar32 = MemoryBar {
            is_64bit: false,
            ..bar64()
        };
        assert!(c.add_bar(0, bar32, 1 << 32).is_err());
        c.add_bar(0, bar64(), 0).unwrap();
        assert!(c.add_bar(1, bar32, 0x8000).is_err());
        c.add_bar(2, bar32, 0x8000).unwrap();
        assert_eq!(c.bar_address(2), Some(0x8000));
    }

    #[test]
    fn capabilities_chain_and_keep_their_masks() {
        let mut c = ConfigSpace::new(ids());
        let a = c.add_capability(&[0x09, 0, 4, 1], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(c.bytes[offset::CAPABILITIES], 0x40);
        assert_eq!(c.bytes[0x41], 0x44);
        assert_eq!(c.bytes[0x45], 0);
        assert_ne!(c.u16_at(offset::STATUS) & STATUS_CAP_LIST, 0);
        c.write(0x40, &[0xff; 8]);
        assert_eq!(&c.bytes[0x40..0x48], &[0x09, 0x44, 4, 1, 0x11, 0, 0, 0xc0]);
        let too_big = [0u8; 200];
        assert!(c.add_capability(&too_big, &[]).is_err());
        // Reads and writes past the end are dropped, not a panic.
        let mut data = [0xffu8; 4];
        c.read(254, &mut data);
        assert_eq!(&data[2..], &[0, 0]);
        c.write(255, &[1, 2, 3]);
    }
}
