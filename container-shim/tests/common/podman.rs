//! podman with private storage, runroot and containers.conf (with the
//! ulimits these machines need, see DESIGN.md), driving a given runtime.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use super::build_rootfs;

/// `name` found in $PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The runtimes to drive: ours and runc (if installed).
pub fn runtimes() -> Vec<PathBuf> {
    let mut list = vec![PathBuf::from(super::SHIM)];
    match find_in_path("runc") {
        Some(runc) => list.push(runc),
        None => {
            eprintln!("NOTE: runc is not installed; only plexvm-shim is driven (run tests/deps.sh)")
        }
    }
    list
}

/// Why the podman/containerd tests cannot run (not root, tools missing), or None.
pub fn missing_tools(tools: &[&str]) -> Option<String> {
    if let Some(why) = super::missing_prerequisite() {
        return Some(why);
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_in_path(t).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not installed (run container-shim/tests/deps.sh)",
            missing.join(", ")
        )
    })
}

/// (exit code, stdout, stderr) of a finished command.
pub fn text(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// podman with private storage and config, using `runtime`.
pub struct Podman {
    pub dir: TempDir,
    pub runtime: PathBuf,
}

impl Podman {
    pub fn new(runtime: &Path) -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("plexvm-podman")
            .tempdir()
            .unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\",\"nproc=1024:1024\"]\n",
        )
        .unwrap();
        build_rootfs(&dir.path().join("rootfs"));
        Podman {
            dir,
            runtime: runtime.to_path_buf(),
        }
    }

    pub fn rootfs(&self) -> String {
        self.dir.path().join("rootfs").display().to_string()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", d.join("containers.conf"))
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--runtime")
            .arg(&self.runtime)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // --rootfs containers hold no image layers: removing them leaves no mounts.
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        // podman's overlay driver bind-mounts its own directory; if a failed
        // run left that mount, detach it so the temp dir can be removed.
        let overlay = self.dir.path().join("storage/overlay");
        let _ = nix::mount::umount2(&overlay, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// podman's locks live in one shared-memory segment for all storage roots,
/// so two podman instances with separate roots must not run at once.
pub static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn podman_lock() -> std::sync::MutexGuard<'static, ()> {
    PODMAN.lock().unwrap_or_else(|e| e.into_inner())
}
