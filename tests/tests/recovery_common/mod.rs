//! What the recovery tests share: a VM under test with its control API, read over plain
//! HTTP on the Unix socket, and a small pseudo-random source for kill timing.

#![allow(dead_code)] // each test binary uses a different part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use plexvm_protocol::api::{BackendState, DeviceInfo, VmInfo};
use plexvm_tests::{bin, probe_result, sha256_file, wait_for, ChildGuard};

/// Image size: big enough for many requests per pass, small enough for quick passes.
pub const DISK: u64 = 32 << 20;

/// A `plexvm run` of the probe guest with one blk device `disk0` and an API socket.
/// Dropping it stops the VM with SIGTERM first (so the backends it spawned are stopped
/// and reaped by the core), then kills it.
pub struct TestVm {
    pub dir: PathBuf,
    pub api: PathBuf,
    child: Option<ChildGuard>,
}

impl TestVm {
    /// Starts a VM in `dir` running `workload` on a device described by `device` (the
    /// `exec = ...` or `socket = ...` line plus any restart keys), and waits until the
    /// driver has activated the device.
    pub fn start(dir: &Path, workload: &str, device: &str) -> TestVm {
        let spec = dir.join("vm.toml");
        let text = format!(
            "[vm]\nname = \"recovery\"\nmemory_mib = 256\nkernel = \"probe\"\n\
             cmdline = \"{workload}\"\nserial = \"file:serial.log\"\napi_socket = \"vm.api\"\n\n\
             [[device]]\nid = \"disk0\"\nkind = \"blk\"\n{device}\n"
        );
        std::fs::write(&spec, text).unwrap();
        let stderr = std::fs::File::create(dir.join("plexvm.stderr")).unwrap();
        let child = ChildGuard::spawn(
            "plexvm",
            Command::new(bin("plexvm"))
                .args(["run", spec.to_str().unwrap()])
                .current_dir(dir)
                .env("PLEXVM_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
        )
        .unwrap();
        let vm = TestVm {
            dir: dir.to_path_buf(),
            api: dir.join("vm.api"),
            child: Some(child),
        };
        let up = wait_for(Duration::from_secs(60), || {
            vm.try_info()
                .is_some_and(|i| i.devices[0].activated && i.devices[0].state == BackendState::Up)
        });
        assert!(up, "the device never came up: {}", vm.logs());
        vm
    }

    /// `GET /vm`, or `None` when the API does not answer.
    pub fn try_info(&self) -> Option<VmInfo> {
        plexvm_tests::probe_vm::get_vm_info(&self.api)
    }

    /// The device as `GET /vm` reports it.
    pub fn disk(&self) -> DeviceInfo {
        let info = self
            .try_info()
            .unwrap_or_else(|| panic!("the API does not answer: {}", self.logs()));
        info.devices.into_iter().next().unwrap()
    }

    /// Waits until the device serves again with a backend other than `old_pid` (any
    /// backend when `old_pid` is `None`) after at least `restarts` restarts.
    pub fn wait_up(&self, restarts: u64, timeout: Duration) -> DeviceInfo {
        let mut last = None;
        let ok = wait_for(timeout, || {
            let d = self.try_info().map(|i| i.devices[0].clone());
            let done = d
                .as_ref()
                .is_some_and(|d| d.state == BackendState::Up && d.restarts >= restarts);
            last = d;
            done
        });
        assert!(
            ok,
            "device not up again after {restarts} restarts: {last:?}\n{}",
            self.logs()
        );
        last.unwrap()
    }

    /// Runs `plexvm ctl --api <api> <args>`; returns stdout, panics with stderr on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(bin("plexvm"))
            .arg("ctl")
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "plexvm ctl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits for the VM to end; returns its exit status and the probe's result fields.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<(String, String)>, String) {
        let mut child = self.child.take().unwrap();
        let status = child.wait_timeout(timeout).unwrap();
        let logs = self.logs();
        let fields = probe_result(&self.serial())
            .unwrap_or_else(|| panic!("no probe result ({status}): {logs}"));
        (status, fields, logs)
    }

    /// The guest's serial output.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    /// The serial output's tail and the core's log, for failure messages.
    pub fn logs(&self) -> String {
        let serial = self.serial();
        let tail: Vec<&str> = serial.lines().rev().take(8).collect();
        let core = std::fs::read_to_string(self.dir.join("plexvm.stderr")).unwrap_or_default();
        let core_tail: Vec<&str> = core.lines().rev().take(40).collect();
        format!(
            "\nserial (last lines, newest first):\n{}\ncore log (last lines, newest first):\n{}",
            tail.join("\n"),
            core_tail.join("\n")
        )
    }

    /// The core's log so far.
    pub fn core_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("plexvm.stderr")).unwrap_or_default()
    }

    /// Whether `plexvm` still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.signal(libc::SIGTERM);
            let _ = child.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// Checks the probe's verdict and that the guest's hash of the disk equals the host's
/// hash of the image file.
pub fn assert_verified(status: ExitStatus, fields: &[(String, String)], image: &Path, logs: &str) {
    let get = |k| plexvm_tests::field(fields, k).unwrap_or("?").to_string();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert_eq!(get("status"), "ok", "{logs}");
    assert_eq!(get("mismatches"), "0", "{logs}");
    assert_eq!(get("errors"), "0", "{logs}");
    let host = sha256_file(image).unwrap();
    assert_eq!(
        get("sha256"),
        host,
        "the image file differs from what the guest read"
    );
}

/// xorshift64*: kill moments that differ from run to run (the seed is printed).
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock, or from `PLEXVM_TEST_SEED` to repeat a run's timings.
    pub fn from_time() -> Rng {
        let seed = std::env::var("PLEXVM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        note(&format!("kill timing seed {seed}"));
        Rng(seed)
    }

    /// A duration uniformly in `[low, high)` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        Duration::from_millis(low + r % (high - low).max(1))
    }
}

/// Median and maximum of stall times in milliseconds.
pub fn median_max(stalls: &mut [u64]) -> (u64, u64) {
    stalls.sort_unstable();
    let median = stalls.get(stalls.len() / 2).copied().unwrap_or(0);
    (median, stalls.last().copied().unwrap_or(0))
}

/// A line on the test's stderr that `cargo test` shows also for passing tests run with
/// `--nocapture`, and in the captured output of failing ones.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; the pid belongs to a backend the
    // VM reported a moment ago (a stale pid could only be reused after it was reaped).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Waits until `deadline` has passed or the VM is gone.
pub fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}
