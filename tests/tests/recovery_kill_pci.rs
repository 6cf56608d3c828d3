//! Crash recovery over virtio-pci: the same as `recovery_kill` with the disk on PCI. The
//! probe writes, flushes and verifies for 20 s while the test SIGKILLs the `plexvm-blk`
//! the core spawned, at least 10 times: the vhost-user frontend, supervisor and
//! in-flight code are the ones virtio-mmio uses, and the guest sees no error and no
//! wrong byte.

mod recovery_common;

use std::time::{Duration, Instant};

use plexvm_protocol::api::BackendState;
use plexvm_tests::create_image;
use recovery_common::{assert_verified, kill9, Rng, TestVm, DISK};

const KILLS: u64 = 10;
const MIN_SPAN: Duration = Duration::from_secs(10);

#[test]
fn sigkilled_plexvm_blk_behind_virtio_pci_is_restarted_without_losing_io() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=13 probe.seconds=25",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]\ntransport = \"pci\"",
    );
    let mut rng = Rng::from_time();
    let start = Instant::now();
    let mut kills = 0u64;
    while kills < KILLS || start.elapsed() < MIN_SPAN {
        std::thread::sleep(rng.millis(250, 900));
        let disk = vm.disk();
        assert_eq!(disk.state, BackendState::Up, "{disk:?}");
        let pid = disk.backend_pid.expect("a spawned backend has a pid");
        kill9(pid);
        kills += 1;
        let back = vm.wait_up(kills, Duration::from_secs(10));
        assert_ne!(
            back.backend_pid,
            Some(pid),
            "a new process serves the device"
        );
        assert!(
            back.inflight_tracking && back.inflight_state_known,
            "{back:?}"
        );
    }
    let disk = vm.disk();
    assert_eq!(disk.restarts, kills, "{disk:?}");
    assert_eq!(disk.failed_restarts, 0, "{disk:?}");
    // The probe found its disk on the PCI bus before the device came up.
    let serial = vm.serial();
    assert!(
        serial.contains("virtio-pci 00:01.0: device id 2"),
        "{serial}"
    );
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    assert_verified(status, &fields, &image, &logs);
}
