//! [`VirtioPciFunction`]: the virtio-pci modern transport (virtio 1.2 spec, section 4.1),
//! without the legacy interface.
//!
//! The function does not keep device state of its own: the vhost-user device, its
//! register state machine (status, features, queues, activation, reset) and everything
//! reconnect, swap and in-flight tracking need are the same [`VirtioMmioTransport`] the
//! virtio-mmio transport uses, which the supervisor holds as for any device. The common
//! configuration structure is translated field by field into that register file; what is
//! PCI-only (MSI-X vectors, ISR, notify addresses) lives here and in [`PciInterrupts`].
//!
//! BAR 0 (64-bit, 32 KiB, in the 64-bit window):
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | common configuration (0x38 bytes) |
//! | 0x1000 | ISR status (1 byte; a read clears it) |
//! | 0x2000 | device configuration (0x100 bytes, from the backend) |
//! | 0x3000 | notify: queue q at 0x3000 + 4 q (notify_off_multiplier 4), an ioeventfd |
//! | 0x4000 | MSI-X table (queues + 1 vectors: one per queue, one for config changes) |
//! | 0x5000 | MSI-X PBA |

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use plexvm_protocol::spec::DeviceKind;
use vmm_sys_util::eventfd::EventFd;

use super::config::{offset, ConfigSpace, MemoryBar, PciIds};
use super::interrupts::{PciInterrupts, NO_VECTOR};
use super::msix::{MsiRouter, TableChange};
use super::root::PciFunction;
use super::{BarAllocator, GuestIssue, GuestIssues, PciError};
use crate::devices::MmioDevice;
use crate::virtio::VirtioMmioTransport;

/// The one BAR's size.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x100;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

/// virtio-mmio register offsets the common configuration maps onto (registers.rs).
mod mmio {
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC: u64 = 0x080;
    pub const QUEUE_DRIVER: u64 = 0x090;
    pub const QUEUE_DEVICE: u64 = 0x0a0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// virtio_pci_cap cfg_type values (4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;

/// The PCI class of each device kind (as QEMU reports them; drivers match on IDs).
fn class_of(kind: DeviceKind) -> (u8, u8, u8) {
    match kind {
        DeviceKind::Net => (0x02, 0x00, 0x00),
        DeviceKind::Blk => (0x01, 0x80, 0x00),
        DeviceKind::Console => (0x07, 0x80, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

/// A virtio_pci_cap body (4.1.4): `extra` follows it (the notify multiplier).
fn virtio_cap(cfg_type: u8, off: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        CAP_ID_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    c.extend((off as u32).to_le_bytes());
    c.extend((len as u32).to_le_bytes());
    c.extend(extra);
    c
}

/// A virtio device on the PCI bus, in front of a [`VirtioMmioTransport`].
#[derive(Debug)]
pub struct VirtioPciFunction {
    id: String,
    config: ConfigSpace,
    transport: Arc<Mutex<VirtioMmioTransport>>,
    interrupts: Arc<PciInterrupts>,
    isr: Arc<AtomicU32>,
    kicks: Vec<EventFd>,
    queue_count: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    msix_cap: usize,
    pci_cfg_cap: usize,
    /// The BAR address the notify ioeventfds are registered at.
    notify_at: Option<u64>,
    issues: GuestIssues,
}

impl VirtioPciFunction {
    /// A function for `transport` (made with [`VirtioMmioTransport::new_unwired`]), its
    /// BAR placed by `bars`, its vectors routed by `router`; registers the notify
    /// ioeventfds. Returns it and the interrupts, whose event handler goes on the
    /// core's event thread.
    pub fn new(
        transport: Arc<Mutex<VirtioMmioTransport>>,
        bars: &mut BarAllocator,
        router: Arc<MsiRouter>,
    ) -> Result<(Self, Arc<PciInterrupts>), PciError> {
        let t = transport.lock().unwrap_or_else(|e| e.into_inner());
        let id = t.id().to_string();
        let virtio_id = t.device_id();
        let queue_count = t.call_eventfds().len();
        let dup = |fds: &[EventFd]| -> Result<Vec<EventFd>, PciError> {
            fds.iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(PciError::EventFd)
        };
        let calls = dup(t.call_eventfds())?;
        let kicks = dup(t.kick_eventfds())?;
        let isr = t.interrupt().status();
        let kind = t.kind();
        drop(t);
        let interrupts = Arc::new(PciInterrupts::new(&id, router, calls, isr.clone())?);
        let bar = MemoryBar {
            size: BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        };
        let bar_addr = bars.place(bar)?;
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            // 0x1040 + device ID, revision 1: a modern-only device (4.1.2.1).
            device: 0x1040 + virtio_id as u16,
            revision: 1,
            class: class_of(kind),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar(0, bar, bar_addr)?;
        let (msix_cap, pci_cfg_cap) = add_capabilities(&mut config, queue_count + 1)?;
        transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_location(bar_addr, 0);
        let mut function = VirtioPciFunction {
            id,
            config,
            transport,
            interrupts: interrupts.clone(),
            isr,
            kicks,
            queue_count,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            msix_cap,
            pci_cfg_cap,
            notify_at: None,
            issues: GuestIssues::default(),
        };
        function.move_notify(Some(bar_addr));
        Ok((function, interrupts))
    }

    /// The BAR 0 address the firmware (the core) assigned.
    pub fn bar_address(&self) -> Option<u64> {
        self.config.bar_address(0)
    }

    fn transport(&self) -> std::sync::MutexGuard<'_, VirtioMmioTransport> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&mut self, kind: GuestIssue, what: std::fmt::Arguments<'_>) {
        self.issues.report(&self.id, kind, what);
    }

    /// How many guest accesses broke a rule.
    pub fn guest_issue_count(&self) -> u64 {
        self.issues.count()
    }

    /// Registers the notify ioeventfds at `bar` (unregistering them where they were),
    /// so a notify never exits; `None` (decoding off) leaves them where they are.
    fn move_notify(&mut self, bar: Option<u64>) {
        let Some(bar) = bar else { return };
        if self.notify_at == Some(bar) {
            return;
        }
        let vm = self.interrupts_vm();
        for (q, kick) in self.kicks.iter().enumerate() {
            let addr = NOTIFY + NOTIFY_MULTIPLIER * q as u64;
            if let Some(old) = self.notify_at {
                let _ = vm.unregister_ioevent(kick, &IoEventAddress::Mmio(old + addr), NoDatamatch);
            }
            if let Err(e) =
                vm.register_ioevent(kick, &IoEventAddress::Mmio(bar + addr), NoDatamatch)
            {
                // The trapped path below still forwards the notify.
                tracing::warn!("device {}: no ioeventfd for queue {q}: {e}", self.id);
            }
        }
        self.notify_at = Some(bar);
    }

    fn interrupts_vm(&self) -> Arc<kvm_ioctls::VmFd> {
        self.interrupts.vm()
    }
}

/// The virtio capabilities and MSI-X; returns the offsets of MSI-X and of the
/// PCI-configuration access capability.
fn add_capabilities(config: &mut ConfigSpace, vectors: usize) -> Result<(usize, usize), PciError> {
    config.add_capability(&virtio_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]), &[])?;
    let multiplier = (NOTIFY_MULTIPLIER as u32).to_le_bytes();
    let notify_len = NOTIFY_MULTIPLIER * (vectors as u64 - 1).max(1);
    config.add_capability(
        &virtio_cap(CAP_NOTIFY, NOTIFY, notify_len, &multiplier),
        &[],
    )?;
    config.add_capability(&virtio_cap(CAP_ISR, ISR, 1, &[]), &[])?;
    config.add_capability(&virtio_cap(CAP_DEVICE, DEVICE, DEVICE_LEN, &[]), &[])?;
    // VIRTIO_PCI_CAP_PCI_CFG (4.1.4.9): the driver writes bar, offset and length, then
    // reads or writes pci_cfg_data; a device MUST present one.
    let mut pci_cfg = virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
    pci_cfg[4] = 0;
    let mut wmask = vec![0u8; pci_cfg.len()];
    wmask[4] = 0xff;
    wmask[8..20].fill(0xff);
    let pci_cfg_cap = config.add_capability(&pci_cfg, &wmask)?;
    // MSI-X: table size - 1 in Message Control, table and PBA in BAR 0; the guest may
    // write only Enable (bit 15) and Function Mask (bit 14).
    let control = (vectors as u16 - 1).to_le_bytes();
    let mut msix = vec![CAP_ID_MSIX, 0, control[0], control[1]];
    msix.extend((MSIX_TABLE as u32).to_le_bytes());
    msix.extend((MSIX_PBA as u32).to_le_bytes());
    let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0])?;
    Ok((msix_cap, pci_cfg_cap))
}

