//! MSI-X (PCI 3.0 section 6.8.2): the vector table and Pending Bit Array of one function,
//! and the VM-wide KVM GSI routing table that turns a vector's message into an interrupt.
//!
//! Table rules: entries are 16 bytes (message address low/high, data, vector control);
//! software uses aligned 4- or 8-byte accesses, anything else is dropped (reads 0);
//! reserved vector-control bits read 0 and ignore writes; the PBA is read-only. Every
//! entry starts masked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// The IOAPIC's pins: GSIs below this are KVM's default irqchip routes.
const IRQCHIP_GSIS: u32 = 24;
/// The last GSI handed to MSI vectors (KVM_MAX_IRQ_ROUTES is 4096).
const LAST_MSI_GSI: u32 = 4095;

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    /// The message as KVM takes it.
    pub fn message(&self) -> (u64, u32) {
        (
            (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            self.data,
        )
    }
}

/// What a table write changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableChange {
    /// Nothing (a dropped or no-op write).
    None,
    /// The message (address or data) of this vector.
    Message(usize),
    /// The mask bit of this vector.
    Mask(usize),
}

/// A function's MSI-X table, PBA and Message Control bits.
#[derive(Debug, Clone)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    /// Message Control bit 15.
    pub enabled: bool,
    /// Message Control bit 14.
    pub function_masked: bool,
}

/// Whether an access of `len` bytes at `offset` is an aligned DWORD or QWORD inside
/// `size` bytes.
fn aligned_within(offset: u64, len: usize, size: u64) -> bool {
    matches!(len, 4 | 8)
        && offset % len as u64 == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
}

impl MsixTable {
    /// `vectors` masked entries (1..=2048).
    pub fn new(vectors: usize) -> Self {
        MsixTable {
            entries: vec![MsixEntry::default(); vectors],
            pending: vec![0; vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
        }
    }

    /// Table size.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the table.
    pub fn table_bytes(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the PBA (whole QWORDs).
    pub fn pba_bytes(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Entry `v`.
    pub fn entry(&self, v: usize) -> Option<MsixEntry> {
        self.entries.get(v).copied()
    }

    /// Whether vector `v` may not be signalled now: MSI-X off, the function masked, the
    /// entry masked, or no such entry.
    pub fn is_masked(&self, v: usize) -> bool {
        !self.enabled
            || self.function_masked
            || self
                .entries
                .get(v)
                .is_none_or(|e| e.control & VECTOR_MASKED != 0)
    }

    /// Sets vector `v`'s pending bit.
    pub fn set_pending(&mut self, v: usize) {
        if let Some(word) = self.pending.get_mut(v / 64) {
            *word |= 1 << (v % 64);
        }
    }

    /// Clears vector `v`'s pending bit; returns whether it was set.
    pub fn take_pending(&mut self, v: usize) -> bool {
        match self.pending.get_mut(v / 64) {
            Some(word) => {
                let bit = 1 << (v % 64);
                let was = *word & bit != 0;
                *word &= !bit;
                was
            }
            None => false,
        }
    }

    /// A guest read of the table; `false` when the access was dropped.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        if !aligned_within(offset, data.len(), self.table_bytes()) {
            return false;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let e = &self.entries[(at / ENTRY_SIZE) as usize];
            let v = match at % ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        true
    }

    /// A guest write to the table: what changed, or `None` when the access was dropped.
    /// A QWORD write touching two fields reports the last change (message before mask).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<TableChange> {
        if !aligned_within(offset, data.len(), self.table_bytes()) {
            return None;
        }
        let mut change = TableChange::None;
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let v = (at / ENTRY_SIZE) as usize;
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.entries[v];
            let field = match at % ENTRY_SIZE {
                0 => &mut e.addr_lo,
                4 => &mut e.addr_hi,
                8 => &mut e.data,
                _ => {
                    // Only the mask bit is defined; the rest is reserved (reads 0).
                    let masked = value & VECTOR_MASKED;
                    if e.control != masked {
                        e.control = masked;
                        change = TableChange::Mask(v);
                    }
                    continue;
                }
            };
            if *field != value {
                *field = value;
                change = TableChange::Message(v);
            }
        }
        Some(change)
    }

