//! Test fixture: a busybox rootfs built at run time, bundles with a runc-like
//! default config, a private `--root` per test, and RAII guards that delete
//! containers and kill processes even when a test fails.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod debian;
pub mod podman;

use serde_json::{json, Value};
use tempfile::TempDir;

/// The runtime under test.
pub const SHIM: &str = env!("CARGO_BIN_EXE_plexvm-shim");

/// Why a test cannot run here, or None. Printed by the tests that skip.
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("these tests need root (namespaces, cgroups, mounts)".into());
    }
    if static_busybox().is_none() {
        return Some("no statically linked busybox (install busybox-static)".into());
    }
    None
}

/// Fails the calling test with a message saying exactly why it cannot run here: a test
/// never skips and counts as passed (tests/run.sh installs what these need, as root).
#[macro_export]
macro_rules! require_prerequisites {
    () => {
        if let Some(why) = common::missing_prerequisite() {
            panic!("cannot run here: {why}");
        }
    };
}

/// A statically linked busybox on this machine.
pub fn static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| std::fs::read(p).is_ok_and(|data| is_static_elf64(&data)))
}

/// An ELF64 file without a PT_INTERP program header (no dynamic loader).
fn is_static_elf64(data: &[u8]) -> bool {
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        const PT_INTERP: &[u8] = &[3, 0, 0, 0];
        data.get(at..at + 4).is_some_and(|t| t != PT_INTERP)
    })
}

/// A unique container ID (tests run in parallel, and so may two test runs).
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Builds a busybox rootfs in `dir`.
pub fn build_rootfs(dir: &Path) {
    let busybox = static_busybox().expect("static busybox");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(&busybox, bin.join("busybox")).unwrap();
    let list = Command::new(&busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = bin.join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).unwrap();
        }
    }
    for d in ["proc", "sys", "dev", "etc", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// The config `runc spec` writes (terminal off), with `args`.
pub fn default_config(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "plexvm-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// A bundle directory: busybox rootfs + config.json.
pub struct Bundle {
    pub dir: TempDir,
}

impl Bundle {
    /// A bundle running `args` with the default config changed by `edit`.
    pub fn new(args: &[&str], edit: impl FnOnce(&mut Value)) -> Bundle {
        let dir = tempfile::Builder::new()
            .prefix("plexvm-bundle")
            .tempdir()
            .unwrap();
        build_rootfs(&dir.path().join("rootfs"));
        let mut config = default_config(args);
        edit(&mut config);
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        Bundle { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

/// A private `--root` for the runtime.
pub struct Shim {
    pub root: TempDir,
    /// The runtime binary this driver runs.
    pub bin: PathBuf,
}

impl Shim {
    pub fn new() -> Shim {
        Shim::with_binary(Path::new(SHIM))
    }

    /// A driver for another copy of the runtime (attack tests run a copy,
    /// so a vulnerable runtime cannot destroy the binary under test).
    pub fn with_binary(bin: &Path) -> Shim {
        Shim {
            root: tempfile::Builder::new()
                .prefix("plexvm-root")
                .tempdir()
                .unwrap(),
            bin: bin.to_path_buf(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(self.root.path()).args(args);
        c
    }

    /// Runs a command to completion with stdin closed. Output goes through
    /// files, not pipes: a container that wrongly outlives the command keeps
    /// its stdio open, which must fail the test rather than hang it.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut out = tempfile::tempfile().unwrap();
        let mut err = tempfile::tempfile().unwrap();
        let status = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(err.try_clone().unwrap())
            .status()
            .unwrap();
        let read = |f: &mut std::fs::File| {
            use std::io::{Read, Seek};
            let mut v = Vec::new();
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut v).unwrap();
            v
        };
        Output {
            status,
            stdout: read(&mut out),
            stderr: read(&mut err),
        }
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `status` field of `state ID`.
    pub fn status(&self, id: &str) -> String {
        let v: Value = serde_json::from_str(&self.ok(&["state", id])).unwrap();
        v["status"].as_str().unwrap().to_string()
    }

    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    /// Creates container `id` from `bundle`; the guard deletes it on drop.
    pub fn create<'a>(&'a self, id: &str, bundle: &Bundle) -> ContainerGuard<'a> {
        // The container keeps create's stdio: a pipe would stay open (and
        // block a reader) until the container exits, so use a file.
        let err_path = self.root.path().join(format!("{id}.create-stderr"));
        let err_file = std::fs::File::create(&err_path).unwrap();
        let status = self
            .cmd(&["create", "--bundle", bundle.path().to_str().unwrap(), id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "create failed: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        ContainerGuard {
            shim: self,
            id: id.to_string(),
        }
    }

    /// `run` to completion: (exit code, stdout, stderr).
    pub fn run_container(&self, id: &str, bundle: &Bundle) -> (i32, String, String) {
        let _guard = ContainerGuard {
            shim: self,
            id: id.to_string(),
        };
        let out = self.run(&["run", "--bundle", bundle.path().to_str().unwrap(), id]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Deletes the container (forcefully) when dropped.
pub struct ContainerGuard<'a> {
    pub shim: &'a Shim,
    pub id: String,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        let _ = self.shim.run(&["delete", "--force", &self.id]);
    }
}

/// A spawned process that is killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` until it holds; panics after a generous bound so a broken
/// runtime fails the test instead of hanging it (not a timing assertion).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("gave up waiting for {what}");
}

/// Does a cgroup directory for `path` exist in any v1 hierarchy or in v2?
pub fn cgroup_exists(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.path().join(rel).exists())
        })
        .unwrap_or(false)
        || Path::new("/sys/fs/cgroup")
            .join(rel)
            .join("cgroup.procs")
            .exists()
}
