//! The network I/O path: two probe VMs exchanging frames through a switch, the probe's
//! `net-echo` workload. One VM sends numbered frames with up to `window` of them in
//! flight and times each round trip with its TSC; the other swaps the MAC addresses and
//! sends every frame back. The switch between them is plexvm-net (two `--socket`
//! ports) or DPDK's `dpdk-testpmd` in io-forward mode between two vhost-user ports, so
//! the same guests and the same core measure both.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::guest::{run_vm, Device, GuestError, VmOutcome, VmRequest};
use crate::process::{ChildGuard, ProcessError};
use crate::vm_bench::{GO_LINE, STOP_LINE};

/// Guest RAM of each net-echo VM.
pub const MEMORY_MIB: u64 = 64;
/// How long the echo VM waits for a first or next frame before it gives up (so a
/// failed sender does not leave it running for long).
const ECHO_IDLE_SECONDS: u64 = 20;
/// The sender's lost-frame timeout (`probe.timeout`, ms): round trips of hundreds of
/// ms happen on this loaded nested machine, and a late frame is not a lost one.
const LOST_AFTER_MS: u64 = 1000;
/// How long a switch may take to create its two sockets (testpmd maps its memory
/// pool first, which takes seconds here).
const SWITCH_START: Duration = Duration::from_secs(60);
const RESULT_PREFIX: &str = "probe: result workload=net-echo ";

/// One traffic pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NetScenario {
    /// Name on the command line and in results.
    pub name: &'static str,
    /// Ethernet frame bytes (without the virtio-net header).
    pub size: u32,
    /// Frames the sender keeps in flight (1: ping-pong, the round-trip latency).
    pub window: u32,
}

/// The scenarios: packet rate at 64 B and 1500 B, round trip at low load.
pub const NET_SCENARIOS: &[NetScenario] = &[
    NetScenario {
        name: "rtt-64",
        size: 64,
        window: 1,
    },
    NetScenario {
        name: "pps-64",
        size: 64,
        window: 32,
    },
    NetScenario {
        name: "pps-1500",
        size: 1500,
        window: 32,
    },
];

/// The switch between the two VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetSubject {
    /// plexvm's backend: a learning L2 switch, two vhost-user ports.
    PlexvmNet,
    /// `dpdk-testpmd --forward-mode=io` between two vhost PMD ports (busy-polls a core).
    Testpmd,
}

impl NetSubject {
    /// Both, in table order.
    pub const ALL: [NetSubject; 2] = [NetSubject::PlexvmNet, NetSubject::Testpmd];

    /// Name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            NetSubject::PlexvmNet => "plexvm-net",
            NetSubject::Testpmd => "testpmd",
        }
    }
}

impl fmt::Display for NetSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors in the `net` selection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetPlanError {
    /// `--scenario` names no known scenario.
    #[error("unknown net scenario {0:?} (known: rtt-64, pps-64, pps-1500)")]
    UnknownScenario(String),
    /// `--backend` names no known switch.
    #[error("unknown net backend {0:?} (known: plexvm-net, testpmd)")]
    UnknownSubject(String),
}

/// Scenarios by name (none: all).
pub fn select_scenarios(names: &[String]) -> Result<Vec<NetScenario>, NetPlanError> {
    if names.is_empty() {
        return Ok(NET_SCENARIOS.to_vec());
    }
    names
        .iter()
        .map(|n| {
            NET_SCENARIOS
                .iter()
                .find(|s| s.name == n)
                .copied()
                .ok_or_else(|| NetPlanError::UnknownScenario(n.clone()))
        })
        .collect()
}

/// Switches by name (none: both), in table order.
pub fn select_subjects(names: &[String]) -> Result<Vec<NetSubject>, NetPlanError> {
    if names.is_empty() {
        return Ok(NetSubject::ALL.to_vec());
    }
    for name in names {
        if !NetSubject::ALL.iter().any(|s| s.name() == name) {
            return Err(NetPlanError::UnknownSubject(name.clone()));
        }
    }
    Ok(NetSubject::ALL
        .into_iter()
        .filter(|s| names.iter().any(|n| n == s.name()))
        .collect())
}

/// Programs a net repetition starts.
#[derive(Debug, Clone)]
pub struct NetBinaries {
    /// The core.
    pub plexvm: PathBuf,
    /// plexvm's switch.
    pub plexvm_net: PathBuf,
    /// `dpdk-testpmd` (Debian package dpdk-dev).
    pub testpmd: PathBuf,
}

/// One repetition's numbers, from the sender's result line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetSample {
    /// Echoed frames per second in the measured time.
    pub pps: f64,
    /// Frame bits per second of echoed frames, one direction, Mbit/s.
    pub mbit_s: f64,
    /// Median round trip, µs.
    pub rtt_p50_us: f64,
    /// 99th percentile round trip, µs.
    pub rtt_p99_us: f64,
    /// Frames sent in the measured time.
    pub sent: u64,
    /// Frames that came back.
    pub echoed: u64,
    /// Frames that did not come back within the probe's timeout.
    pub lost: u64,
    /// Host wall time of the measured interval over the guest's (1.0 = clocks agree).
    pub clock_ratio: f64,
}

