//! The core + plexvm-net + two probe guests, end to end: one probe sends numbered
//! frames (`probe.workload=net-echo probe.role=send`), the other returns each through
//! the switch (`probe.role=echo`), and the sender checks every echoed frame byte for
//! byte. Covers the core's virtio-mmio and virtio-pci transports for a two-queue device (receive and
//! transmit), its vhost-user set-up with a backend that is not blk, and the switch's
//! guest-to-guest path, at ping-pong (64 B, one frame outstanding) and with a window of
//! 32 full-size frames.
//!
//! What the counts mean: the sender's `sent`/`echoed`/`lost` are the measured phase's
//! data frames, `total_sent` the data frames of warm-up and measured phase together;
//! the echo's `echoed` counts the data frames it returned (hello and stop frames are
//! counted apart: `hello=`, and the stop not at all). So with nothing lost, the echo's
//! `echoed` equals the sender's `total_sent`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use plexvm_tests::net_guest::NetSwitch;
use plexvm_tests::probe_vm::{ProbeOutcome, ProbeVm, ProbeVmSpec};
use plexvm_tests::vhost_backends::is_listening;
use plexvm_tests::wait_for;

/// Hang guard for one VM (hello phase, warm-up, measured time, stop, plus a slow start).
const VM_TIMEOUT: Duration = Duration::from_secs(180);
/// Measured seconds of the sender.
const SECONDS: u64 = 3;
/// A frame not back within this counts as lost. Much longer than any round trip on an
/// idle machine, so `lost=0` holds also on a busy 2-core CI machine where the two
/// spinning vCPUs and the switch share the cores (the longest round trip seen there was
/// over 0.3 s); a frame that is really dropped still shows.
const TIMEOUT_MS: u64 = 3000;

fn spec(name: &str, cmdline: String, source: String) -> ProbeVmSpec {
    ProbeVmSpec::net(name, cmdline, source, false)
}

fn socket_line(path: &Path) -> String {
    format!("socket = \"{}\"", path.display())
}

fn sender_cmdline(size: u16, window: u16) -> String {
    format!(
        "probe.workload=net-echo probe.role=send probe.seed=5 probe.size={size} \
         probe.window={window} probe.seconds={SECONDS} probe.warmup=1 probe.timeout={TIMEOUT_MS}"
    )
}

fn echo_cmdline() -> String {
    // Ends at the sender's stop frame; 60 s idle only if the sender never comes.
    "probe.workload=net-echo probe.role=echo probe.seconds=60".into()
}

/// Both VMs' outcomes, each asserted to have exited 0 with status=ok.
fn finish_pair(sender: ProbeVm, echo: ProbeVm) -> (ProbeOutcome, ProbeOutcome) {
    let s = sender.finish(VM_TIMEOUT).unwrap();
    let e = echo.finish(VM_TIMEOUT).unwrap();
    let both = format!("{}\n{}", s.log, e.log);
    assert_eq!(s.status.code(), Some(0), "sender exit status\n{both}");
    assert_eq!(e.status.code(), Some(0), "echo exit status\n{both}");
    assert_eq!(s.get("status"), Some("ok"), "{both}");
    assert_eq!(e.get("status"), Some("ok"), "{both}");
    (s, e)
}

/// The sender's and echo's counts agree and show a lossless, verified run.
fn assert_lossless(s: &ProbeOutcome, e: &ProbeOutcome, size: u16, window: u16) {
    let both = format!("{}\n{}", s.log, e.log);
    assert_eq!(s.get("size"), Some(size.to_string().as_str()), "{both}");
    assert_eq!(s.get("window"), Some(window.to_string().as_str()), "{both}");
    let sent = s.num("sent");
    assert!(sent > 0, "{both}");
    assert_eq!(s.num("echoed"), sent, "every frame came back\n{both}");
    for key in ["lost", "corrupt", "duplicate", "late", "other"] {
        assert_eq!(s.num(key), 0, "{key}\n{both}");
    }
    assert!(s.num("total_sent") >= sent, "{both}");
    assert_eq!(
        e.num("echoed"),
        s.num("total_sent"),
        "the echo returned exactly the data frames sent\n{both}"
    );
    assert_eq!(e.num("other"), 0, "{both}");
    assert_eq!(s.get("stop"), Some("acked"), "{both}");
    assert_eq!(e.get("end"), Some("stop"), "{both}");
    assert!(e.num("hello") >= 1 && s.num("hello") >= 1, "{both}");
    println!(
        "core_net: size={size} window={window}: pps={} rtt_p50_ns={} rtt_p99_ns={} rtt_max_ns={} sent={sent}",
        s.num("pps"),
        s.num("rtt_p50_ns"),
        s.num("rtt_p99_ns"),
        s.num("rtt_max_ns")
    );
}

