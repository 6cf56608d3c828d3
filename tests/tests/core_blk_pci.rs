//! The core + plexvm-blk + the probe guest over virtio-pci: the probe finds the device
//! by scanning bus 0 through ports 0xCF8/0xCFC, moves its BAR, drives it through the
//! common configuration, and the data it writes lands in the image file.

use std::path::Path;
use std::time::Duration;

use plexvm_tests::{create_image, field, probe_result, run_plexvm, sha256_file};

const DISK: u64 = 64 << 20;

fn run(
    dir: &Path,
    vm_extra: &str,
    device_extra: &str,
) -> (Option<i32>, String, Vec<(String, String)>) {
    let spec = dir.join("pci.toml");
    let text = format!(
        "[vm]\nname = \"pci\"\nmemory_mib = 256\nkernel = \"probe\"\n\
         cmdline = \"probe.workload=blk-verify probe.seed=5\"\nserial = \"file:pci.serial\"\n{vm_extra}\n\
         [[device]]\nid = \"disk0\"\nkind = \"blk\"\nexec = [\"plexvm-blk\", \"--image\", \"disk.raw\"]\n{device_extra}\n"
    );
    std::fs::write(&spec, text).unwrap();
    let out = run_plexvm(
        &["run", spec.to_str().unwrap()],
        dir,
        Duration::from_secs(240),
    )
    .unwrap();
    let console = std::fs::read_to_string(dir.join("pci.serial")).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let log = format!("serial:\n{console}\nstderr:\n{stderr}");
    let fields = probe_result(&console)
        .unwrap_or_else(|| panic!("no probe result line; exit {:?}\n{log}", out.status));
    (out.status.code(), log, fields)
}

fn assert_blk_verify(dir: &Path, code: Option<i32>, log: &str, f: &[(String, String)]) {
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(field(f, "status"), Some("ok"), "{log}");
    assert_eq!(field(f, "mismatches"), Some("0"), "{log}");
    assert_eq!(field(f, "errors"), Some("0"), "{log}");
    // MSI-X stays off in the polling probe: the core's event thread sets ISR bit 0.
    assert_eq!(field(f, "irq"), Some("seen"), "{log}");
    let requests: u64 = field(f, "requests").unwrap().parse().unwrap();
    assert!(requests >= 1000, "only {requests} requests: {log}");
    let host = sha256_file(&dir.join("disk.raw")).unwrap();
    assert_eq!(field(f, "sha256"), Some(host.as_str()), "{log}");
    // It really was PCI: found on the bus, and no virtio-mmio window was offered.
    assert!(log.contains("virtio-pci 00:01.0: device id 2"), "{log}");
    assert!(!log.contains("virtio-mmio 0x"), "{log}");
}

#[test]
fn blk_verify_over_pci_lands_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    create_image(&dir.path().join("disk.raw"), DISK).unwrap();
    let (code, log, f) = run(dir.path(), "", "transport = \"pci\"");
    assert_blk_verify(dir.path(), code, &log, &f);
}

#[test]
fn the_vm_wide_transport_puts_devices_on_pci() {
    let dir = tempfile::tempdir().unwrap();
    create_image(&dir.path().join("disk.raw"), DISK).unwrap();
    let (code, log, f) = run(dir.path(), "transport = \"pci\"", "");
    assert_blk_verify(dir.path(), code, &log, &f);
}
