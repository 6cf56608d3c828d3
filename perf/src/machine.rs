//! The machine a run was made on, recorded with every result.

use std::path::Path;

use serde::Serialize;

/// CPU, kernel and virtualization facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// `model name` of the first CPU in /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// How KVM runs here: hardware, nested (hardware-assisted) or nested PVM.
    pub kvm: String,
    /// qemu-storage-daemon version, if installed.
    pub qsd_version: Option<String>,
    /// File system of the disk image folder.
    pub disk_fs: String,
}

impl Machine {
    /// Reads the facts from /proc and /sys.
    pub fn probe(disk_dir: &Path, qsd: &Path) -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Machine {
            cpu_model: cpu_model(&cpuinfo),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            memory_mib: mem_total_kib(&meminfo) / 1024,
            kvm: kvm_flavour(&cpuinfo, |m| Path::new("/sys/module").join(m).exists()),
            qsd_version: qsd_version(qsd),
            disk_fs: fs_of(disk_dir),
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string())
}

fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The KVM flavour from the CPU flags and the loaded KVM modules.
fn kvm_flavour(cpuinfo: &str, module: impl Fn(&str) -> bool) -> String {
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags")?.split_once(':'))
        .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>())
        .unwrap_or_default();
    let under_hypervisor = flags.contains(&"hypervisor");
    let flavour = if module("kvm_pvm") {
        "nested, PVM (software: guest CPL0 emulated, CPL3 native)"
    } else if module("kvm_intel") || module("kvm_amd") {
        if under_hypervisor {
            "nested, hardware-assisted (VMX/SVM)"
        } else {
            "hardware (VMX/SVM)"
        }
    } else if module("kvm") {
        "unknown KVM flavour"
    } else {
        "no KVM module loaded"
    };
    flavour.to_string()
}

fn qsd_version(qsd: &Path) -> Option<String> {
    let out = std::process::Command::new(qsd)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// File system type of `dir` (from /proc/mounts, longest matching mount point).
fn fs_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    read("/proc/mounts")
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mount, fs) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mount)
                .then(|| (mount.len(), format!("{fs} on {dev}")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".to_string(), |(_, fs)| fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours() {
        let info = "model name\t: AMD EPYC\nflags\t\t: fpu hypervisor svm\n";
        assert_eq!(cpu_model(info), "AMD EPYC");
        assert!(kvm_flavour(info, |m| m == "kvm_pvm").starts_with("nested, PVM"));
        assert!(kvm_flavour(info, |m| m == "kvm_amd").starts_with("nested, hardware"));
        let bare = "flags\t\t: fpu svm\n";
        assert!(kvm_flavour(bare, |m| m == "kvm_amd").starts_with("hardware"));
        assert_eq!(mem_total_kib("MemTotal:  2048 kB\n"), 2048);
    }
}
