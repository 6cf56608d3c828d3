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
