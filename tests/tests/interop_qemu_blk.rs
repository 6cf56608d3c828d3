//! Our vhost-user-blk backend (`plexvm-blk`) under a frontend and a driver we did not
//! write: QEMU (TCG) with `-device vhost-user-blk-pci` and Debian's Linux kernel with
//! its virtio-pci and virtio-blk modules. The guest formats the disk, writes and
//! re-reads files, issues FLUSH and DISCARD, and reports what it saw; the host then
//! checks the image with e2fsprogs and compares every file the guest vouched for.
//!
//! See tests/README.md, section "Interoperability".

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plexvm_tests::blk_guest::{
    parse_claims, sha256_hex, GuestClaim, FILE_PREFIX, READ_ONLY_SCRIPT, READ_WRITE_SCRIPT,
    RESULT_PREFIX,
};
use plexvm_tests::ext_image::{debugfs_cat, e2fsck_clean, mkfs_ext2_from, write_test_tree};
use plexvm_tests::initramfs::{GuestKernel, InitramfsSpec, EXT4_MODULES, VIRTIO_BLK_MODULES};
use plexvm_tests::prereq;
use plexvm_tests::qemu::{self, GuestRun, QemuGuest};
use plexvm_tests::vhost_backends::{spawn_plexvm_blk, BlkBackendOptions, RunningBackend};
use plexvm_tests::{create_image, sha256_file};

/// Disk size for the read-write runs: 56 MiB of filesystem plus the 8 MiB raw tail.
const DISK_BYTES: u64 = 64 << 20;
/// Files each guest CPU writes (see `READ_WRITE_SCRIPT`'s writer).
const FILES_PER_CPU: usize = 20;
/// Files the guest deletes before `fstrim`.
const DELETED_FILES: usize = 2;
/// The guest must be done well within the one-minute budget; this only stops a hung
/// guest (it is not a timing assertion).
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The installed kernel; fails the test when it or a tool is missing.
fn guest_kernel(test: &str) -> GuestKernel {
    let mut reasons = prereq::missing(&[prereq::QEMU_SYSTEM, prereq::BUSYBOX_STATIC, prereq::CPIO]);
    reasons.extend(prereq::missing(prereq::E2FSPROGS));
    let kernel = GuestKernel::find_installed();
    if let Err(e) = &kernel {
        reasons.push(e.to_string());
    }
    prereq::require(test, &reasons);
    kernel.expect("checked above")
}

/// Boots `script` under QEMU against `backend`'s socket and returns the guest's run.
fn boot(
    dir: &Path,
    kernel: &GuestKernel,
    script: &str,
    opts: &BlkBackendOptions,
    vcpus: u32,
) -> Result<GuestRun> {
    let mut modules: Vec<&str> = VIRTIO_BLK_MODULES.to_vec();
    modules.extend_from_slice(EXT4_MODULES);
    let initrd = InitramfsSpec::new(kernel.clone(), &modules, script).build(dir)?;
    let mut guest = QemuGuest::new(&kernel.image, &initrd);
    guest.vcpus = vcpus;
    let queues = format!("num-queues={}", opts.queues);
    guest.vhost_user_blk("blk0", &opts.socket, &[&queues]);
    let _cpu = qemu::exclusive();
    let started = Instant::now();
    let run = guest.run(dir, GUEST_TIMEOUT)?;
    // Shown by the test harness only when the test fails.
    eprintln!("guest ran for {:?}\n{}", started.elapsed(), run.tail(200));
    Ok(run)
}

/// The guest's result fields; fails with the console tail unless it says status=ok.
fn guest_result(run: &GuestRun, backend: &RunningBackend) -> Result<Vec<(String, String)>> {
    let context = || format!("{}\n--- backend ---\n{}", run.tail(40), backend.log_text());
    let fields = run
        .result_line(RESULT_PREFIX)
        .with_context(|| format!("the guest printed no result line\n{}", context()))?;
    if get(&fields, "status") != Some("ok") {
        bail!("the guest workload failed\n{}", context());
    }
    Ok(fields)
}

fn get<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Asserts `key=want` in the guest's result, showing the whole line otherwise.
fn expect(fields: &[(String, String)], key: &str, want: &str) -> Result<()> {
    ensure!(
        get(fields, key) == Some(want),
        "guest result {key}={:?}, expected {want:?}; result: {fields:?}",
        get(fields, key)
    );
    Ok(())
}

