//! `probe.workload=blk-bench`: keeps `probe.qd=` requests of `probe.bs=` bytes in
//! flight for `probe.seconds=` (after `probe.warmup=` unrecorded seconds) and reports
//! completions, throughput and a latency histogram, all timed with the TSC.
//!
//! It drives the queue the way a polling guest driver does: VIRTIO_F_EVENT_IDX when
//! the device offers it, no used-buffer notifications unless `probe.irq=on`
//! (`VIRTQ_AVAIL_F_NO_INTERRUPT`, or `used_event` kept out of reach), every free slot
//! refilled after each sweep of the used ring, and one QueueNotify per batch, only when
//! the device asked for it (`avail_event` / `VIRTQ_USED_F_NO_NOTIFY`).
//!
//! Lines for the harness (`perf/`): `probe: bench go` is printed just before the
//! measured time starts and `probe: bench stop` just after it ends, so the host can
//! time the same interval with its own clock; then `probe: histogram ...` and the
//! `probe: result workload=blk-bench ...` line (README.md, "Output").

use super::{open_block_device_with, Env};
use crate::cmdline::{AccessPattern, BenchParams, MAX_QD};
use crate::console::{Chain, ExitCode};
use crate::histogram::Histogram;
use crate::memory::OutOfMemory;
use crate::rng::SplitMix64;
use crate::time::Clock;
use crate::virtio::blk::{
    BlkDevice, BlkError, Request, RequestKind, F_EVENT_IDX, HEADER_SIZE, STATUS_UNSET, S_OK, T_IN,
    T_OUT,
};
use crate::virtio::queue::{Buffer, Used, MAX_QUEUE_SIZE};
use crate::{serial_print, serial_println};
use thiserror::Error;

/// Measured seconds when `probe.seconds=0`.
const DEFAULT_SECONDS: u64 = 5;
/// No completion for this long while requests are in flight is a hang.
const STALL_MS: u64 = 10_000;
/// `slot_of_head` entry of a descriptor that heads no request.
const NO_SLOT: u8 = u8::MAX;
/// Bytes of per-slot control memory: header (16) then the status byte.
const CONTROL: usize = 32;

/// Why the benchmark cannot start on this device.
#[derive(Debug, Error)]
enum SetupError {
    /// A pattern with writes on a read-only device.
    #[error("block device is read-only and the pattern writes")]
    ReadOnly,
    /// Fewer than one request's worth of sectors.
    #[error("disk of {sectors} sectors is smaller than one {bs}-byte request")]
    TooSmall {
        /// Capacity in sectors.
        sectors: u64,
        /// Request size.
        bs: u32,
    },
    /// The queue holds fewer three-descriptor chains than the queue depth.
    #[error("queue size {size} cannot hold {qd} requests")]
    QueueTooSmall {
        /// Queue size.
        size: u16,
        /// Requested depth.
        qd: u16,
    },
    /// No RAM for the request buffers.
    #[error("request buffers")]
    Memory(#[from] OutOfMemory),
}

/// Counters of one phase.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    reads: u64,
    writes: u64,
    bytes: u64,
    errors: u64,
    notifies: u64,
    /// TSC ticks of the phase.
    cycles: u64,
}

impl Counts {
    fn ios(&self) -> u64 {
        self.reads + self.writes
    }
}

struct Bench {
    device: BlkDevice,
    params: BenchParams,
    clock: Clock,
    rng: SplitMix64,
    /// Number of `bs`-sized blocks on the disk.
    blocks: u64,
    next_block: u64,
    /// Slot i: header at `i * CONTROL`, status byte at `i * CONTROL + 16`.
    control: &'static mut [u8],
    /// Slot i's data buffer starts at `data + i * bs`.
    data: u64,
    slot_of_head: [u8; MAX_QUEUE_SIZE as usize],
    free: [u8; MAX_QD as usize],
    free_count: usize,
    started: [u64; MAX_QD as usize],
    is_write: [bool; MAX_QD as usize],
    hist: Histogram,
}

/// Runs the workload; returns the exit code.
pub fn run(env: &mut Env) -> ExitCode {
    let Some(device) = open_block_device_with(env, F_EVENT_IDX) else {
        return ExitCode::DeviceError;
    };
    let mut bench = match Bench::new(env, device) {
        Ok(bench) => bench,
        Err(error) => {
            serial_println!("probe: error: {}", Chain(&error));
            return ExitCode::DeviceError;
        }
    };
    let seconds = match env.config.seconds {
        0 => DEFAULT_SECONDS,
        n => n,
    };
    match bench.run(seconds) {
        Ok(code) => code,
        Err(error) => {
            if let BlkError::Timeout { request, ms } = &error {
                serial_println!(
                    "probe: error: request hung: {request} (no completion for {ms} ms)"
                );
            }
            serial_println!("probe: error: {}", Chain(&error));
            serial_println!("probe: device status {:#x}", bench.device.device_status());
            ExitCode::DeviceError
        }
    }
}

