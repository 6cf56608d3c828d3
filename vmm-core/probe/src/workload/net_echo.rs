//! `probe.workload=net-echo`: two probes on one switch, one sending numbered frames
//! (`probe.role=send`), the other returning each to its sender (`probe.role=echo`), so
//! the whole path — the core's virtio-mmio transports, the vhost-user backend and its
//! switch, both guests' rings — is exercised and timed (frames: [`crate::netframe`]).
//!
//! The sender first broadcasts hello frames until one comes back (then it knows the
//! echo's MAC address), runs an unrecorded warm-up of `probe.warmup=` seconds and then
//! the measured `probe.seconds=`, keeping up to `probe.window=` frames outstanding.
//! Every echoed frame is checked: a sequence number that is outstanding, the size sent,
//! the fill intact, sent to us by the echo. A frame not back within `probe.timeout=` ms
//! counts as lost and frees its window slot, so a switch that drops frames or restarts
//! never hangs the sender; if its echo arrives later it counts as `late`, a second echo
//! of an answered frame as `duplicate`. Each phase ends by waiting until every frame is
//! back or lost, so `sent == echoed + lost`. Finally the sender sends a stop frame
//! (up to 5 times, until the echo acknowledges it by returning it).
//!
//! `probe: bench go` / `probe: bench stop` bracket the measured time as in blk-bench
//! (the perf harness times the same interval with the host clock), and a progress line
//! `probe: net-echo t=<s> sent=<n> echoed=<n> lost=<n>` is printed once a second.

use super::{find_transport, Env};
use crate::cmdline::{NetParams, Role, MAX_WINDOW};
use crate::console::{Chain, ExitCode};
use crate::histogram::Histogram;
use crate::memory::{OutOfMemory, PhysAlloc};
use crate::netframe::{self, Parsed, BROADCAST, SEQ_HELLO, SEQ_STOP};
use crate::time::{Clock, Deadline};
use crate::virtio::net::{NetDevice, NetError, DEVICE_ID_NET, F_EVENT_IDX, MAX_FRAME};
use crate::{serial_print, serial_println};

/// Measured seconds of the sender when `probe.seconds=0`.
const SEND_SECONDS: u64 = 5;
/// Seconds without a frame after which the echo ends when `probe.seconds=0`.
const ECHO_IDLE_SECONDS: u64 = 60;
/// How long the sender looks for its echo.
const HELLO_MS: u64 = 30_000;
/// Gap between hello frames.
const HELLO_GAP_MS: u64 = 10;
/// Stop frames sent at most, and how long to wait for each to come back.
const STOP_TRIES: u32 = 5;
const STOP_WAIT_MS: u64 = 200;
/// How long the echo waits for its last answer (the stop) to leave.
const ECHO_DRAIN_MS: u64 = 100;
/// Answered-or-lost memory of the sender, in sequence numbers.
const HISTORY: usize = 4096;
/// Bad echoes described on the serial port; the rest are only counted.
const MAX_BAD_LINES: u32 = 10;
/// Role bytes of [`netframe::local_mac`].
const MAC_ROLE_SEND: u8 = 1;
const MAC_ROLE_ECHO: u8 = 2;

/// Runs the workload; returns the exit code.
pub fn run(env: &mut Env) -> ExitCode {
    let Some(transport) = find_transport(env, DEVICE_ID_NET) else {
        serial_println!("probe: error: no virtio network device");
        return ExitCode::DeviceError;
    };
    let device = match NetDevice::open(transport, &mut env.alloc) {
        Ok(device) => device,
        Err(error) => {
            serial_println!("probe: error: network device: {}", Chain(&error));
            return ExitCode::DeviceError;
        }
    };
    let params = env.config.net;
    let role = params.role.unwrap_or(Role::Echo);
    let role_byte = match role {
        Role::Send => MAC_ROLE_SEND,
        Role::Echo => MAC_ROLE_ECHO,
    };
    let mac = device
        .mac()
        .unwrap_or_else(|| netframe::local_mac(role_byte, env.config.seed));
    let (rx, tx) = device.queue_sizes();
    serial_println!(
        "probe: network device: mac {}, queues rx {rx} tx {tx}, features {:#x}",
        Mac(mac),
        device.features()
    );
    let mut net = Net {
        device,
        mac,
        clock: env.clock,
        seed: env.config.seed,
        frame: [0; MAX_FRAME],
    };
    let outcome = match role {
        Role::Send => match Sender::new(params, env.config.bench.warmup, &mut env.alloc) {
            Ok(mut sender) => sender.run(&mut net, seconds(env, SEND_SECONDS)),
            Err(error) => Err(NetError::Memory(error)),
        },
        Role::Echo => run_echo(&mut net, seconds(env, ECHO_IDLE_SECONDS)),
    };
    outcome.unwrap_or_else(|error| {
        serial_println!("probe: error: network device: {}", Chain(&error));
        serial_println!("probe: device status {:#x}", net.device.device_status());
        ExitCode::DeviceError
    })
}

