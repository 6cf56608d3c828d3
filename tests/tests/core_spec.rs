//! Bad specs end with one line naming the field and exit code 2, never a panic.

use std::path::Path;
use std::time::Duration;

use plexvm_tests::run_plexvm;

const VM: &str = "[vm]\nname = \"t\"\nmemory_mib = 64\nkernel = \"probe\"\n";

fn expect_rejected(dir: &Path, name: &str, spec: &str, needle: &str) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, spec).unwrap();
    let out = run_plexvm(
        &["run", path.to_str().unwrap()],
        dir,
        Duration::from_secs(30),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: exit status {:?}, stderr: {stderr}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{name}: want exactly one line on stderr, got: {stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{name}: {needle:?} not in {:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
}

#[test]
fn every_bad_spec_gets_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    expect_rejected(
        d,
        "unknown-key",
        &format!("{VM}colour = \"red\"\n"),
        "unknown field `colour`",
    );
    expect_rejected(
        d,
        "missing-kernel",
        "[vm]\nname = \"t\"\nmemory_mib = 64\nkernel = \"no/such/vmlinux\"\n",
        "vm.kernel",
    );
    expect_rejected(
        d,
        "vcpus-0",
        "[vm]\nname = \"t\"\nvcpus = 0\nmemory_mib = 64\nkernel = \"probe\"\n",
        "vm.vcpus",
    );
    expect_rejected(
        d,
        "vcpus-33",
        "[vm]\nname = \"t\"\nvcpus = 33\nmemory_mib = 64\nkernel = \"probe\"\n",
        "vm.vcpus",
    );
    expect_rejected(
        d,
        "memory-0",
        "[vm]\nname = \"t\"\nmemory_mib = 0\nkernel = \"probe\"\n",
        "vm.memory_mib",
    );
    let dev = |id: &str, rest: &str| format!("[[device]]\nid = \"{id}\"\nkind = \"blk\"\n{rest}");
    expect_rejected(
        d,
        "duplicate-id",
        &format!(
            "{VM}{}{}",
            dev("d0", "socket = \"a.sock\"\n"),
            dev("d0", "socket = \"b.sock\"\n")
        ),
        "device[1].id",
    );
    expect_rejected(
        d,
        "exec-and-socket",
        &format!(
            "{VM}{}",
            dev("d0", "socket = \"a.sock\"\nexec = [\"plexvm-blk\"]\n")
        ),
        "not both",
    );
    expect_rejected(
        d,
        "neither",
        &format!("{VM}{}", dev("d0", "")),
        "needs `exec`",
    );
    expect_rejected(
        d,
        "bad-kind",
        &format!("{VM}[[device]]\nid = \"d0\"\nkind = \"gpu\"\nsocket = \"s\"\n"),
        "gpu",
    );
    expect_rejected(d, "not-toml", "[vm\nname=", "not-toml.toml:");
    expect_rejected(d, "missing-vm", "", "missing field `vm`");
    expect_rejected(
        d,
        "bad-serial",
        &format!("{VM}serial = \"tty9\"\n"),
        "file:PATH",
    );
}

#[test]
fn bad_per_kind_device_fields_get_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dev = |kind: &str, rest: &str| {
        format!("{VM}[[device]]\nid = \"d0\"\nkind = \"{kind}\"\nsocket = \"s.sock\"\n{rest}")
    };
    let cases = [
        ("fs-no-tag", dev("fs", ""), "device[0].tag: is required"),
        (
            "fs-long-tag",
            dev("fs", &format!("tag = \"{}\"\n", "t".repeat(37))),
            "device[0].tag: must be 1 to 36 bytes",
        ),
        (
            "fs-queues-0",
            dev("fs", "tag = \"share\"\nrequest_queues = 0\n"),
            "device[0].request_queues",
        ),
        (
            "vsock-no-cid",
            dev("vsock", ""),
            "device[0].guest_cid: is required",
        ),
        (
            "vsock-cid-2",
            dev("vsock", "guest_cid = 2\n"),
            "device[0].guest_cid: must be between 3",
        ),
        (
            "tag-on-blk",
            dev("blk", "tag = \"x\"\n"),
            "device[0].tag: only applies to kind = \"fs\"",
        ),
        (
            "generic-no-id",
            dev("generic", "queues = 1\n"),
            "device[0].device_id: is required",
        ),
        (
            "generic-no-queues",
            dev("generic", "device_id = 41\n"),
            "device[0].queues: is required",
        ),
        (
            "generic-65-queues",
            dev("generic", "device_id = 41\nqueues = 65\n"),
            "device[0].queues: must be between 1 and 64",
        ),
        (
            "generic-config-not-bytes",
            dev("generic", "device_id = 41\nqueues = 1\nconfig = [1, 300]\n"),
            "generic-config-not-bytes.toml:",
        ),
        (
            "queues-on-rng",
            dev("rng", "queues = 2\n"),
            "device[0].queues: only applies to kind = \"generic\"",
        ),
    ];
    for (name, spec, needle) in cases {
        expect_rejected(d, name, &spec, needle);
    }
}

#[test]
fn corrupt_kernel_file_is_named_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"\x7fELF not really").unwrap();
    expect_rejected(
        dir.path(),
        "corrupt-kernel",
        "[vm]\nname = \"t\"\nmemory_mib = 64\nkernel = \"vmlinux\"\n",
        "vmlinux",
    );
}

#[test]
fn missing_spec_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_plexvm(&["run", "nope.toml"], dir.path(), Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}
