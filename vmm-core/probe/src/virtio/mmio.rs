//! The virtio-mmio transport, version 2 register layout (virtio 1.2, 4.2.2).
//!
//! Every register access is a volatile 32-bit access (4.2.2.2: "The driver MUST only
//! use 32 bit wide and aligned reads and writes to access the control registers").

use super::{status, F_VERSION_1};
use thiserror::Error;

const MAGIC_VALUE: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_STATUS: usize = 0x060;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
/// Bounded re-reads: of the status after reset, of a torn 64-bit config field.
const RETRIES: usize = 1000;

/// Transport-level failures.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MmioError {
    /// Nothing virtio at this address.
    #[error("bad magic value {0:#x}")]
    BadMagic(u32),
    /// Not the modern (version 2) interface.
    #[error("virtio-mmio version {0}, only version 2 is supported")]
    BadVersion(u32),
    /// Status did not read back 0 after reset.
    #[error("device did not reset (status {0:#x})")]
    ResetFailed(u32),
    /// The device lacks a feature the driver needs.
    #[error("device lacks required features {0:#x}")]
    MissingFeatures(u64),
    /// FEATURES_OK did not stick (virtio 1.2, 3.1.1 step 6).
    #[error("device rejected the negotiated features")]
    FeaturesRejected,
    /// Queue does not exist or is already live.
    #[error("queue {0} unavailable (QueueNumMax 0 or QueueReady already set)")]
    QueueUnavailable(u16),
    /// ConfigGeneration never settled.
    #[error("config space kept changing")]
    ConfigUnstable,
}

/// One virtio-mmio register window.
#[derive(Debug)]
pub struct MmioTransport {
    base: usize,
}

/// Where a virtqueue's three parts live (guest-physical addresses).
#[derive(Debug, Clone, Copy)]
pub struct QueueAddresses {
    /// Descriptor table.
    pub desc: u64,
    /// Available ("driver") ring.
    pub driver: u64,
    /// Used ("device") ring.
    pub device: u64,
}

impl MmioTransport {
    /// A transport at `base`.
    ///
    /// # Safety
    /// `base..base + 0x200` must be a virtio-mmio register window (or unbacked MMIO
    /// that reads harmlessly), identity mapped and owned by this transport alone.
    pub unsafe fn new(base: u64) -> Self {
        MmioTransport {
            base: base as usize,
        }
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract: the window is mapped MMIO; offsets are the
        // 4-byte aligned register offsets above, within the window.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Checks magic and version and returns the DeviceID (0 = placeholder).
    pub fn device_id(&self) -> Result<u32, MmioError> {
        let magic = self.read(MAGIC_VALUE);
        if magic != MAGIC {
            return Err(MmioError::BadMagic(magic));
        }
        let version = self.read(VERSION);
        if version != 2 {
            return Err(MmioError::BadVersion(version));
        }
        Ok(self.read(DEVICE_ID))
    }

    /// Device initialisation up to FEATURES_OK (virtio 1.2, 3.1.1 steps 1-6).
    ///
    /// Accepts `VERSION_1`, every bit of `required` (error if missing) and whatever
    /// of `optional` the device offers; returns the accepted features.
    pub fn negotiate(&mut self, required: u64, optional: u64) -> Result<u64, MmioError> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        let required = required | F_VERSION_1;
        if offered & required != required {
            self.fail();
            return Err(MmioError::MissingFeatures(required & !offered));
        }
        let accepted = required | (optional & offered);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        let wanted = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(wanted);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(MmioError::FeaturesRejected);
        }
        Ok(accepted)
    }

    fn reset(&mut self) -> Result<(), MmioError> {
        self.write(STATUS, 0);
        // 4.2.3.1: the driver waits for Status to read 0 after writing 0.
        for _ in 0..RETRIES {
            if self.status() == 0 {
                return Ok(());
            }
        }
        Err(MmioError::ResetFailed(self.status()))
    }

    fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    fn set_status(&mut self, value: u32) {
        self.write(STATUS, value);
    }

    /// Sets FAILED (virtio 1.2, 3.1.1: the driver gives up on the device).
    pub fn fail(&mut self) {
        let current = self.status();
        self.set_status(current | status::FAILED);
    }

    /// Largest size queue `index` supports (0 if it does not exist or is live).
    pub fn queue_max(&mut self, index: u16) -> u16 {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return 0;
        }
        u16::try_from(self.read(QUEUE_NUM_MAX)).unwrap_or(u16::MAX)
    }

    /// Sets up queue `index` (virtio 1.2, 4.2.3.2) and marks it ready.
    pub fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        addrs: QueueAddresses,
    ) -> Result<(), MmioError> {
        let max = self.queue_max(index);
        if max == 0 || size > max {
            return Err(MmioError::QueueUnavailable(index));
        }
        self.write(QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, addrs.desc),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, addrs.driver),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, addrs.device),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
        Ok(())
    }

    /// Sets DRIVER_OK: the device is live (virtio 1.2, 3.1.1 step 8).
    pub fn driver_ok(&mut self) {
        let current = self.status();
        self.set_status(current | status::DRIVER_OK);
    }

    /// Tells the device that queue `index` has new buffers (an ioeventfd in plexvm).
    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, u32::from(index));
    }

    /// The InterruptStatus register (bit 0: used buffer, bit 1: config change).
    pub fn interrupt_status(&self) -> u32 {
        self.read(INTERRUPT_STATUS)
    }

    /// Acknowledges interrupt bits.
    pub fn interrupt_ack(&self, bits: u32) {
        self.write(INTERRUPT_ACK, bits);
    }

    /// A 32-bit config field at byte `offset` of the device config space.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(CONFIG + (offset & !3))
    }

    /// A 64-bit config field, read as two 32-bit halves under the ConfigGeneration
    /// check (virtio 1.2, 4.2.2.2 and 2.5.1).
    pub fn config_u64(&self, offset: usize) -> Result<u64, MmioError> {
        for _ in 0..RETRIES {
            let before = self.read(CONFIG_GENERATION);
            let low = self.config_u32(offset);
            let high = self.config_u32(offset + 4);
            if self.read(CONFIG_GENERATION) == before {
                return Ok((u64::from(high) << 32) | u64::from(low));
            }
        }
        Err(MmioError::ConfigUnstable)
    }
}
