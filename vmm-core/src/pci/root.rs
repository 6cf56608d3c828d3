//! The root complex: bus 0 with a host bridge at 00:00.0 and up to 31 single-function
//! devices; configuration mechanism #1 (ports 0xCF8/0xCFC, PCI 3.0 section 3.2.2.3.2) and
//! ECAM (PCIe 5.0 section 7.2.2); and the dispatch of guest accesses in the MMIO windows
//! to the BAR that decodes them.
//!
//! Bad accesses get what hardware gives, never a panic: a function that does not exist,
//! and an access no BAR decodes, read as all ones (master abort) and drop writes; config
//! accesses that are not 1, 2 or 4 bytes naturally aligned are dropped the same way;
//! ECAM offsets 0x100..0x1000 of a present function read 0 (no extended capabilities).

use std::sync::{Arc, Mutex};

use super::config::{ConfigSpace, PciIds, CONFIG_SIZE};
use super::{GuestIssue, GuestIssues, ECAM_SIZE};
use crate::devices::{MmioDevice, PioDevice};

/// Devices (slots) on bus 0.
pub const SLOTS: usize = 32;
/// Bytes of config space per function through ECAM.
const ECAM_FUNCTION_SIZE: usize = 4096;

/// A PCI function on the root bus.
///
/// Config reads and writes arrive already checked (in range of the 256-byte space,
/// 1/2/4 bytes naturally aligned). BAR accesses arrive with the BAR index and the offset
/// into it, the whole access inside the BAR.
pub trait PciFunction: Send {
    /// The function's config space (for BAR decoding).
    fn config(&self) -> &ConfigSpace;
    /// A config read; the default reads the config space.
    fn read_config(&mut self, at: usize, data: &mut [u8]) {
        self.config().read(at, data);
    }
    /// A config write.
    fn write_config(&mut self, at: usize, data: &[u8]);
    /// A read of BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write to BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0: IDs and class only (Cloud Hypervisor uses the same Intel
/// IDs for its host bridge; Linux binds nothing to it).
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: ConfigSpace::new(PciIds {
                vendor: 0x8086,
                device: 0x0d57,
                revision: 0,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn write_config(&mut self, at: usize, data: &[u8]) {
        self.config.write(at, data);
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

/// A function as the root holds it.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Errors adding a function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    /// All 31 device slots are in use.
    #[error("the PCI bus has no free slot (at most {} devices)", SLOTS - 1)]
    BusFull,
}

/// Bus 0 and its functions.
pub struct PciRoot {
    slots: Vec<Option<SharedFunction>>,
    issues: Mutex<GuestIssues>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..SLOTS).filter(|&s| self.slots[s].is_some()).collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
    // A function that panicked while locked keeps its own state: keep serving it.
    f.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// Bus 0 with only the host bridge.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedFunction>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        PciRoot {
            slots,
            issues: Mutex::new(GuestIssues::default()),
        }
    }

    /// The next free slot, which [`Self::add`] will use.
    pub fn next_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// Puts `function` in the next free slot; returns the slot (device number).
    pub fn add(&mut self, function: SharedFunction) -> Result<usize, RootError> {
        let slot = self.next_slot().ok_or(RootError::BusFull)?;
        self.slots[slot] = Some(function);
        Ok(slot)
    }

    fn report(&self, kind: GuestIssue, what: std::fmt::Arguments<'_>) {
        self.issues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report("pci", kind, what);
    }

