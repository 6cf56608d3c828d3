//! A tiny `plexvm-perf run` (a few seconds): one scenario, plexvm-blk and the host
//! ceiling, one repetition, one launch measurement. Checks that the three outputs are
//! written and parse, not how fast anything is (benchmarks are never timed assertions).
//!
//! Needs `/dev/kvm` and the `plexvm` and `plexvm-blk` binaries next to `plexvm-perf`
//! (`cargo build --workspace --bins`, as tests/run.sh does first).

use std::path::PathBuf;
use std::process::Command;

fn perf_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_plexvm-perf"))
}

#[test]
fn quick_run_writes_the_three_outputs() {
    let bin = perf_bin();
    let dir = bin.parent().unwrap();
    for name in ["plexvm", "plexvm-blk"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`)",
            dir.join(name).display()
        );
    }
    let out = tempfile::tempdir().unwrap();
    let disk = tempfile::tempdir().unwrap();
    let output = Command::new(&bin)
        .args([
            "run",
            "--quick",
            "--scenario",
            "randread-4k-qd1",
            "--backend",
            "plexvm-blk",
            "--backend",
            "host",
            "--storage",
            "tmpfs",
            "--reps",
            "1",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--image-mib",
            "16",
            "--launch-reps",
            "1",
        ])
        .arg("--out")
        .arg(out.path())
        .arg("--disk-dir")
        .arg(disk.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "plexvm-perf failed:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let records = json["records"].as_array().unwrap();
    // plexvm-blk, host, host-direct: one repetition each.
    assert_eq!(records.len(), 3, "{records:?}");
    for record in records {
        assert!(record["error"].is_null(), "{record}");
        assert!(record["sample"]["ios"].as_u64().unwrap() > 0, "{record}");
    }
    let guest = records
        .iter()
        .find(|r| r["subject"] == "plexvm-blk")
        .expect("a plexvm-blk record");
    assert!(guest["sample"]["host_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(guest["sample"]["event_idx"], true);
    let costs = &json["core_costs"];
    assert!(
        costs["launch_with_blk"]["first_line_ms"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(costs["memory"].as_array().unwrap().len() == 1);
    assert!(json["machine"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));

    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(md.contains("## Headline"), "{md}");
    assert!(md.contains("| randread-4k-qd1 |"), "{md}");
    assert!(md.contains("## Core costs"), "{md}");
    let svg = std::fs::read_to_string(out.path().join("randread-4k-qd1.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("tmpfs plexvm-blk"),
        "{svg}"
    );
    // The image was removed and the work folder cleaned up.
    assert!(!out.path().join("work").exists());
}
