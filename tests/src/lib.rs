//! Fixture for plexvm's end-to-end tests: find the workspace's binaries, start real
//! processes, and make sure every process a test starts is killed and reaped when the
//! test ends, also when it fails (model: crosvm's `e2e_tests/fixture`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod blk_guest;
pub mod ext_image;
pub mod initramfs;
pub mod kernel_image;
pub mod lab;
pub mod lab_linux;
pub mod net_guest;
pub mod prereq;
pub mod probe_vm;
pub mod qemu;
pub mod third_party;
pub mod vhost_backends;

/// The folder holding the workspace's binaries for the profile the tests were built with
/// (`target/debug` or `target/release`): the test executable lives in `<that>/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps folder");
    deps.parent().expect("profile folder").to_path_buf()
}

/// Path of a workspace binary (`plexvm`, `plexvm-blk`, ...). Panics with a hint when it
/// has not been built: `tests/run.sh` builds all binaries before running the tests.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, tests/run.sh does it)",
        p.display()
    );
    p
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`, naming it `name` in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The child, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until drop")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(None))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; a stale pid is prevented
        // because the child is not reaped before this guard is dropped or waited on.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Waits up to `timeout` for the process to exit; kills it and fails if it does not.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child_mut().kill();
                let _ = self.child_mut().wait();
                bail!("{} did not exit within {:?}", self.name, timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` and collects stdout/stderr (spawn with piped outputs).
    pub fn output_timeout(mut self, timeout: Duration) -> Result<Output> {
        let mut child = self.child.take().expect("child present");
        let out = child.stdout.take();
        let err = child.stderr.take();
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out_t = reader(out.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err_t = reader(err.map(|p| Box::new(p) as Box<dyn Read + Send>));
        self.child = Some(child);
        let status = self.wait_timeout(timeout)?;
        Ok(Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `plexvm` with `args`, capturing its output, killed after `timeout`.
pub fn run_plexvm(args: &[&str], cwd: &Path, timeout: Duration) -> Result<Output> {
    let mut cmd = Command::new(bin("plexvm"));
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ChildGuard::spawn("plexvm", &mut cmd)?.output_timeout(timeout)
}

/// Creates a sparse raw image of `bytes` bytes.
pub fn create_image(path: &Path, bytes: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(bytes)?;
    Ok(())
}

/// SHA-256 of a file, computed by the host's `sha256sum` (independent of our code).
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("run sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The `key=value` fields of the probe's last `probe: result ...` line.
pub use plexvm_protocol::probe::{field, parse_result as probe_result};

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
