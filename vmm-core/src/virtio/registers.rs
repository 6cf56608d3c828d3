//! The virtio-mmio version 2 register file (virtio 1.2 spec, section 4.2.2) and the
//! device-status state machine (section 2.1, 3.1.1), free of side effects: everything that
//! reaches the backend or the guest's interrupt line goes through [`DeviceOps`], so the
//! rules here are unit-tested against a fake device.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::state::{DeviceState, QueueState};
use super::{status, CONFIG_SPACE_OFFSET, MMIO_WINDOW_SIZE};

/// MagicValue: "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version: 2, the modern interface; there is no legacy interface.
pub const MMIO_VERSION: u32 = 2;
/// VendorID: "pxvm" (docs/platform.md).
pub const VENDOR_ID: u32 = 0x706c_7876;
/// InterruptStatus bit 0: the device used a buffer.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit 1: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

// Register offsets (section 4.2.2, table 4.1).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;

/// What the register file needs from the device behind it.
pub trait DeviceOps {
    /// Errors of the device's operations.
    type Error: std::error::Error + 'static;

    /// Reads `data.len()` bytes of config space at `offset`.
    fn read_config(&mut self, offset: u32, data: &mut [u8]) -> Result<(), Self::Error>;
    /// Writes `data` to config space at `offset`.
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error>;
    /// Starts the device with the rings the driver made ready (DRIVER_OK); marks the queues
    /// it started in `state`.
    fn activate(&mut self, state: &mut DeviceState) -> Result<(), Self::Error>;
    /// Stops the started rings and records their next index in `state` (reset). Failures
    /// are the device's to report; the transport resets anyway.
    fn stop(&mut self, state: &mut DeviceState);
    /// The driver wrote QueueNotify through the trapping path (not the ioeventfd).
    fn queue_notify(&mut self, queue: u32);
    /// Sets `bits` in InterruptStatus and interrupts the guest.
    fn interrupt(&mut self, bits: u32);
}

/// A ring the driver made ready with parameters no device can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueSetupError {
    /// QueueNum is zero, above QueueNumMax or not a power of two (split rings, 2.7).
    #[error("queue {queue}: size {size} is not a power of two between 1 and {max}")]
    Size {
        /// Queue index.
        queue: usize,
        /// QueueNum.
        size: u16,
        /// QueueNumMax.
        max: u16,
    },
    /// A ring address breaks the alignment of section 2.7 (table 2.x).
    #[error("queue {queue}: {part} address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Queue index.
        queue: usize,
        /// Which part of the ring.
        part: &'static str,
        /// The guest-physical address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
}

/// Checks the rings the driver made ready.
pub fn validate_queues(state: &DeviceState) -> Result<(), QueueSetupError> {
    for (queue, q) in state.ready_queues() {
        if q.size == 0 || q.size > q.max_size || !q.size.is_power_of_two() {
            return Err(QueueSetupError::Size {
                queue,
                size: q.size,
                max: q.max_size,
            });
        }
        for (part, addr, align) in [
            ("descriptor table", q.desc_table, 16),
            ("available ring", q.avail_ring, 2),
            ("used ring", q.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(QueueSetupError::Misaligned {
                    queue,
                    part,
                    addr,
                    align,
                });
            }
        }
    }
    Ok(())
}

/// Kinds of guest misbehaviour, each logged once per device and then only counted
/// (STYLE.md: anything the guest can trigger is never one log line per event).
#[derive(Debug, Clone, Copy)]
enum GuestIssue {
    Access,
    Status,
    Queue,
    Features,
    Config,
    Activation,
}

#[derive(Debug, Default)]
struct GuestIssues {
    logged: u32,
    count: u64,
}

impl GuestIssues {
    fn report(&mut self, device: &str, kind: GuestIssue, what: std::fmt::Arguments<'_>) {
        self.count += 1;
        let bit = 1 << kind as u32;
        if self.logged & bit == 0 {
            self.logged |= bit;
            tracing::warn!("device {device}: {what} (further {kind:?} issues are only counted)");
        }
    }
}

/// The register file of one virtio-mmio device.
#[derive(Debug)]
pub struct MmioRegisters {
    device: String,
    device_id: u32,
    state: DeviceState,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
    interrupt_status: Arc<AtomicU32>,
    issues: GuestIssues,
}

impl MmioRegisters {
    /// The virtio device ID the registers report.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// Registers of device `device` (its id, for logs) with virtio device ID `device_id`,
    /// starting from `state`; InterruptStatus lives in `interrupt_status`, shared with
    /// whoever raises interrupts.
    pub fn new(
        device: &str,
        device_id: u32,
        state: DeviceState,
        interrupt_status: Arc<AtomicU32>,
    ) -> Self {
        MmioRegisters {
            device: device.to_string(),
            device_id,
            state,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            config_generation: 0,
            interrupt_status,
            issues: GuestIssues::default(),
        }
    }

