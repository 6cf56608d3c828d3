//! Tests of the `plexvm-net` binary as a child process: flag and start-up errors,
//! statistics on SIGUSR1, reconnecting without leaking descriptors, and SIGTERM.

use std::path::Path;
use std::process::Command;

use plexvm_backend_support::guard::{ChildGuard, HANG_GUARD};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const BIN: &str = env!("CARGO_BIN_EXE_plexvm-net");

/// Connects once the socket accepts connections.
fn connect(switch: &mut ChildGuard, socket: &Path) -> Frontend {
    Frontend::from_stream(switch.connect(socket), 2)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + HANG_GUARD;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    for args in [
        &[][..],
        &["--socket", "/tmp/x", "--mac", "not-a-mac"][..],
        &["--socket", "/tmp/x", "--queues", "0"][..],
        &["--socket", "/tmp/x", "--tap", "bad/name"][..],
        &["--socket", "/tmp/x", "--no-such-flag"][..],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("plexvm-net: "), "{stderr}");
    }
}

#[test]
fn a_file_in_the_way_of_the_socket_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn stats_on_sigusr1_reconnects_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let stats = dir.path().join("stats.json");
    let (a_arg, b_arg, s_arg) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        stats.to_str().unwrap(),
    );
    let mut switch = ChildGuard::spawn_piped(
        BIN,
        &[
            "--socket",
            a_arg,
            "--socket",
            b_arg,
            "--mac",
            "52:54:00:00:00:0a",
            "--stats-file",
            s_arg,
        ],
    )
    .unwrap();
    let pid = switch.pid();

    // Connections come and go; descriptors do not pile up.
    let mut baseline = None;
    for round in 0..4 {
        let frontend = connect(&mut switch, &a);
        frontend.set_owner().unwrap();
        assert_eq!(
            frontend.get_features().unwrap() & 1 << 5,
            1 << 5,
            "VIRTIO_NET_F_MAC"
        );
        drop(frontend);
        if round == 0 {
            // Let the first connection end before taking the baseline.
            let _ = connect(&mut switch, &a);
            std::thread::sleep(Duration::from_millis(100));
            baseline = Some(open_fds(pid));
        }
    }
    let baseline = baseline.unwrap();
    assert!(
        wait_until(|| open_fds(pid) <= baseline),
        "descriptors leaked: {} > {baseline}",
        open_fds(pid)
    );

    switch.signal(libc::SIGUSR1);
    assert!(
        wait_until(|| stats.exists()),
        "stats file written on SIGUSR1"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let ports = doc["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0]["kind"], "vhost-user");
    assert_eq!(ports[0]["mac"], "52:54:00:00:00:0a");
    assert_eq!(ports[1]["path"], b_arg);
    assert_eq!(ports[1]["connected"], false);
    assert_eq!(ports[0]["rx_packets"], 0);

    switch.signal(libc::SIGTERM);
    assert!(switch.wait().success(), "SIGTERM ends it with status 0");
    assert!(!a.exists() && !b.exists(), "sockets removed");
    let mut stderr = String::new();
    std::io::Read::read_to_string(switch.child_mut().stderr.as_mut().unwrap(), &mut stderr)
        .unwrap();
    assert!(
        stderr.contains("plexvm-net: port 0 a.sock VhostUser"),
        "one line per port on SIGUSR1: {stderr}"
    );
}
