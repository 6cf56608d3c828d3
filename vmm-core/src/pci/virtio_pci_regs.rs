//! The register side of [`VirtioPciFunction`]: the common configuration structure
//! (virtio 1.2 spec, 4.1.4.3) translated to the virtio-mmio register file, device
//! configuration, trapped notifies, MSI-X table writes and the PCI-configuration access
//! capability.

use super::*;

// Common configuration offsets (4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// The natural width of the field at `off`; the 64-bit ring addresses may also be
/// accessed as two 32-bit halves (Linux's `vp_iowrite64_twopart`).
fn width_ok(off: u64, len: usize) -> bool {
    match off {
        DEVICE_FEATURE_SELECT | DEVICE_FEATURE | DRIVER_FEATURE_SELECT | DRIVER_FEATURE => len == 4,
        CONFIG_MSIX_VECTOR | NUM_QUEUES | QUEUE_SELECT | QUEUE_SIZE | QUEUE_MSIX_VECTOR
        | QUEUE_ENABLE | QUEUE_NOTIFY_OFF => len == 2,
        DEVICE_STATUS | CONFIG_GENERATION => len == 1,
        QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE => len == 4 || len == 8,
        0x24 | 0x2c | 0x34 => len == 4,
        _ => false,
    }
}

fn value_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

