//! Tests of the `plexvm-blk` binary as a child process: start-up errors, serving,
//! reconnecting without leaking descriptors, and SIGTERM handling.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use plexvm_backend_support::guard::ChildGuard;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_plexvm-blk");

/// Connects once the socket accepts connections (the process may still be starting).
fn connect(backend: &mut ChildGuard, socket: &Path) -> Frontend {
    Frontend::from_stream(backend.connect(socket), 1)
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
    let mut backend = ChildGuard::spawn_piped(
        BIN,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--queues",
            "2",
        ],
    )
    .unwrap();
    let mut fds_after_first = 0;
    for round in 0..5 {
        let mut frontend = connect(&mut backend, &socket);
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
        let probe = connect(&mut backend, &socket);
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
