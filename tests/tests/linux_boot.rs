//! Linux guests on the plexvm core, with Debian's own kernel (`linux-image-amd64`, which
//! tests/run.sh installs): the ELF vmlinux inside its bzImage, and the bzImage itself.
//!
//! On these build machines KVM is nested (PVM) and emulates guest code at CPL0 at about
//! 2 million instructions per second (DESIGN.md), so a kernel gets only through its early
//! boot in the time a test can wait: the tests here watch the serial console for up to
//! 90 s ([`watch`]) and assert on what the kernel printed, never on how fast. What Linux
//! makes of the ACPI tables beyond that is checked by handing them to Debian's kernel
//! under QEMU. Linux to userspace on the core runs in the lab instead, where KVM is
//! ordinary (tests/tests/lab_linux.rs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plexvm_tests::initramfs::{GuestKernel, InitramfsSpec};
use plexvm_tests::kernel_image::{debian_kernel, vmlinux};
use plexvm_tests::prereq;
use plexvm_tests::qemu::{self, opt_value, QemuGuest};
use plexvm_tests::{bin, create_image, run_plexvm, ChildGuard};

/// How long a test watches a booting kernel before it stops the VM: 90 s, or
/// `PLEXVM_LINUX_WATCH_S` seconds. Measured here: the last line the tests wait for came
/// after about 50 s while other builds shared the two cores; with many jobs at once it
/// takes several times longer, and the variable gives such a host more time.
fn watch() -> Duration {
    let secs = std::env::var("PLEXVM_LINUX_WATCH_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    Duration::from_secs(secs)
}

/// Guest RAM of the Linux specs (small: early memory set-up runs emulated here).
const MEMORY_MIB: u64 = 128;
/// The legacy hole the core leaves out of the e820 map (docs/platform.md).
const EBDA_START: u64 = 0x9_fc00;
const HIMEM_START: u64 = 0x10_0000;

/// A `plexvm run` whose serial console goes to a file; killed and reaped when dropped.
struct LinuxVm {
    guard: ChildGuard,
    serial: PathBuf,
    stderr: PathBuf,
}

impl LinuxVm {
    fn start(dir: &Path, spec: &str) -> LinuxVm {
        let spec_path = dir.join("vm.toml");
        fs::write(&spec_path, spec).unwrap();
        let stderr = dir.join("plexvm.stderr");
        let mut cmd = Command::new(bin("plexvm"));
        cmd.arg("run")
            .arg(&spec_path)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap());
        LinuxVm {
            guard: ChildGuard::spawn("plexvm", &mut cmd).unwrap(),
            serial: dir.join("serial.log"),
            stderr,
        }
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    fn log(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- plexvm stderr ---\n{}",
            self.serial(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Watches the console until every one of `needles` was printed (Ok), or the VM
    /// ended or `timeout` passed first (Err with the log). The VM keeps running.
    fn watch_for(&mut self, needles: &[&str], timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.serial();
            if needles.iter().all(|n| text.contains(n)) {
                return Ok(text);
            }
            let missing: Vec<&&str> = needles.iter().filter(|n| !text.contains(**n)).collect();
            if !self.guard.is_running() {
                return Err(format!(
                    "the VM ended before printing {missing:?}\n{}",
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not printed within {timeout:?}: {missing:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn linux_spec(kernel: &Path, vcpus: u8, cmdline: &str, extra: &str) -> String {
    format!(
        "[vm]\nname = \"linux\"\nvcpus = {vcpus}\nmemory_mib = {MEMORY_MIB}\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\nserial = \"file:serial.log\"\n{extra}",
        kernel.display()
    )
}

/// The usable ranges of the kernel's `BIOS-e820:` lines, as (start, end exclusive).
fn e820_usable(serial: &str) -> Vec<(u64, u64)> {
    serial
        .lines()
        .filter_map(|l| l.split_once("BIOS-e820: [mem ")?.1.split_once("] usable"))
        .filter_map(|(range, _)| {
            let (a, b) = range.split_once('-')?;
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            Some((hex(a)?, hex(b)? + 1))
        })
        .collect()
}

#[test]
fn vmlinux_prints_banner_e820_map_and_finds_the_acpi_tables() {
    let test = "vmlinux_prints_banner_e820_map_and_finds_the_acpi_tables";
    let kernel = debian_kernel(test);
    let vmlinux = vmlinux(test, &kernel);
    let dir = tempfile::tempdir().unwrap();
    create_image(&dir.path().join("disk.img"), 8 << 20).unwrap();
    let disk = "[[device]]\nid = \"disk0\"\nkind = \"blk\"\nexec = [\"plexvm-blk\", \"--image\", \"disk.img\"]\n";
    // Masking CMPXCHG16B keeps SLUB off the first instruction these nested hosts cannot
    // emulate (DESIGN.md), in case the kernel gets that far within the watch.
    let extra = format!("cpuid_mask = [\"cx16\"]\n{disk}");
    let spec = linux_spec(&vmlinux, 2, "earlyprintk=serial,ttyS0", &extra);
    let mut vm = LinuxVm::start(dir.path(), &spec);
    // ACPI: the RSDP where the core put it, the tables it chains, and the MADT's two
    // local APICs as Linux's SMP set-up counts them.
    let banner = format!("Linux version {}", kernel.version);
    let needles = [
        banner.as_str(),
        "BIOS-e820: [mem ",
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version",
        "GSI 0-23",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ];
    let serial = vm
        .watch_for(&needles, watch())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !serial.contains("A valid RSDP was not found"),
        "{}",
        vm.log()
    );
    let usable = e820_usable(&serial);
    let total: u64 = usable.iter().map(|(a, b)| b - a).sum();
    let top = usable.iter().map(|r| r.1).max().unwrap_or(0);
    let mem = MEMORY_MIB << 20;
    assert_eq!(
        top, mem,
        "RAM must end at the spec's memory size: {usable:x?}"
    );
    assert_eq!(
        total + (HIMEM_START - EBDA_START),
        mem,
        "usable RAM plus the legacy hole must be the spec's memory size: {usable:x?}"
    );
}

#[test]
fn bzimage_runs_its_decompressor() {
    let test = "bzimage_runs_its_decompressor";
    let kernel = debian_kernel(test);
    let dir = tempfile::tempdir().unwrap();
    // Debian builds without CONFIG_X86_VERBOSE_BOOTUP, so the decompressor prints only
    // warnings; `nokaslr` makes it warn right before it decompresses (arch/x86/boot/
    // compressed/kaslr.c), on the early console it set up from our `earlyprintk=`. That
    // line proves the core entered the bzImage's 64-bit entry with a boot_params the
    // decompressor could read (command line included) and routed its serial output.
    let spec = linux_spec(&kernel.image, 1, "earlyprintk=serial,ttyS0 nokaslr", "");
    let mut vm = LinuxVm::start(dir.path(), &spec);
    vm.watch_for(&["KASLR disabled: 'nokaslr' on cmdline."], watch())
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Runs `plexvm run` on `spec` and checks it fails with exit code 2 and one line on stderr
/// that names `file`.
fn expect_file_error(dir: &Path, name: &str, spec: &str, file: &str, reason: &str) {
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, spec).unwrap();
    let out = run_plexvm(
        &["run", path.to_str().unwrap()],
        dir,
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: {:?}, stderr: {stderr}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: want one line, got: {stderr}");
    assert!(
        lines[0].contains(file),
        "{name}: {file:?} not in {:?}",
        lines[0]
    );
    assert!(
        lines[0].contains(reason),
        "{name}: {reason:?} not in {:?}",
        lines[0]
    );
}

#[test]
fn missing_or_corrupt_kernel_and_initrd_are_named_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = |kernel: &str, initrd: &str| {
        format!("[vm]\nname = \"bad\"\nmemory_mib = 64\nkernel = \"{kernel}\"\n{initrd}")
    };
    fs::write(d.join("garbage"), vec![0x5a; 8192]).unwrap();
    // A bzImage cut short: a valid setup header whose protected-mode kernel is missing.
    let mut cut = vec![0u8; 0x1000];
    cut[0x1f1] = 1;
    cut[0x202..0x206].copy_from_slice(b"HdrS");
    cut[0x206] = 0x0f; // protocol 2.15
    cut[0x207] = 0x02;
    cut[0x211] = 1; // loadflags: LOADED_HIGH
    fs::write(d.join("vmlinuz-cut"), &cut).unwrap();
    fs::write(d.join("elf-cut"), b"\x7fELF\x02\x01\x01\0").unwrap();
    fs::write(d.join("tiny.elf"), cpuid_probe_elf()).unwrap();
    let huge = fs::File::create(d.join("huge.cpio")).unwrap();
    huge.set_len(100 << 20).unwrap();
    fs::create_dir(d.join("initrd-dir")).unwrap();

    expect_file_error(
        d,
        "missing-kernel",
        &spec("no-such-vmlinux", ""),
        "no-such-vmlinux",
        "vm.kernel",
    );
    expect_file_error(
        d,
        "garbage-kernel",
        &spec("garbage", ""),
        "garbage",
        "not a bootable kernel",
    );
    expect_file_error(
        d,
        "cut-bzimage",
        &spec("vmlinuz-cut", ""),
        "vmlinuz-cut",
        "vm.kernel",
    );
    expect_file_error(d, "cut-elf", &spec("elf-cut", ""), "elf-cut", "vm.kernel");
    // Debian's real bzImage cut short, when it is installed.
    if let Ok(kernel) = GuestKernel::find_installed() {
        let image = fs::read(&kernel.image).unwrap();
        fs::write(
            d.join("vmlinuz-debian-cut"),
            &image[..image.len().min(20_000)],
        )
        .unwrap();
        expect_file_error(
            d,
            "cut-debian",
            &spec("vmlinuz-debian-cut", ""),
            "vmlinuz-debian-cut",
            "not a bootable kernel",
        );
    }
    let initrd = |p: &str| format!("initrd = \"{p}\"\n");
    expect_file_error(
        d,
        "missing-initrd",
        &spec("tiny.elf", &initrd("no-such.cpio")),
        "no-such.cpio",
        "vm.initrd",
    );
    expect_file_error(
        d,
        "huge-initrd",
        &spec("tiny.elf", &initrd("huge.cpio")),
        "huge.cpio",
        "does not fit",
    );
    expect_file_error(
        d,
        "dir-initrd",
        &spec("tiny.elf", &initrd("initrd-dir")),
        "initrd-dir",
        "vm.initrd",
    );
}

/// Exit codes of [`cpuid_probe_elf`].
const CX16_CLEAR: i32 = 10;
const CX16_SET: i32 = 11;

/// A minimal 64-bit ELF guest: at CPL0 (where these nested hosts honour the CPUID the
/// core sets; at CPL3 they report the outer host's) it reads CPUID.1:ECX.CX16 (bit 13)
/// and ends the VM through the exit port with code 10 + bit.
fn cpuid_probe_elf() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x31, 0xc9,                   // xor ecx, ecx
        0x0f, 0xa2,                   // cpuid
        0x89, 0xc8,                   // mov eax, ecx
        0xc1, 0xe8, 0x0d,             // shr eax, 13
        0x83, 0xe0, 0x01,             // and eax, 1
        0x83, 0xc0, 0x0a,             // add eax, 10
        0x66, 0xba, 0x01, 0x05,       // mov dx, 0x501
        0xee,                         // out dx, al
        0xf4,                         // hlt
        0xeb, 0xfd,                   // jmp hlt
    ];
    tiny_guest_elf(code)
}

/// Where [`acpi_dump_elf`] starts and how many bytes it dumps.
const DUMP_START: u64 = 0xe_0000;
const DUMP_LEN: usize = 0x1000;

/// A minimal guest that writes the 4 KiB of guest memory at 0xe0000 (where the core puts
/// the RSDP and the tables after it) byte by byte to COM1, then exits with code 0: the
/// tables exactly as the guest sees them.
fn acpi_dump_elf() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xbe, 0x00, 0x00, 0x0e, 0x00, // mov esi, 0xe0000
        0xb9, 0x00, 0x10, 0x00, 0x00, // mov ecx, 0x1000
        0x66, 0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xac,                         // next: lodsb
        0xee,                         // out dx, al
        0xff, 0xc9,                   // dec ecx
        0x75, 0xfa,                   // jnz next
        0x66, 0xba, 0x01, 0x05,       // mov dx, 0x501
        0x31, 0xc0,                   // xor eax, eax
        0xee,                         // out dx, al
        0xf4,                         // hlt
        0xeb, 0xfd,                   // jmp hlt
    ];
    tiny_guest_elf(code)
}

/// A 64-bit ELF executable whose one segment, loaded at 1 MiB, is its headers and then
/// `code`, which is the entry point.
fn tiny_guest_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const HEADERS: u64 = 64 + 56;
    let size = HEADERS + code.len() as u64;
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    for (value, width) in [
        (2, 2),              // ET_EXEC
        (0x3e, 2),           // EM_X86_64
        (1, 4),              // EV_CURRENT
        (LOAD + HEADERS, 8), // e_entry
        (64, 8),             // e_phoff
        (0, 8),              // e_shoff
        (0, 4),              // e_flags
        (64, 2),             // e_ehsize
        (56, 2),             // e_phentsize
        (1, 2),              // e_phnum
        (0, 2),              // e_shentsize
        (0, 2),              // e_shnum
        (0, 2),              // e_shstrndx
        (1, 4),              // p_type = PT_LOAD
        (5, 4),              // p_flags = R | X
        (0, 8),              // p_offset
        (LOAD, 8),           // p_vaddr
        (LOAD, 8),           // p_paddr
        (size, 8),           // p_filesz
        (size, 8),           // p_memsz
        (0x1000, 8),         // p_align
    ] {
        elf.extend_from_slice(&u64::to_le_bytes(value)[..width]);
    }
    assert_eq!(elf.len() as u64, HEADERS);
    elf.extend_from_slice(code);
    elf
}

#[test]
fn cpuid_mask_hides_cx16_from_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("cpuid.elf"), cpuid_probe_elf()).unwrap();
    let run = |name: &str, extra: &str| {
        let spec = format!(
            "[vm]\nname = \"{name}\"\nmemory_mib = 16\nkernel = \"cpuid.elf\"\nserial = \"none\"\n{extra}"
        );
        fs::write(d.join(format!("{name}.toml")), spec).unwrap();
        let spec_path = d.join(format!("{name}.toml"));
        let out = run_plexvm(
            &["run", spec_path.to_str().unwrap()],
            d,
            Duration::from_secs(60),
        )
        .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // KVM reports CMPXCHG16B on every x86-64 host it supports, so the unmasked guest sees
    // the bit; the masked one must not.
    let (plain, err) = run("plain", "");
    assert_eq!(plain, Some(CX16_SET), "without cpuid_mask: {err}");
    let (masked, err) = run("masked", "cpuid_mask = [\"cx16\"]\n");
    assert_eq!(
        masked,
        Some(CX16_CLEAR),
        "with cpuid_mask = [\"cx16\"]: {err}"
    );
}

/// The DSDT in a dump of guest memory taken from [`DUMP_START`], found the way a kernel
/// finds it (RSDP, XSDT, FADT's X_DSDT); every table must lie in the dump and have a
/// valid checksum.
fn dsdt_from_dump(dump: &[u8]) -> Result<Vec<u8>, String> {
    let at = |addr: u64, len: usize| -> Result<&[u8], String> {
        let off = usize::try_from(addr.wrapping_sub(DUMP_START)).map_err(|e| e.to_string())?;
        dump.get(off..off.saturating_add(len))
            .ok_or_else(|| format!("{addr:#x}+{len:#x} is outside the dump"))
    };
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let table = |addr: u64| -> Result<Vec<u8>, String> {
        let len = u32::from_le_bytes(at(addr + 4, 4)?.try_into().unwrap());
        let t = at(addr, len as usize)?.to_vec();
        match t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) {
            0 => Ok(t),
            _ => Err(format!("bad checksum in the table at {addr:#x}")),
        }
    };
    let rsdp = at(DUMP_START, 36)?;
    if &rsdp[..8] != b"RSD PTR " {
        return Err("no RSDP at 0xe0000".into());
    }
    let xsdt = table(u64_at(rsdp, 24))?;
    for entry in xsdt[36..].chunks_exact(8) {
        let t = table(u64_at(entry, 0))?;
        if &t[..4] == b"FACP" {
            return table(u64_at(&t, 140));
        }
    }
    Err("no FADT in the XSDT".into())
}

/// Lists what Linux made of the ACPI devices: `ACPI-DEV <namespace path> <device>`, the
/// memory they claimed and the drivers' messages about them.
const ACPI_SCRIPT: &str = r#"#!/bin/sh
for d in /sys/bus/acpi/devices/LNRO0005:* /sys/bus/acpi/devices/PNP0501:*; do
  [ -e "$d/path" ] && echo "ACPI-DEV $(cat $d/path) ${d##*/}"
done
grep LNRO0005 /proc/iomem | sed 's/^ */ACPI-IOMEM /'
dmesg | grep -e 'virtio-mmio LNRO0005' -e 'ttyS0 at I/O' | sed 's/^\[[ 0-9.]*\] /ACPI-DMESG /'
"#;

/// This host cannot run Linux far enough to enumerate ACPI devices (see the module
/// docs), so the tables go to a kernel that can: the tables a guest of the core sees
/// (dumped by [`acpi_dump_elf`]) are handed to Debian's kernel under QEMU, our DSDT as an
/// SSDT beside QEMU's own, and Linux's ACPI interpreter, its virtio-mmio driver and its
/// 8250 PNP driver must find the devices at the addresses the core gave them.
#[test]
fn acpi_tables_from_guest_memory_bind_linux_drivers_under_qemu() {
    let test = "acpi_tables_from_guest_memory_bind_linux_drivers_under_qemu";
    let kernel = debian_kernel(test);
    let tools = [prereq::QEMU_SYSTEM, prereq::BUSYBOX_STATIC, prereq::CPIO];
    prereq::require(test, &prereq::missing(&tools));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("dump.elf"), acpi_dump_elf()).unwrap();
    let mut spec =
        "[vm]\nname = \"acpi\"\nmemory_mib = 16\nkernel = \"dump.elf\"\nserial = \"file:dump.bin\"\n"
            .to_string();
    for i in 0..2 {
        create_image(&d.join(format!("disk{i}.img")), 1 << 20).unwrap();
        spec += &format!("[[device]]\nid = \"disk{i}\"\nkind = \"blk\"\nexec = [\"plexvm-blk\", \"--image\", \"disk{i}.img\"]\n");
    }
    fs::write(d.join("acpi.toml"), spec).unwrap();
    let spec_path = d.join("acpi.toml");
    let out = run_plexvm(
        &["run", spec_path.to_str().unwrap()],
        d,
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "the dump guest: {stderr}");
    let dump = fs::read(d.join("dump.bin")).unwrap();
    assert_eq!(dump.len(), DUMP_LEN, "the dump guest's output");
    let mut ssdt = dsdt_from_dump(&dump).unwrap_or_else(|e| panic!("{e}"));
    ssdt[..4].copy_from_slice(b"SSDT");
    ssdt[9] = 0;
    ssdt[9] = 0u8.wrapping_sub(ssdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    fs::write(d.join("ssdt.aml"), &ssdt).unwrap();

    let initrd = InitramfsSpec::new(kernel.clone(), &["virtio_mmio"], ACPI_SCRIPT)
        .build(d)
        .unwrap();
    let mut guest = QemuGuest::new(&kernel.image, &initrd);
    guest.extra_args.push("-acpitable".into());
    guest
        .extra_args
        .push(format!("file={}", opt_value(&d.join("ssdt.aml"))));
    let run = {
        let _one_guest_at_a_time = qemu::exclusive();
        guest
            .run(d, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e:?}"))
    };
    let devices = run.lines_with("ACPI-DEV ");
    let iomem = run.lines_with("ACPI-IOMEM ");
    let dmesg = run.lines_with("ACPI-DMESG ");
    let log = run.tail(60);
    for path in [
        "\\_SB_.V000 LNRO0005:",
        "\\_SB_.V001 LNRO0005:",
        "\\_SB_.COM1 PNP0501:",
    ] {
        assert!(
            devices.iter().any(|l| l.starts_with(path)),
            "{path} not enumerated\n{log}"
        );
    }
    for range in [
        "d0000000-d0000fff : LNRO0005:",
        "d0001000-d0001fff : LNRO0005:",
    ] {
        assert!(
            iomem.iter().any(|l| l.starts_with(range)),
            "{range} not claimed\n{log}"
        );
    }
    // The driver matched the _HID and read the magic register of each window (QEMU has
    // no device there, so it gives up after that read).
    let probes = dmesg
        .iter()
        .filter(|l| l.starts_with("virtio-mmio LNRO0005:"))
        .count();
    assert_eq!(probes, 2, "virtio-mmio probes\n{log}");
    assert!(
        dmesg
            .iter()
            .any(|l| l.contains("ttyS0 at I/O 0x3f8 (irq = 4")),
        "COM1 through PNP\n{log}"
    );
}