impl Bench {
    fn new(env: &mut Env, device: BlkDevice) -> Result<Bench, SetupError> {
        let params = env.config.bench;
        let reads_only = matches!(params.rw, AccessPattern::RandRead | AccessPattern::Read);
        if device.read_only() && !reads_only {
            return Err(SetupError::ReadOnly);
        }
        let blocks = device.capacity() * 512 / u64::from(params.bs);
        if blocks == 0 {
            return Err(SetupError::TooSmall {
                sectors: device.capacity(),
                bs: params.bs,
            });
        }
        if usize::from(device.queue_size()) / 3 < usize::from(params.qd) {
            return Err(SetupError::QueueTooSmall {
                size: device.queue_size(),
                qd: params.qd,
            });
        }
        let qd = usize::from(params.qd);
        let control = env.alloc.alloc_bytes(qd * CONTROL)?;
        let data = env.alloc.alloc_bytes(qd * params.bs as usize)?.as_ptr() as u64;
        let mut free = [0u8; MAX_QD as usize];
        for (i, slot) in free.iter_mut().enumerate() {
            *slot = i as u8;
        }
        Ok(Bench {
            device,
            params,
            clock: env.clock,
            rng: SplitMix64::new(env.config.seed),
            blocks,
            next_block: 0,
            control,
            data,
            slot_of_head: [NO_SLOT; MAX_QUEUE_SIZE as usize],
            free,
            free_count: qd,
            started: [0; MAX_QD as usize],
            is_write: [false; MAX_QD as usize],
            hist: Histogram::default(),
        })
    }

    fn run(&mut self, seconds: u64) -> Result<ExitCode, BlkError> {
        let p = self.params;
        let event_idx = self.device.features() & F_EVENT_IDX != 0;
        serial_println!(
            "probe: bench rw={} bs={} qd={} warmup={}s seconds={} irq={} event_idx={}",
            p.rw,
            p.bs,
            p.qd,
            p.warmup,
            seconds,
            on_off(p.irq),
            on_off(event_idx)
        );
        self.device.set_interrupts(p.irq);
        if p.warmup > 0 {
            let warm = self.phase(p.warmup.saturating_mul(1000), false)?;
            serial_println!("probe: bench warm-up done: {} requests", warm.ios());
        }
        serial_println!("probe: bench go");
        let counts = self.phase(seconds.saturating_mul(1000), true)?;
        serial_println!("probe: bench stop");
        self.report(&counts, event_idx);
        Ok(if counts.errors == 0 {
            ExitCode::Ok
        } else {
            ExitCode::VerifyFailed
        })
    }

    /// Keeps the queue full for `ms`, then lets what is in flight finish without
    /// counting it. Completions are counted (and, if `record`, timed) while the
    /// phase lasts.
    fn phase(&mut self, ms: u64, record: bool) -> Result<Counts, BlkError> {
        let mut counts = Counts::default();
        let notifies_before = self.device.notifies();
        let start = self.clock.now();
        let end = start.saturating_add(self.clock.ticks(ms));
        let mut last_progress = start;
        loop {
            let now = self.clock.now();
            let open = now < end;
            if open {
                self.fill()?;
            } else if self.in_flight() == 0 {
                break;
            }
            let mut reaped = false;
            while let Some(used) = self.device.pop()? {
                let done = self.clock.now();
                self.complete(used, done, done < end, record, &mut counts)?;
                reaped = true;
                last_progress = done;
            }
            if reaped {
                self.device.rearm();
            } else if self.clock.millis(now.saturating_sub(last_progress)) >= STALL_MS {
                return Err(self.stalled(now - last_progress));
            }
        }
        counts.cycles = end - start;
        counts.notifies = self.device.notifies() - notifies_before;
        Ok(counts)
    }

    fn in_flight(&self) -> usize {
        usize::from(self.params.qd) - self.free_count
    }

    /// The next request's (is it a write, block number).
    fn next_request(&mut self) -> (bool, u64) {
        let write = match self.params.rw {
            AccessPattern::RandRead | AccessPattern::Read => false,
            AccessPattern::RandWrite | AccessPattern::Write => true,
            AccessPattern::Mix(pct) => self.rng.below(100) >= u64::from(pct),
        };
        let block = if self.params.rw.random() {
            self.rng.below(self.blocks)
        } else {
            let block = self.next_block;
            self.next_block = (block + 1) % self.blocks;
            block
        };
        (write, block)
    }

