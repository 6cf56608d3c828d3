//! Fixture for the plexvm-net end-to-end tests: `plexvm-net` under a [`ChildGuard`],
//! Linux guests under QEMU (TCG) that run *concurrently* (the guests of one test talk to
//! each other, so they cannot run one after another like [`QemuGuest::run`] does),
//! network namespaces that are removed again, and the guests' busybox scripts.
//!
//! Addresses used are 10.99.x.y, only inside guests and namespaces a test creates.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::qemu::{opt_value, QemuGuest, QEMU};
use crate::{bin, wait_for, ChildGuard};

/// The virtio-pci transport and the virtio-net driver with its dependencies.
pub const VIRTIO_NET_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Prefix of the guests' result lines.
pub const RESULT_PREFIX: &str = "NET-RESULT ";

/// Adds a virtio-net-pci device backed by the vhost-user-net port listening on
/// `socket`. `vectors=0` (INTx): QEMU 7.2 under TCG crashes in
/// `msix_set_vector_notifiers` when a vhost-user-net device starts with MSI-X
/// (shared/DESIGN.md).
pub fn add_vhost_user_net(guest: &mut QemuGuest, id: &str, socket: &Path, mac: &str) {
    guest.extra_args.extend([
        "-chardev".to_string(),
        format!("socket,id=c{id},path={}", opt_value(socket)),
        "-netdev".to_string(),
        format!("vhost-user,chardev=c{id},id=n{id}"),
        "-device".to_string(),
        format!("virtio-net-pci,netdev=n{id},vectors=0,mac={mac}"),
    ]);
}

/// A running `plexvm-net`, killed and reaped when dropped.
#[derive(Debug)]
pub struct NetSwitch {
    /// The process.
    pub guard: ChildGuard,
    /// Its stderr.
    pub log: PathBuf,
}

