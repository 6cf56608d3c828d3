//! podman and containerd drive the runtime (and, to prove the harness, runc).
//!
//! Each test uses private state: podman gets its own storage root, runroot and
//! containers.conf (with the ulimits these machines need, see DESIGN.md);
//! containerd is started with its own root, state and socket. Prerequisites
//! come from tests/deps.sh.

mod common;

use std::process::{Command, Stdio};

use common::podman::{missing_tools, podman_lock, runtimes, text, Podman};
use common::{build_rootfs, unique_id, wait_until, ChildGuard};
use tempfile::TempDir;

#[test]
fn podman_run_passes_output_and_exit_code() {
    if let Some(why) = missing_tools(&["podman"]) {
        panic!("cannot run here: {why}");
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
        panic!("cannot run here: {why}");
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
        panic!("cannot run here: {why}");
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
        panic!("cannot run here: {why}");
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