    /// Puts a request in every free slot, then notifies the device once.
    fn fill(&mut self) -> Result<(), BlkError> {
        if self.free_count == 0 {
            return Ok(());
        }
        let bs = self.params.bs;
        while self.free_count > 0 {
            let slot = usize::from(self.free[self.free_count - 1]);
            let (write, block) = self.next_request();
            let sector = block * u64::from(bs) / 512;
            let control = &mut self.control[slot * CONTROL..(slot + 1) * CONTROL];
            let kind = if write { T_OUT } else { T_IN };
            control[0..4].copy_from_slice(&kind.to_le_bytes());
            control[4..8].fill(0);
            control[8..16].copy_from_slice(&sector.to_le_bytes());
            control[16] = STATUS_UNSET;
            let header = control.as_ptr() as u64;
            let data = self.data + slot as u64 * u64::from(bs);
            let chain = [
                Buffer::readable(header, HEADER_SIZE),
                Buffer {
                    addr: data,
                    len: bs,
                    writable: !write,
                },
                Buffer::writable(header + 16, 1),
            ];
            let head = self.device.add(&chain)?;
            self.slot_of_head[usize::from(head)] = slot as u8;
            self.is_write[slot] = write;
            self.started[slot] = self.clock.now();
            self.free_count -= 1;
        }
        self.device.kick();
        Ok(())
    }

    fn complete(
        &mut self,
        used: Used,
        done: u64,
        count: bool,
        record: bool,
        counts: &mut Counts,
    ) -> Result<(), BlkError> {
        let entry = &mut self.slot_of_head[usize::from(used.head)];
        let slot = usize::from(*entry);
        if slot >= usize::from(self.params.qd) {
            return Err(BlkError::UnknownChain(used.head));
        }
        *entry = NO_SLOT;
        self.free[self.free_count] = slot as u8;
        self.free_count += 1;
        // SAFETY: the byte lies in `control`, which this struct owns; volatile because
        // the device wrote it behind the compiler's back (before publishing `used`).
        let status = unsafe { core::ptr::read_volatile(&self.control[slot * CONTROL + 16]) };
        if !count {
            return Ok(());
        }
        if status != S_OK {
            counts.errors += 1;
        } else if self.is_write[slot] {
            counts.writes += 1;
        } else {
            counts.reads += 1;
        }
        counts.bytes += u64::from(self.params.bs) * u64::from(status == S_OK);
        if record {
            self.hist.record(done - self.started[slot]);
        }
        Ok(())
    }

    /// The hang error, naming the oldest request in flight.
    fn stalled(&self, ticks: u64) -> BlkError {
        let qd = usize::from(self.params.qd);
        let in_flight = |slot: &usize| !self.free[..self.free_count].contains(&(*slot as u8));
        let oldest = (0..qd)
            .filter(in_flight)
            .min_by_key(|&slot| self.started[slot]);
        let Some(slot) = oldest else {
            return BlkError::Idle;
        };
        let control = &self.control[slot * CONTROL..];
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&control[8..16]);
        BlkError::Timeout {
            ms: self.clock.millis(ticks),
            request: Request {
                kind: if self.is_write[slot] {
                    RequestKind::Write
                } else {
                    RequestKind::Read
                },
                sector: u64::from_le_bytes(sector),
                bytes: self.params.bs,
            },
        }
    }

    fn ns(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.clock.tsc_khz())) as u64
    }

    fn report(&self, c: &Counts, event_idx: bool) {
        let h = &self.hist;
        serial_print!("probe: histogram unit=ns");
        for (low, n) in h.nonzero() {
            serial_print!(" {}:{}", self.ns(low), n);
        }
        serial_print!("\n");
        let secs_x1000 = self.clock.millis(c.cycles).max(1);
        let p = self.params;
        serial_println!(
            "probe: result workload=blk-bench status={} rw={} bs={} qd={} irq={} event_idx={} \
             ios={} reads={} writes={} bytes={} errors={} notifies={} iops={} \
             lat_min_ns={} lat_mean_ns={} lat_p50_ns={} lat_p90_ns={} lat_p99_ns={} \
             lat_p999_ns={} lat_max_ns={} tsc_khz={} cycles={}",
            if c.errors == 0 { "ok" } else { "fail" },
            p.rw,
            p.bs,
            p.qd,
            on_off(p.irq),
            on_off(event_idx),
            c.ios(),
            c.reads,
            c.writes,
            c.bytes,
            c.errors,
            c.notifies,
            c.ios() * 1000 / secs_x1000,
            self.ns(h.min()),
            self.ns(h.mean()),
            self.ns(h.percentile(500)),
            self.ns(h.percentile(900)),
            self.ns(h.percentile(990)),
            self.ns(h.percentile(999)),
            self.ns(h.max()),
            self.clock.tsc_khz(),
            c.cycles
        );
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}