fn seconds(env: &Env, default: u64) -> u64 {
    match env.config.seconds {
        0 => default,
        n => n,
    }
}

/// What both roles share: the device, our address and a frame buffer.
struct Net {
    device: NetDevice,
    mac: [u8; 6],
    clock: Clock,
    seed: u64,
    frame: [u8; MAX_FRAME],
}

impl Net {
    /// Builds a frame of `size` bytes to `dst` and queues it; false if no buffer is free.
    fn send(&mut self, dst: [u8; 6], size: usize, seq: u64) -> Result<bool, NetError> {
        let tsc = self.clock.now();
        netframe::build(&mut self.frame[..size], dst, self.mac, self.seed, seq, tsc);
        self.device.send(&self.frame[..size])
    }

    fn ns(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.clock.tsc_khz())) as u64
    }
}

/// The echo: returns every net-echo frame to its source until a stop frame comes or
/// nothing has come for `idle_s` seconds.
fn run_echo(net: &mut Net, idle_s: u64) -> Result<ExitCode, NetError> {
    serial_println!("probe: net-echo echo: answering; ends at a stop frame or {idle_s} s idle");
    let (mut echoed, mut hello, mut other) = (0u64, 0u64, 0u64);
    let mut stopped = false;
    let mut last = net.clock.now();
    let idle = net.clock.ticks(idle_s.saturating_mul(1000));
    while !stopped && net.clock.now().saturating_sub(last) < idle {
        net.device.reap_tx()?;
        while net.device.tx_free() > 0 {
            let Some(len) = net.device.recv(&mut net.frame)? else {
                break;
            };
            last = net.clock.now();
            let frame = &mut net.frame[..len];
            match netframe::seq_of(frame) {
                None => {
                    other += 1;
                    continue;
                }
                Some(SEQ_STOP) => stopped = true,
                Some(SEQ_HELLO) => hello += 1,
                Some(_) => echoed += 1,
            }
            netframe::answer(frame, net.mac);
            net.device.send(frame)?;
            if stopped {
                break;
            }
        }
        net.device.kick();
    }
    // Give the stop's acknowledgement a moment to leave before the VM ends.
    let drain = Deadline::after(&net.clock, ECHO_DRAIN_MS);
    while net.device.tx_in_flight() > 0 && !drain.passed(&net.clock) {
        net.device.reap_tx()?;
    }
    let end = if stopped { "stop" } else { "idle" };
    let ok = stopped || echoed > 0;
    serial_println!(
        "probe: result workload=net-echo role=echo status={} echoed={echoed} hello={hello} \
         other={other} end={end} notifies={}",
        if ok { "ok" } else { "fail" },
        net.device.notifies()
    );
    Ok(if ok {
        ExitCode::Ok
    } else {
        ExitCode::VerifyFailed
    })
}

/// Counters of one sender phase.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    sent: u64,
    echoed: u64,
    /// Echoes that arrived before the phase's end (for the rate).
    echoed_in_time: u64,
    lost: u64,
    late: u64,
    duplicate: u64,
    corrupt: u64,
    hello: u64,
    other: u64,
    /// TSC ticks of the phase (without the final wait for outstanding frames).
    cycles: u64,
}

/// One window slot: a frame on its way.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    seq: u64,
    sent: u64,
    active: bool,
}

/// What an arriving echo means for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Outstanding: answered now, `sent` ticks when it left.
    Answered { sent: u64 },
    /// Answered before.
    Duplicate,
    /// Counted lost before (or too old to remember).
    Late,
    /// Never sent.
    Unknown,
}

/// The sender's outstanding frames and the fate of recent ones (host-tested).
#[derive(Debug)]
struct Window {
    slots: [Slot; MAX_WINDOW as usize],
    limit: usize,
    active: usize,
    next_seq: u64,
    /// `seq << 1 | echoed` of recent sequence numbers no longer outstanding, at
    /// `seq % HISTORY`; `NOTHING` where none. In guest RAM: the probe's stack is small.
    history: &'static mut [u64],
}

