//! The VM spec: the TOML file `plexvm run` takes.
//!
//! Parsing is strict (unknown keys are errors) and every error names the field it is
//! about in one line, because the spec is written by hand.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::device::{DeviceFields, DeviceKind, DeviceParams};

/// Highest vCPU count a spec may ask for.
pub const MAX_VCPUS: u8 = 32;
/// The `kernel` value that selects the probe guest embedded in `plexvm`.
pub const PROBE_KERNEL: &str = "probe";

/// A whole spec file as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The `[vm]` table.
    pub vm: VmConfig,
    /// The `[[device]]` tables, in the order the guest sees them.
    #[serde(default, rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
}

/// The `[vm]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// A name for logs, the API and per-VM runtime paths.
    pub name: String,
    /// Number of vCPUs, 1..=32.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// `"probe"` or a path to a kernel image.
    pub kernel: String,
    /// Kernel command line; the core appends its own entries.
    #[serde(default)]
    pub cmdline: String,
    /// Where the guest's COM1 goes.
    #[serde(default)]
    pub serial: SerialSink,
    /// Control-API socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// An initramfs to load for a Linux kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// CPU features to hide from the guest's CPUID, e.g. `["cx16"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_mask: Vec<String>,
    /// The transport of devices that do not choose one (default `"mmio"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// How the guest reaches a virtio device (docs/platform.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio: a 4 KiB window and an IOAPIC interrupt, named on the command line
    /// and in the DSDT.
    #[default]
    Mmio,
    /// virtio-pci (modern) on the PCI root bus, with MSI-X.
    Pci,
}

fn default_vcpus() -> u8 {
    1
}

/// Where serial output goes: `stdout`, `none` or `file:PATH`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialSink {
    /// The `plexvm` process's standard output.
    #[default]
    Stdout,
    /// Discarded.
    None,
    /// Appended to a file (created if missing).
    File(PathBuf),
}

impl fmt::Display for SerialSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialSink::Stdout => f.write_str("stdout"),
            SerialSink::None => f.write_str("none"),
            SerialSink::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl std::str::FromStr for SerialSink {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialSink::Stdout),
            "none" => Ok(SerialSink::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialSink::File(PathBuf::from(p))),
                _ => Err(format!(
                    "expected \"stdout\", \"none\" or \"file:PATH\", got {s:?}"
                )),
            },
        }
    }
}

impl Serialize for SerialSink {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialSink {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One `[[device]]` table: a virtio device whose backend is a vhost-user process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Unique among the VM's devices.
    pub id: String,
    /// Which virtio device the backend implements.
    pub kind: DeviceKind,
    /// Spawn this backend; the core appends `--socket <path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// Attach to a backend already listening here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// What to do when the backend goes away while the VM runs: `"always"` (the
    /// default) restarts an `exec` backend with the same arguments or reconnects to a
    /// `socket` backend when its socket comes back; `"never"` leaves the device down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Give up after this many restarts in a row that fail (the backend exits or cannot
    /// be reached before it serves). Unset: never give up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_max: Option<u32>,
    /// Per-kind fields: `tag` and `request_queues` (fs), `guest_cid` (vsock),
    /// `device_id`, `queues` and `config` (generic); see [`crate::device`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// fs: request queues besides the high-priority one (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_queues: Option<u16>,
    /// vsock: the guest's context ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u64>,
    /// generic: the virtio device ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<u32>,
    /// generic: the queues the backend serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// generic: config space bytes the core serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Vec<u8>>,
    /// Deadline of one vhost-user round trip in milliseconds (default 1000). A backend
    /// that misses it is treated as gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_timeout_ms: Option<u64>,
    /// The device counts as stalled when the guest's notifications stay unread and no
    /// request completes for this many milliseconds (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
    /// What to do with a stalled backend: `"restart"` (default for `exec`) kills and
    /// restarts it, `"wait"` (the only choice for `socket`) waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_stall: Option<StallPolicy>,
    /// `"mmio"` or `"pci"`; unset: `[vm] transport`, else `"mmio"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// The `on_stall` value of a `[[device]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StallPolicy {
    /// SIGKILL the backend, reap it, and restart it; requests in flight are
    /// resubmitted to the new one.
    Restart,
    /// Report the stall and wait for the backend to move again.
    Wait,
}

/// Default deadline of one vhost-user round trip.
pub const DEFAULT_REPLY_TIMEOUT_MS: u64 = 1000;
/// Default time without progress before a device counts as stalled.
pub const DEFAULT_STALL_MS: u64 = 1000;
/// Largest `reply_timeout_ms` and `stall_ms` accepted (an hour).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// The `restart` value of a `[[device]]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// Restart (or reconnect) the backend, with back-off, whenever it goes away.
    #[default]
    Always,
    /// Leave the device down when its backend goes away.
    Never,
}