/// Reads the switch's counters (`--stats-file`, written on SIGUSR1).
fn switch_stats(switch: &NetSwitch, path: &Path) -> serde_json::Value {
    let _ = std::fs::remove_file(path);
    switch.guard.signal(libc::SIGUSR1);
    assert!(
        wait_for(Duration::from_secs(10), || path.exists()),
        "no stats file: {}",
        switch.log_text()
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The switch saw every frame of the run on both ports: the sender's port received the
/// data, hello and stop frames and sent the echoes back, the echo's port the reverse.
fn assert_switch_counts(stats: &serde_json::Value, s: &ProbeOutcome, e: &ProbeOutcome) {
    let ports = stats["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 2, "{stats}");
    let n = |port: usize, key: &str| ports[port][key].as_u64().unwrap_or(0);
    // Data frames plus at least one hello and one stop frame each way.
    let total = s.num("total_sent");
    assert!(n(0, "rx_packets") >= total + 2, "{stats}");
    assert!(n(1, "tx_packets") >= total + 2, "{stats}");
    assert!(n(1, "rx_packets") >= e.num("echoed") + 2, "{stats}");
    assert!(n(0, "tx_packets") >= total + 2, "{stats}");
    for port in 0..2 {
        assert_eq!(n(port, "rx_dropped"), 0, "malformed frames\n{stats}");
        assert_eq!(n(port, "tx_dropped_error"), 0, "unusable buffers\n{stats}");
    }
    // The sender's receive ring is full from the start and never runs dry.
    assert_eq!(n(0, "tx_dropped_no_buffer"), 0, "{stats}");
}

/// Runs one sender/echo pair on two ports of a plexvm-net the test owns.
fn run_attached(size: u16, window: u16) {
    run_attached_with(size, window, ["", ""]);
}

/// [`run_attached`] with extra `[[device]]` lines for the sender's and the echo's device
/// (e.g. `transport = "pci"`).
fn run_attached_with(size: u16, window: u16, extra: [&str; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let sockets = [dir.path().join("send.sock"), dir.path().join("echo.sock")];
    let stats = dir.path().join("stats.json");
    let mut args: Vec<String> = sockets
        .iter()
        .flat_map(|s| ["--socket".to_string(), s.display().to_string()])
        .collect();
    args.extend(["--stats-file".into(), stats.display().to_string()]);
    let switch = NetSwitch::start(&[], &args, &sockets, &dir.path().join("switch.log")).unwrap();
    let echo = ProbeVm::start(
        dir.path(),
        &spec(
            "echo",
            echo_cmdline(),
            format!("{}\n{}", socket_line(&sockets[1]), extra[1]),
        ),
    )
    .unwrap();
    let sender = ProbeVm::start(
        dir.path(),
        &spec(
            "send",
            sender_cmdline(size, window),
            format!("{}\n{}", socket_line(&sockets[0]), extra[0]),
        ),
    )
    .unwrap();
    let (s, e) = finish_pair(sender, echo);
    for (outcome, transport) in [(&s, extra[0]), (&e, extra[1])] {
        if transport.contains("pci") {
            assert!(
                outcome.log.contains("virtio-pci 00:01.0: device id 1"),
                "{}",
                outcome.log
            );
        }
    }
    assert_lossless(&s, &e, size, window);
    let stats = switch_stats(&switch, &stats);
    assert_switch_counts(&stats, &s, &e);
}

#[test]
fn net_echo_64_byte_ping_pong_through_plexvm_net() {
    run_attached(64, 1);
}

#[test]
fn net_echo_1514_byte_frames_window_32_through_plexvm_net() {
    run_attached(1514, 32);
}

/// The two-queue net device over virtio-pci (the sender) talking to one over
/// virtio-mmio (the echo): the same data checks.
#[test]
fn net_echo_between_a_virtio_pci_and_a_virtio_mmio_guest() {
    run_attached_with(1514, 32, ["transport = \"pci\"", ""]);
}

/// The sender's core spawns the switch (`exec`): its own port is the socket the core
/// appends, and a second `--socket` in `exec` is the port the echo VM attaches to.
#[test]
fn net_echo_through_a_plexvm_net_the_core_spawned() {
    let dir = tempfile::tempdir().unwrap();
    let echo_socket: PathBuf = dir.path().join("echo.sock");
    let exec = format!(
        "exec = [\"plexvm-net\", \"--socket\", \"{}\"]",
        echo_socket.display()
    );
    let sender = ProbeVm::start(dir.path(), &spec("send", sender_cmdline(64, 4), exec)).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || is_listening(&echo_socket)),
        "the spawned plexvm-net never listened on the echo's port\n{}",
        sender.logs()
    );
    let echo = ProbeVm::start(
        dir.path(),
        &spec("echo", echo_cmdline(), socket_line(&echo_socket)),
    )
    .unwrap();
    let (s, e) = finish_pair(sender, echo);
    assert_lossless(&s, &e, 64, 4);
}
