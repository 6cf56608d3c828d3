//! Real Linux guests on plexvm's own core, in the lab (tests/src/lab.rs): Debian's stock
//! kernel boots on plexvm inside a QEMU/TCG machine whose KVM is ordinary (not these
//! hosts' nested PVM), so every test run checks the core against a real operating system:
//! ACPI discovery, SMP, interrupts, virtio-mmio, reset and power-off, crash recovery and
//! live swap, each with outcomes checked on the host (checksums, e2fsck, exit codes).

use std::time::Duration;

use plexvm_tests::ext_image;
use plexvm_tests::kernel_image::vmlinux;
use plexvm_tests::lab::Lab;
use plexvm_tests::lab_linux::{blk_device, GuestOutput, LinuxGuest};

/// How long one lab may run. Measured here: 1–4 minutes per test on an idle machine; the
/// limit only ends a hung lab (and says where it hung).
const LAB_TIMEOUT: Duration = Duration::from_secs(900);

/// The guest half of the ext4 check: make ext4 on the plexvm-blk disk found through ACPI,
/// write files of several sizes, fsync, print their checksums, report the CPU count.
const EXT4_SCRIPT: &str = r#"
wait_dev /dev/vda
/usr/sbin/mke2fs -q -t ext4 -F /dev/vda || fail mkfs
mount -t ext4 /dev/vda /mnt || fail mount
mkdir -p /mnt/tree/sub
n=0
for size in 0 1 4095 65536 1000000 3000000; do
  n=$((n + 1))
  head -c $size /dev/urandom > /mnt/tree/sub/file$n