/// A history entry no sequence number makes (they stay far below 2^63).
const NOTHING: u64 = u64::MAX;

impl Window {
    fn new(limit: u16, alloc: &mut PhysAlloc) -> Result<Window, OutOfMemory> {
        Ok(Window {
            slots: [Slot::default(); MAX_WINDOW as usize],
            limit: usize::from(limit).min(MAX_WINDOW as usize),
            active: 0,
            next_seq: 0,
            history: alloc.alloc_u64s(HISTORY, NOTHING)?,
        })
    }

    fn has_room(&self) -> bool {
        self.active < self.limit
    }

    /// Takes the next sequence number into a free slot, sent at `now`.
    fn open(&mut self, now: u64) -> Option<u64> {
        let slot = self.slots[..self.limit].iter_mut().find(|s| !s.active)?;
        let seq = self.next_seq;
        *slot = Slot {
            seq,
            sent: now,
            active: true,
        };
        self.next_seq += 1;
        self.active += 1;
        Some(seq)
    }

    /// Gives back the slot of a frame that was opened but could not be queued.
    fn cancel(&mut self, seq: u64) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.active && s.seq == seq) {
            slot.active = false;
            self.active -= 1;
            self.next_seq = seq;
        }
    }

    fn remember(&mut self, seq: u64, echoed: bool) {
        self.history[(seq % HISTORY as u64) as usize] = seq << 1 | u64::from(echoed);
    }

    fn arrive(&mut self, seq: u64) -> Arrival {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.active && s.seq == seq) {
            slot.active = false;
            self.active -= 1;
            let sent = slot.sent;
            self.remember(seq, true);
            return Arrival::Answered { sent };
        }
        if seq >= self.next_seq {
            return Arrival::Unknown;
        }
        if self.history[(seq % HISTORY as u64) as usize] == seq << 1 | 1 {
            Arrival::Duplicate
        } else {
            Arrival::Late
        }
    }

    /// Counts frames sent before `deadline` as lost; returns how many.
    fn expire(&mut self, deadline: u64) -> u64 {
        let mut lost = 0;
        for i in 0..self.limit {
            let slot = self.slots[i];
            if slot.active && slot.sent < deadline {
                self.slots[i].active = false;
                self.active -= 1;
                self.remember(slot.seq, false);
                lost += 1;
            }
        }
        lost
    }
}

struct Sender {
    params: NetParams,
    warmup_s: u64,
    window: Window,
    peer: [u8; 6],
    hist: Histogram,
    hello: u64,
    bad_printed: u32,
}

impl Sender {
    fn new(params: NetParams, warmup_s: u64, alloc: &mut PhysAlloc) -> Result<Sender, OutOfMemory> {
        Ok(Sender {
            params,
            warmup_s,
            window: Window::new(params.window, alloc)?,
            peer: BROADCAST,
            hist: Histogram::default(),
            hello: 0,
            bad_printed: 0,
        })
    }

    fn run(&mut self, net: &mut Net, seconds: u64) -> Result<ExitCode, NetError> {
        let p = self.params;
        let warmup = self.warmup_s;
        serial_println!(
            "probe: net-echo send: size={} window={} timeout={}ms warmup={warmup}s seconds={seconds} event_idx={}",
            p.size,
            p.window,
            p.timeout_ms,
            if net.device.features() & F_EVENT_IDX != 0 { "on" } else { "off" }
        );
        let Some(peer) = self.find_echo(net)? else {
            serial_println!(
                "probe: error: no echo answered within {} s",
                HELLO_MS / 1000
            );
            serial_println!("probe: result workload=net-echo role=send status=fail reason=no-echo");
            return Ok(ExitCode::VerifyFailed);
        };
        self.peer = peer;
        serial_println!("probe: net-echo send: echo is {}", Mac(peer));
        let warm = self.phase(net, warmup.saturating_mul(1000), false)?;
        serial_println!(
            "probe: net-echo warm-up done: sent={} echoed={} lost={}",
            warm.sent,
            warm.echoed,
            warm.lost
        );
        serial_println!("probe: bench go");
        let counts = self.phase(net, seconds.saturating_mul(1000), true)?;
        serial_println!("probe: bench stop");
        let acked = self.stop(net)?;
        Ok(self.report(net, &counts, &warm, acked))
    }

