//! Reconnecting an attached backend: the VM attaches to a `qemu-storage-daemon` the test
//! started; while the probe guest writes, flushes and verifies its disk, the test
//! SIGKILLs the daemon at random moments, at least 20 times over at least 20 s, and each
//! time starts a fresh one on the same socket path. The core reconnects to it and replays
//! the rings. qemu-storage-daemon does not offer INFLIGHT_SHMFD and completes requests
//! out of order, so a plain rollback to the used index would repeat some and lose
//! others; the core's ring tracker lays out exactly the outstanding ones for the new
//! daemon. The guest sees no error and no wrong byte.

mod recovery_common;

use std::time::{Duration, Instant};

use plexvm_protocol::api::BackendState;
use plexvm_tests::create_image;
use plexvm_tests::prereq::{missing, require, QEMU_STORAGE_DAEMON};
use plexvm_tests::vhost_backends::{spawn_qemu_storage_daemon, BlkBackendOptions};
use recovery_common::{assert_verified, median_max, note, Rng, TestVm, DISK};

const KILLS: u64 = 20;
const MIN_SPAN: Duration = Duration::from_secs(20);

#[test]
fn sigkilled_qemu_storage_daemon_is_replaced_and_reconnected() {
    let test = "sigkilled_qemu_storage_daemon_is_replaced_and_reconnected";
    require(test, &missing(&[QEMU_STORAGE_DAEMON]));
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let socket = dir.path().join("qsd.sock");
    let opts = BlkBackendOptions::new(&image, &socket);
    let mut daemon = spawn_qemu_storage_daemon(&opts).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=12 probe.seconds=40",
        &format!("socket = \"{}\"", socket.display()),
    );
    assert!(
        !vm.disk().inflight_tracking,
        "qemu-storage-daemon 7.2 has no INFLIGHT_SHMFD"
    );
    let mut rng = Rng::from_time();
    let start = Instant::now();
    let mut kills = 0u64;
    let mut stalls = Vec::new();
    while kills < KILLS || start.elapsed() < MIN_SPAN {
        std::thread::sleep(rng.millis(250, 900));
        let before = vm.disk();
        assert_eq!(before.state, BackendState::Up);
        daemon.guard.signal(libc::SIGKILL);
        let _ = daemon.guard.wait_timeout(Duration::from_secs(10));
        kills += 1;
        // A fresh daemon on the same path; the core finds it by retrying the path.
        daemon = spawn_qemu_storage_daemon(&opts).unwrap();
        // Counted from what the core had done before this kill, so a report from before
        // the core noticed it is never taken for the reconnect.
        let back = vm.wait_up(before.restarts + 1, Duration::from_secs(10));
        assert_eq!(
            back.backend_pid, None,
            "an attached backend is not the core's child"
        );
        assert!(!back.inflight_tracking, "{back:?}{}", vm.logs());
        // The core's ring tracker knew which requests were outstanding.
        assert!(
            back.inflight_state_known,
            "kill {kills}: {back:?}\nwhy the ring tracker lost track:\n{}{}",
            lines_with(&vm.core_log(), "ring tracker"),
            vm.logs()
        );
        stalls.push(back.last_stall_ms.expect("a finished down period"));
    }
    let disk = vm.disk();
    let (median, max) = median_max(&mut stalls);
    let core_log = vm.core_log();
    let reordered = core_log.matches("completed out of order").count();
    let lost = core_log.matches("lost track of the outstanding").count();
    note(&format!(
        "recovery_attach: {kills} kills in {:.1} s; reconnects {}; {reordered} of them found \
         requests completed out of order; the ring tracker lost track {lost} times; {} \
         reconnect attempts failed; stall per reconnect (core's view, includes starting \
         qemu-storage-daemon) median {median} ms, max {max} ms",
        start.elapsed().as_secs_f64(),
        disk.restarts,
        disk.failed_restarts
    ));
    assert_eq!(disk.restarts, kills, "{disk:?}");
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    drop(daemon);
    assert_verified(status, &fields, &image, &logs);
}

/// The lines of `log` that contain `needle`.
fn lines_with(log: &str, needle: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    lines.join("\n")
}