fn read_range(image: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = fs::File::open(image)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Every file and raw range the guest vouched for has the same SHA-256 on the host;
/// returns how many files were checked.
fn check_claims_on_host(image: &Path, run: &GuestRun) -> Result<usize> {
    let claims = parse_claims(&run.lines_with(FILE_PREFIX));
    let mut files = 0;
    for claim in &claims {
        match claim {
            GuestClaim::File { path, sha256 } => {
                let data = debugfs_cat(image, path)?;
                ensure!(
                    &sha256_hex(&data) == sha256,
                    "{path}: the host reads {} bytes with another checksum than the guest wrote",
                    data.len()
                );
                files += 1;
            }
            GuestClaim::Raw {
                offset_mib,
                len_mib,
                sha256,
            } => {
                let data = read_range(image, offset_mib << 20, (*len_mib << 20) as usize)?;
                ensure!(
                    &sha256_hex(&data) == sha256,
                    "raw range at {offset_mib} MiB: the host reads other bytes than the guest wrote"
                );
            }
        }
    }
    Ok(files)
}

/// The read-write workload against plexvm-blk with `queues` queues and `vcpus` vCPUs,
/// then every host-side check.
fn read_write_round_trip(test: &str, vcpus: u32, queues: u16) -> Result<()> {
    let kernel = guest_kernel(test);
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.raw");
    create_image(&image, DISK_BYTES)?;
    let mut opts = BlkBackendOptions::new(&image, &dir.path().join("blk.sock"));
    opts.queues = queues;
    let backend = spawn_plexvm_blk(&opts)?;
    let run = boot(dir.path(), &kernel, READ_WRITE_SCRIPT, &opts, vcpus)?;
    let fields = guest_result(&run, &backend)?;
    let log = backend.log_text();
    let status = backend.stop()?;
    ensure!(status.success(), "plexvm-blk ended with {status}\n{log}");

    let cpus = vcpus as usize;
    expect(&fields, "files", &(FILES_PER_CPU * cpus).to_string())?;
    for key in ["bad", "bad_after_trim", "io_errors", "ro"] {
        expect(&fields, key, "0")?;
    }
    expect(&fields, "raw", "ok")?;
    expect(&fields, "queues", &queues.to_string())?;
    let irqs: Vec<u64> = get(&fields, "irqs")
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        irqs.len() == usize::from(queues) && irqs.iter().all(|&n| n > 0),
        "every queue must have completed requests, got interrupts per queue {irqs:?}"
    );
    let trimmed: u64 = get(&fields, "trimmed").unwrap_or("").parse().unwrap_or(0);
    ensure!(trimmed > 0, "fstrim discarded nothing: {fields:?}");

    e2fsck_clean(&image)?;
    let checked = check_claims_on_host(&image, &run)?;
    ensure!(
        checked == FILES_PER_CPU * cpus - DELETED_FILES,
        "the guest vouched for {checked} files"
    );
    // plexvm-blk turns DISCARD into a hole punch: the 2 MiB the guest discarded after
    // its raw pattern read back as zeroes (they held random data before).
    let raw_mib: u64 = get(&fields, "raw_offset_mib").unwrap_or("").parse()?;
    let discarded = read_range(&image, (raw_mib + 6) << 20, 2 << 20)?;
    ensure!(
        discarded.iter().all(|&b| b == 0),
        "the range the guest discarded still holds data"
    );
    Ok(())
}

#[test]
fn linux_guest_ext2_workload_on_plexvm_blk() -> Result<()> {
    read_write_round_trip("linux_guest_ext2_workload_on_plexvm_blk", 1, 1)
}

#[test]
fn linux_guest_two_vcpus_multiqueue_on_plexvm_blk() -> Result<()> {
    read_write_round_trip("linux_guest_two_vcpus_multiqueue_on_plexvm_blk", 2, 2)
}

#[test]
fn linux_guest_sees_read_only_plexvm_blk_disk() -> Result<()> {
    let test = "linux_guest_sees_read_only_plexvm_blk_disk";
    let kernel = guest_kernel(test);
    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("tree");
    let names = write_test_tree(&tree, 42)?;
    let image = dir.path().join("disk.raw");
    mkfs_ext2_from(&image, &tree, 32 << 10)?;
    let before = sha256_file(&image)?;

    let mut opts = BlkBackendOptions::new(&image, &dir.path().join("blk.sock"));
    opts.readonly = true;
    let backend = spawn_plexvm_blk(&opts)?;
    let run = boot(dir.path(), &kernel, READ_ONLY_SCRIPT, &opts, 1)?;
    let fields = guest_result(&run, &backend)?;
    let log = backend.log_text();
    let status = backend.stop()?;
    ensure!(status.success(), "plexvm-blk ended with {status}\n{log}");

    expect(&fields, "ro", "1")?;
    expect(&fields, "files", &names.len().to_string())?;
    for key in ["fs_write", "remount_rw", "raw_write"] {
        expect(&fields, key, "refused")?;
    }
    expect(&fields, "io_errors", "0")?;
    // Every file the guest read matches the host's original.
    let claims = parse_claims(&run.lines_with(FILE_PREFIX));
    ensure!(claims.len() == names.len(), "guest listed {claims:?}");
    for claim in claims {
        let GuestClaim::File { path, sha256 } = claim else {
            bail!("unexpected raw claim in the read-only run");
        };
        let original = fs::read(tree.join(path.trim_start_matches('/')))?;
        ensure!(
            sha256_hex(&original) == sha256,
            "{path}: guest read other bytes"
        );
    }
    ensure!(
        sha256_file(&image)? == before,
        "the read-only image changed"
    );
    e2fsck_clean(&image)?;
    Ok(())
}