done
dd if=/dev/urandom of=/mnt/tree/big bs=1M count=8 conv=fsync 2>/dev/null || fail dd
sync
for f in /mnt/tree/sub/* /mnt/tree/big; do echo "GUEST-FILE $(sha256sum $f)"; done
umount /mnt || fail umount
result status=ok cpus=$(nproc) acpi_virtio=$(acpi_virtio) io_errors=$(io_errors)
"#;

/// Checks one guest of the ext4 scenario on the host: exit code, CPU count, ACPI, and the
/// image (e2fsck clean, every file the guest vouched for reads back with its checksum).
fn check_ext4_guest(lab: &plexvm_tests::lab::LabRun, name: &str, vcpus: u32) {
    let boot = lab.result(&format!("vm-{name}"));
    let out = GuestOutput::read(&lab.work, name);
    let context = || format!("{name}: {boot:?}\n{}", lab.diagnostics());
    assert_eq!(
        boot.get("exit").map(String::as_str),
        Some("0"),
        "{}",
        context()
    );
    let result = out.result();
    assert_eq!(
        result.get("status").map(String::as_str),
        Some("ok"),
        "{}",
        context()
    );
    assert_eq!(
        result.get("cpus"),
        Some(&vcpus.to_string()),
        "{}",
        context()
    );
    assert_eq!(
        result.get("acpi_virtio").map(String::as_str),
        Some("1"),
        "{}",
        context()
    );
    assert_eq!(
        result.get("io_errors").map(String::as_str),
        Some("0"),
        "{}",
        context()
    );
    let image = lab.file(&format!("{name}.img"));
    ext_image::e2fsck_clean(&image).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let files = out.files();
    assert_eq!(files.len(), 7, "{}", context());
    for (sum, path) in files {
        let inner = path.trim_start_matches("/mnt");
        let data = ext_image::debugfs_cat(&image, inner).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            plexvm_tests::blk_guest::sha256_hex(&data),
            sum,
            "{name}: {path} differs on the host\n{}",
            context()
        );
    }
}

/// Runs each `(name, vcpus)` guest of `guests` one after the other in one lab, each on a
/// fresh 64 MiB plexvm-blk disk, and copies the disks out.
fn ext4_scenario(names: &[&str]) -> String {
    let mut s = String::new();
    for name in names {
        s.push_str(&format!(
            "truncate -s 64M \"$LAB_SCRATCH/{name}.img\"\n\
             vm_start {name} {name}.toml\n\
             vm_wait {name} 300; lab_result vm-{name} exit=$VM_EXIT\n\
             copy_out \"$LAB_SCRATCH/{name}.img\"\n"
        ));
    }
    s
}

#[test]
fn lab_debian_bzimage_and_vmlinux_boot_to_userspace_with_1_vcpu_and_write_ext4() {
    let test = "lab_debian_bzimage_and_vmlinux_boot_to_userspace_with_1_vcpu_and_write_ext4";
    let lab = Lab::new(test).unwrap();
    let kernel = lab.kernel().clone();
    let elf = vmlinux(test, &kernel);
    let guests = [("bz1", kernel.image.clone()), ("elf1", elf)];
    for (name, image) in &guests {
        let g = LinuxGuest::build(lab.work(), name, &kernel, image, &[], EXT4_SCRIPT);
        let devices = blk_device("disk0", &format!("/tmp/lab/{name}.img"));
        lab.write(
            &format!("{name}.toml"),
            &g.spec(lab.work(), name, 1, 512, &devices),
        );
    }
    let names: Vec<&str> = guests.iter().map(|g| g.0).collect();
    let run = lab.run(&ext4_scenario(&names), LAB_TIMEOUT).unwrap();
    run.expect_success();
    for (name, _) in &guests {
        check_ext4_guest(&run, name, 1);
    }
}

/// The guest half of the full boot (the test that used to return early on these hosts):
/// find the virtio-blk disk ACPI announced, mount the ext2 image the host made, print
/// the checksum of its file and the CPU count, and reset through the i8042 (`reboot -f`
/// with the core's `reboot=k`), which ends plexvm with 0.
const FULL_BOOT_SCRIPT: &str = r#"
wait_dev /dev/vda
mount -t ext2 -o ro /dev/vda /mnt || fail mount
result status=ok cpus=$(nproc) sum=$(sha256sum /mnt/data.bin | cut -d' ' -f1) acpi_virtio=$(acpi_virtio)
umount /mnt
reboot -f
"#;

#[test]
fn lab_full_boot_to_init_reads_a_plexvm_blk_disk() {
    let test = "lab_full_boot_to_init_reads_a_plexvm_blk_disk";
    let lab = Lab::new(test).unwrap();
    let kernel = lab.kernel().clone();
    let tree = lab.work().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("data.bin"), ext_image::pattern_bytes(42, 3 << 20)).unwrap();
    let want = plexvm_tests::sha256_file(&tree.join("data.bin")).unwrap();
    ext_image::mkfs_ext2_from(&lab.work().join("full.img"), &tree, 16 << 10).unwrap();
    let g = LinuxGuest::build(
        lab.work(),
        "full",
        &kernel,
        &kernel.image,
        &[],
        FULL_BOOT_SCRIPT,
    );
    let image = lab.work().join("full.img");
    let devices = blk_device("disk0", &image.display().to_string());
    lab.write("full.toml", &g.spec(lab.work(), "full", 2, 512, &devices));
    let run = lab
        .run(
            "vm_start full full.toml\nvm_wait full 300; lab_result vm-full exit=$VM_EXIT\n",
            LAB_TIMEOUT,
        )
        .unwrap();
    run.expect_success();
    let out = GuestOutput::read(&run.work, "full");
    let context = || run.diagnostics();
    assert_eq!(
        run.result("vm-full").get("exit").map(String::as_str),
        Some("0"),
        "reboot -f must end plexvm with 0\n{}",
        context()
    );
    let r = out.result();
    assert_eq!(
        r.get("status").map(String::as_str),
        Some("ok"),
        "{}",
        context()
    );
    assert_eq!(
        r.get("cpus").map(String::as_str),
        Some("2"),
        "{}",
        context()
    );
    assert_eq!(r.get("sum"), Some(&want), "{}", context());
    assert_eq!(
        r.get("acpi_virtio").map(String::as_str),
        Some("1"),
        "{}",
        context()
    );
}

/// Guest scripts that end the VM three ways: power off (ACPI S5 through the sleep control
/// register), reset (i8042), and a kernel panic (pvpanic, exit code 3).
const POWEROFF_SCRIPT: &str = r#"
result status=ok pvpanic=$(ls /sys/bus/platform/drivers/pvpanic-mmio | grep -c QEMU0001)
poweroff -f
"#;
const REBOOT_SCRIPT: &str = "result status=ok\nreboot -f\n";
const PANIC_SCRIPT: &str = r#"
result status=ok pvpanic=$(ls /sys/bus/platform/drivers/pvpanic-mmio | grep -c QEMU0001)
echo c > /proc/sysrq-trigger
"#;

#[test]
fn lab_poweroff_and_reboot_end_plexvm_with_0_and_a_guest_panic_with_3() {
    let test = "lab_poweroff_and_reboot_end_plexvm_with_0_and_a_guest_panic_with_3";
    let lab = Lab::new(test).unwrap();
    let kernel = lab.kernel().clone();
    let cases = [
        ("off", POWEROFF_SCRIPT, "0"),
        ("reboot", REBOOT_SCRIPT, "0"),
        ("panic", PANIC_SCRIPT, "3"),
    ];
    let mut scenario = String::new();
    for (name, script, _) in &cases {
        let g = LinuxGuest::build(lab.work(), name, &kernel, &kernel.image, &[], script);
        lab.write(
            &format!("{name}.toml"),
            &g.spec(lab.work(), name, 1, 256, ""),
        );
        scenario.push_str(&format!(
            "vm_start {name} {name}.toml\nvm_wait {name} 300; lab_result vm-{name} exit=$VM_EXIT\n"
        ));
    }
    let run = lab.run(&scenario, LAB_TIMEOUT).unwrap();
    run.expect_success();
    for (name, _, code) in &cases {
        let out = GuestOutput::read(&run.work, name);
        let exit = run.result(&format!("vm-{name}"));
        assert_eq!(
            exit.get("exit").map(String::as_str),
            Some(*code),
            "{name}\n{}",
            run.diagnostics()
        );
        assert_eq!(
            out.result().get("status").map(String::as_str),
            Some("ok"),
            "{name}\n{}",
            run.diagnostics()
        );
        // No device is on PCI here: the core's bare host bridge answers Linux's probe.
        assert!(
            !out.serial.contains("PCI: Fatal"),
            "{name}: Linux found no PCI configuration access\n{}",
            out.serial
        );
    }
    for name in ["off", "panic"] {
        let out = GuestOutput::read(&run.work, name);
        assert_eq!(
            out.result().get("pvpanic").map(String::as_str),
            Some("1"),
            "{name}: pvpanic not bound\n{}",
            out.serial
        );
    }
    let panic = GuestOutput::read(&run.work, "panic");
    assert!(panic.serial.contains("Kernel panic"), "{}", panic.serial);
    assert!(
        run.text("panic.err").contains("panic"),
        "the core must say the guest panicked:\n{}",
        run.text("panic.err")
    );
}

/// The guest half of the kill and swap tests: 24 MiB of random data written to the raw
/// disk vda with O_DIRECT per pass, and between passes files written with fsync on an
/// ext4 file system on vdb, pass after pass until the scenario writes `STOP` into the
/// control disk vdc (1 MiB); then everything is read back and checked in the guest.
const WRITE_UNTIL_STOPPED_SCRIPT: &str = r#"
wait_dev /dev/vda
wait_dev /dev/vdb
wait_dev /dev/vdc
[ "$(cat /sys/block/vdc/size)" = 2048 ] || fail disk-order
stop_requested() { [ "$(dd if=/dev/vdc bs=512 count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ]; }
head -c 25165824 /dev/urandom > /tmp/raw
RAW=$(sha256sum /tmp/raw | cut -d' ' -f1)
/usr/sbin/mke2fs -q -t ext4 -F /dev/vdb || fail mkfs
mount -t ext4 /dev/vdb /mnt || fail mount
echo "GUEST-PHASE writing"
r=0
while ! stop_requested; do
  r=$((r + 1))
  [ $r -le 200 ] || fail never-stopped
  dd if=/tmp/raw of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null || fail dd-raw-$r
  for i in 1 2 3 4; do
    dd if=/dev/urandom of=/mnt/r$r-f$i bs=64k count=$((i * 4)) conv=fsync 2>/dev/null || fail dd-file-$r-$i
  done
  echo "GUEST-PHASE round $r"
done
echo "GUEST-PHASE writes-done"
sync
for f in /mnt/r*; do echo "GUEST-FILE $(sha256sum $f)"; done
umount /mnt || fail umount
BACK=$(dd if=/dev/vda bs=64k count=384 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$BACK" = "$RAW" ] || fail raw-readback
result status=ok raw=$RAW rounds=$r io_errors=$(io_errors)
"#;

/// Scenario lines that create the three disks of [`WRITE_UNTIL_STOPPED_SCRIPT`] for VM
/// `name`, and `stop_writes`, which tells its guest to finish.
fn disks_until_stopped(name: &str) -> String {
    format!(
        "truncate -s 64M \"$LAB_SCRATCH/{name}-raw.img\" \"$LAB_SCRATCH/{name}-fs.img\"\n\
         truncate -s 1M \"$LAB_SCRATCH/{name}-ctl.img\"\n\
         stop_writes() {{ printf STOP | dd of=\"$LAB_SCRATCH/{name}-ctl.img\" conv=notrunc 2>/dev/null; }}\n"
    )
}

/// Host-side checks of the two disks the kill and swap tests write: the guest's result,
/// no I/O error in its kernel log, the raw disk's first 24 MiB equal to what the guest
/// wrote, the ext4 image clean and every file with the guest's checksum.
fn check_written_disks(run: &plexvm_tests::lab::LabRun, name: &str, raw_img: &str, fs_img: &str) {
    let out = GuestOutput::read(&run.work, name);
    let r = out.result();
    let context = || format!("{r:?}\n{}", run.diagnostics());
    assert_eq!(
        run.result(&format!("vm-{name}"))
            .get("exit")
            .map(String::as_str),
        Some("0"),
        "{}",
        context()
    );
    assert_eq!(
        r.get("status").map(String::as_str),
        Some("ok"),
        "{}",
        context()
    );
    assert_eq!(
        r.get("io_errors").map(String::as_str),
        Some("0"),
        "{}",
        context()
    );
    let raw = std::fs::read(run.file(raw_img)).unwrap();
    assert!(raw.len() >= 24 << 20, "{}", context());
    assert_eq!(
        Some(&plexvm_tests::blk_guest::sha256_hex(&raw[..24 << 20])),
        r.get("raw"),
        "the raw disk does not hold what the guest wrote\n{}",
        context()
    );
    let fs = run.file(fs_img);
    ext_image::e2fsck_clean(&fs).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let files = out.files();
    assert!(!files.is_empty(), "{}", context());
    for (sum, path) in files {
        let data = ext_image::debugfs_cat(&fs, path.trim_start_matches("/mnt")).unwrap();
        assert_eq!(
            plexvm_tests::blk_guest::sha256_hex(&data),
            sum,
            "{path}\n{}",
            context()
        );
    }
}

/// Builds the guest `name` of [`WRITE_UNTIL_STOPPED_SCRIPT`] with its three disks and
/// returns the scenario lines that start it and wait until it writes (`$API` is its
/// API socket, `stop_writes` ends its writing).
fn start_writing_guest(lab: &Lab, name: &str) -> String {
    let kernel = lab.kernel().clone();
    let g = LinuxGuest::build(
        lab.work(),
        name,
        &kernel,
        &kernel.image,
        &[],
        WRITE_UNTIL_STOPPED_SCRIPT,
    );
    lab.write(
        &format!("{name}.toml"),
        &g.spec(lab.work(), name, 2, 512, &three_disks(name)),
    );
    disks_until_stopped(name)
        + &format!(
            "vm_start {name} {name}.toml\n\
             API=$LAB_SCRATCH/{name}.api\n\
             wait_for {name}.serial.log \"GUEST-PHASE writing\" 300 \"$(vm_pid {name})\"\n"
        )
}

/// The plexvm-blk disks `raw`, `fs` and `ctl` of [`WRITE_UNTIL_STOPPED_SCRIPT`].
fn three_disks(name: &str) -> String {
    ["raw", "fs", "ctl"]
        .iter()
        .map(|d| blk_device(d, &format!("/tmp/lab/{name}-{d}.img")))
        .collect()
}

#[test]
fn lab_plexvm_blk_sigkilled_12_times_during_linux_direct_and_fsync_writes() {
    let test = "lab_plexvm_blk_sigkilled_12_times_during_linux_direct_and_fsync_writes";
    let lab = Lab::new(test).unwrap();
    // Kill the two disks' backends in turn, each time waiting until the core has
    // restarted it and serves again, while the guest writes.
    let scenario = start_writing_guest(&lab, "kill")
        + r#"
kills=0
while ((kills < 12)); do
  sleep 0.7
  dev=$([ $((kills % 2)) = 0 ] && echo raw || echo fs)
  pid=$(dev_field "$API" $dev backend_pid)
  before=$(dev_field "$API" $dev restarts)
  kill -9 "$pid"
  kills=$((kills + 1))
  wait_dev_field "$API" $dev restarts $((before + 1)) 60
  wait_dev_field "$API" $dev state up 60
  lab_log "kill $kills: $dev (pid $pid) restarted, now pid $(dev_field "$API" $dev backend_pid)"
done
lab_result kills n=$kills raw_restarts=$(dev_field "$API" raw restarts) fs_restarts=$(dev_field "$API" fs restarts)
grep -q "GUEST-PHASE writes-done" kill.serial.log && lab_fail "the guest stopped writing before the kills did"
stop_writes
vm_wait kill 600; lab_result vm-kill exit=$VM_EXIT
copy_out "$LAB_SCRATCH/kill-raw.img"
copy_out "$LAB_SCRATCH/kill-fs.img"
"#;
    let run = lab.run(&scenario, LAB_TIMEOUT).unwrap();
    run.expect_success();
    let kills = run.result("kills");
    assert_eq!(
        kills.get("n").map(String::as_str),
        Some("12"),
        "the guest finished before 12 kills\n{}",
        run.diagnostics()
    );
    assert_eq!(
        kills.get("raw_restarts").map(String::as_str),
        Some("6"),
        "{}",
        run.diagnostics()
    );
    assert_eq!(
        kills.get("fs_restarts").map(String::as_str),
        Some("6"),
        "{}",
        run.diagnostics()
    );
    check_written_disks(&run, "kill", "kill-raw.img", "kill-fs.img");
}

#[test]
fn lab_live_swap_plexvm_blk_to_qemu_storage_daemon_and_back_under_linux_writes() {
    let test = "lab_live_swap_plexvm_blk_to_qemu_storage_daemon_and_back_under_linux_writes";
    let lab = Lab::new(test).unwrap();
    plexvm_tests::prereq::require(
        test,
        &plexvm_tests::prereq::missing(&[plexvm_tests::prereq::QEMU_STORAGE_DAEMON]),
    );
    // Each disk goes plexvm-blk -> qemu-storage-daemon -> plexvm-blk while the guest
    // writes; the API must show the socket of each backend in turn.
    let scenario = start_writing_guest(&lab, "swap")
        + r#"
swaps=0
for dev in raw fs; do
  img="$LAB_SCRATCH/swap-$dev.img"
  qsd="$LAB_SCRATCH/qsd-$dev.sock"
  qemu-storage-daemon --blockdev driver=file,node-name=f,filename="$img" \
    --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="$qsd",writable=on \
    >"$LAB_WORK/qsd-$dev.err" 2>&1 &
  echo $! > "$LAB_SCRATCH/qsd-$dev.pid"
  wait_socket "$qsd" 60
  plexvm ctl --api "$API" swap $dev --socket "$qsd" > /dev/null
  [ "$(dev_field "$API" $dev socket)" = "$qsd" ] || lab_fail "$dev is not on qemu-storage-daemon"
  wait_dev_field "$API" $dev state up 60
  swaps=$((swaps + 1))
  sleep 2
  plexvm ctl --api "$API" swap $dev --exec plexvm-blk --image "$img" > /dev/null
  wait_dev_field "$API" $dev state up 60
  [ "$(dev_field "$API" $dev socket)" != "$qsd" ] || lab_fail "$dev is still on qemu-storage-daemon"
  kill "$(cat "$LAB_SCRATCH/qsd-$dev.pid")" 2>/dev/null || true
  swaps=$((swaps + 1))
  lab_log "$dev: plexvm-blk -> qemu-storage-daemon -> plexvm-blk (pid $(dev_field "$API" $dev backend_pid))"
done
grep -q "GUEST-PHASE writes-done" swap.serial.log && lab_fail "the guest stopped writing before the swaps did"
lab_result swaps n=$swaps
stop_writes
vm_wait swap 600; lab_result vm-swap exit=$VM_EXIT
copy_out "$LAB_SCRATCH/swap-raw.img"
copy_out "$LAB_SCRATCH/swap-fs.img"
"#;
    let run = lab.run(&scenario, LAB_TIMEOUT).unwrap();
    run.expect_success();
    assert_eq!(
        run.result("swaps").get("n").map(String::as_str),
        Some("4"),
        "{}",
        run.diagnostics()
    );
    check_written_disks(&run, "swap", "swap-raw.img", "swap-fs.img");
}

/// A guest that prints a numbered tick twice a second until it is stopped.
const TICK_SCRIPT: &str = r#"
echo "GUEST-PHASE ticking"
i=0
while true; do i=$((i + 1)); echo "GUEST-TICK $i"; sleep 0.5; done
"#;

#[test]
fn lab_api_pause_resume_and_stop_of_a_running_linux_guest() {
    let test = "lab_api_pause_resume_and_stop_of_a_running_linux_guest";
    let lab = Lab::new(test).unwrap();
    let kernel = lab.kernel().clone();
    let g = LinuxGuest::build(lab.work(), "tick", &kernel, &kernel.image, &[], TICK_SCRIPT);
    let disk = blk_device("disk0", "/tmp/lab/tick.img");
    lab.write("tick.toml", &g.spec(lab.work(), "tick", 2, 256, &disk));
    // While paused no tick may appear; after resume they must go on; stop ends plexvm
    // with 0 and leaves no backend behind.
    let scenario = r#"
truncate -s 8M "$LAB_SCRATCH/tick.img"
vm_start tick tick.toml
API=$LAB_SCRATCH/tick.api
wait_for tick.serial.log "GUEST-TICK 3" 300 "$(vm_pid tick)"
ticks() { grep -c GUEST-TICK tick.serial.log; }
plexvm ctl --api "$API" pause
[ "$(vm_field "$API" state)" = paused ] || lab_fail "not paused"
sleep 1
paused_at=$(ticks)
sleep 4
paused_after=$(ticks)
plexvm ctl --api "$API" resume
wait_vm_field "$API" state running 10
wait_for tick.serial.log "GUEST-TICK $((paused_after + 3))" 60 "$(vm_pid tick)"
backend=$(dev_field "$API" disk0 backend_pid)
plexvm ctl --api "$API" stop
vm_wait tick 60; rc=$VM_EXIT
left=$(kill -0 "$backend" 2>/dev/null && echo yes || echo no)
lab_result pause at=$paused_at after=$paused_after resumed=$(ticks) exit=$rc backend_left=$left
"#;
    let run = lab.run(scenario, LAB_TIMEOUT).unwrap();
    run.expect_success();
    let r = run.result("pause");
    let n = |k: &str| r.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    assert!(n("at") >= 3, "{r:?}\n{}", run.diagnostics());
    assert_eq!(
        n("at"),
        n("after"),
        "the guest ran while paused: {r:?}\n{}",
        run.diagnostics()
    );
    assert!(
        n("resumed") >= n("after") + 3,
        "{r:?}\n{}",
        run.diagnostics()
    );
    assert_eq!(
        r.get("exit").map(String::as_str),
        Some("0"),
        "{r:?}\n{}",
        run.diagnostics()
    );
    assert_eq!(
        r.get("backend_left").map(String::as_str),
        Some("no"),
        "{r:?}\n{}",
        run.diagnostics()
    );
}

/// The README's "Booting Linux" example, run as written: its `debian.toml` (taken from
/// README.md itself), an `initramfs.cpio` that loads virtio_mmio and virtio_blk, and a
/// `disk.raw` beside them; the guest writes and reads back a block and powers off.
const README_GUEST_SCRIPT: &str = r#"
wait_dev /dev/vda
echo plexvm-readme-example > /tmp/block
dd if=/tmp/block of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null || fail write
BACK=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 22)
[ "$BACK" = plexvm-readme-example ] || fail readback
result status=ok cpus=$(nproc)
"#;

/// The TOML block of README.md that starts with `# debian.toml`.
fn readme_debian_toml() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("# debian.toml")
        .expect("README.md has the debian.toml example");
    let end = readme[start..]
        .find("```")
        .expect("the example's code block ends");
    readme[start..start + end].to_string()
}

#[test]
fn lab_readme_booting_linux_example_runs_as_written() {
    let test = "lab_readme_booting_linux_example_runs_as_written";
    let lab = Lab::new(test).unwrap();
    let kernel = lab.kernel().clone();
    let dir = lab.work().join("readme");
    std::fs::create_dir(&dir).unwrap();
    let initrd = plexvm_tests::initramfs::InitramfsSpec::new(
        kernel.clone(),
        &["virtio_mmio", "virtio_blk"],
        &format!("wait_dev() {{ i=0; while [ ! -e \"$1\" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; }}\nresult() {{ echo \"GUEST-RESULT $*\"; }}\nfail() {{ result status=fail why=$1; exit 1; }}\n{README_GUEST_SCRIPT}"),
    )
    .build(&dir)
    .unwrap();
    assert_eq!(initrd, dir.join("initramfs.cpio"));
    std::fs::write(dir.join("debian.toml"), readme_debian_toml()).unwrap();
    // The README's commands: `truncate -s 64M disk.raw`, `plexvm run debian.toml`.
    let scenario = r#"
cd readme
truncate -s 64M disk.raw
rc=0
plexvm run debian.toml > ../readme-serial.log 2> ../readme.err || rc=$?
lab_result readme exit=$rc
"#;
    let run = lab.run(scenario, LAB_TIMEOUT).unwrap();
    run.expect_success();
    let serial = run.text("readme-serial.log");
    let out = GuestOutput { serial };
    let r = out.result();
    assert_eq!(
        run.result("readme").get("exit").map(String::as_str),
        Some("0"),
        "{}",
        run.diagnostics()
    );
    assert_eq!(
        r.get("status").map(String::as_str),
        Some("ok"),
        "{r:?}\n{}",
        run.diagnostics()
    );
    assert_eq!(
        r.get("cpus").map(String::as_str),
        Some("2"),
        "{r:?}\n{}",
        run.diagnostics()
    );
}
