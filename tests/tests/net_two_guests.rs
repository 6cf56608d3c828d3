//! Two Linux guests (QEMU TCG, Debian's kernel and virtio_net driver) on two ports of
//! one `plexvm-net`: static addresses, `ping -c 20` both ways, and 32 MiB sent from one
//! to the other with busybox `nc`, whose SHA-256 must match on both sides. Frames go
//! guest memory to guest memory through the switch, with the offloads Linux negotiates
//! (MRG_RXBUF, checksum offload, TSO) in use.

use std::time::Duration;

use anyhow::{ensure, Result};
use plexvm_tests::field;
use plexvm_tests::initramfs::{GuestKernel, InitramfsSpec};
use plexvm_tests::net_guest::{
    add_vhost_user_net, script_ping, script_prelude, NetSwitch, RunningGuest, VIRTIO_NET_MODULES,
};
use plexvm_tests::prereq::{self, BUSYBOX_STATIC, CPIO, QEMU_SYSTEM};
use plexvm_tests::qemu::{self, QemuGuest};

/// Hang guard for a whole guest run (boot, pings, transfer); not a timing assertion.
const GUEST_TIMEOUT: Duration = Duration::from_secs(150);

const SIZE: u64 = 32 * 1024 * 1024;

fn sender_script() -> String {
    let mut s = script_prelude("10.99.1.1", "10.99.1.2");
    s.push_str(&script_ping("10.99.1.2"));
    s.push_str(&format!(
        r#"head -c {SIZE} /dev/urandom > /tmp/data || fail data
SUM=$(sha256sum /tmp/data | cut -d' ' -f1)
n=0; until nc 10.99.1.2 5001 < /tmp/data; do n=$((n + 1)); [ $n -lt 300 ] || fail connect; sleep 0.2; done
echo "${{R}}status=ok role=sender ping=$PING sha=$SUM"
"#
    ));
    s
}

fn receiver_script() -> String {
    let mut s = script_prelude("10.99.1.2", "10.99.1.1");
    s.push_str(&script_ping("10.99.1.1"));
    // Foreground, so nc's stdin is the console, which never reaches EOF: busybox nc
    // half-closes when its stdin ends, and the sender would stop early.
    s.push_str(
        r#"nc -l -p 5001 > /tmp/recv || fail listen
SUM=$(sha256sum /tmp/recv | cut -d' ' -f1)
BYTES=$(wc -c < /tmp/recv)
echo "${R}status=ok role=receiver ping=$PING sha=$SUM bytes=$BYTES"
"#,
    );
    s
}

#[test]
fn net_two_guests_ping_and_transfer() -> Result<()> {
    let mut missing = prereq::missing(&[QEMU_SYSTEM, BUSYBOX_STATIC, CPIO]);
    if let Err(e) = GuestKernel::find_installed() {
        missing.push(e.to_string());
    }
    prereq::require("net_two_guests_ping_and_transfer", &missing);
    let _cpu = qemu::exclusive();
    let dir = tempfile::tempdir()?;
    let kernel = GuestKernel::find_installed()?;
    let sockets = [dir.path().join("a.sock"), dir.path().join("b.sock")];
    let args: Vec<String> = sockets
        .iter()
        .flat_map(|s| ["--socket".to_string(), s.display().to_string()])
        .chain([
            "--stats-file".to_string(),
            dir.path().join("stats.json").display().to_string(),
        ])
        .collect();
    let switch = NetSwitch::start(&[], &args, &sockets, &dir.path().join("switch.log"))?;

    let mut guests = Vec::new();
    for (name, script, socket, mac) in [
        ("sender", sender_script(), &sockets[0], "52:54:00:99:01:01"),
        (
            "receiver",
            receiver_script(),
            &sockets[1],
            "52:54:00:99:01:02",
        ),
    ] {
        let gdir = dir.path().join(name);
        std::fs::create_dir_all(&gdir)?;
        let initrd =
            InitramfsSpec::new(kernel.clone(), VIRTIO_NET_MODULES, &script).build(&gdir)?;
        let mut guest = QemuGuest::new(&kernel.image, &initrd);
        guest.memory_mib = 256;
        // Kernel messages would interleave with the result lines on the console.
        guest.extra_cmdline = "loglevel=1".into();
        add_vhost_user_net(&mut guest, "0", socket, mac);
        guests.push(RunningGuest::spawn(name, &guest, dir.path())?);
    }
    let sender = guests[0].result(GUEST_TIMEOUT)?;
    let receiver = guests[1].result(GUEST_TIMEOUT)?;
    let context = || {
        // The switch prints its counters on SIGUSR1, into its log.
        switch.guard.signal(libc::SIGUSR1);
        plexvm_tests::wait_for(Duration::from_secs(5), || {
            switch.log_text().contains("plexvm-net: port 1")
        });
        format!(
            "{}\n{}\n--- switch ---\n{}",
            guests[0].tail(),
            guests[1].tail(),
            switch.log_text()
        )
    };
    ensure!(
        field(&sender, "status") == Some("ok"),
        "sender: {sender:?}\n{}",
        context()
    );
    ensure!(
        field(&receiver, "status") == Some("ok"),
        "receiver: {receiver:?}\n{}",
        context()
    );
    assert_eq!(
        field(&sender, "ping"),
        Some("20"),
        "sender's pings\n{}",
        context()
    );
    assert_eq!(
        field(&receiver, "ping"),
        Some("20"),
        "receiver's pings\n{}",
        context()
    );
    assert_eq!(field(&receiver, "bytes"), Some(SIZE.to_string().as_str()));
    assert_eq!(
        field(&sender, "sha"),
        field(&receiver, "sha"),
        "checksums\n{}",
        context()
    );

    // The switch counted the transfer on both ports and dropped nothing malformed.
    switch.guard.signal(libc::SIGUSR1);
    let stats_path = dir.path().join("stats.json");
    assert!(plexvm_tests::wait_for(Duration::from_secs(10), || {
        stats_path.exists()
    }));
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats_path)?)?;
    let ports = stats["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 2);
    assert!(
        ports[0]["rx_bytes"].as_u64().unwrap_or(0) >= SIZE,
        "{stats}"
    );
    assert!(
        ports[1]["tx_bytes"].as_u64().unwrap_or(0) >= SIZE,
        "{stats}"
    );
    assert_eq!(ports[0]["rx_dropped"], 0, "{stats}");
    assert_eq!(ports[1]["rx_dropped"], 0, "{stats}");
    drop(guests);
    Ok(())
}