    /// How many guest accesses broke a rule.
    pub fn guest_issue_count(&self) -> u64 {
        self.issues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count()
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<&SharedFunction> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(device))?.as_ref()
    }

    /// A config read of function `bus:device.function` at `at` (0..4096).
    pub fn config_read(&self, bdf: (u8, u8, u8), at: usize, data: &mut [u8]) {
        let Some(f) = self.function(bdf.0, bdf.1, bdf.2) else {
            return data.fill(0xff);
        };
        if !config_access_ok(at, data.len()) {
            self.report_config(at, data.len());
            return data.fill(0xff);
        }
        if at >= CONFIG_SIZE {
            return data.fill(0);
        }
        lock(f).read_config(at, data);
    }

    /// A config write to function `bus:device.function` at `at` (0..4096).
    pub fn config_write(&self, bdf: (u8, u8, u8), at: usize, data: &[u8]) {
        let Some(f) = self.function(bdf.0, bdf.1, bdf.2) else {
            return;
        };
        if !config_access_ok(at, data.len()) {
            return self.report_config(at, data.len());
        }
        if at < CONFIG_SIZE {
            lock(f).write_config(at, data);
        }
    }

    fn report_config(&self, at: usize, len: usize) {
        self.report(
            GuestIssue::Config,
            format_args!("dropped a {len}-byte config access at {at:#x}"),
        );
    }

    /// Calls `f` with the function and BAR that decode `[addr, addr + len)` whole.
    fn with_bar(&self, addr: u64, len: usize, f: impl FnOnce(&mut dyn PciFunction, usize, u64)) {
        let end = addr.checked_add(len as u64);
        for function in self.slots.iter().flatten() {
            let mut guard = lock(function);
            let hit = (0..6).find_map(|bar| {
                let (base, size) = guard.config().decoded_bar(bar)?;
                let inside = addr >= base && end.is_some_and(|e| e <= base + size);
                inside.then(|| (bar, addr - base))
            });
            if let Some((bar, offset)) = hit {
                return f(&mut *guard, bar, offset);
            }
        }
        self.report(
            GuestIssue::Bar,
            format_args!("a {len}-byte access at {addr:#x} hit no BAR"),
        );
    }

    /// A guest read at `addr` in a PCI MMIO window.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.with_bar(addr, data.len(), |f, bar, offset| {
            f.read_bar(bar, offset, data)
        });
    }

    /// A guest write at `addr` in a PCI MMIO window.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.with_bar(addr, data.len(), |f, bar, offset| {
            f.write_bar(bar, offset, data)
        });
    }
}

/// 1, 2 or 4 bytes, naturally aligned, inside the function's 4 KiB.
fn config_access_ok(at: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && at % len == 0 && at + len <= ECAM_FUNCTION_SIZE
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 (32-bit accesses only) and
/// CONFIG_DATA at 0xCFC..0xCFF. Put on the port bus at 0xCF8 with length 8.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    /// Config I/O for `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The function and register CONFIG_ADDRESS selects, when its enable bit is set.
    fn target(&self, data_offset: u16) -> Option<((u8, u8, u8), usize)> {
        if self.address & (1 << 31) == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let device = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let register = (self.address & 0xfc) as usize;
        Some(((bus, device, function), register + usize::from(data_offset)))
    }
}

impl PioDevice for PciConfigIo {
    fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((bdf, at)) => self.root.config_read(bdf, at, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8]) {
        match offset {
            // Reserved bits 30:24 and 1:0 read as 0 (PCI 3.0, 3.2.2.3.2).
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(b) & 0x80ff_fffc;
                }
            }
            4..=7 => {
                if let Some((bdf, at)) = self.target(offset - 4) {
                    self.root.config_write(bdf, at, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: bus 0's 32 × 8 functions × 4 KiB. Put on the MMIO bus at [`super::ECAM_BASE`]
/// with length [`ECAM_SIZE`].
#[derive(Debug)]
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    /// ECAM for `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigMmio { root }
    }
}

fn ecam_target(offset: u64) -> Option<((u8, u8, u8), usize)> {
    if offset >= ECAM_SIZE {
        return None;
    }
    let bus = (offset >> 20) as u8;
    let device = ((offset >> 15) & 0x1f) as u8;
    let function = ((offset >> 12) & 0x7) as u8;
    Some(((bus, device, function), (offset & 0xfff) as usize))
}

impl MmioDevice for PciConfigMmio {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        match ecam_target(offset) {
            Some((bdf, at)) => self.root.config_read(bdf, at, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, at)) = ecam_target(offset) {
            self.root.config_write(bdf, at, data);
        }
    }
}

/// One of the MMIO windows BARs live in, as put on the MMIO bus at `base`.
#[derive(Debug)]
pub struct PciBarWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciBarWindow {
    /// The window at `base` of `root`'s functions.
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        PciBarWindow { root, base }
    }
}

impl MmioDevice for PciBarWindow {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        match self.base.checked_add(offset) {
            Some(addr) => self.root.mmio_read(addr, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if let Some(addr) = self.base.checked_add(offset) {
            self.root.mmio_write(addr, data);
        }
    }
}

#[cfg(test)]
#[path = "root_tests.rs"]
mod tests;
