//! Live swap over virtio-pci: the same hand-over as `recovery_swap` (plexvm-blk →
//! qemu-storage-daemon → plexvm-blk, twice, while the probe writes, flushes and verifies)
//! with the disk on PCI. The swap code is the one virtio-mmio uses; the call eventfds
//! (and so any MSI-X irqfd on them) stay the core's across it.

mod recovery_common;

use std::time::Duration;

use plexvm_protocol::api::{BackendState, DeviceInfo};
use plexvm_tests::prereq::{missing, require, QEMU_STORAGE_DAEMON};
use plexvm_tests::vhost_backends::{spawn_qemu_storage_daemon, BlkBackendOptions};
use plexvm_tests::{create_image, wait_for};
use recovery_common::{assert_verified, TestVm, DISK};

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
fn backends_swap_under_a_running_guest_on_virtio_pci() {
    let test = "backends_swap_under_a_running_guest_on_virtio_pci";
    require(test, &missing(&[QEMU_STORAGE_DAEMON]));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let qsd_socket = dir.path().join("qsd.sock");
    let _qsd = spawn_qemu_storage_daemon(&BlkBackendOptions::new(&image, &qsd_socket)).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=17 probe.seconds=20",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]\ntransport = \"pci\"",
    );
    let serial = vm.serial();
    assert!(
        serial.contains("virtio-pci 00:01.0: device id 2"),
        "{serial}"
    );
    let mut pid = vm.disk().backend_pid.unwrap();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        let info = swapped(&vm, &["--socket", qsd_socket.to_str().unwrap()]);
        assert_eq!((info.backend_pid, &info.socket), (None, &qsd_socket));
        assert!(
            wait_for(Duration::from_secs(10), || !alive(pid)),
            "old plexvm-blk stopped"
        );
        std::thread::sleep(Duration::from_secs(2));
        let info = swapped(&vm, &["--exec", "plexvm-blk", "--image", "disk.raw"]);
        pid = info.backend_pid.expect("a spawned backend");
        assert!(
            info.inflight_tracking && info.inflight_state_known,
            "{info:?}"
        );
    }
    assert_eq!(vm.disk().restarts, 0);
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    assert_verified(status, &fields, &image, &logs);
}