impl PciFunction for VirtioPciFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn read_config(&mut self, at: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16..self.pci_cfg_cap + 20;
        if window.contains(&at) {
            return self.pci_cfg_access(data.len(), |f, bar_off| f.read_bar(0, bar_off, data));
        }
        self.config.read(at, data);
    }

    fn write_config(&mut self, at: usize, data: &[u8]) {
        let window = self.pci_cfg_cap + 16..self.pci_cfg_cap + 20;
        if window.contains(&at) {
            let data = data.to_vec();
            return self.pci_cfg_access(data.len(), |f, bar_off| f.write_bar(0, bar_off, &data));
        }
        self.config.write(at, data);
        let end = at + data.len();
        if at < self.msix_cap + 4 && end > self.msix_cap + 2 {
            self.msix_control_written();
        }
        if at < offset::BAR0 + 8 && end > offset::COMMAND {
            let bar = self.config.decoded_bar(0).map(|(a, _)| a);
            self.move_notify(bar);
        }
    }

    fn read_bar(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match off {
            COMMON..0x1000 => self.read_common(off, data),
            // Reading ISR status clears it (4.1.4.5).
            ISR => data[0] = self.isr.swap(0, Ordering::AcqRel) as u8,
            DEVICE..0x3000 => self.device_config(off - DEVICE, data.len(), |t, o| {
                t.mmio_read(mmio::CONFIG + o, data)
            }),
            MSIX_TABLE..MSIX_PBA => {
                let ok = self
                    .interrupts
                    .lock()
                    .table
                    .read_table(off - MSIX_TABLE, data);
                if !ok {
                    self.report_msix(off, data.len());
                }
            }
            MSIX_PBA..BAR_SIZE => {
                let ok = self.interrupts.lock().table.read_pba(off - MSIX_PBA, data);
                if !ok {
                    self.report_msix(off, data.len());
                }
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, off: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match off {
            COMMON..0x1000 => self.write_common(off, data),
            DEVICE..0x3000 => self.device_config(off - DEVICE, data.len(), |t, o| {
                t.mmio_write(mmio::CONFIG + o, data)
            }),
            NOTIFY..MSIX_TABLE => self.trapped_notify(off - NOTIFY),
            MSIX_TABLE..MSIX_PBA => self.write_msix_table(off - MSIX_TABLE, data),
            // ISR and the PBA are read-only.
            _ => self.report(
                GuestIssue::Virtio,
                format_args!("ignored a write to read-only BAR offset {off:#x}"),
            ),
        }
    }
}

#[path = "virtio_pci_regs.rs"]
mod regs;

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
