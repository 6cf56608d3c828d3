//! The virtio-pci modern transport (virtio 1.2, 4.1) on bus 0, found through PCI
//! configuration mechanism #1 (ports 0xCF8/0xCFC: legal at CPL3 with IOPL = 3).
//!
//! The probe's identity map covers only the first 4 GiB, and the core places 64-bit BARs
//! above RAM (docs/platform.md, "PCI"), so the driver moves BAR 0 into the 32-bit window
//! as firmware may: size it, write an address there, then turn memory decoding on.
//! Interrupts are not used (the probe polls): MSI-X stays disabled, and a completion
//! shows as ISR bit 0, which reading clears.

use super::mmio::{MmioError, QueueAddresses};
use super::{status, F_VERSION_1};
use crate::arch::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + the virtio device ID (4.1.2.1).
const MODERN_BASE: u16 = 0x1040;
/// Where the probe puts BAR 0 of slot s: the 32-bit window, 64 KiB per slot.
const WINDOW32: u64 = 0xc000_0000;
const SLOT_SPAN: u64 = 0x1_0000;
const RETRIES: usize = 1000;

// Common configuration offsets (4.1.4.3).
const DEVICE_FEATURE_SELECT: usize = 0x00;
const DEVICE_FEATURE: usize = 0x04;
const DRIVER_FEATURE_SELECT: usize = 0x08;
const DRIVER_FEATURE: usize = 0x0c;
const DEVICE_STATUS: usize = 0x14;
const CONFIG_GENERATION: usize = 0x15;
const QUEUE_SELECT: usize = 0x16;
const QUEUE_SIZE: usize = 0x18;
const QUEUE_ENABLE: usize = 0x1c;
const QUEUE_NOTIFY_OFF: usize = 0x1e;
const QUEUE_DESC: usize = 0x20;
const QUEUE_DRIVER: usize = 0x28;
const QUEUE_DEVICE: usize = 0x30;

fn config_read(slot: u8, reg: u8) -> u32 {
    outl(
        CONFIG_ADDRESS,
        (1 << 31) | (u32::from(slot) << 11) | u32::from(reg & 0xfc),
    );
    inl(CONFIG_DATA)
}

fn config_write(slot: u8, reg: u8, value: u32) {
    outl(
        CONFIG_ADDRESS,
        (1 << 31) | (u32::from(slot) << 11) | u32::from(reg & 0xfc),
    );
    outl(CONFIG_DATA, value);
}

fn config_byte(slot: u8, reg: u8) -> u8 {
    (config_read(slot, reg) >> (8 * (reg & 3))) as u8
}

/// A virtio function on bus 0: its slot and virtio device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Device number on bus 0.
    pub slot: u8,
    /// Virtio device ID.
    pub device_id: u32,
}

/// The modern virtio functions on bus 0, in slot order, into `out`; returns how many.
pub fn scan(out: &mut [Option<PciFunction>]) -> usize {
    let mut n = 0;
    for slot in 0..32u8 {
        let id = config_read(slot, 0);
        let (vendor, device) = (id as u16, (id >> 16) as u16);
        if vendor != VIRTIO_VENDOR || !(MODERN_BASE..MODERN_BASE + 0x40).contains(&device) {
            continue;
        }
        if let Some(o) = out.get_mut(n) {
            *o = Some(PciFunction {
                slot,
                device_id: u32::from(device - MODERN_BASE),
            });
            n += 1;
        }
    }
    n
}

/// One virtio-pci device's structures in BAR 0.
#[derive(Debug)]
pub struct PciTransport {
    slot: u8,
    common: usize,
    notify: usize,
    notify_multiplier: usize,
    isr: usize,
    device: usize,
    /// queue_notify_off of queues 0..8, read when each is set up.
    notify_offs: [u16; 8],
}

impl PciTransport {
    /// Finds the capabilities of `function`, moves BAR 0 into the 32-bit window and
    /// enables memory decoding; `None` when a structure is missing or not in a usable
    /// 64-bit memory BAR 0.
    pub fn open(function: PciFunction) -> Option<PciTransport> {
        let slot = function.slot;
        let bar = place_bar0(slot)?;
        let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
        let mut multiplier = 0;
        let mut cap = config_byte(slot, 0x34) & 0xfc;
        let mut hops = 0;
        while cap != 0 && hops < 48 {
            hops += 1;
            if config_byte(slot, cap) == 0x09 && config_byte(slot, cap + 4) == 0 {
                let offset = config_read(slot, cap + 8) as usize;
                let at = Some(bar + offset);
                match config_byte(slot, cap + 3) {
                    1 => common = at,
                    2 => {
                        notify = at;
                        multiplier = config_read(slot, cap + 16) as usize;
                    }
                    3 => isr = at,
                    4 => device = at,
                    _ => {}
                }
            }
            cap = config_byte(slot, cap + 1) & 0xfc;
        }
        Some(PciTransport {
            slot,
            common: common?,
            notify: notify?,
            notify_multiplier: multiplier,
            isr: isr?,
            device: device?,
            notify_offs: [0; 8],
        })
    }