impl VirtioPciFunction {
    fn mmio_reg(&self, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport().mmio_read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn set_mmio_reg(&self, reg: u64, value: u32) {
        self.transport().mmio_write(reg, &value.to_le_bytes());
    }

    pub(super) fn read_common(&mut self, off: u64, data: &mut [u8]) {
        if !width_ok(off, data.len()) {
            return self.report_common(off, data.len());
        }
        let sel = usize::from(self.queue_select);
        let t = self.transport();
        let state = t.state();
        let queue = state.queues.get(sel);
        let value: u64 = match off {
            DEVICE_FEATURE_SELECT => self.device_feature_select.into(),
            DEVICE_FEATURE => match self.device_feature_select {
                0 => state.device_features & 0xffff_ffff,
                1 => state.device_features >> 32,
                _ => 0,
            },
            DRIVER_FEATURE_SELECT => self.driver_feature_select.into(),
            DRIVER_FEATURE => match self.driver_feature_select {
                0 => state.driver_features & 0xffff_ffff,
                1 => state.driver_features >> 32,
                _ => 0,
            },
            CONFIG_MSIX_VECTOR => self.interrupts.lock().config_vector.into(),
            NUM_QUEUES => self.queue_count as u64,
            DEVICE_STATUS => state.status.into(),
            QUEUE_SELECT => self.queue_select.into(),
            QUEUE_SIZE => queue.map_or(0, |q| q.size.into()),
            QUEUE_MSIX_VECTOR => {
                let vectors = &self.interrupts.lock().queue_vectors;
                vectors.get(sel).copied().unwrap_or(NO_VECTOR).into()
            }
            QUEUE_ENABLE => queue.map_or(0, |q| q.ready.into()),
            QUEUE_NOTIFY_OFF => (sel.min(self.queue_count)) as u64,
            QUEUE_DESC..=0x27 => queue.map_or(0, |q| q.desc_table),
            QUEUE_DRIVER..=0x2f => queue.map_or(0, |q| q.avail_ring),
            QUEUE_DEVICE..=0x37 => queue.map_or(0, |q| q.used_ring),
            _ => 0,
        };
        drop(t);
        let value = match off {
            CONFIG_GENERATION => self.mmio_reg(mmio::CONFIG_GENERATION).into(),
            0x24 | 0x2c | 0x34 => value >> 32,
            _ => value,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    pub(super) fn write_common(&mut self, off: u64, data: &[u8]) {
        if !width_ok(off, data.len()) {
            return self.report_common(off, data.len());
        }
        let value = value_of(data);
        let v32 = value as u32;
        match off {
            DEVICE_FEATURE_SELECT => {
                self.device_feature_select = v32;
                self.set_mmio_reg(mmio::DEVICE_FEATURES_SEL, v32);
            }
            DRIVER_FEATURE_SELECT => {
                self.driver_feature_select = v32;
                self.set_mmio_reg(mmio::DRIVER_FEATURES_SEL, v32);
            }
            DRIVER_FEATURE => self.set_mmio_reg(mmio::DRIVER_FEATURES, v32),
            CONFIG_MSIX_VECTOR => self.set_vector(None, value as u16),
            DEVICE_STATUS => self.write_status(v32),
            QUEUE_SELECT => {
                self.queue_select = value as u16;
                self.set_mmio_reg(mmio::QUEUE_SEL, v32);
            }
            QUEUE_SIZE => self.set_mmio_reg(mmio::QUEUE_NUM, v32),
            QUEUE_MSIX_VECTOR => self.set_vector(Some(self.queue_select.into()), value as u16),
            QUEUE_ENABLE => self.set_mmio_reg(mmio::QUEUE_READY, v32),
            QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE | 0x24 | 0x2c | 0x34 => {
                self.write_ring_address(off, data.len(), value)
            }
            _ => self.report(
                GuestIssue::Virtio,
                format_args!("ignored a write to read-only common config field {off:#x}"),
            ),
        }
    }

    fn write_ring_address(&mut self, off: u64, len: usize, value: u64) {
        let (field, high) = (off & !7, off % 8 == 4);
        let reg = match field {
            QUEUE_DESC => mmio::QUEUE_DESC,
            QUEUE_DRIVER => mmio::QUEUE_DRIVER,
            _ => mmio::QUEUE_DEVICE,
        };
        if len == 8 {
            self.set_mmio_reg(reg, value as u32);
            self.set_mmio_reg(reg + 4, (value >> 32) as u32);
        } else {
            self.set_mmio_reg(reg + if high { 4 } else { 0 }, value as u32);
        }
    }

    fn write_status(&mut self, value: u32) {
        self.set_mmio_reg(mmio::STATUS, value);
        if value == 0 {
            // Reset (4.1.4.3.1): the vectors go back to NO_VECTOR with the device.
            let i = self.interrupts.clone();
            let mut state = i.lock();
            state.config_vector = NO_VECTOR;
            state.queue_vectors.fill(NO_VECTOR);
            i.reroute(&mut state);
        }
    }

    /// config_msix_vector (`queue` None) or the selected queue's vector: a vector past
    /// the table is refused by reading back NO_VECTOR (4.1.5.1.2.1).
    fn set_vector(&mut self, queue: Option<usize>, vector: u16) {
        let i = self.interrupts.clone();
        let mut state = i.lock();
        let vector = if usize::from(vector) < state.table.len() {
            vector
        } else {
            NO_VECTOR
        };
        match queue {
            None => state.config_vector = vector,
            Some(q) => match state.queue_vectors.get_mut(q) {
                Some(v) => *v = vector,
                None => return,
            },
        }
        i.reroute(&mut state);
    }

    fn report_common(&mut self, off: u64, len: usize) {
        self.report(
            GuestIssue::Virtio,
            format_args!("ignored a {len}-byte common config access at {off:#x}"),
        );
    }

    pub(super) fn device_config(
        &mut self,
        off: u64,
        len: usize,
        f: impl FnOnce(&mut VirtioMmioTransport, u64),
    ) {
        if off + len as u64 > DEVICE_LEN {
            return self.report(
                GuestIssue::Virtio,
                format_args!("ignored a {len}-byte device config access at {off:#x}"),
            );
        }
        f(&mut self.transport(), off);
    }

    /// A notify that reached the core (its ioeventfd missing): forwarded as a
    /// virtio-mmio QueueNotify so no kick is lost.
    pub(super) fn trapped_notify(&mut self, off: u64) {
        let q = off / NOTIFY_MULTIPLIER;
        if (q as usize) < self.queue_count {
            self.set_mmio_reg(mmio::QUEUE_NOTIFY, q as u32);
        }
    }

    pub(super) fn write_msix_table(&mut self, off: u64, data: &[u8]) {
        let i = self.interrupts.clone();
        let mut state = i.lock();
        match state.table.write_table(off, data) {
            None => {
                drop(state);
                self.report_msix(MSIX_TABLE + off, data.len());
            }
            Some(TableChange::None) => {}
            Some(TableChange::Message(v)) => i.message_changed(&state, v),
            Some(TableChange::Mask(v)) => {
                i.reroute(&mut state);
                if !state.table.is_masked(v) {
                    i.send_pending(&mut state, &[v]);
                }
            }
        }
    }

    pub(super) fn report_msix(&mut self, off: u64, len: usize) {
        self.report(
            GuestIssue::Msix,
            format_args!("dropped a {len}-byte MSI-X access at BAR offset {off:#x}"),
        );
    }

    /// Message Control was written: MSI-X enable and function mask.
    pub(super) fn msix_control_written(&mut self) {
        let control = self.config.u16_at(self.msix_cap + 2);
        let i = self.interrupts.clone();
        let mut state = i.lock();
        let enabled = control & (1 << 15) != 0;
        let masked = control & (1 << 14) != 0;
        let deliverable = state.table.set_control(enabled, masked);
        i.reroute(&mut state);
        i.send_pending(&mut state, &deliverable);
    }

    /// An access to pci_cfg_data: to the BAR, offset and length the capability holds
    /// (4.1.4.9.1: bar 0 only here, length 1, 2 or 4 matching the access, aligned).
    pub(super) fn pci_cfg_access(&mut self, len: usize, f: impl FnOnce(&mut Self, u64)) {
        let cap = self.pci_cfg_cap;
        let bar = self.config.u16_at(cap + 4) as u8;
        let off = u64::from(self.config.u32_at(cap + 8));
        let cap_len = self.config.u32_at(cap + 12) as usize;
        if bar != 0 || cap_len != len || off % len as u64 != 0 || off + len as u64 > BAR_SIZE {
            return self.report(
                GuestIssue::Virtio,
                format_args!(
                    "ignored a PCI-config window access (bar {bar}, {cap_len} bytes at {off:#x})"
                ),
            );
        }
        f(self, off);
    }
}
