//! QEMU (Debian `qemu-system-x86`, TCG: no KVM needed) as a real frontend with a real
//! Linux driver, for checking our vhost-user backends.
//!
//! Guest RAM is a shared memfd (`memory-backend-memfd,share=on` bound to a NUMA node),
//! which vhost-user requires: the backend maps the same pages. The flags are those seen
//! to work here (shared/DESIGN.md, "How the machines here behave"): Debian's kernel
//! reaches init in about 2 s under TCG on q35 with `-nodefaults` (no option ROMs).
//! The serial console goes to a file the test reads after the guest powered off.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::ChildGuard;

/// The QEMU system emulator binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Why a guest run failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU could not be started or waited for.
    #[error("QEMU did not run to the end")]
    Run(#[source] anyhow::Error),
    /// A log file could not be created.
    #[error("cannot create {0}")]
    Log(PathBuf, #[source] std::io::Error),
}

/// Quotes a value for a QEMU option list (`,` is doubled).
pub fn opt_value(value: &Path) -> String {
    value.to_string_lossy().replace(',', ",,")
}

/// One Linux guest to boot under QEMU.
#[derive(Debug, Clone)]
pub struct QemuGuest {
    /// Kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// Initramfs (`-initrd`).
    pub initrd: PathBuf,
    /// Guest RAM in MiB (also the size of the shared memfd backend).
    pub memory_mib: u64,
    /// vCPUs (`-smp`).
    pub vcpus: u32,
    /// Appended to `console=ttyS0 panic=-1 quiet`.
    pub extra_cmdline: String,
    /// Further QEMU arguments, e.g. `-chardev socket,...` and `-device ...`.
    pub extra_args: Vec<String>,
}

impl QemuGuest {
    /// A 1-vCPU, 512 MiB guest booting `kernel` with `initrd`.
    pub fn new(kernel: &Path, initrd: &Path) -> QemuGuest {
        QemuGuest {
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            memory_mib: 512,
            vcpus: 1,
            extra_cmdline: String::new(),
            extra_args: Vec::new(),
        }
    }

    /// Adds a vhost-user-blk-pci device connected to the backend listening on `socket`.
    /// `props` are extra device properties such as `num-queues=2`.
    pub fn vhost_user_blk(&mut self, id: &str, socket: &Path, props: &[&str]) -> &mut Self {
        self.extra_args.push("-chardev".into());
        self.extra_args
            .push(format!("socket,id={id},path={}", opt_value(socket)));
        let mut device = format!("vhost-user-blk-pci,chardev={id}");
        for p in props {
            device.push(',');
            device.push_str(p);
        }
        self.extra_args.push("-device".into());
        self.extra_args.push(device);
        self
    }

    /// The full argument list; the console is written to `console`.
    pub fn args(&self, console: &Path) -> Vec<String> {
        let mem = self.memory_mib;
        let mut args: Vec<String> = [
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem0,size={mem}M,share=on"),
            "-numa".into(),
            "node,memdev=mem0".into(),
            "-chardev".into(),
            format!("file,id=console0,path={}", opt_value(console)),
            "-serial".into(),
            "chardev:console0".into(),
            "-kernel".into(),
            self.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            self.initrd.to_string_lossy().into_owned(),
            "-append".into(),
            format!("console=ttyS0 panic=-1 quiet {}", self.extra_cmdline)
                .trim_end()
                .to_string(),
        ]);
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Boots the guest and waits (at most `timeout`) for it to power off. QEMU's own
    /// messages go to `<dir>/qemu.log`, the console to `<dir>/console.log`.
    pub fn run(&self, dir: &Path, timeout: Duration) -> Result<GuestRun, QemuError> {
        let console = dir.join("console.log");
        let log_path = dir.join("qemu.log");
        let log = fs::File::create(&log_path).map_err(|e| QemuError::Log(log_path.clone(), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| QemuError::Log(log_path.clone(), e))?;
        let mut cmd = Command::new(QEMU);
        cmd.args(self.args(&console))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut guard = ChildGuard::spawn(QEMU, &mut cmd).map_err(QemuError::Run)?;
        let status = guard.wait_timeout(timeout);
        let run = GuestRun {
            status: status.as_ref().ok().copied(),
            console: fs::read_to_string(&console).unwrap_or_default(),
            qemu_log: fs::read_to_string(&log_path).unwrap_or_default(),
        };
        match status {
            Ok(_) => Ok(run),
            Err(e) => Err(QemuError::Run(e.context(run.tail(40)))),
        }
    }
}

/// What a finished guest left behind.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// QEMU's exit status (None when it had to be killed).
    pub status: Option<ExitStatus>,
    /// Everything the guest wrote to its serial console.
    pub console: String,
    /// QEMU's own stdout/stderr.
    pub qemu_log: String,
}

impl GuestRun {
    /// The last `n` console lines and QEMU's messages, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        let start = lines.len().saturating_sub(n);
        format!(
            "--- guest console (last {n} lines) ---\n{}\n--- qemu ---\n{}",
            lines[start..].join("\n"),
            self.qemu_log.trim_end()
        )
    }

    /// The `key=value` fields of the last console line that starts with `prefix`.
    pub fn result_line(&self, prefix: &str) -> Option<Vec<(String, String)>> {
        let line = self
            .console
            .lines()
            .rev()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))?;
        Some(
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Console lines starting with `prefix`, prefix removed.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .map(str::to_string)
            .collect()
    }
}

/// TCG guests are CPU-bound and this machine has 2 cores: guests of one test binary run
/// one at a time, so each gets the CPU time it was measured with.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_takes_the_last_match() {
        let run = GuestRun {
            status: None,
            console: "RESULT a=1\r\nnoise\nRESULT a=2 b=x\n".into(),
            qemu_log: String::new(),
        };
        let fields = run.result_line("RESULT ").expect("line");
        assert_eq!(fields, [("a".into(), "2".into()), ("b".into(), "x".into())]);
        assert!(run.result_line("MISSING ").is_none());
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        assert_eq!(opt_value(Path::new("/tmp/a,b")), "/tmp/a,,b");
    }
}
