//! A backend that fails at once on every start: the core backs off (no busy loop), the
//! API says clearly what is wrong, the VM keeps running, and the device comes back when
//! the cause is gone; with `restart_max` the core gives up and says so.

mod recovery_common;

use std::time::{Duration, Instant};

use plexvm_protocol::api::{BackendState, VmState};
use plexvm_tests::{create_image, wait_for};
use recovery_common::{assert_verified, kill9, note, TestVm, DISK};

#[test]
fn a_backend_failing_at_every_start_backs_off_and_recovers_when_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let moved = dir.path().join("disk.moved");
    create_image(&image, DISK).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=14 probe.seconds=15",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]",
    );
    std::thread::sleep(Duration::from_secs(1));
    // The image goes missing and the backend dies: every restart now fails at once.
    std::fs::rename(&image, &moved).unwrap();
    kill9(vm.disk().backend_pid.unwrap());
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(2000));
    let info = vm
        .try_info()
        .expect("the API answers while the device is down");
    let disk = &info.devices[0];
    assert_eq!(info.state, VmState::Running, "the VM runs on");
    assert!(
        matches!(disk.state, BackendState::Down | BackendState::Reconnecting),
        "{disk:?}"
    );
    // 0, 50, 100, 200, 400, 800 ms apart: a handful of attempts in 2 s, not thousands.
    assert!(
        (3..=8).contains(&disk.failed_restarts),
        "{} failed restarts in 2 s: {disk:?}",
        disk.failed_restarts
    );
    let why = disk.last_exit.clone().unwrap_or_default();
    assert!(why.contains("disk.raw"), "the API says why: {why}");
    assert_eq!(disk.backend_pid, None, "{disk:?}");
    note(&format!("recovery_backoff: after 2 s down: {why}"));
    // The cause goes away: the next attempt (at most 5 s later) brings the device back
    // well inside the guest's 10 s request timeout.
    std::fs::rename(&moved, &image).unwrap();
    let back = vm.wait_up(1, Duration::from_secs(8));
    let down = start.elapsed();
    note(&format!(
        "recovery_backoff: back after {} ms down, {} failed restarts",
        back.last_stall_ms.unwrap_or_default(),
        back.failed_restarts
    ));
    assert!(down < Duration::from_secs(9), "{down:?}");
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    assert_verified(status, &fields, &image, &logs);
}

#[test]
fn restart_max_gives_up_and_leaves_the_vm_running() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=15 probe.seconds=60",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]\nrestart_max = 2",
    );
    std::thread::sleep(Duration::from_millis(700));
    std::fs::remove_file(&image).unwrap();
    kill9(vm.disk().backend_pid.unwrap());
    let mut last = None;
    let failed = wait_for(Duration::from_secs(10), || {
        last = vm.try_info();
        last.as_ref()
            .is_some_and(|i| i.devices[0].state == BackendState::Failed)
    });
    let info = last.unwrap();
    assert!(failed, "{info:?}");
    assert_eq!(info.devices[0].failed_restarts, 2, "{info:?}");
    assert_eq!(info.state, VmState::Running);
    // It stays failed: no further attempts.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.disk().failed_restarts, 2);
    vm.ctl(&["stop"]);
}