/// A device's restart and stall policy after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartConfig {
    /// Whether to restart at all.
    pub policy: RestartPolicy,
    /// Most failed restarts in a row before giving up; `None`: no limit.
    pub max_failures: Option<u32>,
    /// Deadline of one vhost-user round trip.
    pub reply_timeout: std::time::Duration,
    /// Time without progress before the device counts as stalled.
    pub stall: std::time::Duration,
    /// What to do with a stalled backend.
    pub on_stall: StallPolicy,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            policy: RestartPolicy::Always,
            max_failures: None,
            reply_timeout: std::time::Duration::from_millis(DEFAULT_REPLY_TIMEOUT_MS),
            stall: std::time::Duration::from_millis(DEFAULT_STALL_MS),
            on_stall: StallPolicy::Restart,
        }
    }
}

/// How the core reaches a device's backend, after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendSource {
    /// Spawned by the core: program and arguments (without `--socket`).
    Exec(Vec<String>),
    /// An existing listener's socket path.
    Socket(PathBuf),
}

/// The guest kernel, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The probe guest embedded in `plexvm`.
    Probe,
    /// A kernel image file (absolute path; known to exist when the spec was checked).
    File(PathBuf),
}

/// A device after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Unique id.
    pub id: String,
    /// Virtio device kind.
    pub kind: DeviceKind,
    /// Where its backend comes from.
    pub backend: BackendSource,
    /// What happens when the backend goes away while the VM runs.
    pub restart: RestartConfig,
    /// What the frontend provides for this kind (fs tag, vsock CID, generic ID/queues).
    pub params: DeviceParams,
    /// How the guest reaches it.
    pub transport: Transport,
}

/// A checked spec with paths resolved: what the core runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfigResolved {
    /// VM name.
    pub name: String,
    /// vCPU count, 1..=32.
    pub vcpus: u8,
    /// Guest RAM in MiB, > 0.
    pub memory_mib: u64,
    /// Guest kernel.
    pub kernel: KernelSource,
    /// The user's command line (the core appends to it).
    pub cmdline: String,
    /// Serial sink with an absolute path for `file:`.
    pub serial: SerialSink,
    /// Absolute control-API socket path.
    pub api_socket: Option<PathBuf>,
    /// Absolute initramfs path (known to exist when the spec was checked).
    pub initrd: Option<PathBuf>,
    /// CPUID feature bits to clear.
    pub cpuid_mask: Vec<CpuFeature>,
    /// Devices in guest order.
    pub devices: Vec<DeviceConfig>,
    /// Folder relative paths were resolved against; backends run with it as cwd.
    pub base_dir: PathBuf,
}

