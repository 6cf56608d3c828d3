//! A tiny `plexvm-perf net` (seconds): the round-trip scenario through plexvm-net and
//! through dpdk-testpmd, one repetition each. Checks that both switches carried the
//! probe's frames and that net.json and net.md are written, not how fast anything is.
//!
//! Needs `/dev/kvm`, `plexvm` and `plexvm-net` next to `plexvm-perf`
//! (`cargo build --workspace --bins`) and `dpdk-testpmd` (Debian dpdk-dev, installed by
//! tests/run.sh).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn net_quick_run_goes_through_both_switches() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_plexvm-perf"));
    let dir = bin.parent().unwrap();
    for name in ["plexvm", "plexvm-net"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`)",
            dir.join(name).display()
        );
    }
    let testpmd_found = Command::new("dpdk-testpmd")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        testpmd_found,
        "dpdk-testpmd is not installed (tests/run.sh installs dpdk-dev)"
    );
    let backends = vec!["plexvm-net", "testpmd"];
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "net",
        "--scenario",
        "rtt-64",
        "--reps",
        "1",
        "--seconds",
        "1",
        "--warmup",
        "0",
    ]);
    for b in &backends {
        cmd.args(["--backend", b]);
    }
    let output = cmd.arg("--out").arg(out.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "plexvm-perf net failed:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("net.json")).unwrap())
            .unwrap();
    let records = json["records"].as_array().unwrap();
    assert_eq!(records.len(), backends.len(), "{records:?}");
    for record in records {
        assert!(record["error"].is_null(), "{record}\n{stderr}");
        let sample = &record["sample"];
        assert!(sample["echoed"].as_u64().unwrap() > 0, "{record}");
        assert!(sample["pps"].as_f64().unwrap() > 0.0, "{record}");
        assert!(sample["rtt_p50_us"].as_f64().unwrap() > 0.0, "{record}");
    }
    let md = std::fs::read_to_string(out.path().join("net.md")).unwrap();
    assert!(md.contains("## Headline"), "{md}");
    assert!(md.contains("| rtt-64 (size 64 B, window 1) |"), "{md}");
    assert!(!out.path().join("net-work").exists());
}
