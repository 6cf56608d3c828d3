//! vCPU threads and the state machine that pauses, resumes and stops them.
//!
//! Each vCPU runs `KVM_RUN` in its own thread and dispatches port and MMIO exits to the
//! buses. A pause or stop request is a state change in [`VcpuControl`] plus a signal
//! that knocks every vCPU out of `KVM_RUN` (EINTR); the signal is repeated until every
//! vCPU has seen the new state, because one sent just before a thread enters `KVM_RUN`
//! would otherwise be lost.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, EntryPoint};
use crate::devices::bus::Bus;
use crate::devices::legacy::GuestExit;
use crate::devices::{MmioDevice, PioDevice};
use crate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// What the vCPUs should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Run guest code.
    Running,
    /// Stay outside KVM_RUN until resumed.
    Paused,
    /// Leave the thread.
    Exited,
}

#[derive(Debug)]
struct ControlState {
    requested: RunState,
    /// vCPUs currently parked in the paused state.
    parked: usize,
    /// vCPU threads that have returned.
    exited: usize,
}

/// Shared between the VM's owner and its vCPU threads.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl VcpuControl {
    fn new() -> Self {
        VcpuControl {
            state: Mutex::new(ControlState {
                requested: RunState::Running,
                parked: 0,
                exited: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state last requested.
    pub fn requested(&self) -> RunState {
        self.lock().requested
    }

    /// Waits in a vCPU thread while paused; returns false when the thread must exit.
    fn wait_runnable(&self) -> bool {
        let mut st = self.lock();
        let mut parked = false;
        loop {
            match st.requested {
                RunState::Running => break,
                RunState::Exited => break,
                RunState::Paused => {
                    if !parked {
                        parked = true;
                        st.parked += 1;
                        self.changed.notify_all();
                    }
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        if parked {
            st.parked -= 1;
        }
        st.requested != RunState::Exited
    }

    fn thread_exited(&self) {
        self.lock().exited += 1;
        self.changed.notify_all();
    }
}

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which call.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table could not be built.
    #[error("vCPU {0}: cannot build the CPUID table")]
    Cpuid(u8),
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU {index} thread")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Everything a vCPU thread dispatches exits to.
#[derive(Debug)]
pub struct ExitHandlers {
    /// Port I/O devices.
    pub pio: Bus<dyn PioDevice>,
    /// MMIO devices.
    pub mmio: Bus<dyn MmioDevice>,
    /// Where a guest-initiated end of the VM is reported.
    pub exit: Sender<GuestExit>,
    /// Guest RAM, to show the instruction a vCPU stopped at.
    pub memory: GuestMemory,
}

/// Configures vCPU `index` of `count`; the boot vCPU (0) also gets the entry state.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    supported_cpuid: &kvm_bindings::CpuId,
    cpuid_mask: &[plexvm_protocol::spec::CpuFeature],
    entry: EntryPoint,
) -> Result<(), VcpuError> {
    let err = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    let mut cpuid = supported_cpuid.clone();
    crate::cpuid::configure(&mut cpuid, index, count, tsc_khz, cpuid_mask)
        .map_err(|_| VcpuError::Cpuid(index))?;
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    vcpu.set_msrs(&boot_msrs().map_err(|_| VcpuError::Cpuid(index))?)
        .map_err(err("KVM_SET_MSRS"))?;
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    if index == 0 {
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot::boot_sregs(sregs))
            .map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot::boot_regs(entry))
            .map_err(err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&boot::boot_fpu())
            .map_err(err("KVM_SET_FPU"))?;
    }
    Ok(())
}

/// MSRs as firmware would leave them for the 64-bit boot protocol.
fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ])
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as the MP spec's virtual-wire mode expects.
fn set_lint(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let set = |regs: &mut [std::os::raw::c_char], off: usize, mode: u32| {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
}

/// The running vCPU threads of one VM.
#[derive(Debug)]
pub struct VcpuSet {
    control: Arc<VcpuControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    count: usize,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that knocks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

impl VcpuSet {
    /// Starts one thread per vCPU.
    pub fn start(vcpus: Vec<VcpuFd>, handlers: Arc<ExitHandlers>) -> Result<VcpuSet, VcpuError> {
        // The handler does nothing: its only job is to make KVM_RUN return EINTR.
        let _ = register_signal_handler(kick_signal(), kick_handler);
        let control = Arc::new(VcpuControl::new());
        let mut threads = Vec::with_capacity(vcpus.len());
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let index = i as u8;
            let control = control.clone();
            let handlers = handlers.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    run_vcpu(vcpu, index, &control, &handlers);
                    control.thread_exited();
                })
                .map_err(|source| VcpuError::Spawn { index, source })?;
            threads.push(t);
        }
        let count = threads.len();
        Ok(VcpuSet {
            control,
            threads: Mutex::new(threads),
            count,
        })
    }

    /// The shared run-state control.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            let _ = t.kill(kick_signal());
        }
    }

    /// Requests `state` and waits until every vCPU has seen it.
    pub fn set_state(&self, state: RunState) {
        let n = self.count;
        {
            let mut st = self.control.lock();
            if st.requested == RunState::Exited && state != RunState::Exited {
                return;
            }
            st.requested = state;
            self.control.changed.notify_all();
        }
        if state == RunState::Running {
            return;
        }
        loop {
            {
                let st = self.control.lock();
                let done = match state {
                    RunState::Paused => st.parked + st.exited >= n,
                    _ => st.exited >= n,
                };
                if done {
                    return;
                }
            }
            self.kick_all();
            let st = self.control.lock();
            let _ = self
                .control
                .changed
                .wait_timeout(st, Duration::from_millis(2));
        }
    }

    /// Stops all vCPUs and joins their threads.
    pub fn stop(&self) {
        self.set_state(RunState::Exited);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn run_vcpu(mut vcpu: VcpuFd, index: u8, control: &VcpuControl, handlers: &ExitHandlers) {
    while control.wait_runnable() {
        let outcome = match vcpu.run() {
            Ok(exit) => handle_exit(exit, handlers),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(GuestExit::Error(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        };
        if let Some(mut end) = outcome {
            if let GuestExit::Error(msg) = &mut end {
                describe_fault(&mut vcpu, &handlers.memory, msg);
            }
            let _ = handlers.exit.send(end);
            return;
        }
    }
}

fn handle_exit(exit: VcpuExit<'_>, h: &ExitHandlers) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoOut(port, data) => {
            h.pio
                .with_device(u64::from(port), |d, off| d.pio_write(off as u16, data));
        }
        VcpuExit::IoIn(port, data) => {
            if h.pio
                .with_device(u64::from(port), |d, off| d.pio_read(off as u16, data))
                .is_none()
            {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            h.mmio.with_device(addr, |d, off| d.mmio_write(off, data));
        }
        VcpuExit::MmioRead(addr, data) => {
            if h.mmio
                .with_device(addr, |d, off| d.mmio_read(off, data))
                .is_none()
            {
                data.fill(0);
            }
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        VcpuExit::Shutdown => return Some(GuestExit::TripleFault),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                other => GuestExit::Error(format!("unexpected KVM system event {other}")),
            })
        }
        VcpuExit::InternalError => {
            return Some(GuestExit::Error(
                "KVM internal error (an instruction KVM cannot emulate?)".into(),
            ))
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(GuestExit::Error(format!(
                "KVM entry failed: reason {reason:#x} on cpu {cpu}"
            )))
        }
        other => return Some(GuestExit::Error(format!("unexpected vCPU exit {other:?}"))),
    }
    None
}

