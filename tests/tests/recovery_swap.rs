//! Live swap of a device's backend implementation: while the probe guest writes, flushes
//! and verifies its disk, `plexvm ctl swap` hands the disk from the spawned `plexvm-blk`
//! to a `qemu-storage-daemon` on the same image and back, twice. The guest sees no error
//! and no wrong byte; the old backend is stopped after each swap; a swap to a backend
//! that cannot start leaves the old one serving.

mod recovery_common;

use std::process::Command;
use std::time::Duration;

use plexvm_protocol::api::{BackendState, DeviceInfo};
use plexvm_tests::prereq::{missing, require, QEMU_STORAGE_DAEMON};
use plexvm_tests::vhost_backends::{spawn_qemu_storage_daemon, BlkBackendOptions};
use plexvm_tests::{bin, create_image, wait_for};
use recovery_common::{assert_verified, note, TestVm, DISK};

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn swapped(vm: &TestVm, args: &[&str]) -> DeviceInfo {
    let mut all = vec!["swap", "disk0"];
    all.extend_from_slice(args);
    let out = vm.ctl(&all);
    let info: DeviceInfo = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(info.state, BackendState::Up, "{info:?}");
    info
}

#[test]
fn plexvm_blk_and_qemu_storage_daemon_swap_under_a_running_guest() {
    let test = "plexvm_blk_and_qemu_storage_daemon_swap_under_a_running_guest";
    require(test, &missing(&[QEMU_STORAGE_DAEMON]));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let qsd_socket = dir.path().join("qsd.sock");
    let _qsd = spawn_qemu_storage_daemon(&BlkBackendOptions::new(&image, &qsd_socket)).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=13 probe.seconds=25",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]",
    );
    let mut pid = vm.disk().backend_pid.unwrap();
    for round in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        let info = swapped(&vm, &["--socket", qsd_socket.to_str().unwrap()]);
        assert_eq!((info.backend_pid, &info.socket), (None, &qsd_socket));
        assert!(
            !info.inflight_tracking && info.inflight_state_known,
            "{info:?}"
        );
        assert!(
            wait_for(Duration::from_secs(10), || !alive(pid)),
            "old plexvm-blk stopped"
        );
        std::thread::sleep(Duration::from_secs(2));
        let info = swapped(&vm, &["--exec", "plexvm-blk", "--image", "disk.raw"]);
        pid = info.backend_pid.expect("a spawned backend");
        assert!(info.inflight_tracking, "{info:?}");
        assert!(info.inflight_state_known, "{info:?}{}", vm.logs());
        note(&format!("recovery_swap: round {round}: plexvm-blk -> qemu-storage-daemon -> plexvm-blk (pid {pid})"));
    }
    // A backend that cannot start: refused, and the current one keeps serving.
    let out = Command::new(bin("plexvm"))
        .args([
            "ctl",
            "--api",
            vm.api.to_str().unwrap(),
            "swap",
            "disk0",
            "--exec",
        ])
        .args(["plexvm-blk", "--image", "no-such.raw"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("409") && stderr.contains("no-such.raw"),
        "{stderr}"
    );
    let disk = vm.disk();
    assert_eq!(
        (disk.state, disk.backend_pid),
        (BackendState::Up, Some(pid))
    );
    assert_eq!(disk.restarts, 0, "swaps are not restarts: {disk:?}");
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    assert_verified(status, &fields, &image, &logs);
}
