//! The KVM VM: in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, guest RAM registered
//! as KVM memory slots.
//!
//! Registering guest RAM (KVM_SET_USER_MEMORY_REGION) took 4-17 ms here whatever the
//! size (16 MiB to 1 GiB: a fixed cost in the kernel, not per page), half of a launch
//! without devices. It runs on a helper thread while the rest of the VM is built;
//! [`Vm::wait_memory_registered`] must be called before a vCPU runs.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Address of the 3-page TSS region KVM needs on Intel (below the 4 GiB boundary,
/// inside the MMIO hole, away from the virtio windows).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// One page below it: the EPT identity map page.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM ioctl {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The thread registering guest memory could not start or died.
    #[error("guest memory registration thread")]
    RegistrationThread(#[source] std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The helper thread registering guest memory, until someone waited for it.
type Registration = Mutex<Option<JoinHandle<Result<(), VmError>>>>;

/// A KVM VM with its guest memory registered (or being registered).
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemory,
    registration: Registration,
}

impl Vm {
    /// Creates the VM, its irqchip and PIT, and starts registering `memory` with KVM
    /// (see [`Vm::wait_memory_registered`]).
    pub fn new(memory: GuestMemory) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let fd = Arc::new(fd);
        let registration = {
            let (fd, memory) = (fd.clone(), memory.clone());
            std::thread::Builder::new()
                .name("kvm-memslots".into())
                .stack_size(64 * 1024)
                .spawn(move || register_memory(&fd, &memory))
                .map_err(VmError::RegistrationThread)?
        };
        let vm = Vm {
            kvm,
            fd,
            memory,
            registration: Mutex::new(Some(registration)),
        };
        // The irqchip and PIT do not depend on memory slots: created meanwhile.
        vm.fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(vm)
    }

    /// Waits until guest memory is registered with KVM; a vCPU must not run before.
    /// Later calls return at once.
    pub fn wait_memory_registered(&self) -> Result<(), VmError> {
        let handle = self
            .registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match handle.map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(VmError::RegistrationThread(std::io::Error::other(
                "the thread panicked",
            ))),
        }
    }

    /// The VM file descriptor (for vCPUs, ioeventfds, irqfds).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The thread may still be in the ioctl (a set-up error came first): let it end
        // before the mappings it hands to KVM can go away.
        let _ = self.wait_memory_registered();
    }
}

/// Registers every region of `memory` as a KVM memory slot.
fn register_memory(fd: &VmFd, memory: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, whose regions the VM
        // keeps for its whole life, so KVM never sees an unmapped host address.
        unsafe { fd.set_user_memory_region(mem_region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
