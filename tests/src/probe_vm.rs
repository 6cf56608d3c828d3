//! Probe-guest VMs that run side by side (the net-echo tests need two at once, talking
//! through one switch): `plexvm run` of a spec with one virtio device, in the
//! background under a [`ChildGuard`], with its serial console in a file and, if asked,
//! its control API read over plain HTTP on the Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use plexvm_protocol::api::VmInfo;

use crate::{bin, probe_result, ChildGuard};

/// What a [`ProbeVm`] runs: the guest command line and its one device.
#[derive(Debug, Clone)]
pub struct ProbeVmSpec {
    /// VM name; also names its files in the directory (`<name>.toml`, `.serial`, ...).
    pub name: String,
    /// The probe's command line (`probe.workload=...`).
    pub cmdline: String,
    /// Guest RAM.
    pub memory_mib: u32,
    /// `id` of the device.
    pub device_id: String,
    /// `kind` of the device (`net`, `blk`).
    pub device_kind: String,
    /// The rest of the `[[device]]` table: a `socket = ...` or `exec = [...]` line.
    pub device_source: String,
    /// Whether to give the VM a control API socket (`<name>.api`).
    pub api: bool,
}

impl ProbeVmSpec {
    /// A 64 MiB probe VM with one net device `net0`, attached by `device_source`
    /// (a `socket = ...` or `exec = [...]` line).
    pub fn net(name: &str, cmdline: String, device_source: String, api: bool) -> ProbeVmSpec {
        ProbeVmSpec {
            name: name.into(),
            cmdline,
            memory_mib: 64,
            device_id: "net0".into(),
            device_kind: "net".into(),
            device_source,
            api,
        }
    }

    /// The spec file's text.
    pub fn toml(&self) -> String {
        let api = if self.api {
            format!("api_socket = \"{}.api\"\n", self.name)
        } else {
            String::new()
        };
        format!(
            "[vm]\nname = \"{n}\"\nmemory_mib = {m}\nkernel = \"probe\"\ncmdline = \"{c}\"\n\
             serial = \"file:{n}.serial\"\n{api}\n[[device]]\nid = \"{id}\"\nkind = \"{k}\"\n{s}\n",
            n = self.name,
            m = self.memory_mib,
            c = self.cmdline,
            id = self.device_id,
            k = self.device_kind,
            s = self.device_source,
        )
    }
}

/// A running `plexvm run` of the probe; killed and reaped when dropped (SIGTERM first,
/// so that the core stops and reaps the backends it spawned).
#[derive(Debug)]
pub struct ProbeVm {
    /// VM name.
    pub name: String,
    /// Directory holding its spec, serial log and core log.
    pub dir: PathBuf,
    child: Option<ChildGuard>,
}

/// How a finished VM ended.
#[derive(Debug)]
pub struct ProbeOutcome {
    /// Exit status of `plexvm`.
    pub status: ExitStatus,
    /// The fields of the probe's result line (empty when there was none).
    pub fields: Vec<(String, String)>,
    /// Serial output and core log, for failure messages.
    pub log: String,
}

impl ProbeOutcome {
    /// A field of the result line.
    pub fn get(&self, key: &str) -> Option<&str> {
        crate::field(&self.fields, key)
    }

    /// A numeric field of the result line; panics with the log when it is missing.
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {key}= in the result:\n{}", self.log))
    }
}

impl ProbeVm {
    /// Writes the spec into `dir` and starts `plexvm run` on it.
    pub fn start(dir: &Path, spec: &ProbeVmSpec) -> Result<ProbeVm> {
        let path = dir.join(format!("{}.toml", spec.name));
        std::fs::write(&path, spec.toml()).with_context(|| format!("write {}", path.display()))?;
        let stderr = std::fs::File::create(dir.join(format!("{}.stderr", spec.name)))?;
        let child = ChildGuard::spawn(
            "plexvm",
            Command::new(bin("plexvm"))
                .args(["run", &path.to_string_lossy()])
                .current_dir(dir)
                .env("PLEXVM_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
        )?;
        Ok(ProbeVm {
            name: spec.name.clone(),
            dir: dir.to_path_buf(),
            child: Some(child),
        })
    }

    /// The guest's serial output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.serial", self.name))).unwrap_or_default()
    }

    /// The core's log so far.
    pub fn core_log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.stderr", self.name))).unwrap_or_default()
    }

    /// The serial output and the core log's tail, for failure messages.
    pub fn logs(&self) -> String {
        let core = self.core_log();
        let lines: Vec<&str> = core.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!(
            "--- {} serial ---\n{}\n--- {} core log (last 30 lines) ---\n{tail}",
            self.name,
            self.serial(),
            self.name
        )
    }

    /// `GET /vm` on the VM's API socket, or `None` when it does not answer.
    pub fn info(&self) -> Option<VmInfo> {
        get_vm_info(&self.dir.join(format!("{}.api", self.name)))
    }

    /// Whether `plexvm` still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Waits up to `timeout` (a hang guard) for the VM to end.
    pub fn finish(mut self, timeout: Duration) -> Result<ProbeOutcome> {
        let mut child = self.child.take().context("VM already finished")?;
        let status = child.wait_timeout(timeout)?;
        Ok(ProbeOutcome {
            status,
            fields: probe_result(&self.serial()).unwrap_or_default(),
            log: self.logs(),
        })
    }
}

impl Drop for ProbeVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.signal(libc::SIGTERM);
            let _ = child.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// `GET /vm` on the API socket `api`, or `None` when it does not answer with 200.
pub fn get_vm_info(api: &std::path::Path) -> Option<VmInfo> {
    let mut s = UnixStream::connect(api).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then_some(())?;
    serde_json::from_str(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexvm_protocol::spec::{DeviceKind, VmSpec};

    #[test]
    fn spec_text_parses_as_a_vm_spec() {
        let spec = ProbeVmSpec {
            name: "echo".into(),
            cmdline: "probe.workload=net-echo probe.role=echo".into(),
            memory_mib: 64,
            device_id: "net0".into(),
            device_kind: "net".into(),
            device_source: "socket = \"/s\"".into(),
            api: true,
        };
        let parsed = VmSpec::parse(&spec.toml(), "test").unwrap();
        assert_eq!(parsed.vm.name, "echo");
        assert_eq!(parsed.vm.memory_mib, 64);
        assert_eq!(parsed.vm.cmdline, spec.cmdline);
        assert_eq!(parsed.vm.api_socket, Some(PathBuf::from("echo.api")));
        assert_eq!(parsed.devices.len(), 1);
        assert_eq!(parsed.devices[0].kind, DeviceKind::Net);
        assert_eq!(parsed.devices[0].socket, Some(PathBuf::from("/s")));
        let no_api = ProbeVmSpec { api: false, ..spec };
        assert_eq!(
            VmSpec::parse(&no_api.toml(), "test").unwrap().vm.api_socket,
            None
        );
    }
}