/// A spec that cannot be used. `Display` is one line naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The file could not be read.
    #[error("{path}: cannot read spec: {reason}")]
    Read {
        /// Spec path.
        path: PathBuf,
        /// OS error text.
        reason: String,
    },
    /// TOML syntax or type error, unknown key, missing key.
    #[error("{location}: {message}")]
    Parse {
        /// `file:line:column`.
        location: String,
        /// What the parser said, first line only.
        message: String,
    },
    /// A field has a value that is not allowed.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted field name, e.g. `vm.vcpus` or `device[1].id`.
        field: String,
        /// Why.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl VmSpec {
    /// Parses spec text. `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<VmSpec, SpecError> {
        toml::from_str(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("{origin}:{line}:{col}")
                }
                None => origin.to_string(),
            };
            let message = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid spec")
                .to_string();
            SpecError::Parse { location, message }
        })
    }

    /// Reads, parses and validates a spec file.
    pub fn load(path: &Path) -> Result<VmConfigResolved, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let spec = VmSpec::parse(&text, &path.display().to_string())?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).map_err(|e| SpecError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        spec.resolve(&base)
    }

    /// Validates the spec and resolves relative paths against `base_dir`.
    pub fn resolve(self, base_dir: &Path) -> Result<VmConfigResolved, SpecError> {
        let vm = self.vm;
        if vm.name.is_empty() || !vm.name.chars().all(is_name_char) {
            return Err(invalid(
                "vm.name",
                format!(
                    "must be non-empty and use only letters, digits, '-', '_' and '.', got {:?}",
                    vm.name
                ),
            ));
        }
        if vm.vcpus == 0 || vm.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vm.vcpus",
                format!("must be between 1 and {MAX_VCPUS}, got {}", vm.vcpus),
            ));
        }
        if vm.memory_mib == 0 {
            return Err(invalid("vm.memory_mib", "must be greater than 0"));
        }
        if vm.memory_mib > 1 << 20 {
            return Err(invalid(
                "vm.memory_mib",
                format!("must be at most 1048576 (1 TiB), got {}", vm.memory_mib),
            ));
        }
        let kernel = resolve_kernel(&vm.kernel, base_dir)?;
        if vm.cmdline.contains('\0') || vm.cmdline.contains('\n') {
            return Err(invalid(
                "vm.cmdline",
                "must not contain NUL or newline characters",
            ));
        }
        let serial = match vm.serial {
            SerialSink::File(p) => SerialSink::File(base_dir.join(p)),
            other => other,
        };
        let api_socket = vm.api_socket.map(|p| base_dir.join(p));
        let initrd = match vm.initrd {
            Some(p) => Some(existing_file("vm.initrd", base_dir.join(p))?),
            None => None,
        };
        let cpuid_mask = vm
            .cpuid_mask
            .iter()
            .map(|name| {
                CpuFeature::from_name(name).ok_or_else(|| {
                    invalid(
                        "vm.cpuid_mask",
                        format!(
                            "unknown CPU feature {name:?}; known: {}",
                            CpuFeature::names().join(", ")
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let devices = resolve_devices(self.devices, base_dir, vm.transport.unwrap_or_default())?;
        Ok(VmConfigResolved {
            name: vm.name,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel,
            cmdline: vm.cmdline,
            serial,
            api_socket,
            initrd,
            cpuid_mask,
            devices,
            base_dir: base_dir.to_path_buf(),
        })
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn resolve_kernel(kernel: &str, base_dir: &Path) -> Result<KernelSource, SpecError> {
    if kernel == PROBE_KERNEL {
        return Ok(KernelSource::Probe);
    }
    if kernel.is_empty() {
        return Err(invalid(
            "vm.kernel",
            "must be \"probe\" or a path to a kernel image",
        ));
    }
    existing_file("vm.kernel", base_dir.join(kernel)).map(KernelSource::File)
}

fn existing_file(field: &str, path: PathBuf) -> Result<PathBuf, SpecError> {
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(invalid(
            field,
            format!("{}: not a regular file", path.display()),
        )),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidReg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A CPU feature a spec may hide with `cpuid_mask` (Intel SDM vol. 2A, CPUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeature {
    /// Name as written in specs (Linux /proc/cpuinfo spelling).
    pub name: &'static str,
    /// CPUID leaf (EAX input); subleaf 0.
    pub leaf: u32,
    /// Output register.
    pub reg: CpuidReg,
    /// Bit in that register.
    pub bit: u8,
}

const fn feature(name: &'static str, leaf: u32, reg: CpuidReg, bit: u8) -> CpuFeature {
    CpuFeature {
        name,
        leaf,
        reg,
        bit,
    }
}

/// Features `cpuid_mask` knows. `cx16` is the one these machines' nested KVM needs
/// masked: `lock cmpxchg16b` at CPL0 cannot be emulated there (DESIGN.md).
const CPU_FEATURES: &[CpuFeature] = &[
    feature("cx16", 1, CpuidReg::Ecx, 13),
    feature("pcid", 1, CpuidReg::Ecx, 17),
    feature("x2apic", 1, CpuidReg::Ecx, 21),
    feature("movbe", 1, CpuidReg::Ecx, 22),
    feature("xsave", 1, CpuidReg::Ecx, 26),
    feature("avx", 1, CpuidReg::Ecx, 28),
    feature("rdrand", 1, CpuidReg::Ecx, 30),
    feature("fsgsbase", 7, CpuidReg::Ebx, 0),
    feature("avx2", 7, CpuidReg::Ebx, 5),
    feature("smep", 7, CpuidReg::Ebx, 7),
    feature("invpcid", 7, CpuidReg::Ebx, 10),
    feature("avx512f", 7, CpuidReg::Ebx, 16),
    feature("rdseed", 7, CpuidReg::Ebx, 18),
    feature("smap", 7, CpuidReg::Ebx, 20),
    feature("pku", 7, CpuidReg::Ecx, 3),
    feature("la57", 7, CpuidReg::Ecx, 16),
    feature("pdpe1gb", 0x8000_0001, CpuidReg::Edx, 26),
    feature("rdtscp", 0x8000_0001, CpuidReg::Edx, 27),
];

impl CpuFeature {
    /// Looks a feature up by name.
    pub fn from_name(name: &str) -> Option<CpuFeature> {
        CPU_FEATURES.iter().copied().find(|f| f.name == name)
    }

    /// All known names.
    pub fn names() -> Vec<&'static str> {
        CPU_FEATURES.iter().map(|f| f.name).collect()
    }
}

fn resolve_devices(
    devices: Vec<DeviceSpec>,
    base_dir: &Path,
    default_transport: Transport,
) -> Result<Vec<DeviceConfig>, SpecError> {
    let mut out: Vec<DeviceConfig> = Vec::with_capacity(devices.len());
    for (i, d) in devices.into_iter().enumerate() {
        let field = |name: &str| format!("device[{i}].{name}");
        if d.id.is_empty() || !d.id.chars().all(is_name_char) {
            return Err(invalid(
                field("id"),
                format!(
                    "must be non-empty and use only letters, digits, '-', '_' and '.', got {:?}",
                    d.id
                ),
            ));
        }
        if out.iter().any(|o| o.id == d.id) {
            return Err(invalid(
                field("id"),
                format!("duplicate device id {:?}", d.id),
            ));
        }
        let backend = match (d.exec, d.socket) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("device[{i}] ({})", d.id),
                    "give either `exec` or `socket`, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    format!("device[{i}] ({})", d.id),
                    "needs `exec` (spawn a backend) or `socket` (attach to one)",
                ))
            }
            (Some(argv), None) => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(invalid(field("exec"), "must name a program"));
                }
                BackendSource::Exec(argv)
            }
            (None, Some(sock)) => {
                if sock.as_os_str().is_empty() {
                    return Err(invalid(field("socket"), "must be a path"));
                }
                BackendSource::Socket(base_dir.join(sock))
            }
        };
        let mut restart = resolve_restart(d.restart, d.restart_max, &field)?;
        restart.reply_timeout = millis(
            d.reply_timeout_ms,
            DEFAULT_REPLY_TIMEOUT_MS,
            &field("reply_timeout_ms"),
        )?;
        restart.stall = millis(d.stall_ms, DEFAULT_STALL_MS, &field("stall_ms"))?;
        restart.on_stall = match (&backend, d.on_stall) {
            (BackendSource::Socket(_), Some(StallPolicy::Restart)) => {
                return Err(invalid(
                    field("on_stall"),
                    "\"restart\" needs an `exec` backend: the core cannot kill a `socket` backend, so it could still complete requests after another one took over",
                ))
            }
            (BackendSource::Socket(_), _) => StallPolicy::Wait,
            (BackendSource::Exec(_), policy) => policy.unwrap_or(StallPolicy::Restart),
        };
        let fields = DeviceFields {
            tag: d.tag,
            request_queues: d.request_queues,
            guest_cid: d.guest_cid,
            device_id: d.device_id,
            queues: d.queues,
            config: d.config,
        };
        let params = crate::device::resolve_params(d.kind, fields, &field)?;
        out.push(DeviceConfig {
            id: d.id,
            kind: d.kind,
            backend,
            restart,
            params,
            transport: d.transport.unwrap_or(default_transport),
        });
    }
    Ok(out)
}

fn millis(value: Option<u64>, default: u64, field: &str) -> Result<std::time::Duration, SpecError> {
    match value.unwrap_or(default) {
        0 => Err(invalid(field, "must be at least 1")),
        ms if ms > MAX_TIMEOUT_MS => {
            Err(invalid(field, format!("must be at most {MAX_TIMEOUT_MS}")))
        }
        ms => Ok(std::time::Duration::from_millis(ms)),
    }
}

fn resolve_restart(
    policy: Option<RestartPolicy>,
    max: Option<u32>,
    field: &dyn Fn(&str) -> String,
) -> Result<RestartConfig, SpecError> {
    let policy = policy.unwrap_or_default();
    match (policy, max) {
        (RestartPolicy::Never, Some(_)) => Err(invalid(
            field("restart_max"),
            "only applies with restart = \"always\"",
        )),
        (_, Some(0)) => Err(invalid(
            field("restart_max"),
            "must be at least 1 (use restart = \"never\" for no restarts)",
        )),
        _ => Ok(RestartConfig {
            policy,
            max_failures: max,
            ..RestartConfig::default()
        }),
    }
}

/// Finds a backend program: a bare `plexvm-*` name is looked up next to the running
/// `plexvm` binary (`exe_dir`) first, then on PATH; other bare names on PATH; a name with
/// a `/` relative to `base_dir`.
pub fn resolve_program(program: &str, exe_dir: Option<&Path>, base_dir: &Path) -> Option<PathBuf> {
    if program.contains('/') {
        let p = base_dir.join(program);
        return is_executable(&p).then_some(p);
    }
    if program.starts_with("plexvm-") {
        if let Some(dir) = exe_dir {
            let p = dir.join(program);
            if is_executable(&p) {
                return Some(p);
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[vm]
name = "demo"
vcpus = 2
memory_mib = 256
kernel = "probe"
cmdline = "probe.workload=blk-verify"
serial = "file:serial.log"
api_socket = "demo.api"

[[device]]
id = "disk0"
kind = "blk"
exec = ["plexvm-blk", "--image", "disk.raw"]

[[device]]
id = "disk1"
kind = "blk"
socket = "/run/x.sock"
"#;

    fn check(text: &str) -> Result<VmConfigResolved, SpecError> {
        VmSpec::parse(text, "vm.toml")?.resolve(Path::new("/specs"))
    }

    fn err_of(text: &str) -> String {
        let e = check(text)
            .expect_err("spec should be rejected")
            .to_string();
        assert!(!e.contains('\n'), "error must be one line: {e:?}");
        e
    }

    #[test]
    fn good_spec_resolves_paths_against_its_folder() {
        let c = check(GOOD).unwrap();
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.kernel, KernelSource::Probe);
        assert_eq!(c.serial, SerialSink::File("/specs/serial.log".into()));
        assert_eq!(c.api_socket, Some("/specs/demo.api".into()));
        assert_eq!(c.devices.len(), 2);
        assert_eq!(
            c.devices[0].backend,
            BackendSource::Exec(vec![
                "plexvm-blk".into(),
                "--image".into(),
                "disk.raw".into()
            ])
        );
        assert_eq!(
            c.devices[1].backend,
            BackendSource::Socket("/run/x.sock".into())
        );
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\nfoo=1\n");
        assert!(e.contains("unknown field `foo`"), "{e}");
        assert!(e.starts_with("vm.toml:5:"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = err_of("[vm]\nname=\"a\"\nkernel=\"probe\"\n");
        assert!(e.contains("memory_mib"), "{e}");
    }

    #[test]
    fn zero_vcpus_and_memory_are_rejected() {
        let e = err_of("[vm]\nname=\"a\"\nvcpus=0\nmemory_mib=1\nkernel=\"probe\"\n");
        assert!(e.starts_with("vm.vcpus:"), "{e}");
        let e = err_of("[vm]\nname=\"a\"\nvcpus=33\nmemory_mib=1\nkernel=\"probe\"\n");
        assert!(e.starts_with("vm.vcpus:"), "{e}");
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=0\nkernel=\"probe\"\n");
        assert!(e.starts_with("vm.memory_mib:"), "{e}");
    }

    #[test]
    fn negative_or_wrong_type_is_a_parse_error_naming_the_line() {
        let e = err_of("[vm]\nname=\"a\"\nvcpus=-1\nmemory_mib=1\nkernel=\"probe\"\n");
        assert!(e.starts_with("vm.toml:3:"), "{e}");
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=\"lots\"\nkernel=\"probe\"\n");
        assert!(e.starts_with("vm.toml:3:"), "{e}");
    }

    #[test]
    fn missing_kernel_file_is_named() {
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"nope/vmlinux\"\n");
        assert!(e.starts_with("vm.kernel: /specs/nope/vmlinux:"), "{e}");
    }

    #[test]
    fn device_errors_name_the_device() {
        let base = "[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\n";
        let dup = format!("{base}[[device]]\nid=\"d\"\nkind=\"blk\"\nsocket=\"s\"\n[[device]]\nid=\"d\"\nkind=\"blk\"\nsocket=\"t\"\n");
        assert!(err_of(&dup).starts_with("device[1].id: duplicate"));
        let both =
            format!("{base}[[device]]\nid=\"d\"\nkind=\"blk\"\nsocket=\"s\"\nexec=[\"x\"]\n");
        assert!(err_of(&both).contains("not both"));
        let neither = format!("{base}[[device]]\nid=\"d\"\nkind=\"blk\"\n");
        assert!(err_of(&neither).contains("needs `exec`"));
        let empty = format!("{base}[[device]]\nid=\"d\"\nkind=\"blk\"\nexec=[]\n");
        assert!(err_of(&empty).starts_with("device[0].exec:"));
        let kind = format!("{base}[[device]]\nid=\"d\"\nkind=\"gpu\"\nexec=[\"x\"]\n");
        assert!(err_of(&kind).contains("unknown variant `gpu`"));
    }

    #[test]
    fn deadlines_and_stall_policy_have_defaults_and_are_checked() {
        let base = "[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\n[[device]]\nid=\"d\"\nkind=\"blk\"\n";
        let exec = format!("{base}exec=[\"x\"]\n");
        let r = check(&exec).unwrap().devices[0].restart;
        assert_eq!(r.reply_timeout, std::time::Duration::from_millis(1000));
        assert_eq!(r.stall, std::time::Duration::from_millis(1000));
        assert_eq!(r.on_stall, StallPolicy::Restart);
        let r = check(&format!(
            "{exec}stall_ms=300\nreply_timeout_ms=50\non_stall=\"wait\"\n"
        ))
        .unwrap()
        .devices[0]
            .restart;
        assert_eq!(r.stall, std::time::Duration::from_millis(300));
        assert_eq!(r.reply_timeout, std::time::Duration::from_millis(50));
        assert_eq!(r.on_stall, StallPolicy::Wait);
        let socket = format!("{base}socket=\"s\"\n");
        assert_eq!(
            check(&socket).unwrap().devices[0].restart.on_stall,
            StallPolicy::Wait
        );
        let e = err_of(&format!("{socket}on_stall=\"restart\"\n"));
        assert!(
            e.starts_with("device[0].on_stall:") && e.contains("cannot kill"),
            "{e}"
        );
        let e = err_of(&format!("{exec}stall_ms=0\n"));
        assert!(
            e.starts_with("device[0].stall_ms: must be at least 1"),
            "{e}"
        );
        let e = err_of(&format!("{exec}reply_timeout_ms=99999999999\n"));
        assert!(
            e.starts_with("device[0].reply_timeout_ms: must be at most"),
            "{e}"
        );
        let e = err_of(&format!("{exec}on_stall=\"panic\"\n"));
        assert!(e.contains("unknown variant `panic`"), "{e}");
    }

    #[test]
    fn restart_policy_defaults_to_always_and_is_checked() {
        let c = check(GOOD).unwrap();
        assert_eq!(c.devices[0].restart, RestartConfig::default());
        assert_eq!(c.devices[0].restart.policy, RestartPolicy::Always);
        let base = "[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\n[[device]]\nid=\"d\"\nkind=\"blk\"\nsocket=\"s\"\n";
        let c = check(&format!("{base}restart=\"never\"\n")).unwrap();
        assert_eq!(c.devices[0].restart.policy, RestartPolicy::Never);
        let c = check(&format!("{base}restart=\"always\"\nrestart_max=5\n")).unwrap();
        assert_eq!(
            c.devices[0].restart,
            RestartConfig {
                policy: RestartPolicy::Always,
                max_failures: Some(5),
                on_stall: StallPolicy::Wait,
                ..RestartConfig::default()
            }
        );
        let c = check(&format!("{base}restart_max=2\n")).unwrap();
        assert_eq!(c.devices[0].restart.max_failures, Some(2));
        let e = err_of(&format!("{base}restart=\"never\"\nrestart_max=3\n"));
        assert!(e.starts_with("device[0].restart_max:"), "{e}");
        let e = err_of(&format!("{base}restart_max=0\n"));
        assert!(
            e.starts_with("device[0].restart_max: must be at least 1"),
            "{e}"
        );
        let e = err_of(&format!("{base}restart=\"sometimes\"\n"));
        assert!(e.contains("unknown variant `sometimes`"), "{e}");
        let e = err_of(&format!("{base}restart_max=-1\n"));
        assert!(e.starts_with("vm.toml:"), "{e}");
    }

    #[test]
    fn transport_defaults_to_mmio_and_vm_sets_the_default() {
        let c = check(GOOD).unwrap();
        assert!(c.devices.iter().all(|d| d.transport == Transport::Mmio));
        let vm = "[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\n";
        let dev = |id: &str, extra: &str| {
            format!("[[device]]\nid=\"{id}\"\nkind=\"blk\"\nsocket=\"s\"\n{extra}")
        };
        let text = format!("{vm}{}{}", dev("a", "transport=\"pci\"\n"), dev("b", ""));
        let c = check(&text).unwrap();
        assert_eq!(c.devices[0].transport, Transport::Pci);
        assert_eq!(c.devices[1].transport, Transport::Mmio);
        let text = format!(
            "{vm}transport=\"pci\"\n{}{}",
            dev("a", "transport=\"mmio\"\n"),
            dev("b", "")
        );
        let c = check(&text).unwrap();
        assert_eq!(c.devices[0].transport, Transport::Mmio);
        assert_eq!(c.devices[1].transport, Transport::Pci);
        let e = err_of(&format!("{vm}{}", dev("a", "transport=\"isa\"\n")));
        assert!(e.contains("unknown variant `isa`"), "{e}");
        let e = err_of(&format!("{vm}transport=1\n"));
        assert!(e.starts_with("vm.toml:"), "{e}");
    }

    #[test]
    fn cpuid_mask_names_are_checked() {
        let c = check("[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\ncpuid_mask=[\"cx16\"]\n")
            .unwrap();
        assert_eq!(c.cpuid_mask, vec![CpuFeature::from_name("cx16").unwrap()]);
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\ncpuid_mask=[\"warp\"]\n");
        assert!(
            e.starts_with("vm.cpuid_mask: unknown CPU feature \"warp\""),
            "{e}"
        );
    }

    #[test]
    fn missing_initrd_is_named() {
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\ninitrd=\"initrd.img\"\n");
        assert!(e.starts_with("vm.initrd: /specs/initrd.img:"), "{e}");
    }

    #[test]
    fn bad_serial_is_rejected() {
        let e = err_of("[vm]\nname=\"a\"\nmemory_mib=1\nkernel=\"probe\"\nserial=\"tty\"\n");
        assert!(e.contains("file:PATH"), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "[",
            "\u{0}",
            "[vm]\nname=1",
            "vm=3",
            "[[device]]\n",
            "[vm]\nname=\"\u{1f600}\"\nmemory_mib=1\nkernel=\"probe\"",
        ] {
            let _ = check(text);
        }
    }
}