/// Why a net repetition failed.
#[derive(Debug, thiserror::Error)]
pub enum NetBenchError {
    /// The switch did not come up.
    #[error("{0} did not start")]
    Switch(NetSubject, #[source] ProcessError),
    /// A VM run failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The echo VM's thread panicked (a harness bug).
    #[error("the echo VM's thread panicked")]
    EchoThread,
    /// The sender reports failure.
    #[error("sender reports status={status} corrupt={corrupt} duplicate={duplicate} (exit code {code:?})")]
    Failed {
        /// `status=`.
        status: String,
        /// `corrupt=`.
        corrupt: String,
        /// `duplicate=`.
        duplicate: String,
        /// plexvm's exit code.
        code: Option<i32>,
    },
}

/// The sender's command line.
pub fn sender_cmdline(scenario: &NetScenario, seconds: u64, warmup: u64) -> String {
    format!(
        "probe.workload=net-echo probe.role=send probe.size={} probe.window={} \
         probe.seconds={seconds} probe.warmup={warmup} probe.timeout={LOST_AFTER_MS}",
        scenario.size, scenario.window
    )
}

/// The echo side's command line.
pub fn echo_cmdline() -> String {
    format!("probe.workload=net-echo probe.role=echo probe.seconds={ECHO_IDLE_SECONDS}")
}

/// Starts `subject` with two vhost-user ports in `work`; returns it and the sockets.
fn start_switch(
    subject: NetSubject,
    bins: &NetBinaries,
    work: &Path,
) -> Result<(ChildGuard, [PathBuf; 2]), NetBenchError> {
    let sockets = [work.join("port0.sock"), work.join("port1.sock")];
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    let log = std::fs::File::create(work.join(format!("{subject}.log"))).ok();
    let mut command = match subject {
        NetSubject::PlexvmNet => {
            let mut c = Command::new(&bins.plexvm_net);
            for s in &sockets {
                c.arg("--socket").arg(s);
            }
            c
        }
        NetSubject::Testpmd => testpmd_command(&bins.testpmd, &sockets),
    };
    command.stdin(Stdio::null());
    if let Some(log) = log {
        if let Ok(copy) = log.try_clone() {
            command.stdout(copy);
        }
        command.stderr(log);
    }
    let mut child = ChildGuard::spawn(subject.name(), &mut command)
        .map_err(|e| NetBenchError::Switch(subject, e))?;
    for s in &sockets {
        child
            .wait_for_socket(s, SWITCH_START)
            .map_err(|e| NetBenchError::Switch(subject, e))?;
    }
    Ok((child, sockets))
}

/// testpmd as DESIGN.md describes it: no hugepages, no PCI, two vhost PMD ports in
/// server mode, io forwarding (port 0 <-> port 1) on one forwarding lcore.
pub fn testpmd_command(testpmd: &Path, sockets: &[PathBuf; 2]) -> Command {
    let mut c = Command::new(testpmd);
    c.args(["-l", "0,1", "--no-huge", "--no-pci", "-m", "1024"])
        .arg("--file-prefix")
        .arg(format!("plexvm-perf-{}", std::process::id()));
    for (i, s) in sockets.iter().enumerate() {
        c.arg("--vdev")
            .arg(format!("net_vhost{i},iface={},queues=1", s.display()));
    }
    c.args([
        "--",
        "--forward-mode=io",
        "--auto-start",
        "--nb-cores=1",
        "--total-num-mbufs=16384",
        "--stats-period=1",
    ]);
    c
}

/// Runs one repetition of `scenario` through `subject`.
pub fn run(
    bins: &NetBinaries,
    work: &Path,
    scenario: &NetScenario,
    subject: NetSubject,
    seconds: u64,
    warmup: u64,
) -> Result<NetSample, NetBenchError> {
    let (mut switch, sockets) = start_switch(subject, bins, work)?;
    let dirs = [work.join("send"), work.join("echo")];
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|source| GuestError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let timeout = Duration::from_secs(warmup + seconds + 90);
    let echo = VmRequest {
        cmdline: echo_cmdline(),
        device: Device::Socket(sockets[1].clone()),
        kind: "net",
        transport: "mmio",
        memory_mib: MEMORY_MIB,
        timeout,
        sample_memory_at: None,
    };
    let send = VmRequest {
        cmdline: sender_cmdline(scenario, seconds, warmup),
        device: Device::Socket(sockets[0].clone()),
        kind: "net",
        transport: "mmio",
        memory_mib: MEMORY_MIB,
        timeout,
        sample_memory_at: None,
    };
    let (sender, echo) = std::thread::scope(|scope| {
        let echo = scope.spawn(|| run_vm(&bins.plexvm, &dirs[1], &echo));
        let sender = run_vm(&bins.plexvm, &dirs[0], &send);
        (sender, echo.join())
    });
    switch.terminate(Duration::from_secs(5));
    let sender = sender?;
    // The echo side's own result matters only when the sender has none.
    echo.map_err(|_| NetBenchError::EchoThread)??;
    sample_of(&sender)
}

/// The sample in a sender's output.
pub fn sample_of(outcome: &VmOutcome) -> Result<NetSample, NetBenchError> {
    let f = outcome.fields(RESULT_PREFIX)?;
    let text = |k: &str| f.get(k).cloned().unwrap_or_default();
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
    if text("status") != "ok" || outcome.code != Some(0) {
        return Err(NetBenchError::Failed {
            status: text("status"),
            corrupt: text("corrupt"),
            duplicate: text("duplicate"),
            code: outcome.code,
        });
    }
    let bad = || GuestError::BadResult(format!("{f:?}"));
    let pps = num("pps").ok_or_else(bad)?;
    let size = num("size").unwrap_or(0.0);
    let guest_seconds = num("seconds").unwrap_or(0.0);
    let host_seconds = match (outcome.line(GO_LINE), outcome.line(STOP_LINE)) {
        (Some(go), Some(stop)) => stop.at.saturating_sub(go.at).as_secs_f64(),
        _ => 0.0,
    };
    Ok(NetSample {
        pps,
        mbit_s: pps * size * 8.0 / 1e6,
        rtt_p50_us: num("rtt_p50_ns").ok_or_else(bad)? / 1000.0,
        rtt_p99_us: num("rtt_p99_ns").ok_or_else(bad)? / 1000.0,
        sent: num("sent").unwrap_or(0.0) as u64,
        echoed: num("echoed").unwrap_or(0.0) as u64,
        lost: num("lost").unwrap_or(0.0) as u64,
        clock_ratio: if guest_seconds > 0.0 {
            host_seconds / guest_seconds
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::SerialLine;

    fn outcome(lines: &[(u64, &str)], code: i32) -> VmOutcome {
        VmOutcome {
            lines: lines
                .iter()
                .map(|&(ms, t)| SerialLine {
                    at: Duration::from_millis(ms),
                    text: t.to_string(),
                })
                .collect(),
            code: Some(code),
            memory: None,
            stderr_tail: String::new(),
        }
    }

    #[test]
    fn a_sender_result_becomes_a_sample() {
        let o = outcome(
            &[
                (100, "probe: bench go"),
                (2100, "probe: bench stop"),
                (
                    2101,
                    "probe: result workload=net-echo role=send status=ok size=64 window=1 \
                     sent=1000 echoed=1000 lost=0 corrupt=0 duplicate=0 pps=500 seconds=2.000 \
                     rtt_p50_ns=1500 rtt_p99_ns=9000 rtt_max_ns=20000",
                ),
            ],
            0,
        );
        let s = sample_of(&o).unwrap();
        assert_eq!((s.pps, s.sent, s.echoed, s.lost), (500.0, 1000, 1000, 0));
        assert_eq!((s.rtt_p50_us, s.rtt_p99_us), (1.5, 9.0));
        assert!((s.mbit_s - 0.256).abs() < 1e-9);
        assert!((s.clock_ratio - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_failed_or_missing_result_is_an_error() {
        let failed = outcome(
            &[(
                1,
                "probe: result workload=net-echo role=send status=fail corrupt=3 duplicate=0 pps=1",
            )],
            1,
        );
        assert!(matches!(
            sample_of(&failed),
            Err(NetBenchError::Failed { corrupt, .. }) if corrupt == "3"
        ));
        assert!(matches!(
            sample_of(&outcome(&[(1, "probe: booted")], 0)),
            Err(NetBenchError::Guest(GuestError::NoResult { .. }))
        ));
    }

    #[test]
    fn selection_and_command_lines() {
        assert_eq!(select_scenarios(&[]).unwrap().len(), 3);
        assert!(select_scenarios(&["pps-9000".into()]).is_err());
        assert_eq!(
            select_subjects(&["testpmd".into(), "plexvm-net".into()]).unwrap(),
            NetSubject::ALL
        );
        assert!(select_subjects(&["ovs".into()]).is_err());
        assert_eq!(
            sender_cmdline(&NET_SCENARIOS[1], 5, 1),
            "probe.workload=net-echo probe.role=send probe.size=64 probe.window=32 \
             probe.seconds=5 probe.warmup=1 probe.timeout=1000"
        );
        let sockets = [PathBuf::from("/x/a.sock"), PathBuf::from("/x/b.sock")];
        let c = testpmd_command(Path::new("dpdk-testpmd"), &sockets);
        let args: Vec<_> = c.get_args().map(|a| a.to_string_lossy()).collect();
        assert!(args.contains(&"net_vhost1,iface=/x/b.sock,queues=1".into()));
        assert!(args.contains(&"--forward-mode=io".into()));
    }
}