    /// Broadcasts hello frames until the echo returns one; its source is the echo.
    fn find_echo(&mut self, net: &mut Net) -> Result<Option<[u8; 6]>, NetError> {
        let give_up = Deadline::after(&net.clock, HELLO_MS);
        let mut next_hello = net.clock.now();
        while !give_up.passed(&net.clock) {
            net.device.reap_tx()?;
            if net.clock.now() >= next_hello && net.send(BROADCAST, self.size(), SEQ_HELLO)? {
                next_hello = net.clock.now() + net.clock.ticks(HELLO_GAP_MS);
            }
            net.device.kick();
            while let Some(len) = net.device.recv(&mut net.frame)? {
                let frame = &net.frame[..len];
                let hello = matches!(
                    netframe::parse(frame, net.seed),
                    Parsed::Echo { seq: SEQ_HELLO, .. }
                );
                if hello && netframe::dst(frame) == net.mac {
                    self.hello += 1;
                    return Ok(Some(netframe::src(frame)));
                }
            }
        }
        Ok(None)
    }

    fn size(&self) -> usize {
        usize::from(self.params.size)
    }

    /// Sends for `ms`, then waits until every frame is back or lost.
    fn phase(&mut self, net: &mut Net, ms: u64, record: bool) -> Result<Counts, NetError> {
        let mut c = Counts::default();
        let start = net.clock.now();
        let end = start.saturating_add(net.clock.ticks(ms));
        let timeout = net.clock.ticks(self.params.timeout_ms);
        let second = net.clock.ticks(1000);
        let mut next_progress = start.saturating_add(second);
        let mut elapsed_s = 0u64;
        loop {
            let now = net.clock.now();
            let open = now < end;
            if !open && self.window.active == 0 {
                break;
            }
            net.device.reap_tx()?;
            while let Some(len) = net.device.recv(&mut net.frame)? {
                self.on_frame(net, len, open, record, &mut c);
            }
            c.lost += self.window.expire(net.clock.now().saturating_sub(timeout));
            if open {
                self.fill(net, &mut c)?;
            }
            net.device.kick();
            if record && now >= next_progress {
                next_progress = next_progress.saturating_add(second);
                elapsed_s += 1;
                serial_println!(
                    "probe: net-echo t={elapsed_s} sent={} echoed={} lost={}",
                    c.sent,
                    c.echoed,
                    c.lost
                );
            }
        }
        c.cycles = end - start;
        Ok(c)
    }

    /// Opens window slots while there is room and a transmit buffer.
    fn fill(&mut self, net: &mut Net, c: &mut Counts) -> Result<(), NetError> {
        while self.window.has_room() && net.device.tx_free() > 0 {
            let Some(seq) = self.window.open(net.clock.now()) else {
                break;
            };
            if !net.send(self.peer, self.size(), seq)? {
                self.window.cancel(seq);
                break;
            }
            c.sent += 1;
        }
        Ok(())
    }

    fn on_frame(&mut self, net: &Net, len: usize, open: bool, record: bool, c: &mut Counts) {
        let now = net.clock.now();
        let frame = &net.frame[..len];
        let seq = match netframe::parse(frame, net.seed) {
            Parsed::Foreign => {
                c.other += 1;
                return;
            }
            Parsed::Corrupt { seq } => {
                self.report_corrupt(seq, "fill bytes differ");
                c.corrupt += 1;
                return;
            }
            Parsed::Echo { seq: SEQ_HELLO, .. } => {
                c.hello += 1;
                return;
            }
            Parsed::Echo { seq, .. } => seq,
        };
        let addressed = netframe::dst(frame) == net.mac && netframe::src(frame) == self.peer;
        if len != self.size() || !addressed {
            self.report_corrupt(seq, "wrong size or addresses");
            c.corrupt += 1;
            return;
        }
        match self.window.arrive(seq) {
            Arrival::Answered { sent } => {
                c.echoed += 1;
                if open {
                    c.echoed_in_time += 1;
                }
                if record {
                    self.hist.record(now.saturating_sub(sent));
                }
            }
            Arrival::Duplicate => c.duplicate += 1,
            Arrival::Late => c.late += 1,
            Arrival::Unknown => {
                self.report_corrupt(seq, "never sent");
                c.corrupt += 1;
            }
        }
    }

    /// Names the first few bad echoes (each serial byte is an exit to the core).
    fn report_corrupt(&mut self, seq: u64, what: &str) {
        self.bad_printed += 1;
        if self.bad_printed <= MAX_BAD_LINES {
            serial_println!("probe: net-echo: bad echo of seq {seq}: {what}");
        }
    }

