//! Builds a VM from a checked spec and runs it until the guest ends it or it is stopped.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use plexvm_protocol::api::{RequestedState, VmInfo, VmState};
use plexvm_protocol::spec::{KernelSource, SerialSink, VmConfigResolved};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::devices::bus::Bus;
use crate::devices::legacy::{self, ExitPort, ExitSender, GuestExit, IrqLine, SerialPort, I8042};
use crate::devices::serial_buffer::{line_buffered, SerialFlusher};
use crate::devices::{MmioDevice, PioDevice};
use crate::memory::{create_guest_memory, MemoryError};
use crate::runtime_dir::RuntimeDir;
use crate::vcpu::{configure_vcpu, ExitHandlers, RunState, VcpuError, VcpuSet};
use crate::virtio_devices::VirtioDevices;
use crate::vm::{Vm, VmError};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The kernel image could not be read.
    #[error("vm.kernel: {path}: cannot read the kernel image")]
    KernelFile {
        /// Path from the spec.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not one the core can boot.
    #[error("vm.kernel: {path}: not a bootable kernel")]
    KernelImage {
        /// Path from the spec (or "probe").
        path: PathBuf,
        /// Loader error.
        #[source]
        source: BootError,
    },
    /// The initramfs could not be read.
    #[error("vm.initrd: {path}: cannot read the initramfs")]
    InitrdFile {
        /// Path from the spec.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs could not be placed.
    #[error("vm.initrd: {path}: cannot load the initramfs")]
    InitrdImage {
        /// Path from the spec.
        path: PathBuf,
        /// Cause.
        #[source]
        source: BootError,
    },
    /// Boot structures could not be written.
    #[error("cannot set up the boot structures")]
    Boot(#[source] BootError),
    /// Guest RAM could not be created.
    #[error("cannot create guest memory")]
    Memory(#[source] MemoryError),
    /// The KVM VM could not be created.
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    /// A vCPU could not be set up.
    #[error("cannot set up the vCPUs")]
    Vcpu(#[source] VcpuError),
    /// A platform device could not be set up.
    #[error("cannot set up {what}")]
    Device {
        /// Which device.
        what: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A virtio device or its backend could not be set up.
    #[error("cannot set up the virtio devices")]
    Devices(#[source] crate::virtio_devices::DeviceSetupError),
    /// The serial output file could not be opened.
    #[error("vm.serial: {path}: cannot open")]
    SerialFile {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime folder could not be created.
    #[error("{path}: cannot create the VM's runtime folder")]
    RuntimeDir {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// Whether the error is about the user's input (spec, kernel file): exit code 2.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            RunError::KernelFile { .. }
                | RunError::KernelImage { .. }
                | RunError::InitrdFile { .. }
                | RunError::InitrdImage { .. }
                | RunError::SerialFile { .. }
        )
    }
}

/// Where serial output goes.
pub enum SerialOut {
    /// Standard output.
    Stdout,
    /// Discard.
    Discard,
    /// A file.
    File(File),
    /// Standard output, and a copy into a shared buffer (used by `demo`).
    Tee(Arc<Mutex<Vec<u8>>>),
}

impl std::fmt::Debug for SerialOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SerialOut::Stdout => "Stdout",
            SerialOut::Discard => "Discard",
            SerialOut::File(_) => "File",
            SerialOut::Tee(_) => "Tee",
        })
    }
}

impl SerialOut {
    /// Opens the sink named in a spec.
    pub fn from_spec(sink: &SerialSink) -> Result<SerialOut, RunError> {
        Ok(match sink {
            SerialSink::Stdout => SerialOut::Stdout,
            SerialSink::None => SerialOut::Discard,
            SerialSink::File(path) => SerialOut::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| RunError::SerialFile {
                        path: path.clone(),
                        source,
                    })?,
            ),
        })
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SerialOut::Stdout => std::io::stdout().write_all(buf)?,
            SerialOut::Discard => {}
            SerialOut::File(f) => f.write_all(buf)?,
            SerialOut::Tee(copy) => {
                copy.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(buf);
                std::io::stdout().write_all(buf)?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialOut::Stdout | SerialOut::Tee(_) => std::io::stdout().flush(),
            SerialOut::File(f) => f.flush(),
            SerialOut::Discard => Ok(()),
        }
    }
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// What ended it.
    pub exit: GuestExit,
}

