//! Three Linux guests (QEMU TCG) on three ports of one `plexvm-net`. The third one is
//! busy pinging the first when it is killed (SIGKILL to its QEMU) just as the first two
//! start their traffic: `ping -c 20` both ways and a busybox `nc` transfer between the
//! two survivors must be complete and intact, and the switch must stay up with the dead
//! guest's port shown disconnected.

use std::time::Duration;

use anyhow::{ensure, Result};
use plexvm_tests::initramfs::{GuestKernel, InitramfsSpec};
use plexvm_tests::net_guest::{
    add_vhost_user_net, script_ping, script_prelude, NetSwitch, RunningGuest, VIRTIO_NET_MODULES,
};
use plexvm_tests::prereq::{self, BUSYBOX_STATIC, CPIO, QEMU_SYSTEM};
use plexvm_tests::qemu::{self, QemuGuest};
use plexvm_tests::{field, wait_for};

/// Hang guard for a guest run; not a timing assertion.
const GUEST_TIMEOUT: Duration = Duration::from_secs(150);
const SIZE: u64 = 8 * 1024 * 1024;

fn first_script() -> String {
    let mut s = script_prelude("10.99.3.1", "10.99.3.2");
    s.push_str(&format!(
        r#"n=0; until ping -c 1 -W 1 10.99.3.3 > /dev/null 2>&1; do n=$((n + 1)); [ $n -lt 60 ] || fail reach-third; done
head -c {SIZE} /dev/urandom > /tmp/data || fail data
echo "NET-START"
{ping}SUM=$(sha256sum /tmp/data | cut -d' ' -f1)
n=0; until nc 10.99.3.2 5003 < /tmp/data; do n=$((n + 1)); [ $n -lt 300 ] || fail connect; sleep 0.2; done
echo "${{R}}status=ok ping=$PING sha=$SUM"
"#,
        ping = script_ping("10.99.3.2")
    ));
    s
}

fn second_script() -> String {
    let mut s = script_prelude("10.99.3.2", "10.99.3.1");
    s.push_str(&script_ping("10.99.3.1"));
    s.push_str(
        r#"nc -l -p 5003 > /tmp/recv || fail listen
SUM=$(sha256sum /tmp/recv | cut -d' ' -f1)
echo "${R}status=ok ping=$PING sha=$SUM bytes=$(wc -c < /tmp/recv)"
"#,
    );
    s
}

fn third_script() -> String {
    let mut s = script_prelude("10.99.3.3", "10.99.3.1");
    s.push_str("echo NET-THIRD-UP\nping -i 0.1 10.99.3.1 > /dev/null\n");
    s
}

#[test]
fn net_killing_one_guest_does_not_disturb_the_others() -> Result<()> {
    let mut missing = prereq::missing(&[QEMU_SYSTEM, BUSYBOX_STATIC, CPIO]);
    if let Err(e) = GuestKernel::find_installed() {
        missing.push(e.to_string());
    }
    prereq::require(
        "net_killing_one_guest_does_not_disturb_the_others",
        &missing,
    );
    let _cpu = qemu::exclusive();
    let dir = tempfile::tempdir()?;
    let kernel = GuestKernel::find_installed()?;
    let sockets: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("p{i}.sock")))
        .collect();
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
    for (i, (name, script)) in [
        ("first", first_script()),
        ("second", second_script()),
        ("third", third_script()),
    ]
    .into_iter()
    .enumerate()
    {
        let gdir = dir.path().join(name);
        std::fs::create_dir_all(&gdir)?;
        let initrd =
            InitramfsSpec::new(kernel.clone(), VIRTIO_NET_MODULES, &script).build(&gdir)?;
        let mut guest = QemuGuest::new(&kernel.image, &initrd);
        guest.memory_mib = 256;
        // Kernel messages would interleave with the result lines on the console.
        guest.extra_cmdline = "loglevel=1".into();
        add_vhost_user_net(
            &mut guest,
            "0",
            &sockets[i],
            &format!("52:54:00:99:03:0{}", i + 1),
        );
        guests.push(RunningGuest::spawn(name, &guest, dir.path())?);
    }
    let mut third = guests.pop().expect("third guest");
    third.wait_line("NET-THIRD-UP", GUEST_TIMEOUT)?;
    guests[0].wait_line("NET-START", GUEST_TIMEOUT)?;
    // Kill the third guest while it pings the first and the first two start talking.
    drop(third);

    let first = guests[0].result(GUEST_TIMEOUT)?;
    let second = guests[1].result(GUEST_TIMEOUT)?;
    let context = || {
        format!(
            "{}\n{}\n--- switch ---\n{}",
            guests[0].tail(),
            guests[1].tail(),
            switch.log_text()
        )
    };
    ensure!(
        field(&first, "status") == Some("ok"),
        "first: {first:?}\n{}",
        context()
    );
    ensure!(
        field(&second, "status") == Some("ok"),
        "second: {second:?}\n{}",
        context()
    );
    assert_eq!(field(&first, "ping"), Some("20"), "{}", context());
    assert_eq!(field(&second, "ping"), Some("20"), "{}", context());
    assert_eq!(field(&second, "bytes"), Some(SIZE.to_string().as_str()));
    assert_eq!(field(&first, "sha"), field(&second, "sha"), "{}", context());

    let mut switch = switch;
    assert!(
        switch.guard.is_running(),
        "the switch survived the killed guest"
    );
    switch.guard.signal(libc::SIGUSR1);
    let stats_path = dir.path().join("stats.json");
    assert!(wait_for(Duration::from_secs(10), || stats_path.exists()));
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats_path)?)?;
    assert_eq!(stats["ports"][2]["connected"], false, "{stats}");
    assert_eq!(stats["ports"][0]["rx_dropped"], 0, "{stats}");
    Ok(())
}
