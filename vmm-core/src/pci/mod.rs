//! PCI: a root complex with one bus, and the virtio-pci transport (docs/platform.md,
//! "PCI").
//!
//! Module map:
//! - [`config`]: one function's config space (header, BARs, capability list, write masks);
//! - [`root`]: bus 0, the host bridge, config access through 0xCF8/0xCFC and ECAM, and
//!   the dispatch of MMIO-window accesses to BARs;
//! - [`BarAllocator`]: BAR placement in the 32-bit and the 64-bit window (vm-allocator);
//! - [`msix`]: MSI-X table and PBA, and the VM's GSI routing table ([`MsiRouter`]);
//! - [`interrupts`]: per function, which queue's call eventfd is a KVM irqfd and which
//!   the core's event thread serves (masked vectors, pending bits);
//! - [`virtio_pci`]: the virtio-pci modern transport in front of the shared
//!   [`crate::virtio::VirtioMmioTransport`];
//! - [`acpi`]: MCFG and the DSDT's host bridge.
//!
//! Everything here runs on vCPU threads on exits; guest mistakes are counted and logged
//! once per kind ([`GuestIssues`]), never one line per access.

pub mod acpi;
pub mod config;
pub mod interrupts;
pub mod msix;
pub mod platform;
pub mod root;
pub mod virtio_pci;

use vm_allocator::{AddressAllocator, AllocPolicy};

pub use config::{ConfigSpace, MemoryBar, PciIds};
pub use interrupts::{PciEventHandler, PciInterrupts};
pub use msix::MsiRouter;
pub use root::{PciBarWindow, PciConfigIo, PciConfigMmio, PciFunction, PciRoot};
pub use virtio_pci::VirtioPciFunction;

/// ECAM base (MCFG): bus 0 only, 32 devices × 8 functions × 4 KiB.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM size for bus 0.
pub const ECAM_SIZE: u64 = 1 << 20;
/// Configuration mechanism #1: CONFIG_ADDRESS port (CONFIG_DATA is at +4).
pub const CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports used by configuration mechanism #1.
pub const CONFIG_IO_LEN: u16 = 8;
/// The 32-bit MMIO window: from the top of low RAM (3 GiB) to the virtio-mmio windows.
pub const MMIO32_BASE: u64 = 0xc000_0000;
/// Size of the 32-bit window (256 MiB).
pub const MMIO32_SIZE: u64 = 0x1000_0000;
/// Size of the 64-bit window (64 GiB), which starts at [`mmio64_base`].
pub const MMIO64_SIZE: u64 = 64 << 30;

/// Where the 64-bit window starts for a VM whose RAM ends at `ram_end` (the highest
/// guest-physical RAM address + 1): 4 GiB or the next 1 GiB boundary above RAM, so it
/// never overlaps RAM and the probe maps it with one more page directory.
pub fn mmio64_base(ram_end: u64) -> u64 {
    ram_end.max(4 << 30).next_multiple_of(1 << 30)
}

/// Errors placing BARs.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// A window is full (or its range is invalid).
    #[error("no room for a BAR of {size:#x} bytes in the {window} MMIO window")]
    NoRoom {
        /// "32-bit" or "64-bit".
        window: &'static str,
        /// Bytes asked for.
        size: u64,
        /// The allocator's error.
        #[source]
        source: vm_allocator::Error,
    },
    /// The config space layout was refused.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The bus is full.
    #[error(transparent)]
    Root(#[from] root::RootError),
    /// An MSI route or GSI could not be set up.
    #[error(transparent)]
    Msi(#[from] msix::MsiError),
    /// An eventfd could not be duplicated.
    #[error("cannot duplicate an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The two MMIO windows the ACPI host bridge describes, and what is placed in them.
#[derive(Debug)]
pub struct BarAllocator {
    low: AddressAllocator,
    high: AddressAllocator,
    high_base: u64,
}

impl BarAllocator {
    /// Windows for a VM whose RAM ends at `ram_end`.
    pub fn new(ram_end: u64) -> Result<Self, PciError> {
        let high_base = mmio64_base(ram_end);
        let err = |window, source| PciError::NoRoom {
            window,
            size: 0,
            source,
        };
        Ok(BarAllocator {
            low: AddressAllocator::new(MMIO32_BASE, MMIO32_SIZE).map_err(|e| err("32-bit", e))?,
            high: AddressAllocator::new(high_base, MMIO64_SIZE).map_err(|e| err("64-bit", e))?,
            high_base,
        })
    }

    /// (base, size) of the 32-bit window.
    pub fn window32(&self) -> (u64, u64) {
        (MMIO32_BASE, MMIO32_SIZE)
    }

    /// (base, size) of the 64-bit window.
    pub fn window64(&self) -> (u64, u64) {
        (self.high_base, MMIO64_SIZE)
    }

    /// A naturally aligned address for `bar`: 64-bit BARs in the 64-bit window (as Cloud
    /// Hypervisor and Firecracker place them), 32-bit BARs below 4 GiB.
    pub fn place(&mut self, bar: MemoryBar) -> Result<u64, PciError> {
        let (alloc, window) = if bar.is_64bit {
            (&mut self.high, "64-bit")
        } else {
            (&mut self.low, "32-bit")
        };
        alloc
            .allocate(bar.size, bar.size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|source| PciError::NoRoom {
                window,
                size: bar.size,
                source,
            })
    }
}

/// Kinds of guest misbehaviour on PCI, each logged once and then only counted.
#[derive(Debug, Clone, Copy)]
pub enum GuestIssue {
    /// A config access of a bad size or alignment.
    Config,
    /// An MMIO access no BAR decodes, or a bad access inside one.
    Bar,
    /// A bad MSI-X table or PBA access.
    Msix,
    /// A bad virtio-pci register access.
    Virtio,
}

/// A rate-limited report of guest mistakes: the first of each kind is logged.
#[derive(Debug, Default)]
pub struct GuestIssues {
    logged: u32,
    count: u64,
}

impl GuestIssues {
    /// Counts one issue; logs it when it is the first of its kind.
    pub fn report(&mut self, device: &str, kind: GuestIssue, what: std::fmt::Arguments<'_>) {
        self.count += 1;
        let bit = 1 << kind as u32;
        if self.logged & bit == 0 {
            self.logged |= bit;
            tracing::warn!("{device}: {what} (further {kind:?} issues are only counted)");
        }
    }

    /// Issues so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_placed_aligned_in_their_window() {
        let mut a = BarAllocator::new(512 << 20).unwrap();
        assert_eq!(a.window64(), (4 << 30, MMIO64_SIZE));
        let big = MemoryBar {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        };
        let small = MemoryBar {
            size: 0x1000,
            is_64bit: false,
            prefetchable: false,
        };
        let b0 = a.place(big).unwrap();
        let s0 = a.place(small).unwrap();
        let b1 = a.place(big).unwrap();
        assert_eq!(b0, 4 << 30);
        assert_eq!(b1, (4 << 30) + 0x8000);
        assert_eq!(s0, MMIO32_BASE);
        let huge = MemoryBar {
            size: MMIO32_SIZE * 2,
            ..small
        };
        assert!(a.place(huge).is_err());
        // RAM above 4 GiB pushes the window up to the next GiB.
        let a = BarAllocator::new((6 << 30) + 1).unwrap();
        assert_eq!(a.window64().0, 7 << 30);
    }
}