/// Adds RIP, CPL, the instruction bytes there and KVM's internal-error suberror to an
/// error message, so that "an instruction KVM cannot emulate" names the instruction.
fn describe_fault(vcpu: &mut VcpuFd, memory: &GuestMemory, msg: &mut String) {
    if vcpu.get_kvm_run().exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: exit_reason says the `internal` member of the union is the valid one.
        let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
        msg.push_str(&format!(" (suberror {suberror})"));
    }
    let Ok(regs) = vcpu.get_regs() else { return };
    msg.push_str(&format!(" at RIP {:#x}", regs.rip));
    if let Ok(sregs) = vcpu.get_sregs() {
        msg.push_str(&format!(" CPL {}", sregs.cs.dpl));
    }
    let gpa = vcpu
        .translate_gva(regs.rip)
        .ok()
        .filter(|t| t.valid != 0)
        .map(|t| t.physical_address);
    let mut bytes = [0u8; 15];
    if let Some(gpa) = gpa {
        if memory.read_slice(&mut bytes, GuestAddress(gpa)).is_ok() {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            msg.push_str(&format!(", instruction bytes {}", hex.join(" ")));
            if bytes.starts_with(&[0xf0, 0x48, 0x0f, 0xc7])
                || bytes.starts_with(&[0x48, 0x0f, 0xc7])
            {
                msg.push_str(" (cmpxchg16b: add cpuid_mask = [\"cx16\"] to the spec)");
            }
        }
    }
}
