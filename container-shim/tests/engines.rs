//! podman and containerd drive the runtime (and, to prove the harness, runc).
//!
//! Each test uses private state: podman gets its own storage root, runroot and
//! containers.conf (with the ulimits these machines need, see DESIGN.md);
//! containerd is started with its own root, state and socket. Prerequisites
//! come from tests/deps.sh.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{build_rootfs, unique_id, wait_until, ChildGuard};
use tempfile::TempDir;

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The runtimes to drive: ours and runc (if installed).
fn runtimes() -> Vec<PathBuf> {
    let mut list = vec![PathBuf::from(common::SHIM)];
    match find_in_path("runc") {
        Some(runc) => list.push(runc),
        None => {
            eprintln!("NOTE: runc is not installed; only plexvm-shim is driven (run tests/deps.sh)")
        }
    }
    list
}

fn missing_tools(tools: &[&str]) -> Option<String> {
    if let Some(why) = common::missing_prerequisite() {
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

fn text(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// podman with private storage and config, using `runtime`.
struct Podman {
    dir: TempDir,
    runtime: PathBuf,
}

impl Podman {
    fn new(runtime: &Path) -> Podman {
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

    fn rootfs(&self) -> String {
        self.dir.path().join("rootfs").display().to_string()
    }

    fn cmd(&self, args: &[&str]) -> Command {
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

    fn run(&self, args: &[&str]) -> Output {
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
static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn podman_lock() -> std::sync::MutexGuard<'static, ()> {
    PODMAN.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn podman_run_passes_output_and_exit_code() {
    if let Some(why) = missing_tools(&["podman"]) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _lock = podman_lock();
    for runtime in runtimes() {
        let podman = Podman::new(&runtime);
        let rootfs = podman.rootfs();
        let out = podman.run(&[
            "run",
            "--rm",
            "--rootfs",
            &rootfs,
            "/bin/sh",
            "-c",
            "echo hello; echo oops >&2; exit 7",
        ]);
        let (code, stdout, stderr) = text(&out);
        assert_eq!(code, Some(7), "{}: {stderr}", runtime.display());
        assert_eq!(stdout, "hello\n", "{}", runtime.display());
        assert!(stderr.contains("oops"), "{}: {stderr}", runtime.display());
    }
}

#[test]
fn podman_detach_exec_stop_rm() {
    if let Some(why) = missing_tools(&["podman"]) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _lock = podman_lock();
    for runtime in runtimes() {
        let rt = runtime.display().to_string();
        let podman = Podman::new(&runtime);
        let rootfs = podman.rootfs();
        let script = "trap 'exit 0' TERM; while true; do sleep 0.1; done";
        let out = podman.run(&["run", "-d", "--rootfs", &rootfs, "/bin/sh", "-c", script]);
        let (code, stdout, stderr) = text(&out);
        assert_eq!(code, Some(0), "{rt}: {stderr}");
        let cid = stdout.trim().to_string();

        let (code, stdout, stderr) =
            text(&podman.run(&["exec", &cid, "/bin/sh", "-c", "echo in-exec; exit 3"]));
        assert_eq!(
            (code, stdout.as_str()),
            (Some(3), "in-exec\n"),
            "{rt}: {stderr}"
        );

        let (code, stdout, stderr) =
            text(&podman.run(&["exec", "-t", &cid, "/bin/sh", "-c", "tty"]));
        assert_eq!(code, Some(0), "{rt}: {stderr}");
        assert!(stdout.starts_with("/dev/pts/"), "{rt}: {stdout:?}");

        let (code, _, stderr) = text(&podman.run(&["stop", "-t", "10", &cid]));
        assert_eq!(code, Some(0), "{rt}: {stderr}");
        let (_, status, _) = text(&podman.run(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            &cid,
        ]));
        assert_eq!(status.trim(), "exited 0", "{rt}");
        let (code, _, stderr) = text(&podman.run(&["rm", &cid]));
        assert_eq!(code, Some(0), "{rt}: {stderr}");
        let (_, list, _) = text(&podman.run(&["ps", "-a", "-q", "--no-trunc"]));
        assert!(!list.contains(&cid), "{rt}: container still listed");
    }
}

#[test]
fn podman_tty_gives_a_terminal() {
    if let Some(why) = missing_tools(&["podman"]) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _lock = podman_lock();
    for runtime in runtimes() {
        let podman = Podman::new(&runtime);
        let rootfs = podman.rootfs();
        let script = "tty; test -t 1 && echo stdout-is-tty; exit 5";
        let out = podman.run(&[
            "run", "--rm", "-t", "--rootfs", &rootfs, "/bin/sh", "-c", script,
        ]);
        let (code, stdout, stderr) = text(&out);
        assert_eq!(code, Some(5), "{}: {stderr}", runtime.display());
        // A pty turns "\n" into "\r\n".
        assert!(
            stdout.starts_with("/dev/pts/0\r\n"),
            "{}: {stdout:?}",
            runtime.display()
        );
        assert!(
            stdout.contains("stdout-is-tty\r\n"),
            "{}: {stdout:?}",
            runtime.display()
        );
    }
}

/// A private containerd, killed when dropped.
struct Containerd {
    dir: TempDir,
    _daemon: ChildGuard,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("plexvm-ctd")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let daemon = ChildGuard(
            Command::new("containerd")
                .arg("--config")
                .arg(dir.path().join("config.toml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let ctd = Containerd {
            dir,
            _daemon: daemon,
        };
        wait_until("containerd answers", || {
            ctd.ctr(&["version"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        ctd
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.path().join("c.sock"))
            .args(["--namespace", "plexvm-test"])
            .args(args)
            .stdin(Stdio::null());
        c
    }
}

#[test]
fn containerd_runs_containers_through_the_runtime() {
    if let Some(why) = missing_tools(&["containerd", "ctr", "containerd-shim-runc-v2"]) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let ctd = Containerd::start();
    for runtime in runtimes() {
        let rt = runtime.display().to_string();
        let rootfs = ctd.dir.path().join(format!("rootfs-{}", unique_id("r")));
        build_rootfs(&rootfs);
        let id = unique_id("ctr");
        let out = ctd
            .ctr(&[
                "run",
                "--rm",
                "--runc-binary",
                &rt,
                "--rootfs",
                rootfs.to_str().unwrap(),
                &id,
                "/bin/sh",
                "-c",
                "echo hello from $(cat /proc/1/comm); exit 7",
            ])
            .output()
            .unwrap();
        let (code, stdout, stderr) = text(&out);
        let log =
            std::fs::read_to_string(ctd.dir.path().join("containerd.log")).unwrap_or_default();
        assert_eq!(code, Some(7), "{rt}: {stderr}\ncontainerd log:\n{log}");
        assert_eq!(stdout, "hello from sh\n", "{rt}");
        let (_, containers, _) = text(&ctd.ctr(&["containers", "list", "-q"]).output().unwrap());
        assert!(!containers.contains(&id), "{rt}: container not removed");
    }
}