    /// What the guest programmed.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// What the guest programmed, for replaying it to a new backend (which updates the
    /// queues' bases and started flags).
    pub fn state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    /// How many guest accesses broke a rule so far.
    pub fn guest_issue_count(&self) -> u64 {
        self.issues.count
    }

    /// A guest read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, ops: &mut impl DeviceOps, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            return self.read_config(ops, offset - CONFIG_SPACE_OFFSET, data);
        }
        if data.len() != 4 || offset % 4 != 0 {
            return self.report_access(offset, data.len());
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    /// A guest write of `data` at `offset`.
    pub fn write(&mut self, ops: &mut impl DeviceOps, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            return self.write_config(ops, offset - CONFIG_SPACE_OFFSET, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.report_access(offset, data.len());
        };
        if offset % 4 != 0 {
            return self.report_access(offset, data.len());
        }
        self.write_register(ops, offset, u32::from_le_bytes(bytes));
    }

    fn report_access(&mut self, offset: u64, len: usize) {
        self.issues.report(
            &self.device,
            GuestIssue::Access,
            format_args!("ignored a {len}-byte access to register {offset:#x}"),
        );
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.selected_queue();
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device_id,
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.state.device_features as u32,
                1 => (self.state.device_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size.into()),
            QUEUE_READY => queue.map_or(0, |q| q.ready.into()),
            INTERRUPT_STATUS => self.interrupt_status.load(Ordering::Acquire),
            STATUS => self.state.status,
            // No shared memory regions: "a length of -1" (section 4.2.2).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, ops: &mut impl DeviceOps, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => self.write_queue_setup(offset, value),
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_NOTIFY => self.write_queue_notify(ops, value),
            INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::AcqRel);
            }
            STATUS => self.write_status(ops, value),
            SHM_SEL => {}
            _ => self.issues.report(
                &self.device,
                GuestIssue::Access,
                format_args!("ignored a write to read-only or unknown register {offset:#x}"),
            ),
        }
    }

    fn selected_queue(&self) -> Option<&QueueState> {
        self.state.queues.get(self.queue_sel as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        let s = self.state.status;
        if s & status::DRIVER == 0 || s & status::FEATURES_OK != 0 {
            return self.issues.report(
                &self.device,
                GuestIssue::Features,
                format_args!("ignored DriverFeatures written with status {s:#x}"),
            );
        }
        let f = &mut self.state.driver_features;
        match self.driver_features_sel {
            0 => *f = (*f & !0xffff_ffff) | u64::from(value),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(value) << 32),
            _ => self.state.driver_features_invalid |= value != 0,
        }
    }

    /// The index of the selected queue when its set-up registers may be written: before
    /// DRIVER_OK (section 4.2.3.2) and, for size and addresses, while QueueReady is 0.
    fn writable_queue(&mut self, what: &str, need_not_ready: bool) -> Option<usize> {
        let sel = self.queue_sel;
        let s = self.state.status;
        let ok = s & status::DRIVER_OK == 0
            && self
                .state
                .queues
                .get(sel as usize)
                .is_some_and(|q| !(need_not_ready && q.ready));
        if !ok {
            self.issues.report(
                &self.device,
                GuestIssue::Queue,
                format_args!("ignored {what} of queue {sel} (status {s:#x})"),
            );
            return None;
        }
        Some(sel as usize)
    }

    fn write_queue_setup(&mut self, offset: u64, value: u32) {
        let Some(index) = self.writable_queue("a set-up write", true) else {
            return;
        };
        let q = &mut self.state.queues[index];
        let set_low = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(value);
        let set_high = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size <= q.max_size => q.size = size,
                _ => {
                    let max = q.max_size;
                    self.issues.report(
                        &self.device,
                        GuestIssue::Queue,
                        format_args!("ignored QueueNum {value} above QueueNumMax {max}"),
                    );
                }
            },
            QUEUE_DESC_LOW => set_low(&mut q.desc_table),
            QUEUE_DESC_HIGH => set_high(&mut q.desc_table),
            QUEUE_DRIVER_LOW => set_low(&mut q.avail_ring),
            QUEUE_DRIVER_HIGH => set_high(&mut q.avail_ring),
            QUEUE_DEVICE_LOW => set_low(&mut q.used_ring),
            _ => set_high(&mut q.used_ring),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        if let Some(index) = self.writable_queue("QueueReady", false) {
            self.state.queues[index].ready = value & 1 != 0;
        }
    }

    fn write_queue_notify(&mut self, ops: &mut impl DeviceOps, value: u32) {
        // Normally an ioeventfd catches this write before it exits to the core; a trapped
        // one (e.g. no ioeventfd support) is forwarded so no kick is lost.
        if self.state.activated && (value as usize) < self.state.queues.len() {
            ops.queue_notify(value);
        }
    }

    fn write_status(&mut self, ops: &mut impl DeviceOps, value: u32) {
        if value == 0 {
            return self.reset(ops);
        }
        let old = self.state.status;
        // The driver only ever adds bits (section 2.1.2); DEVICE_NEEDS_RESET is the
        // device's to set.
        let value = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if value & old != old {
            return self.report_status(old, value);
        }
        let added = value & !old;
        let mut new = value;
        if added & status::DRIVER != 0 && new & status::ACKNOWLEDGE == 0 {
            return self.report_status(old, value);
        }
        if added & status::FEATURES_OK != 0 && !self.features_acceptable(new) {
            // Section 3.1.1 step 6: the driver re-reads Status and sees FEATURES_OK unset.
            new &= !status::FEATURES_OK;
            self.report_status(old, value);
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
            self.report_status(old, value);
        }
        self.state.status = new;
        let activate = added & new & status::DRIVER_OK != 0;
        if activate && new & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0 {
            self.activate(ops);
        }
    }

    fn report_status(&mut self, old: u32, value: u32) {
        self.issues.report(
            &self.device,
            GuestIssue::Status,
            format_args!("refused status change {old:#x} -> {value:#x}"),
        );
    }

    /// FEATURES_OK may be set only after DRIVER and for a subset of the offered features
    /// (section 2.2.2).
    fn features_acceptable(&self, new_status: u32) -> bool {
        new_status & status::DRIVER != 0
            && !self.state.driver_features_invalid
            && self.state.driver_features & !self.state.device_features == 0
    }

    fn activate(&mut self, ops: &mut impl DeviceOps) {
        if let Err(e) = validate_queues(&self.state) {
            return self.fail(ops, &e);
        }
        match ops.activate(&mut self.state) {
            Ok(()) => self.state.activated = true,
            Err(e) => self.fail(ops, &e),
        }
    }

    /// The device cannot go on (its activation failed after the register write that
    /// asked for it returned): see [`Self::fail`].
    pub fn fail_device(
        &mut self,
        ops: &mut impl DeviceOps,
        err: &(dyn std::error::Error + 'static),
    ) {
        self.fail(ops, err);
    }

    /// The device cannot go on: DEVICE_NEEDS_RESET plus a configuration-change interrupt
    /// (section 2.1.2), so the driver resets it.
    fn fail(&mut self, ops: &mut impl DeviceOps, err: &(dyn std::error::Error + 'static)) {
        let mut msg = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        self.issues.report(
            &self.device,
            GuestIssue::Activation,
            format_args!("cannot start the device, it now needs a reset: {msg}"),
        );
        self.state.status |= status::DEVICE_NEEDS_RESET;
        ops.interrupt(INT_CONFIG);
    }

    /// Status 0: stop the rings and return to the initial state (section 2.4).
    fn reset(&mut self, ops: &mut impl DeviceOps) {
        if self.state.queues.iter().any(|q| q.started) {
            ops.stop(&mut self.state);
        }
        self.state.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::Release);
    }

    fn read_config(&mut self, ops: &mut impl DeviceOps, offset: u64, data: &mut [u8]) {
        let Some(offset) = self.config_range(offset, data.len()) else {
            return;
        };
        if let Err(e) = ops.read_config(offset, data) {
            data.fill(0);
            self.report_config("read", offset, data.len(), &e);
        }
    }

    fn write_config(&mut self, ops: &mut impl DeviceOps, offset: u64, data: &[u8]) {
        let Some(offset) = self.config_range(offset, data.len()) else {
            return;
        };
        if let Err(e) = ops.write_config(offset, data) {
            self.report_config("write", offset, data.len(), &e);
        }
    }

    /// The config-space offset when `len` bytes at `offset` lie inside the window.
    fn config_range(&mut self, offset: u64, len: usize) -> Option<u32> {
        let size = MMIO_WINDOW_SIZE - CONFIG_SPACE_OFFSET;
        match offset.checked_add(len as u64) {
            Some(end) if len > 0 && end <= size => u32::try_from(offset).ok(),
            _ => {
                self.issues.report(
                    &self.device,
                    GuestIssue::Config,
                    format_args!("ignored a {len}-byte config access at {offset:#x}"),
                );
                None
            }
        }
    }

    fn report_config(&mut self, what: &str, offset: u32, len: usize, e: &dyn std::fmt::Display) {
        self.issues.report(
            &self.device,
            GuestIssue::Config,
            format_args!("config {what} of {len} bytes at {offset:#x} failed: {e}"),
        );
    }
}

#[cfg(test)]
#[path = "registers_tests.rs"]
mod tests;
