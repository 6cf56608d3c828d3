//! Our core with a virtio-rng backend we did not write: rust-vmm's `vhost-device-rng`
//! (installed by tests/deps/vhost-devices.sh), attached with `socket = ...`, driven by
//! the probe guest's `rng-read` workload. The backend reads its entropy from a file the
//! test wrote, so the bytes the guest reports must be exactly that file's first bytes:
//! proof that they came from the backend, through the core's transport, into the guest.
//! Once as `kind = "rng"`, once as `kind = "generic"` with `device_id = 4`.
//!
//! See tests/README.md, section "Device types".

use std::process::{Command, Stdio};
use std::time::Duration;

use plexvm_tests::probe_vm::{ProbeVm, ProbeVmSpec};
use plexvm_tests::third_party::installed;
use plexvm_tests::vhost_backends::is_listening;
use plexvm_tests::{wait_for, ChildGuard};

/// What the probe's rng-read workload reads (vmm-core/probe/src/workload/rng_read.rs).
const RNG_BYTES: usize = 16 * 1024;
/// The entropy file: more than the probe reads, so the backend never hits its end.
const SOURCE_BYTES: usize = 1 << 20;
/// Hang guards, not timing assertions.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
const VM_TIMEOUT: Duration = Duration::from_secs(120);

/// FNV-1a 64, as the probe computes it.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Bytes that look random to the probe's checks (SplitMix64 of a fixed seed).
fn entropy(len: usize) -> Vec<u8> {
    let mut state = 0x5eed_u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn probe_reads_the_bytes_vhost_device_rng_serves() {
    let test = "probe_reads_the_bytes_vhost_device_rng_serves";
    read_through_vhost_device_rng(test, "rng", "", None);
}

/// The same device described as `kind = "generic"` (device ID 4, one queue): the
/// escape hatch for types the core has no table entry for reaches the same driver and
/// backend, and the config bytes of the spec are what the guest reads from the
/// device's config space (served by the core, as for the virtio-fs tag).
#[test]
fn generic_kind_with_device_id_4_is_the_same_rng_device() {
    read_through_vhost_device_rng(
        "generic_kind_with_device_id_4_is_the_same_rng_device",
        "generic",
        "device_id = 4\nqueues = 1\nconfig = [0x78, 0x56, 0x34, 0x12, 1, 2, 3, 4]\n",
        Some("7856341201020304"),
    );
}

/// Runs the probe's rng-read against a vhost-device-rng serving a known file, with a
/// `[[device]]` of `kind` plus `fields`, and checks every byte the probe reports;
/// with `config`, also that the first config-space bytes read as that hex.
fn read_through_vhost_device_rng(test: &str, kind: &str, fields: &str, config: Option<&str>) {
    let program = installed(test, "vhost-device-rng");
    let dir = tempfile::tempdir().unwrap();
    let source = entropy(SOURCE_BYTES);
    let source_path = dir.path().join("entropy.bin");
    std::fs::write(&source_path, &source).unwrap();
    // vhost-device-rng appends the socket's index to --socket-path: rng.sock → rng.sock0.
    let log = std::fs::File::create(dir.path().join("rng.log")).unwrap();
    let _backend = ChildGuard::spawn(
        "vhost-device-rng",
        Command::new(&program)
            .arg("--socket-path")
            .arg(dir.path().join("rng.sock"))
            .arg("--rng-source")
            .arg(&source_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap();
    let socket = dir.path().join("rng.sock0");
    assert!(
        wait_for(LISTEN_TIMEOUT, || is_listening(&socket)),
        "vhost-device-rng never listened on {}",
        socket.display()
    );
    let spec = ProbeVmSpec {
        name: "rng".into(),
        cmdline: match config {
            Some(hex) => format!("probe.workload=rng-read probe.config={}", hex.len() / 2),
            None => "probe.workload=rng-read".into(),
        },
        memory_mib: 64,
        device_id: "rng0".into(),
        device_kind: kind.into(),
        device_source: format!("socket = \"rng.sock0\"\n{fields}"),
        api: false,
    };
    let vm = ProbeVm::start(dir.path(), &spec).unwrap();
    let outcome = vm.finish(VM_TIMEOUT).unwrap();
    let log = &outcome.log;
    assert!(
        outcome.status.success(),
        "plexvm: {}\n{log}",
        outcome.status
    );
    assert_eq!(outcome.get("workload"), Some("rng-read"), "{log}");
    assert_eq!(outcome.get("status"), Some("ok"), "{log}");
    assert_eq!(outcome.num("bytes"), RNG_BYTES as u64, "{log}");
    // One buffer of 1 KiB per request; a device may write less, never more.
    assert!(
        outcome.num("requests") >= (RNG_BYTES / 1024) as u64,
        "{log}"
    );
    let served = &source[..RNG_BYTES];
    let fnv = format!("{:#018x}", fnv1a64(served));
    assert_eq!(outcome.get("fnv64"), Some(fnv.as_str()), "{log}");
    let head: String = served[..32].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(outcome.get("head"), Some(head.as_str()), "{log}");
    assert_eq!(outcome.num("distinct"), 256, "{log}");
    assert_eq!(outcome.num("repeats"), 0, "{log}");
    let zeros = served.iter().filter(|&&b| b == 0).count() as u64;
    assert_eq!(outcome.num("zeros"), zeros, "{log}");
    assert_eq!(outcome.get("config"), Some(config.unwrap_or("")), "{log}");
}