impl RunOutcome {
    /// The `plexvm` process exit code.
    pub fn exit_code(&self) -> i32 {
        self.exit.exit_code()
    }
}

fn device_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |e| RunError::Device {
        what,
        source: Box::new(e),
    }
}

/// The port-I/O bus with COM1, the i8042 and the exit port, and the handle that flushes
/// COM1's line buffer.
type PlatformDevices = (Bus<dyn PioDevice>, SerialFlusher<SerialOut>);

fn platform_devices(
    vm: &Vm,
    serial: SerialOut,
    exit: &Sender<GuestExit>,
) -> Result<PlatformDevices, RunError> {
    let mut pio: Bus<dyn PioDevice> = Bus::new();
    let com1_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(device_err("COM1"))?;
    vm.fd()
        .register_irqfd(&com1_irq, legacy::COM1_IRQ)
        .map_err(|e| device_err("COM1")(std::io::Error::from_raw_os_error(e.errno())))?;
    let (serial, flusher) = line_buffered(serial).map_err(|e| RunError::Device {
        what: "COM1".into(),
        source: Box::new(e),
    })?;
    let com1: Arc<Mutex<dyn PioDevice>> =
        Arc::new(Mutex::new(SerialPort::new(IrqLine(com1_irq), serial)));
    let i8042: Arc<Mutex<dyn PioDevice>> =
        Arc::new(Mutex::new(I8042::new(ExitSender(exit.clone()))));
    let exit_port: Arc<Mutex<dyn PioDevice>> = Arc::new(Mutex::new(ExitPort(exit.clone())));
    let sleep: Arc<Mutex<dyn PioDevice>> =
        Arc::new(Mutex::new(legacy::AcpiSleepControl(exit.clone())));
    let pvpanic: Arc<Mutex<dyn PioDevice>> = Arc::new(Mutex::new(legacy::PvPanic(exit.clone())));
    let insert = |bus: &mut Bus<dyn PioDevice>, base: u16, len: u64, dev, what: &str| {
        bus.insert(u64::from(base), len, dev)
            .map_err(|e| RunError::Device {
                what: what.to_string(),
                source: Box::new(e),
            })
    };
    insert(&mut pio, legacy::COM1_BASE, 8, com1, "COM1")?;
    insert(&mut pio, legacy::I8042_BASE, 5, i8042, "i8042")?;
    insert(&mut pio, legacy::EXIT_PORT, 1, exit_port, "the exit port")?;
    insert(
        &mut pio,
        legacy::ACPI_SLEEP_PORT,
        2,
        sleep,
        "the ACPI sleep registers",
    )?;
    insert(&mut pio, legacy::PVPANIC_PORT, 1, pvpanic, "pvpanic")?;
    Ok((pio, flusher))
}

fn load_kernel(vm: &Vm, kernel: &KernelSource) -> Result<boot::LoadedKernel, RunError> {
    match kernel {
        KernelSource::Probe => {
            let mut image = std::io::Cursor::new(crate::probe::PROBE_ELF);
            boot::load_kernel(vm.memory(), &mut image).map_err(|source| RunError::KernelImage {
                path: PathBuf::from("probe"),
                source,
            })
        }
        KernelSource::File(path) => {
            let mut file = File::open(path).map_err(|source| RunError::KernelFile {
                path: path.clone(),
                source,
            })?;
            boot::load_kernel(vm.memory(), &mut file).map_err(|source| RunError::KernelImage {
                path: path.clone(),
                source,
            })
        }
    }
}

