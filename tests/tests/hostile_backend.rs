//! A hostile backend harms only its own device (issue 12, item 6). While the probe
//! guest writes, flushes and verifies disk0, the test swaps disk0 to `plexvm-hostile`
//! (tests/src/bin/plexvm-hostile.rs: a proxy in front of plexvm-blk that misbehaves
//! once, in one way) for each of its acts in turn. Each time the core and the guest
//! run on, disk1 (another device) is untouched, disk0 ends up served again (the swap
//! is refused and the old backend restarted, or the swap succeeds when the act did no
//! harm), the log says what the backend did, and at the end the probe has verified
//! every byte it wrote.

mod recovery_common;

use std::process::Command;
use std::time::Duration;

use plexvm_protocol::api::{BackendState, DeviceInfo};
use plexvm_tests::{bin, create_image, wait_for};
use recovery_common::{assert_verified, note, TestVm, DISK};

/// Act, the request it is done at, whether the swap succeeds, and what the core's log
/// must say about it.
const ACTS: &[(&str, &str, bool, &str)] = &[
    (
        "ftruncate",
        "SET_MEM_TABLE",
        true,
        "0) failed: Operation not permitted",
    ),
    (
        "call-flood",
        "SET_VRING_CALL",
        true,
        "signalled a call eventfd 200000 times",
    ),
    (
        "wrong-reply-id",
        "SET_MEM_TABLE",
        false,
        "answered SET_MEM_TABLE with a bad reply",
    ),
    // The vhost crate reads the 8 bytes GET_FEATURES's reply should have; the 8 extra
    // ones are then taken as the start of the next reply, which is refused.
    (
        "wrong-reply-size",
        "GET_FEATURES",
        false,
        "answered GET_PROTOCOL_FEATURES with a bad reply",
    ),
    (
        "wrong-reply-flags",
        "GET_QUEUE_NUM",
        false,
        "answered GET_QUEUE_NUM with a bad reply",
    ),
    (
        "oversized-reply",
        "GET_CONFIG",
        false,
        "answered GET_CONFIG with a bad reply",
    ),
    (
        "close-mid-message",
        "SET_VRING_ADDR",
        false,
        "answered SET_VRING_ADDR with a bad reply",
    ),
    (
        "never-reply",
        "SET_VRING_ENABLE",
        false,
        "did not answer SET_VRING_ENABLE within 1000 ms",
    ),
    ("reply-twice", "SET_FEATURES", false, "with a bad reply"),
];

fn device(vm: &TestVm, index: usize) -> DeviceInfo {
    let info = vm
        .try_info()
        .unwrap_or_else(|| panic!("the API does not answer: {}", vm.logs()));
    info.devices[index].clone()
}

fn swap(vm: &TestVm, exec: &[&str]) -> (bool, String) {
    let out = Command::new(bin("plexvm"))
        .args([
            "ctl",
            "--api",
            vm.api.to_str().unwrap(),
            "swap",
            "disk0",
            "--exec",
        ])
        .args(exec)
        .current_dir(&vm.dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn each_hostile_act_harms_only_the_device_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    create_image(&dir.path().join("spare.raw"), 1 << 20).unwrap();
    let vm = TestVm::start(
        dir.path(),
        "probe.workload=blk-verify probe.seed=31 probe.seconds=40",
        "exec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]\n\n[[device]]\nid = \"disk1\"\n\
         kind = \"blk\"\nexec = [\"plexvm-blk\", \"--image\", \"spare.raw\"]",
    );
    let other = device(&vm, 1);
    assert_eq!(other.state, BackendState::Up);
    for &(act, on, succeeds, says) in ACTS {
        let hostile = [
            "plexvm-hostile",
            "--act",
            act,
            "--on",
            on,
            "plexvm-blk",
            "--image",
            "disk.raw",
        ];
        let (ok, out) = swap(&vm, &hostile);
        assert_eq!(ok, succeeds, "{act} on {on}: {out}{}", vm.logs());
        let up = wait_for(Duration::from_secs(20), || {
            vm.try_info()
                .is_some_and(|i| i.devices[0].state == BackendState::Up)
        });
        assert!(
            up,
            "{act}: disk0 is not served again: {:?}{}",
            device(&vm, 0),
            vm.logs()
        );
        // What the core says: in its log, or in the refused swap's answer.
        let said = wait_for(Duration::from_secs(20), || {
            vm.core_log().contains(says) || out.contains(says)
        });
        assert!(
            said,
            "{act}: neither the log nor the API says {says:?}: {out}{}",
            vm.logs()
        );
        if succeeds {
            let (ok, out) = swap(&vm, &["plexvm-blk", "--image", "disk.raw"]);
            assert!(ok, "{act}: swap back: {out}{}", vm.logs());
        }
        let now = device(&vm, 1);
        assert_eq!(
            (now.state, now.backend_pid, now.restarts),
            (BackendState::Up, other.backend_pid, 0),
            "{act}: the other device was touched"
        );
        note(&format!(
            "hostile_backend: {act} on {on}: swap ok={ok}; the log says {says:?}"
        ));
    }
    let (status, fields, logs) = vm.finish(Duration::from_secs(240));
    assert_verified(status, &fields, &image, &logs);
}