    /// Sends the stop frame until the echo returns it; whether it did.
    fn stop(&mut self, net: &mut Net) -> Result<bool, NetError> {
        for _ in 0..STOP_TRIES {
            net.device.reap_tx()?;
            net.send(self.peer, self.size(), SEQ_STOP)?;
            net.device.kick();
            let wait = Deadline::after(&net.clock, STOP_WAIT_MS);
            while !wait.passed(&net.clock) {
                while let Some(len) = net.device.recv(&mut net.frame)? {
                    if netframe::seq_of(&net.frame[..len]) == Some(SEQ_STOP) {
                        return Ok(true);
                    }
                }
                net.device.reap_tx()?;
            }
        }
        Ok(false)
    }

    fn report(&self, net: &Net, c: &Counts, warm: &Counts, acked: bool) -> ExitCode {
        let h = &self.hist;
        serial_print!("probe: histogram unit=ns");
        for (low, n) in h.nonzero() {
            serial_print!(" {}:{}", net.ns(low), n);
        }
        serial_print!("\n");
        let bad = c.corrupt + c.duplicate + warm.corrupt + warm.duplicate;
        let ok = bad == 0 && c.echoed > 0;
        let millis = net.clock.millis(c.cycles).max(1);
        serial_println!(
            "probe: result workload=net-echo role=send status={} size={} window={} sent={} \
             echoed={} lost={} corrupt={} duplicate={} late={} total_sent={} hello={} \
             other={} stop={} notifies={} pps={} seconds={}.{:03} rtt_min_ns={} \
             rtt_mean_ns={} rtt_p50_ns={} rtt_p90_ns={} rtt_p99_ns={} rtt_max_ns={} \
             tsc_khz={} cycles={}",
            if ok { "ok" } else { "fail" },
            self.params.size,
            self.params.window,
            c.sent,
            c.echoed,
            c.lost,
            c.corrupt + warm.corrupt,
            c.duplicate + warm.duplicate,
            c.late + warm.late,
            c.sent + warm.sent,
            self.hello + warm.hello + c.hello,
            c.other + warm.other,
            if acked { "acked" } else { "unacked" },
            net.device.notifies(),
            c.echoed_in_time * 1000 / millis,
            millis / 1000,
            millis % 1000,
            net.ns(h.min()),
            net.ns(h.mean()),
            net.ns(h.percentile(500)),
            net.ns(h.percentile(900)),
            net.ns(h.percentile(990)),
            net.ns(h.max()),
            net.clock.tsc_khz(),
            c.cycles
        );
        if ok {
            ExitCode::Ok
        } else {
            ExitCode::VerifyFailed
        }
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::host_alloc;

    #[test]
    fn window_tracks_answers_losses_duplicates_and_late_echoes() {
        let mut w = Window::new(2, &mut host_alloc(HISTORY * 8)).unwrap();
        assert_eq!(w.open(100), Some(0));
        assert_eq!(w.open(200), Some(1));
        assert!(!w.has_room());
        assert_eq!(w.open(300), None);
        assert_eq!(w.arrive(1), Arrival::Answered { sent: 200 });
        assert_eq!(w.arrive(1), Arrival::Duplicate);
        assert_eq!(w.arrive(7), Arrival::Unknown);
        // Frame 0 left at 100: lost once the deadline passes it.
        assert_eq!(w.expire(100), 0);
        assert_eq!(w.expire(101), 1);
        assert_eq!(w.active, 0);
        assert_eq!(w.arrive(0), Arrival::Late);
        assert_eq!(w.open(400), Some(2));
        w.cancel(2);
        assert_eq!((w.active, w.next_seq), (0, 2));
        assert_eq!(w.open(500), Some(2));
    }

    #[test]
    fn window_history_wraps() {
        let mut w = Window::new(1, &mut host_alloc(HISTORY * 8)).unwrap();
        for seq in 0..(HISTORY as u64 + 10) {
            assert_eq!(w.open(seq), Some(seq));
            assert_eq!(w.arrive(seq), Arrival::Answered { sent: seq });
        }
        // Too old to remember: counted late, not duplicate.
        assert_eq!(w.arrive(3), Arrival::Late);
        assert_eq!(w.arrive(HISTORY as u64 + 5), Arrival::Duplicate);
    }

    #[test]
    fn mac_display() {
        assert_eq!(
            Mac([0x52, 0x54, 0, 0xab, 1, 2]).to_string(),
            "52:54:00:ab:01:02"
        );
    }
}