    /// A guest read of the PBA; `false` when the access was dropped.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        if !aligned_within(offset, data.len(), self.pba_bytes()) {
            return false;
        }
        let bytes: Vec<u8> = self.pending.iter().flat_map(|w| w.to_le_bytes()).collect();
        let at = offset as usize;
        data.copy_from_slice(&bytes[at..at + data.len()]);
        true
    }

    /// Message Control was written: returns the vectors that became deliverable (for
    /// their pending bits to be sent).
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) -> Vec<usize> {
        let before: Vec<bool> = (0..self.len()).map(|v| self.is_masked(v)).collect();
        self.enabled = enabled;
        self.function_masked = function_masked;
        (0..self.len())
            .filter(|&v| before[v] && !self.is_masked(v))
            .collect()
    }

    /// Function reset: every entry masked and zero, nothing pending, MSI-X off.
    pub fn reset(&mut self) {
        *self = MsixTable::new(self.len());
    }
}

/// Errors of the routing table.
#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    /// No GSI left for another vector.
    #[error("no GSI left for an MSI vector")]
    NoGsi(#[source] vm_allocator::Error),
    /// KVM refused the routing table, an irqfd or a message.
    #[error("KVM ioctl {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The VM's GSI routing table: KVM's default irqchip routes (GSIs 0..23, kept because
/// KVM_SET_GSI_ROUTING replaces the whole table) plus one MSI route per vector.
#[derive(Debug)]
pub struct MsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

#[derive(Debug)]
struct RouterState {
    gsis: IdAllocator,
    routes: BTreeMap<u32, (u64, u32)>,
}

impl MsiRouter {
    /// A router for `vm` (which has its in-kernel irqchip).
    pub fn new(vm: Arc<VmFd>) -> Self {
        // The range is valid (24 <= 4095): IdAllocator::new cannot fail on it.
        let gsis = IdAllocator::new(IRQCHIP_GSIS, LAST_MSI_GSI)
            .unwrap_or_else(|_| unreachable!("a valid GSI range"));
        MsiRouter {
            vm,
            state: Mutex::new(RouterState {
                gsis,
                routes: BTreeMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM fd.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// A GSI for a new vector (routed nowhere until [`Self::set_route`]).
    pub fn allocate_gsi(&self) -> Result<u32, MsiError> {
        self.state().gsis.allocate_id().map_err(MsiError::NoGsi)
    }

    /// Routes `gsi` to the MSI `message` (address, data) and commits the table.
    pub fn set_route(&self, gsi: u32, message: (u64, u32)) -> Result<(), MsiError> {
        let mut state = self.state();
        if state.routes.insert(gsi, message) == Some(message) {
            return Ok(());
        }
        let table = routing_table(&state.routes)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| MsiError::Kvm {
                what: "KVM_SET_GSI_ROUTING",
                source,
            })
    }

    /// Sends `message` once, now (a pending bit, a masked vector's deferred interrupt).
    pub fn signal(&self, message: (u64, u32)) -> Result<(), MsiError> {
        let msi = kvm_msi {
            address_lo: message.0 as u32,
            address_hi: (message.0 >> 32) as u32,
            data: message.1,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(drop)
            .map_err(|source| MsiError::Kvm {
                what: "KVM_SIGNAL_MSI",
                source,
            })
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// KVM's default routes (virt/kvm/irqchip.c, arch/x86/kvm/irq_comm.c `default_routing`)
/// plus the MSI routes.
fn routing_table(routes: &BTreeMap<u32, (u64, u32)>) -> Result<KvmIrqRouting, MsiError> {
    let mut entries = Vec::new();
    for gsi in 0..IRQCHIP_GSIS {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, pic, gsi % 8));
        }
    }
    for (&gsi, &(addr, data)) in routes {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = addr as u32;
        e.u.msi.address_hi = (addr >> 32) as u32;
        e.u.msi.data = data;
        entries.push(e);
    }
    KvmIrqRouting::from_entries(&entries).map_err(|_| MsiError::Kvm {
        what: "KVM_SET_GSI_ROUTING (table too big)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_start_masked_and_take_aligned_dword_and_qword_writes() {
        let mut t = MsixTable::new(3);
        assert_eq!(t.table_bytes(), 48);
        assert_eq!(t.pba_bytes(), 8);
        assert!(t.is_masked(0));
        let mut b = [0u8; 4];
        assert!(t.read_table(12, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1);
        let qword = 0xfee0_0000u64.to_le_bytes();
        assert_eq!(t.write_table(16, &qword), Some(TableChange::Message(1)));
        assert_eq!(
            t.write_table(24, &[0x41, 0, 0, 0]),
            Some(TableChange::Message(1))
        );
        assert_eq!(t.write_table(28, &[0, 0, 0, 0]), Some(TableChange::Mask(1)));
        assert_eq!(t.write_table(28, &[0, 0, 0, 0]), Some(TableChange::None));
        assert_eq!(t.entry(1).unwrap().message(), (0xfee0_0000, 0x41));
        // Masked at the function level until MSI-X is enabled.
        assert!(t.is_masked(1));
        assert_eq!(t.set_control(true, false), vec![1]);
        assert!(!t.is_masked(1));
        assert!(t.is_masked(0));
    }

    #[test]
    fn table_abuse_is_dropped() {
        let mut t = MsixTable::new(2);
        let before = t.clone().entries;
        // Unaligned, odd sizes, past the end, straddling the end.
        assert_eq!(t.write_table(2, &[0xff; 4]), None);
        assert_eq!(t.write_table(0, &[0xff; 2]), None);
        assert_eq!(t.write_table(0, &[0xff; 1]), None);
        assert_eq!(t.write_table(4, &[0xff; 8]), None);
        assert_eq!(t.write_table(32, &[0xff; 4]), None);
        assert_eq!(t.write_table(u64::MAX - 3, &[0xff; 4]), None);
        assert_eq!(t.write_table(28, &[0xff; 8]), None);
        assert_eq!(t.entries, before);
        // Reserved vector-control bits stay 0.
        t.write_table(12, &u32::MAX.to_le_bytes());
        let mut b = [0xffu8; 4];
        assert!(t.read_table(12, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1);
        assert!(!t.read_table(13, &mut b));
        assert_eq!(b, [0; 4]);
        assert!(!t.read_table(32, &mut b));
    }

    #[test]
    fn pending_bits_are_read_only_and_cleared_on_delivery() {
        let mut t = MsixTable::new(65);
        assert_eq!(t.pba_bytes(), 16);
        t.set_pending(64);
        t.set_pending(1);
        t.set_pending(5000);
        let mut b = [0u8; 8];
        assert!(t.read_pba(8, &mut b));
        assert_eq!(u64::from_le_bytes(b), 1);
        assert!(t.read_pba(0, &mut b));
        assert_eq!(u64::from_le_bytes(b), 2);
        assert!(!t.read_pba(16, &mut b));
        assert!(!t.read_pba(3, &mut b[..4]));
        assert!(t.take_pending(1));
        assert!(!t.take_pending(1));
        assert!(!t.take_pending(5000));
        t.reset();
        assert!(!t.take_pending(64));
        assert!(!t.enabled);
    }

    #[test]
    fn routing_table_keeps_the_irqchip_routes() {
        let mut routes = BTreeMap::new();
        routes.insert(24, (0xfee0_0000, 0x30));
        let table = routing_table(&routes).unwrap();
        let entries = table.as_slice();
        assert_eq!(entries.len(), 24 + 16 + 1);
        assert_eq!(entries.iter().filter(|e| e.gsi == 4).count(), 2);
        let msi = entries.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
    }

    #[test]
    fn router_commits_routes_and_signals_on_a_real_vm() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        // KVM_SIGNAL_MSI needs a local APIC to deliver to.
        let _vcpu = vm.create_vcpu(0).unwrap();
        let router = MsiRouter::new(vm);
        let gsi = router.allocate_gsi().unwrap();
        assert_eq!(gsi, IRQCHIP_GSIS);
        router.set_route(gsi, (0xfee0_0000, 0x31)).unwrap();
        router.set_route(gsi, (0xfee0_0000, 0x31)).unwrap();
        let fd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        router.vm().register_irqfd(&fd, gsi).unwrap();
        router.signal((0xfee0_0000, 0x31)).unwrap();
        router.vm().unregister_irqfd(&fd, gsi).unwrap();
    }
}
