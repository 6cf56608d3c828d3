//! Our core against a vhost-user-blk backend we did not write: `qemu-storage-daemon`
//! (Debian `qemu-utils`) exporting a raw image, attached with `socket = ...` in the
//! spec, driven by the probe guest's `blk-verify` workload. And the swap check: the
//! same workload on the same starting image gives byte-identical images whether
//! `plexvm-blk` or `qemu-storage-daemon` serves it.
//!
//! See tests/README.md, section "Interoperability".

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plexvm_tests::ext_image::pattern_bytes;
use plexvm_tests::prereq;
use plexvm_tests::vhost_backends::{
    spawn_plexvm_blk, spawn_qemu_storage_daemon, BlkBackendOptions, RunningBackend,
};
use plexvm_tests::{field, probe_result, run_plexvm, sha256_file};

/// Disk size: the demo's 64 MiB.
const DISK_BYTES: usize = 64 << 20;
/// Stops a hung VM; the probe needs well under a second here (not a timing assertion).
const VM_TIMEOUT: Duration = Duration::from_secs(120);

/// Which backend serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    PlexvmBlk,
    QemuStorageDaemon,
}

/// What one VM run left behind.
#[derive(Debug)]
struct ProbeRun {
    /// The probe's result fields.
    fields: Vec<(String, String)>,
    /// sha256sum of the image before the run.
    initial_sha256: String,
    /// sha256sum of the image after the backend ended.
    image_sha256: String,
}

/// Fails the test when qemu-storage-daemon is missing (tests/run.sh installs it).
fn require_qsd(test: &str) {
    prereq::require(test, &prereq::missing(&[prereq::QEMU_STORAGE_DAEMON]));
}

/// A spec for the probe's blk-verify workload with one disk reached through `socket`.
fn spec_text(name: &str, seed: u64, socket: &Path) -> String {
    format!(
        r#"[vm]
name = "{name}"
vcpus = 1
memory_mib = 256
kernel = "probe"
cmdline = "probe.workload=blk-verify probe.seed={seed}"
serial = "stdout"

[[device]]
id = "disk0"
kind = "blk"
socket = "{socket}"
"#,
        socket = socket.display()
    )
}

fn start(backend: Backend, opts: &BlkBackendOptions) -> Result<RunningBackend> {
    Ok(match backend {
        Backend::PlexvmBlk => spawn_plexvm_blk(opts)?,
        Backend::QemuStorageDaemon => spawn_qemu_storage_daemon(opts)?,
    })
}

/// Runs the probe with `seed` against `image` served by `backend`; fails unless the
/// probe reports status=ok and `plexvm` exits 0.
fn probe_run(dir: &Path, backend: Backend, image: &Path, seed: u64) -> Result<ProbeRun> {
    let initial_sha256 = sha256_file(image)?;
    let socket = dir.join("blk.sock");
    let opts = BlkBackendOptions::new(image, &socket);
    let server = start(backend, &opts)?;
    let spec = dir.join("vm.toml");
    fs::write(&spec, spec_text("interop", seed, &socket))?;
    let out = run_plexvm(&["run", &spec.to_string_lossy()], dir, VM_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = || {
        format!(
            "backend {backend:?}, plexvm {}\n--- plexvm stdout ---\n{stdout}\n--- plexvm stderr ---\n{}\n--- backend log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            server.log_text()
        )
    };
    let fields = probe_result(&stdout)
        .with_context(|| format!("the probe printed no result line\n{}", context()))?;
    ensure!(
        out.status.success() && field(&fields, "status") == Some("ok"),
        "the probe's blk-verify failed\n{}",
        context()
    );
    for key in ["mismatches", "errors"] {
        ensure!(
            field(&fields, key) == Some("0"),
            "{key} != 0\n{}",
            context()
        );
    }
    // Both backends flush and exit on SIGTERM; the image is complete after that.
    let log = server.log_text();
    let status = server.stop()?;
    ensure!(status.success(), "{backend:?} ended with {status}\n{log}");
    Ok(ProbeRun {
        fields,
        initial_sha256,
        image_sha256: sha256_file(image)?,
    })
}

/// A 64 MiB image with deterministic non-zero content, so that sectors the probe does
/// not write must come back unchanged too.
fn patterned_image(path: &Path) -> Result<()> {
    fs::write(path, pattern_bytes(0x5eed, DISK_BYTES))?;
    Ok(())
}

#[test]
fn core_probe_verifies_disk_served_by_qemu_storage_daemon() -> Result<()> {
    require_qsd("core_probe_verifies_disk_served_by_qemu_storage_daemon");
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.raw");
    patterned_image(&image)?;
    let run = probe_run(dir.path(), Backend::QemuStorageDaemon, &image, 11)?;
    ensure!(
        field(&run.fields, "sha256") == Some(run.image_sha256.as_str()),
        "the probe read back a disk with sha256 {:?}, the host's image has {}",
        field(&run.fields, "sha256"),
        run.image_sha256
    );
    let written: u64 = field(&run.fields, "bytes_written").unwrap_or("0").parse()?;
    ensure!(written > 0, "the probe wrote nothing: {:?}", run.fields);
    ensure!(
        run.image_sha256 != run.initial_sha256,
        "the image did not change"
    );
    Ok(())
}

#[test]
fn swap_plexvm_blk_for_qemu_storage_daemon_gives_identical_images() -> Result<()> {
    require_qsd("swap_plexvm_blk_for_qemu_storage_daemon_gives_identical_images");
    let seed = 23;
    let mut runs = Vec::new();
    let mut dirs = Vec::new(); // kept until the end: each holds one run's image
    for backend in [Backend::PlexvmBlk, Backend::QemuStorageDaemon] {
        let dir = tempfile::tempdir()?;
        let image = dir.path().join("disk.raw");
        patterned_image(&image)?;
        runs.push(probe_run(dir.path(), backend, &image, seed)?);
        dirs.push(dir);
    }
    let (ours, theirs) = (&runs[0], &runs[1]);
    for run in &runs {
        ensure!(
            field(&run.fields, "sha256") == Some(run.image_sha256.as_str()),
            "probe and host disagree about the image: {:?} vs {}",
            run.fields,
            run.image_sha256
        );
    }
    ensure!(
        ours.image_sha256 != ours.initial_sha256,
        "the probe did not change the image"
    );
    ensure!(
        ours.image_sha256 == theirs.image_sha256,
        "same workload, same seed, different images: plexvm-blk {} vs qemu-storage-daemon {}",
        ours.image_sha256,
        theirs.image_sha256
    );
    Ok(())
}
