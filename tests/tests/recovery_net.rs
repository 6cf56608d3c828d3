//! Restarting the switch under two running VMs: a net-echo pair attaches (`socket =`)
//! to two ports of one `plexvm-net` the test owns; during the sender's 20 s measured
//! phase the test SIGKILLs the switch 4 times at random moments and each time starts a
//! fresh one on the same sockets. Both cores reconnect to it and replay their receive
//! and transmit rings (plexvm-net has no INFLIGHT_SHMFD, so the core's ring tracker says
//! which buffers were outstanding).
//!
//! A network may lose frames when its switch dies, so `lost` is only reported. What
//! must hold: both probes end normally, no echoed frame is corrupt, the cores count one
//! restart per kill, and frames flow again after the last restart — the sender's echoed
//! count keeps growing after both cores report the device up again. Rings that stay
//! stuck after a reconnect (or buffers lost by the replay, which starve the receive
//! rings) stop that count and fail the test. No frame may come back twice either:
//! plexvm-net returns a transmit chain to the guest before it forwards the frame, so
//! a chain replayed after a kill was never forwarded, and a replay of chains the guest
//! already had back (a wrong ring base) shows as `duplicate`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use plexvm_protocol::api::BackendState;
use plexvm_tests::net_guest::NetSwitch;
use plexvm_tests::probe_vm::{ProbeVm, ProbeVmSpec};
use plexvm_tests::wait_for;

const KILLS: u64 = 4;
/// Measured seconds: room for the kills and several seconds after the last one.
const SECONDS: u64 = 20;
const WINDOW: u16 = 8;
/// Frames that must come back after the last restart (a stuck ring gives 0; a working
/// one thousands in the seconds left).
const MIN_AFTER_LAST: u64 = 100;

fn spec(name: &str, cmdline: String, socket: &std::path::Path) -> ProbeVmSpec {
    let source = format!("socket = \"{}\"", socket.display());
    ProbeVmSpec::net(name, cmdline, source, true)
}

/// The `echoed=` of the sender's last progress line (`probe: net-echo t=...`).
fn last_progress_echoed(serial: &str) -> Option<u64> {
    serial
        .lines()
        .rev()
        .find(|l| l.starts_with("probe: net-echo t="))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("echoed="))?
        .parse()
        .ok()
}

/// Waits until the VM's device is up again after `restarts` restarts.
fn wait_up(vm: &ProbeVm, restarts: u64) {
    let mut last = None;
    let up = wait_for(Duration::from_secs(20), || {
        last = vm.info().map(|i| i.devices[0].clone());
        last.as_ref()
            .is_some_and(|d| d.state == BackendState::Up && d.restarts >= restarts)
    });
    assert!(
        up,
        "{}: device not up after {restarts} restarts: {last:?}\n{}",
        vm.name,
        vm.logs()
    );
}

/// Kill moments that differ from run to run (xorshift64*, seed printed).
struct Rng(u64);

impl Rng {
    fn from_time() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("recovery_net: kill timing seed {seed}");
        Rng(seed)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        Duration::from_millis(low + r % (high - low).max(1))
    }
}

#[test]
fn sigkilled_plexvm_net_is_restarted_under_a_running_net_echo_pair() {
    let dir = tempfile::tempdir().unwrap();
    let sockets: [PathBuf; 2] = [dir.path().join("send.sock"), dir.path().join("echo.sock")];
    let args: Vec<String> = sockets
        .iter()
        .flat_map(|s| ["--socket".to_string(), s.display().to_string()])
        .collect();
    let log = |n: u64| dir.path().join(format!("switch{n}.log"));
    let mut switch = NetSwitch::start(&[], &args, &sockets, &log(0)).unwrap();
    let echo_cmd = "probe.workload=net-echo probe.role=echo probe.seconds=60".to_string();
    let echo = ProbeVm::start(dir.path(), &spec("echo", echo_cmd, &sockets[1])).unwrap();
    let send_cmd = format!(
        "probe.workload=net-echo probe.role=send probe.seed=9 probe.size=256 \
         probe.window={WINDOW} probe.warmup=1 probe.seconds={SECONDS} probe.timeout=100"
    );
    let sender = ProbeVm::start(dir.path(), &spec("send", send_cmd, &sockets[0])).unwrap();
    assert!(
        wait_for(Duration::from_secs(90), || sender
            .serial()
            .contains("probe: bench go")),
        "the sender never started its measured phase\n{}\n{}",
        sender.logs(),
        echo.logs()
    );
    let mut rng = Rng::from_time();
    let start = Instant::now();
    for kill in 1..=KILLS {
        std::thread::sleep(rng.millis(1000, 2500));
        switch.guard.signal(libc::SIGKILL);
        let _ = switch.guard.wait_timeout(Duration::from_secs(10));
        // A fresh switch on the same sockets; both cores find it by retrying the path.
        switch = NetSwitch::start(&[], &args, &sockets, &log(kill)).unwrap();
        wait_up(&sender, kill);
        wait_up(&echo, kill);
    }
    let serial = sender.serial();
    assert!(
        !serial.contains("probe: bench stop"),
        "the kills took longer than the measured phase ({:?})",
        start.elapsed()
    );
    let before = last_progress_echoed(&serial).unwrap_or(0);
    eprintln!(
        "recovery_net: {KILLS} kills in {:.1} s; echoed {before} frames before the last restart",
        start.elapsed().as_secs_f64()
    );
    // The cores' view while the VMs still run: one restart per kill, nothing more.
    for vm in [&sender, &echo] {
        let info = vm.info().expect("API answers");
        assert_eq!(info.devices[0].restarts, KILLS, "{}: {info:?}", vm.name);
    }

    let s = sender.finish(Duration::from_secs(180)).unwrap();
    let e = echo.finish(Duration::from_secs(180)).unwrap();
    drop(switch);
    let both = format!("{}\n{}", s.log, e.log);
    assert_eq!(s.status.code(), Some(0), "{both}");
    assert_eq!(e.status.code(), Some(0), "{both}");
    assert_eq!(s.get("status"), Some("ok"), "{both}");
    assert_eq!(e.get("status"), Some("ok"), "{both}");
    assert_eq!(s.num("corrupt"), 0, "{both}");
    assert_eq!(s.num("other"), 0, "{both}");
    let (sent, echoed, lost) = (s.num("sent"), s.num("echoed"), s.num("lost"));
    assert_eq!(sent, echoed + lost, "{both}");
    let duplicate = s.num("duplicate");
    assert_eq!(duplicate, 0, "{both}");
    assert!(
        echoed >= before + MIN_AFTER_LAST,
        "frames stopped flowing after the last restart: {echoed} echoed at the end, \
         {before} before the last restart\n{both}"
    );
    eprintln!(
        "recovery_net: sent={sent} echoed={echoed} lost={lost} duplicate={duplicate} late={} \
         pps={} rtt_p50_ns={} rtt_max_ns={} stop={} echo_end={}",
        s.num("late"),
        s.num("pps"),
        s.num("rtt_p50_ns"),
        s.num("rtt_max_ns"),
        s.get("stop").unwrap_or("?"),
        e.get("end").unwrap_or("?")
    );
}