    /// The device number on bus 0.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    fn r8(&self, at: usize) -> u8 {
        // SAFETY: `at` lies in BAR 0, which `open` placed in the identity-mapped 32-bit
        // window where nothing but this device decodes.
        unsafe { core::ptr::read_volatile(at as *const u8) }
    }
    fn r16(&self, at: usize) -> u16 {
        // SAFETY: as in `r8`; the fields are naturally aligned.
        unsafe { core::ptr::read_volatile(at as *const u16) }
    }
    fn r32(&self, at: usize) -> u32 {
        // SAFETY: as in `r16`.
        unsafe { core::ptr::read_volatile(at as *const u32) }
    }
    fn w8(&self, at: usize, v: u8) {
        // SAFETY: as in `r8`.
        unsafe { core::ptr::write_volatile(at as *mut u8, v) }
    }
    fn w16(&self, at: usize, v: u16) {
        // SAFETY: as in `r16`.
        unsafe { core::ptr::write_volatile(at as *mut u16, v) }
    }
    fn w32(&self, at: usize, v: u32) {
        // SAFETY: as in `r16`.
        unsafe { core::ptr::write_volatile(at as *mut u32, v) }
    }

    /// Device initialisation up to FEATURES_OK (3.1.1 steps 1-6), as the mmio one.
    pub fn negotiate(&mut self, required: u64, optional: u64) -> Result<u64, MmioError> {
        self.w8(self.common + DEVICE_STATUS, 0);
        if !(0..RETRIES).any(|_| self.status() == 0) {
            return Err(MmioError::ResetFailed(self.status()));
        }
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.w32(self.common + DEVICE_FEATURE_SELECT, 0);
        let low = self.r32(self.common + DEVICE_FEATURE);
        self.w32(self.common + DEVICE_FEATURE_SELECT, 1);
        let offered = (u64::from(self.r32(self.common + DEVICE_FEATURE)) << 32) | u64::from(low);
        let required = required | F_VERSION_1;
        if offered & required != required {
            self.fail();
            return Err(MmioError::MissingFeatures(required & !offered));
        }
        let accepted = required | (optional & offered);
        self.w32(self.common + DRIVER_FEATURE_SELECT, 0);
        self.w32(self.common + DRIVER_FEATURE, accepted as u32);
        self.w32(self.common + DRIVER_FEATURE_SELECT, 1);
        self.w32(self.common + DRIVER_FEATURE, (accepted >> 32) as u32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(MmioError::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// device_status.
    pub fn status(&self) -> u32 {
        self.r8(self.common + DEVICE_STATUS).into()
    }

    fn set_status(&mut self, value: u32) {
        self.w8(self.common + DEVICE_STATUS, value as u8);
    }

    /// Sets FAILED.
    pub fn fail(&mut self) {
        let s = self.status();
        self.set_status(s | status::FAILED);
    }

    /// Largest size of queue `index` (0: absent or already enabled).
    pub fn queue_max(&mut self, index: u16) -> u16 {
        self.w16(self.common + QUEUE_SELECT, index);
        if self.r16(self.common + QUEUE_ENABLE) != 0 {
            return 0;
        }
        self.r16(self.common + QUEUE_SIZE)
    }

    /// Sets up queue `index` (4.1.5.1.3) and enables it.
    pub fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        a: QueueAddresses,
    ) -> Result<(), MmioError> {
        let max = self.queue_max(index);
        if max == 0 || size > max {
            return Err(MmioError::QueueUnavailable(index));
        }
        self.w16(self.common + QUEUE_SIZE, size);
        for (field, addr) in [
            (QUEUE_DESC, a.desc),
            (QUEUE_DRIVER, a.driver),
            (QUEUE_DEVICE, a.device),
        ] {
            self.w32(self.common + field, addr as u32);
            self.w32(self.common + field + 4, (addr >> 32) as u32);
        }
        let off = self.r16(self.common + QUEUE_NOTIFY_OFF);
        if let Some(o) = self.notify_offs.get_mut(usize::from(index)) {
            *o = off;
        }
        self.w16(self.common + QUEUE_ENABLE, 1);
        Ok(())
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.set_status(s | status::DRIVER_OK);
    }

    /// Notifies queue `index` (4.1.4.4: at notify + queue_notify_off × multiplier; an
    /// ioeventfd in plexvm).
    pub fn notify(&self, index: u16) {
        let off = self
            .notify_offs
            .get(usize::from(index))
            .copied()
            .unwrap_or(0);
        self.w16(
            self.notify + usize::from(off) * self.notify_multiplier,
            index,
        );
    }

    /// ISR status (bit 0: used buffer, bit 1: config change); reading clears it.
    pub fn interrupt_status(&self) -> u32 {
        self.r8(self.isr).into()
    }

    /// A 32-bit device config field.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.r32(self.device + (offset & !3))
    }

    /// A 64-bit device config field under the config_generation check (2.5.1).
    pub fn config_u64(&self, offset: usize) -> Result<u64, MmioError> {
        for _ in 0..RETRIES {
            let before = self.r8(self.common + CONFIG_GENERATION);
            let low = self.config_u32(offset);
            let high = self.config_u32(offset + 4);
            if self.r8(self.common + CONFIG_GENERATION) == before {
                return Ok((u64::from(high) << 32) | u64::from(low));
            }
        }
        Err(MmioError::ConfigUnstable)
    }
}

/// Sizes BAR 0 (a 64-bit memory BAR), moves it to `WINDOW32 + slot × SLOT_SPAN` and
/// enables memory decoding and bus mastering; returns its address.
fn place_bar0(slot: u8) -> Option<usize> {
    let low = config_read(slot, 0x10);
    if low & 0x7 != 0x4 {
        return None;
    }
    let command = config_read(slot, 0x04) & 0xffff;
    config_write(slot, 0x04, command & !0x2);
    config_write(slot, 0x10, u32::MAX);
    let size = (!(config_read(slot, 0x10) & !0xf)).wrapping_add(1);
    let addr = WINDOW32 + u64::from(slot) * SLOT_SPAN;
    if size == 0 || u64::from(size) > SLOT_SPAN {
        config_write(slot, 0x10, low);
        return None;
    }
    config_write(slot, 0x10, addr as u32);
    config_write(slot, 0x14, 0);
    config_write(slot, 0x04, command | 0x6);
    Some(addr as usize)
}