impl NetSwitch {
    /// Starts `prefix + [plexvm-net] + args` (prefix e.g. `ip netns exec NS`), logging
    /// to `log`, and waits until every socket in `sockets` is listening.
    pub fn start(
        prefix: &[&str],
        args: &[String],
        sockets: &[PathBuf],
        log: &Path,
    ) -> Result<NetSwitch> {
        let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let binary = bin("plexvm-net");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        cmd.args(args)
            .env(
                "PLEXVM_NET_LOG",
                std::env::var("PLEXVM_NET_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut guard = ChildGuard::spawn("plexvm-net", &mut cmd)?;
        let pid = guard.pid();
        let ready = wait_for(Duration::from_secs(20), || {
            !guard.is_running() || sockets.iter().all(|s| listening_in(pid, s))
        }) && guard.is_running();
        if !ready {
            bail!(
                "plexvm-net did not start listening: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(NetSwitch {
            guard,
            log: log.to_path_buf(),
        })
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether `socket` is listening in the network namespace of process `pid` (its
/// `/proc/<pid>/net/unix`: a switch started under `ip netns exec` lives in another
/// namespace than the test, and `/proc/net/unix` shows only the caller's).
fn listening_in(pid: u32, socket: &Path) -> bool {
    let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        return false;
    };
    let wanted = socket.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == wanted
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// A guest booting under QEMU in the background; killed and reaped when dropped.
#[derive(Debug)]
pub struct RunningGuest {
    /// Name in messages.
    pub name: String,
    /// The QEMU process.
    pub guard: ChildGuard,
    console: PathBuf,
    qemu_log: PathBuf,
}

impl RunningGuest {
    /// Starts `guest`; console and QEMU log go to `<dir>/<name>-console.log` and
    /// `<dir>/<name>-qemu.log`.
    pub fn spawn(name: &str, guest: &QemuGuest, dir: &Path) -> Result<RunningGuest> {
        let console = dir.join(format!("{name}-console.log"));
        let qemu_log = dir.join(format!("{name}-qemu.log"));
        let out = fs::File::create(&qemu_log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(QEMU);
        cmd.args(guest.args(&console))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        Ok(RunningGuest {
            name: name.to_string(),
            guard: ChildGuard::spawn(QEMU, &mut cmd)?,
            console,
            qemu_log,
        })
    }

    /// Everything on the guest's console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The last lines of the console and QEMU's messages, for failure messages.
    pub fn tail(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        let start = lines.len().saturating_sub(30);
        format!(
            "--- {} console (last 30 lines) ---\n{}\n--- {} qemu ---\n{}",
            self.name,
            lines[start..].join("\n"),
            self.name,
            fs::read_to_string(&self.qemu_log)
                .unwrap_or_default()
                .trim_end()
        )
    }

    /// Waits (at most `timeout`, a hang guard) until a console line starts with
    /// `prefix`; fails early if QEMU exits first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let mut found = None;
        let mut exited = false;
        wait_for(timeout, || {
            found = find_line(&self.console(), prefix);
            exited = found.is_none() && !self.guard.is_running();
            found.is_some() || exited
        });
        match found.or_else(|| find_line(&self.console(), prefix)) {
            Some(line) => Ok(line),
            None => bail!(
                "{}: no console line {prefix:?} ({}):\n{}",
                self.name,
                if exited {
                    "QEMU exited"
                } else {
                    "hang guard expired"
                },
                self.tail()
            ),
        }
    }

    /// Waits for the guest's result line and parses its `key=value` fields.
    pub fn result(&mut self, timeout: Duration) -> Result<Vec<(String, String)>> {
        let line = self.wait_line(RESULT_PREFIX, timeout)?;
        Ok(line[RESULT_PREFIX.len()..]
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

/// The first complete (newline-terminated) console line starting with `prefix`: the
/// console file is read while QEMU is still writing it.
fn find_line(console: &str, prefix: &str) -> Option<String> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

/// A network namespace, deleted (with everything in it) when dropped.
#[derive(Debug)]
pub struct NetNs {
    /// Its name.
    pub name: String,
}

impl NetNs {
    /// Creates namespace `name` (removing a leftover of an earlier run first) with its
    /// loopback up.
    pub fn create(name: &str) -> Result<NetNs> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_ok(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace (`ip netns exec <ns> program`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `cmd`, failing with its stderr unless it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Received count from busybox/iputils ping's summary ("N packets received").
pub fn ping_received(output: &str) -> Option<u32> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let (_, after) = line.split_once(", ")?;
    after.split_whitespace().next()?.parse().ok()
}

/// The start of every guest script: bring up `eth0` with address `ip`/24 and wait until
/// `peer` answers a ping (a hang guard of 60 tries; the peer may still be booting).
pub fn script_prelude(ip: &str, peer: &str) -> String {
    format!(
        r#"#!/bin/sh
R="{RESULT_PREFIX}"
fail() {{ echo "${{R}}status=fail step=$1"; ip addr; dmesg | tail -20; exit 1; }}
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /sys/class/net/eth0 ] || fail no-eth0
ip link set lo up
ip addr add {ip}/24 dev eth0 || fail addr
ip link set eth0 up || fail up
n=0; until ping -c 1 -W 1 {peer} > /dev/null 2>&1; do n=$((n + 1)); [ $n -lt 60 ] || fail reach-{peer}; done
echo "NET-REACHED {peer}"
"#
    )
}

/// Guest script lines: `ping -c 20` to `peer`, storing the received count in `$PING`.
pub fn script_ping(peer: &str) -> String {
    format!(
        "PING=$(ping -c 20 -i 0.2 -W 2 {peer} | sed -n 's/.* \\([0-9]*\\) packets received.*/\\1/p')\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_are_parsed() {
        let busybox = "--- 10.99.1.2 ping statistics ---\n20 packets transmitted, 19 packets received, 5% packet loss\n";
        assert_eq!(ping_received(busybox), Some(19));
        assert_eq!(ping_received("nothing"), None);
    }

    #[test]
    fn lines_are_found_without_carriage_returns() {
        assert_eq!(
            find_line("a\r\nNET-RESULT x=1\r\n", RESULT_PREFIX),
            Some("NET-RESULT x=1".to_string())
        );
        assert_eq!(
            find_line("a\nNET-RESULT x=1 y", RESULT_PREFIX),
            None,
            "incomplete"
        );
    }
}
