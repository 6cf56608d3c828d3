//! Crash recovery of a spawned backend: the probe guest writes, flushes and verifies its
//! disk for 30 s while the test SIGKILLs the `plexvm-blk` the core spawned at random
//! moments, at least 20 times over at least 20 s. The core restarts it each time and the
//! new backend resubmits what the dead one had in flight (INFLIGHT_SHMFD): the guest sees
//! no error and no wrong byte, and the image file holds what the guest wrote.

mod recovery_common;

use std::time::{Duration, Instant};

use plexvm_protocol::api::BackendState;
use plexvm_tests::create_image;
use recovery_common::{assert_verified, kill9, median_max, note, Rng, TestVm, DISK};

const KILLS: u64 = 20;
const MIN_SPAN: Duration = Duration::from_secs(20);

#[test]
fn sigkilled_plexvm_blk_is_restarted_without_losing_io() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=11 probe.seconds=35",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]",
    );
    let mut rng = Rng::from_time();
    let start = Instant::now();
    let mut kills = 0u64;
    let mut stalls = Vec::new();
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
        let why = back.last_exit.clone().unwrap_or_default();
        assert!(
            why.contains("SIGKILL"),
            "the API says why it went down: {why}"
        );
        stalls.push(back.last_stall_ms.expect("a finished down period"));
    }
    let disk = vm.disk();
    let (median, max) = median_max(&mut stalls);
    note(&format!(
        "recovery_kill: {kills} kills in {:.1} s; restarts {}; stall per restart (core's \
         view) median {median} ms, max {max} ms; device down {} ms in all",
        start.elapsed().as_secs_f64(),
        disk.restarts,
        disk.down_ms
    ));
    assert!(disk.restarts >= KILLS, "{disk:?}");
    assert_eq!(disk.restarts, kills, "{disk:?}");
    assert_eq!(disk.failed_restarts, 0, "{disk:?}");
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    assert_verified(status, &fields, &image, &logs);
}
