//! A Linux guest (QEMU TCG) on a vhost-user port of `plexvm-net`, and a tap port inside
//! a network namespace the test creates (and removes): `ping -c 20` from the guest to
//! the namespace and back, and 8 MiB from the guest to a listener in the namespace
//! (TCP with the guest's checksum and segmentation offloads handed to the tap's kernel
//! side through the virtio-net header), checked by SHA-256.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use plexvm_tests::initramfs::{GuestKernel, InitramfsSpec};
use plexvm_tests::net_guest::{
    add_vhost_user_net, ping_received, run_ok, script_ping, script_prelude, NetNs, NetSwitch,
    RunningGuest, VIRTIO_NET_MODULES,
};
use plexvm_tests::prereq::{self, Tool, BUSYBOX_STATIC, CPIO, QEMU_SYSTEM};
use plexvm_tests::qemu::{self, QemuGuest};
use plexvm_tests::{field, ChildGuard};

/// Hang guard for the guest run; not a timing assertion.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const SIZE: u64 = 8 * 1024 * 1024;
const NS: &str = "plexvm-net-test-tap";
const TAP: &str = "pxtap0";

const IPROUTE2: Tool = Tool {
    program: "ip",
    package: "iproute2",
};

fn guest_script() -> String {
    let mut s = script_prelude("10.99.2.2", "10.99.2.1");
    s.push_str(&script_ping("10.99.2.1"));
    s.push_str(&format!(
        r#"head -c {SIZE} /dev/urandom > /tmp/data || fail data
SUM=$(sha256sum /tmp/data | cut -d' ' -f1)
n=0; until nc 10.99.2.1 5002 < /tmp/data; do n=$((n + 1)); [ $n -lt 300 ] || fail connect; sleep 0.2; done
echo "${{R}}status=ok ping=$PING sha=$SUM"
# Stay up until the namespace has pinged us and says so (stdin is the console: no EOF).
nc -l -p 7000 > /dev/null
"#
    ));
    s
}

#[test]
fn net_tap_port_in_a_namespace() -> Result<()> {
    let mut missing = prereq::missing(&[QEMU_SYSTEM, BUSYBOX_STATIC, CPIO, IPROUTE2]);
    if let Err(e) = GuestKernel::find_installed() {
        missing.push(e.to_string());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun is missing (tun module)".into());
    }
    prereq::require("net_tap_port_in_a_namespace", &missing);
    let _cpu = qemu::exclusive();
    let dir = tempfile::tempdir()?;
    let ns = NetNs::create(NS)?;
    let socket = dir.path().join("vm.sock");
    // The switch runs inside the namespace, so its tap is created there; the vhost-user
    // socket is a file and works across network namespaces.
    let args = vec![
        "--socket".to_string(),
        socket.display().to_string(),
        "--tap".to_string(),
        TAP.to_string(),
    ];
    let switch = NetSwitch::start(
        &["ip", "netns", "exec", NS],
        &args,
        std::slice::from_ref(&socket),
        &dir.path().join("switch.log"),
    )?;
    ns.ip(&["addr", "add", "10.99.2.1/24", "dev", TAP])?;
    ns.ip(&["link", "set", TAP, "up"])?;

    // The namespace's end of the transfer; stdin stays open (piped) so busybox nc does
    // not half-close early.
    let received = dir.path().join("received");
    let mut listen_cmd = ns.command("busybox");
    listen_cmd
        .args(["nc", "-l", "-p", "5002"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&received)?)
        .stderr(Stdio::null());
    let mut listener = ChildGuard::spawn("nc -l", &mut listen_cmd)?;

    let kernel = GuestKernel::find_installed()?;
    let initrd = InitramfsSpec::new(kernel.clone(), VIRTIO_NET_MODULES, &guest_script())
        .build(dir.path())?;
    let mut qemu_guest = QemuGuest::new(&kernel.image, &initrd);
    qemu_guest.memory_mib = 256;
    // Kernel messages would interleave with the result lines on the console.
    qemu_guest.extra_cmdline = "loglevel=1".into();
    add_vhost_user_net(&mut qemu_guest, "0", &socket, "52:54:00:99:02:02");
    let mut guest = RunningGuest::spawn("guest", &qemu_guest, dir.path())?;

    let result = guest.result(GUEST_TIMEOUT)?;
    let context = || format!("{}\n--- switch ---\n{}", guest.tail(), switch.log_text());
    ensure!(
        field(&result, "status") == Some("ok"),
        "guest: {result:?}\n{}",
        context()
    );
    assert_eq!(
        field(&result, "ping"),
        Some("20"),
        "guest → namespace pings\n{}",
        context()
    );
    listener
        .wait_timeout(Duration::from_secs(60))
        .context("namespace nc")?;
    let mut bytes = Vec::new();
    std::fs::File::open(&received)?.read_to_end(&mut bytes)?;
    assert_eq!(bytes.len() as u64, SIZE, "bytes received in the namespace");
    assert_eq!(
        Some(plexvm_tests::blk_guest::sha256_hex(&bytes).as_str()),
        field(&result, "sha"),
        "checksum of what the namespace received"
    );

    // And the other way: the namespace pings the guest.
    let out = run_ok(ns.command("busybox").args([
        "ping",
        "-c",
        "20",
        "-i",
        "0.2",
        "-W",
        "2",
        "10.99.2.2",
    ]))?;
    assert_eq!(
        ping_received(&out),
        Some(20),
        "namespace → guest pings: {out}\n{}",
        context()
    );
    // Let the guest power off.
    let _ = run_ok(
        ns.command("busybox")
            .args(["nc", "10.99.2.2", "7000"])
            .stdin(Stdio::null()),
    );
    let _ = guest.guard.wait_timeout(Duration::from_secs(60));
    drop(switch);
    drop(ns);
    Ok(())
}