fn load_initrd(
    vm: &Vm,
    kernel: &boot::LoadedKernel,
    path: &std::path::Path,
) -> Result<(u64, u64), RunError> {
    let mut file = File::open(path).map_err(|source| RunError::InitrdFile {
        path: path.to_path_buf(),
        source,
    })?;
    boot::load_initrd(vm.memory(), kernel, &mut file).map_err(|source| RunError::InitrdImage {
        path: path.to_path_buf(),
        source,
    })
}

/// For a Linux kernel and no device on PCI: configuration mechanism #1 with only the
/// host bridge at 00:00.0 behind it, so that Linux's x86 PCI set-up finds an access
/// method (no "PCI: Fatal" line). Nothing else is there: the DSDT names no PCI root, no
/// ECAM and no BAR window, so Linux scans no bus. The probe gets `pci=off` instead.
fn bare_host_bridge(config: &VmConfigResolved) -> Option<Arc<Mutex<dyn PioDevice>>> {
    if config.kernel == KernelSource::Probe {
        return None;
    }
    let root = Arc::new(crate::pci::PciRoot::new());
    Some(Arc::new(Mutex::new(crate::pci::PciConfigIo::new(root))))
}

/// What the core appends to the user's command line: the virtio-mmio devices, and for a
/// Linux kernel the serial console and the i8042 options the platform needs; an entry
/// the user already has is not repeated.
fn core_cmdline_entries(config: &VmConfigResolved, devices: &VirtioDevices) -> Vec<String> {
    let mut extra = Vec::new();
    if config.kernel != KernelSource::Probe {
        if config.serial != SerialSink::None && !config.cmdline.contains("console=") {
            extra.push("console=ttyS0".to_string());
        }
        // Only the reset line of the i8042 is emulated (vm-superio); keep Linux's driver
        // from probing an AUX port and a multiplexer that are not there.
        extra.extend(["reboot=k", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd"].map(String::from));
    }
    // Without a device on PCI the probe is told to skip its bus scan. Linux is not told
    // `pci=off`: that skips its 0xCF8 probe, and then it prints "PCI: Fatal: No config
    // space access function found" (arch/x86/pci/init.c). It finds the bare host bridge
    // instead (`bare_host_bridge`), and with no PCI root in the DSDT scans no bus.
    if config.kernel == KernelSource::Probe && !devices.uses_pci() {
        extra.push("pci=off".to_string());
    }
    extra.extend(devices.cmdline_entries());
    let have: Vec<&str> = config.cmdline.split_whitespace().collect();
    extra.retain(|e| !have.contains(&e.as_str()));
    extra
}

/// A VM that is set up and ready to start its vCPUs.
#[derive(Debug)]
pub struct PreparedVm {
    config: VmConfigResolved,
    vm: Vm,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    handlers: Arc<ExitHandlers>,
    exits: Receiver<GuestExit>,
    exit_tx: Sender<GuestExit>,
    devices: VirtioDevices,
    serial: SerialFlusher<SerialOut>,
    _runtime_dir: RuntimeDir,
}

/// Creates the VM, its devices and backends, and loads the kernel.
pub fn prepare(config: VmConfigResolved, serial: SerialOut) -> Result<PreparedVm, RunError> {
    let runtime_dir = RuntimeDir::create(&config.name)?;
    // The backends start up (exec, load, open their image, listen) while the core sets
    // up KVM, guest memory, the kernel and the vCPUs; only then does it connect to them.
    let mut early =
        crate::backend::spawn_early(&config.devices, runtime_dir.path(), &config.base_dir)
            .map_err(|e| RunError::Devices(e.into()))?;
    let memory = create_guest_memory(config.memory_mib << 20).map_err(RunError::Memory)?;
    let vm = Vm::new(memory).map_err(RunError::Vm)?;
    let (exit_tx, exits) = channel();
    let (mut pio, serial) = platform_devices(&vm, serial, &exit_tx)?;
    let kernel = load_kernel(&vm, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(&vm, &kernel, path)?),
        None => None,
    };
    let vcpus = create_vcpus(&vm, &config, kernel.entry)?;
    let mut mmio: Bus<dyn MmioDevice> = Bus::new();
    let devices = VirtioDevices::create(&config, &vm, runtime_dir.path(), &mut mmio, &mut early)
        .map_err(RunError::Devices)?;
    drop(early);
    if let Some(config_io) = devices
        .pci_config_io()
        .or_else(|| bare_host_bridge(&config))
    {
        let (port, len) = (crate::pci::CONFIG_IO_PORT, crate::pci::CONFIG_IO_LEN);
        pio.insert(port.into(), len.into(), config_io)
            .map_err(|e| RunError::Device {
                what: "PCI configuration ports".into(),
                source: Box::new(e),
            })?;
    }
    // The command line and the ACPI tables name the devices' MMIO windows.
    let cmdline = boot::build_cmdline(&config.cmdline, &core_cmdline_entries(&config, &devices))
        .map_err(RunError::Boot)?;
    boot::write_boot_structures(vm.memory(), &cmdline, &kernel, initrd).map_err(RunError::Boot)?;
    let rsdp = crate::acpi::write_acpi_tables_with_pci(
        vm.memory(),
        config.vcpus,
        devices.windows(),
        devices.pci_layout(),
    )
    .map_err(|e| RunError::Device {
        what: "the ACPI tables".into(),
        source: Box::new(e),
    })?;
    boot::set_acpi_rsdp(vm.memory(), rsdp).map_err(RunError::Boot)?;
    vm.wait_memory_registered().map_err(RunError::Vm)?;
    let handlers = Arc::new(ExitHandlers {
        pio,
        mmio,
        exit: exit_tx.clone(),
        memory: vm.memory().clone(),
    });
    Ok(PreparedVm {
        config,
        vm,
        vcpus,
        handlers,
        exits,
        exit_tx,
        devices,
        serial,
        _runtime_dir: runtime_dir,
    })
}

/// Creates the vCPUs with their CPUID, MSRs, LAPIC and (vCPU 0) the entry state. Nothing
/// here reads guest memory, so it runs before the boot structures are written.
fn create_vcpus(
    vm: &Vm,
    config: &VmConfigResolved,
    entry: boot::EntryPoint,
) -> Result<Vec<kvm_ioctls::VcpuFd>, RunError> {
    let cpuid = vm.supported_cpuid().map_err(RunError::Vm)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for i in 0..config.vcpus {
        let vcpu = vm.fd().create_vcpu(u64::from(i)).map_err(|source| {
            RunError::Vcpu(VcpuError::Kvm {
                index: i,
                what: "KVM_CREATE_VCPU",
                source,
            })
        })?;
        configure_vcpu(&vcpu, i, config.vcpus, &cpuid, &config.cpuid_mask, entry)
            .map_err(RunError::Vcpu)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// The running VM as the control API sees it.
#[derive(Debug)]
struct Controller {
    name: String,
    vcpu_count: u8,
    memory_mib: u64,
    vcpus: Arc<VcpuSet>,
    stopped: Mutex<bool>,
    exit: Sender<GuestExit>,
    devices: Arc<VirtioDevices>,
    serial: SerialFlusher<SerialOut>,
}

impl Controller {
    fn state(&self) -> VmState {
        if *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) {
            return VmState::Stopped;
        }
        match self.vcpus.control().requested() {
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
            RunState::Exited => VmState::Stopped,
        }
    }
}

impl crate::api::VmController for Controller {
    fn info(&self) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            state: self.state(),
            vcpus: self.vcpu_count,
            memory_mib: self.memory_mib,
            pid: std::process::id(),
            devices: self.devices.info(),
        }
    }

    fn set_state(&self, requested: RequestedState) -> Result<VmInfo, crate::api::ControlError> {
        let current = self.state();
        match (current, requested) {
            (VmState::Stopped, _) => {
                return Err(crate::api::ControlError::Conflict(
                    "the VM has stopped".into(),
                ))
            }
            (VmState::Running, RequestedState::Paused) => {
                self.vcpus.set_state(RunState::Paused);
                // A paused guest's output stands still: nothing may trickle out later.
                let _ = self.serial.flush();
            }
            (VmState::Paused, RequestedState::Running) => self.vcpus.set_state(RunState::Running),
            (_, RequestedState::Stopped) => {
                *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
                let _ = self.exit.send(GuestExit::Stopped);
            }
            (state, wanted) => {
                return Err(crate::api::ControlError::Conflict(
                    format!("cannot go from {state:?} to {wanted:?}").to_lowercase(),
                ))
            }
        }
        Ok(self.info())
    }
    fn swap_backend(
        &self,
        device: &str,
        source: plexvm_protocol::api::BackendSwapRequest,
    ) -> Result<plexvm_protocol::api::DeviceInfo, crate::api::ControlError> {
        use crate::api::ControlError;
        use crate::supervisor::SupervisorError;
        if self.state() == VmState::Stopped {
            return Err(ControlError::Conflict("the VM has stopped".into()));
        }
        self.devices
            .swap_backend(device, source)
            .map_err(|e| match e {
                SupervisorError::NoDevice(_) => ControlError::NotFound(e.to_string()),
                SupervisorError::Refused { .. } | SupervisorError::Stopped => {
                    ControlError::Conflict(e.to_string())
                }
                SupervisorError::Start(_) => ControlError::Internal(e.to_string()),
            })
    }
}

