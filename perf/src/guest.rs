//! Running one VM with the probe guest: writes its spec, starts `plexvm run`, and
//! collects the guest's serial lines, each stamped with the host time since spawn
//! (`plexvm` writes serial output to its stdout line by line).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use plexvm_protocol::VmSpec;
use serde::Serialize;

use crate::process::{ChildGuard, ProcessError};

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The generated spec does not validate (a harness bug).
    #[error("generated VM spec is invalid: {0}")]
    Spec(String),
    /// Files in the work folder.
    #[error("{path}: cannot write")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM process.
    #[error("plexvm")]
    Process(#[from] ProcessError),
    /// The VM did not end in time.
    #[error("VM did not finish within {secs} s; last serial line: {last:?}; stderr: {stderr}")]
    Timeout {
        /// Seconds waited.
        secs: u64,
        /// Last line seen.
        last: String,
        /// Tail of plexvm's stderr.
        stderr: String,
    },
    /// The guest printed no result line.
    #[error("no {what} line from the guest (exit code {code:?}); last serial line: {last:?}; stderr: {stderr}")]
    NoResult {
        /// What was looked for.
        what: &'static str,
        /// plexvm's exit code.
        code: Option<i32>,
        /// Last line seen.
        last: String,
        /// Tail of plexvm's stderr.
        stderr: String,
    },
    /// A result line that does not parse.
    #[error("bad result line: {0}")]
    BadResult(String),
}

/// The guest's device (block or network, see [`VmRequest::kind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// No device at all.
    None,
    /// A backend the core spawns: program and arguments (the core adds `--socket`).
    Exec(Vec<String>),
    /// A backend already listening on this socket.
    Socket(PathBuf),
}

/// One VM to run.
#[derive(Debug, Clone)]
pub struct VmRequest {
    /// The probe's command line.
    pub cmdline: String,
    /// Its device.
    pub device: Device,
    /// The device's spec `kind` (`"blk"`, `"net"`).
    pub kind: &'static str,
    /// The device's spec `transport` (`"mmio"`, `"pci"`).
    pub transport: &'static str,
    /// Guest RAM.
    pub memory_mib: u64,
    /// Longest the VM may take.
    pub timeout: Duration,
    /// Sample the core's memory when this serial line prefix appears.
    pub sample_memory_at: Option<&'static str>,
}

/// One serial line and when the host read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    /// Time since `plexvm` was spawned.
    pub at: Duration,
    /// The line without its newline.
    pub text: String,
}

/// The core process's memory (from `/proc/PID/status`), in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemorySample {
    /// VmRSS.
    pub rss_kib: u64,
    /// RssAnon: the core's own heap, stacks, page tables of KVM structures...
    pub anon_kib: u64,
    /// RssFile: mapped files (the `plexvm` binary, shared libraries).
    pub file_kib: u64,
    /// RssShmem: guest RAM (a memfd) the guest has touched and the core mapped.
    pub shmem_kib: u64,
}

impl MemorySample {
    /// The core's overhead: resident memory that is not guest RAM.
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.shmem_kib)
    }

    /// Parses `/proc/PID/status` text.
    pub fn parse(status: &str) -> MemorySample {
        let mut sample = MemorySample::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let kib = value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            match key {
                "VmRSS" => sample.rss_kib = kib,
                "RssAnon" => sample.anon_kib = kib,
                "RssFile" => sample.file_kib = kib,
                "RssShmem" => sample.shmem_kib = kib,
                _ => {}
            }
        }
        sample
    }
}

/// What a VM run produced.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// Serial lines in order.
    pub lines: Vec<SerialLine>,
    /// plexvm's exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// The core's memory, if asked for and the line appeared.
    pub memory: Option<MemorySample>,
    /// Last lines of plexvm's stderr.
    pub stderr_tail: String,
}

impl VmOutcome {
    /// The first line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&SerialLine> {
        self.lines.iter().find(|l| l.text.starts_with(prefix))
    }

    /// The `key=value` fields of the first line starting with `prefix`.
    pub fn fields(&self, prefix: &'static str) -> Result<BTreeMap<String, String>, GuestError> {
        let line = self.line(prefix).ok_or_else(|| self.no_result(prefix))?;
        Ok(parse_fields(&line.text[prefix.len()..]))
    }

    /// The error for a missing line.
    pub fn no_result(&self, what: &'static str) -> GuestError {
        GuestError::NoResult {
            what,
            code: self.code,
            last: self
                .lines
                .last()
                .map(|l| l.text.clone())
                .unwrap_or_default(),
            stderr: self.stderr_tail.clone(),
        }
    }
}

