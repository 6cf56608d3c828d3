//! Tests of the `plexvm-blk` binary as a child process: start-up errors, serving,
//! reconnecting without leaking descriptors, and SIGTERM handling.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_plexvm-blk");

/// A running backend process; killed and reaped on drop if still running.
struct BackendProcess {
    child: Child,
}

impl BackendProcess {
    fn spawn(args: &[&str]) -> BackendProcess {
        let child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        BackendProcess { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the process to exit.
    fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill(2) with a pid we own (the child is not reaped yet).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        self.child.wait().unwrap()
    }

    /// Connects once the socket accepts connections (the process may still be starting).
    fn connect(&mut self, socket: &Path) -> Frontend {
        for _ in 0..2000 {
            if let Ok(stream) = UnixStream::connect(socket) {
                return Frontend::from_stream(stream, 1);
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("backend exited early: {status}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("backend never listened on {}", socket.display());
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_to_completion(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let socket = dir.path().join("blk.sock");
    (dir, image, socket)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn missing_image_is_one_line_and_nonzero_exit() {
    let (dir, _, socket) = setup();
    let missing = dir.path().join("missing.raw");
    let out = run_to_completion(&[
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("missing.raw"), "{stderr}");
    assert!(!socket.exists());
}

#[test]
fn bad_flags_are_rejected() {
    let (_dir, image, socket) = setup();
    let (socket, image) = (socket.to_str().unwrap(), image.to_str().unwrap());
    for extra in [
        &["--queue-size", "100"][..],
        &["--queues", "0"],
        &["--serial", "this-serial-is-longer-than-20"],
        &["--no-such-flag"],
    ] {
        let mut args = vec!["--socket", socket, "--image", image];
        args.extend_from_slice(extra);
        let out = run_to_completion(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    let out = run_to_completion(&["--image", image]);
    assert_eq!(out.status.code(), Some(2), "--socket is required");
}

#[test]
fn serves_reconnects_without_leaking_and_exits_on_sigterm() {
    let (_dir, image, socket) = setup();
    let mut backend = BackendProcess::spawn(&[
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--queues",
        "2",
    ]);
    let mut fds_after_first = 0;
    for round in 0..5 {
        let mut frontend = backend.connect(&socket);
        let features = frontend.get_features().unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        frontend.set_features(features).unwrap();
        frontend.set_protocol_features(proto).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend.set_owner().unwrap();
        let (_, cfg) = frontend
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .unwrap();
        assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 2048);
        drop(frontend);
        // The backend serves one connection at a time, so an answer on the next one
        // means the previous connection is torn down and this one is fully set up.
        let probe = backend.connect(&socket);
        assert_ne!(probe.get_features().unwrap(), 0);
        let fds = open_fds(backend.pid());
        drop(probe);
        if round == 0 {
            fds_after_first = fds;
        } else {
            assert_eq!(
                fds, fds_after_first,
                "descriptor count grows per connection"
            );
        }
    }
    let status = backend.terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(!socket.exists(), "socket removed on exit");
}