impl PreparedVm {
    /// Starts the vCPUs and waits until the guest ends or the VM is stopped.
    pub fn run(self) -> Result<RunOutcome, RunError> {
        let PreparedVm {
            config,
            vm,
            vcpus,
            handlers,
            exits,
            exit_tx,
            devices,
            serial,
            _runtime_dir,
        } = self;
        let devices = Arc::new(devices);
        let signals = watch_signals(exit_tx.clone());
        let vcpus = Arc::new(VcpuSet::start(vcpus, handlers).map_err(RunError::Vcpu)?);
        let controller = Arc::new(Controller {
            name: config.name.clone(),
            vcpu_count: config.vcpus,
            memory_mib: config.memory_mib,
            vcpus: vcpus.clone(),
            stopped: Mutex::new(false),
            exit: exit_tx,
            devices: devices.clone(),
            serial,
        });
        let api = match &config.api_socket {
            Some(path) => Some(
                crate::api::server::ApiServer::start(path, controller.clone()).map_err(|e| {
                    vcpus.stop();
                    RunError::Device {
                        what: format!("the control API on {}", path.display()),
                        source: Box::new(e),
                    }
                })?,
            ),
            None => None,
        };
        let exit = exits
            .recv()
            .unwrap_or(GuestExit::Error("all vCPU threads are gone".into()));
        *controller.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        vcpus.stop();
        // Whatever the guest wrote last (a crash message without newline) goes out now,
        // even if the API server still holds the controller.
        let _ = controller.serial.flush();
        drop(api);
        drop(controller);
        // Last reference: stops the backends the core spawned and the event thread.
        drop(devices);
        if let Some(s) = signals {
            s.close();
        }
        drop(vm);
        Ok(RunOutcome { exit })
    }
}

/// Turns SIGTERM/SIGINT/SIGHUP into a clean stop (backends are killed, sockets removed).
fn watch_signals(exit: Sender<GuestExit>) -> Option<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).ok()?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = exit.send(GuestExit::Stopped);
            }
        })
        .ok()?;
    Some(handle)
}

/// Builds and runs a VM.
pub fn run(config: VmConfigResolved, serial: SerialOut) -> Result<RunOutcome, RunError> {
    prepare(config, serial)?.run()
}