/// `key=value` words of a line; other words are skipped.
pub fn parse_fields(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes the spec for `req` into `work` and returns its path.
fn write_spec(work: &Path, req: &VmRequest) -> Result<PathBuf, GuestError> {
    let mut vm = toml::Table::new();
    vm.insert("name".into(), "perf".into());
    vm.insert("vcpus".into(), 1.into());
    vm.insert("memory_mib".into(), (req.memory_mib as i64).into());
    vm.insert("kernel".into(), "probe".into());
    vm.insert("cmdline".into(), req.cmdline.clone().into());
    vm.insert("serial".into(), "stdout".into());
    let mut spec = toml::Table::new();
    spec.insert("vm".into(), vm.into());
    let mut device = toml::Table::new();
    device.insert("id".into(), format!("{}0", req.kind).into());
    device.insert("kind".into(), req.kind.into());
    device.insert("transport".into(), req.transport.into());
    match &req.device {
        Device::None => {}
        Device::Exec(argv) => {
            device.insert("exec".into(), argv.clone().into());
        }
        Device::Socket(path) => {
            device.insert("socket".into(), path.display().to_string().into());
        }
    }
    if req.device != Device::None {
        spec.insert("device".into(), vec![toml::Value::Table(device)].into());
    }
    let text = toml::to_string(&spec).map_err(|e| GuestError::Spec(e.to_string()))?;
    VmSpec::parse(&text, "perf spec").map_err(|e| GuestError::Spec(e.to_string()))?;
    let path = work.join("vm.toml");
    std::fs::write(&path, text).map_err(|source| GuestError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Runs one VM to its end and collects its serial output.
pub fn run_vm(plexvm: &Path, work: &Path, req: &VmRequest) -> Result<VmOutcome, GuestError> {
    let spec = write_spec(work, req)?;
    let stderr_path = work.join("plexvm.stderr");
    let stderr = File::create(&stderr_path).map_err(|source| GuestError::Io {
        path: stderr_path.clone(),
        source,
    })?;
    let mut command = Command::new(plexvm);
    command
        .arg("run")
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let spawned = Instant::now();
    let mut child = ChildGuard::spawn("plexvm", &mut command)?;
    let stdout = child.child_mut().and_then(|c| c.stdout.take());
    let (tx, rx) = channel();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((spawned.elapsed(), line)).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = spawned + req.timeout;
    let mut lines = Vec::new();
    let mut memory = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, text)) => {
                if memory.is_none() && req.sample_memory_at.is_some_and(|p| text.starts_with(p)) {
                    memory = sample_memory(child.pid());
                }
                lines.push(SerialLine { at, text });
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                child.kill();
                return Err(GuestError::Timeout {
                    secs: req.timeout.as_secs(),
                    last: lines
                        .last()
                        .map(|l: &SerialLine| l.text.clone())
                        .unwrap_or_default(),
                    stderr: tail(&stderr_path),
                });
            }
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let status = child.wait_timeout(left.max(Duration::from_secs(1)))?;
    Ok(VmOutcome {
        lines,
        code: status.and_then(|s| s.code()),
        memory,
        stderr_tail: tail(&stderr_path),
    })
}

fn sample_memory(pid: u32) -> Option<MemorySample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(MemorySample::parse(&text))
}

/// The last few lines of a log file, on one line.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_memory() {
        let f = parse_fields("workload=blk-bench status=ok iops=123 junk");
        assert_eq!(f["iops"], "123");
        assert_eq!(f.len(), 3);
        let m = MemorySample::parse(
            "Name:\tplexvm\nVmRSS:\t  140000 kB\nRssAnon:\t 2000 kB\nRssFile:\t 4000 kB\nRssShmem:\t134000 kB\n",
        );
        assert_eq!(
            (m.rss_kib, m.anon_kib, m.file_kib, m.shmem_kib),
            (140000, 2000, 4000, 134000)
        );
        assert_eq!(m.overhead_kib(), 6000);
    }

    #[test]
    fn spec_validates() {
        let dir = tempfile::tempdir().unwrap();
        for device in [
            Device::None,
            Device::Exec(vec!["/bin/true".into(), "--image".into(), "x".into()]),
            Device::Socket(dir.path().join("s.sock")),
        ] {
            let req = VmRequest {
                cmdline: "probe.workload=blk-bench probe.qd=4".into(),
                device,
                kind: "blk",
                transport: "mmio",
                memory_mib: 128,
                timeout: Duration::from_secs(1),
                sample_memory_at: None,
            };
            let path = write_spec(dir.path(), &req).unwrap();
            let text = std::fs::read_to_string(path).unwrap();
            assert!(text.contains("probe.qd=4"), "{text}");
        }
    }
}
