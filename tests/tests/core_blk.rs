//! The core + plexvm-blk + the probe guest, end to end: data written by the guest lands
//! in the image file, malformed requests do not hurt the backend, and two VMs run at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use plexvm_tests::{
    bin, create_image, field, probe_result, run_plexvm, sha256_file, wait_for, ChildGuard,
};

const DISK: u64 = 64 << 20;

fn spec(dir: &Path, name: &str, workload: &str, device: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "[vm]\nname = \"{name}\"\nmemory_mib = 256\nkernel = \"probe\"\ncmdline = \"{workload}\"\nserial = \"file:{name}.serial\"\n\n[[device]]\nid = \"disk0\"\nkind = \"blk\"\n{device}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn exec_device(image: &str) -> String {
    format!("exec = [\"plexvm-blk\", \"--image\", \"{image}\"]")
}

fn serial(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.serial"))).unwrap_or_default()
}

fn run_vm(dir: &Path, name: &str, spec: &Path) -> (Option<i32>, String, Vec<(String, String)>) {
    let out = run_plexvm(
        &["run", spec.to_str().unwrap()],
        dir,
        Duration::from_secs(240),
    )
    .unwrap();
    let console = serial(dir, name);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let fields = probe_result(&console).unwrap_or_else(|| {
        panic!(
            "{name}: no probe result line; exit {:?}\nserial:\n{console}\nstderr:\n{stderr}",
            out.status
        )
    });
    (
        out.status.code(),
        format!("serial:\n{console}\nstderr:\n{stderr}"),
        fields,
    )
}

#[test]
fn blk_verify_data_lands_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    create_image(&dir.path().join("disk.raw"), DISK).unwrap();
    let spec = spec(
        dir.path(),
        "verify",
        "probe.workload=blk-verify probe.seed=7",
        &exec_device("disk.raw"),
    );
    let (code, log, f) = run_vm(dir.path(), "verify", &spec);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(field(&f, "status"), Some("ok"), "{log}");
    assert_eq!(field(&f, "mismatches"), Some("0"), "{log}");
    assert_eq!(field(&f, "errors"), Some("0"), "{log}");
    assert_eq!(
        field(&f, "irq"),
        Some("seen"),
        "the core's interrupt path: {log}"
    );
    let requests: u64 = field(&f, "requests").unwrap().parse().unwrap();
    assert!(requests >= 1000, "only {requests} requests: {log}");
    let verified: u64 = field(&f, "bytes_verified").unwrap().parse().unwrap();
    assert!(
        verified >= DISK / 2,
        "only {verified} bytes verified: {log}"
    );
    // The guest's hash of the whole disk as it read it back must equal the host's hash of
    // the image file: the data really went through plexvm-blk into the file.
    let host = sha256_file(&dir.path().join("disk.raw")).unwrap();
    assert_eq!(field(&f, "sha256"), Some(host.as_str()), "{log}");
    assert_ne!(host, sha256_file_of_zeros(DISK), "the guest wrote nothing");
}

fn sha256_file_of_zeros(len: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("zeros");
    create_image(&p, len).unwrap();
    sha256_file(&p).unwrap()
}

#[test]
fn blk_abuse_leaves_the_backend_alive_and_serving() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK).unwrap();
    let sock = dir.path().join("blk.sock");
    // The test owns the backend (attach mode) so that it can check it outlives the VM.
    let mut backend = ChildGuard::spawn(
        "plexvm-blk",
        Command::new(bin("plexvm-blk"))
            .args([
                "--socket",
                sock.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
            ])
            .stdin(Stdio::null()),
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || sock.exists()),
        "backend socket never appeared"
    );
    let device = format!("socket = \"{}\"", sock.display());
    let abuse = spec(dir.path(), "abuse", "probe.workload=blk-abuse", &device);
    let (code, log, f) = run_vm(dir.path(), "abuse", &abuse);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(field(&f, "status"), Some("ok"), "{log}");
    assert_eq!(field(&f, "failed"), Some("0"), "{log}");
    let cases: u32 = field(&f, "cases").unwrap().parse().unwrap();
    assert!(cases >= 9, "only {cases} abuse cases ran: {log}");
    assert!(
        backend.is_running(),
        "plexvm-blk died after the abuse run: {log}"
    );
    // Still serving: a fresh VM verifies data through the same backend process.
    let verify = spec(
        dir.path(),
        "after",
        "probe.workload=blk-verify probe.seed=3",
        &device,
    );
    let (code, log, f) = run_vm(dir.path(), "after", &verify);
    assert_eq!((code, field(&f, "status")), (Some(0), Some("ok")), "{log}");
    assert!(backend.is_running());
}

#[test]
fn two_vms_run_at_once_without_sharing_paths() {
    let dir = tempfile::tempdir().unwrap();
    let mut vms = Vec::new();
    for i in 0..2 {
        let sub = dir.path().join(format!("vm{i}"));
        std::fs::create_dir(&sub).unwrap();
        create_image(&sub.join("disk.raw"), 16 << 20).unwrap();
        // Same VM name on purpose: per-VM runtime paths must still differ.
        let spec = spec(
            &sub,
            "twin",
            &format!("probe.workload=blk-verify probe.seed={}", i + 1),
            &exec_device("disk.raw"),
        );
        let child = ChildGuard::spawn(
            "plexvm",
            Command::new(bin("plexvm"))
                .args(["run", spec.to_str().unwrap()])
                .current_dir(&sub)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .unwrap();
        vms.push((sub, child));
    }
    let mut hashes = Vec::new();
    for (sub, child) in vms {
        let out = child.output_timeout(Duration::from_secs(240)).unwrap();
        let console = serial(&sub, "twin");
        assert_eq!(
            out.status.code(),
            Some(0),
            "serial:\n{console}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f = probe_result(&console).unwrap();
        let host = sha256_file(&sub.join("disk.raw")).unwrap();
        assert_eq!(field(&f, "sha256"), Some(host.as_str()));
        hashes.push(host);
    }
    assert_ne!(
        hashes[0], hashes[1],
        "different seeds must give different disks"
    );
}

#[test]
fn demo_exits_0_and_reports_verified_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_plexvm(&["demo"], dir.path(), Duration::from_secs(240)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("demo: ok") && last.contains("verified"),
        "last line: {last}"
    );
}

#[test]
fn backend_that_fails_to_start_is_reported_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(
        dir.path(),
        "nodisk",
        "probe.workload=blk-verify",
        &exec_device("missing.raw"),
    );
    let out = run_plexvm(
        &["run", spec.to_str().unwrap()],
        dir.path(),
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("disk0"), "the device is named: {stderr}");
    assert!(
        stderr.contains("missing.raw"),
        "the backend's own message comes through: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
