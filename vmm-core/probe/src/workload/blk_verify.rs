//! `probe.workload=blk-verify`: random writes of mixed sizes over the whole disk,
//! FLUSH, then read everything back, compare it with the model and hash it.
//!
//! The model is one generation number per sector ([`GenerationTable`]); a sector's
//! expected content is `pattern::fill_sector(seed, generation, sector)`. Writes in
//! flight never overlap, so the order in which the device completes them does not
//! matter. The SHA-256 covers the whole disk as read back, in sector order, so the
//! test harness can compare it with `sha256sum` of the image file.

use super::{open_block_device, Env};
use crate::console::{exit, hex, Chain, ExitCode};
use crate::pattern::{self, GenerationTable, SECTOR_SIZE, UNKNOWN};
use crate::rng::SplitMix64;
use crate::serial_println;
use crate::time::{Clock, Deadline};
use crate::virtio::blk::{
    BlkDevice, BlkError, Completion, Request, RequestKind, RequestSlots, MAX_REQUEST_BYTES,
    MAX_SLOTS, S_OK,
};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Minimum writes per pass, so small disks still see many requests.
const MIN_WRITES: u64 = 1000;
/// Largest write, in sectors (128 KiB).
const MAX_WRITE_SECTORS: u64 = (MAX_REQUEST_BYTES / SECTOR_SIZE) as u64;
/// Lines about individual bad sectors or failed requests before going quiet.
const MAX_REPORTS: u64 = 10;
/// Interval between progress lines.
const PROGRESS_MS: u64 = 2_000;

/// Why the workload cannot start on this device.
#[derive(Debug, Error)]
enum SetupError {
    /// VIRTIO_BLK_F_RO.
    #[error("block device is read-only")]
    ReadOnly,
    /// Capacity 0.
    #[error("block device has no sectors")]
    Empty,
    /// No RAM for the per-sector table or the request buffers.
    #[error("not enough guest RAM for a {sectors}-sector disk")]
    Memory {
        /// Disk size in sectors.
        sectors: u64,
    },
}

/// Counters for the result line.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    requests: u64,
    bytes_written: u64,
    bytes_verified: u64,
    mismatches: u64,
    errors: u64,
}

struct Verifier {
    device: BlkDevice,
    slots: RequestSlots,
    table: GenerationTable<'static>,
    rng: SplitMix64,
    seed: u64,
    clock: Clock,
    stats: Stats,
    reports: u64,
}

/// Runs the workload; returns the exit code.
pub fn run(env: &mut Env) -> ExitCode {
    let Some(device) = open_block_device(env) else {
        return ExitCode::DeviceError;
    };
    let mut verifier = match Verifier::new(env, device) {
        Ok(verifier) => verifier,
        Err(error) => {
            serial_println!("probe: error: {error}");
            return ExitCode::DeviceError;
        }
    };
    match verifier.run(env.config.seconds) {
        Ok(code) => code,
        Err(error) => {
            if let BlkError::Timeout { request, ms } = &error {
                serial_println!(
                    "probe: error: request hung: {request} (no completion for {ms} ms)"
                );
            }
            serial_println!("probe: error: {}", Chain(&error));
            serial_println!(
                "probe: device status {:#x}",
                verifier.device.device_status()
            );
            ExitCode::DeviceError
        }
    }
}

impl Verifier {
    fn new(env: &mut Env, device: BlkDevice) -> Result<Verifier, SetupError> {
        if device.read_only() {
            return Err(SetupError::ReadOnly);
        }
        let sectors = device.capacity();
        if sectors == 0 {
            return Err(SetupError::Empty);
        }
        let no_memory = |_| SetupError::Memory { sectors };
        let table_len = usize::try_from(sectors).map_err(|_| SetupError::Memory { sectors })?;
        let table = env.alloc.alloc_u32s(table_len).map_err(no_memory)?;
        let slots = RequestSlots::new(&mut env.alloc, &device)
            .map_err(|_| SetupError::Memory { sectors })?;
        Ok(Verifier {
            device,
            slots,
            table: GenerationTable::new(table),
            rng: SplitMix64::new(env.config.seed),
            seed: env.config.seed,
            clock: env.clock,
            stats: Stats::default(),
            reports: 0,
        })
    }

    fn run(&mut self, seconds: u64) -> Result<ExitCode, BlkError> {
        let start = self.clock.now();
        let mut digest = [0u8; 32];
        for pass in 1u64.. {
            self.write_pass(pass)?;
            self.flush()?;
            digest = self.verify_pass(pass)?;
            let elapsed_ms = self.clock.millis(self.clock.now() - start);
            if seconds == 0 || elapsed_ms >= seconds.saturating_mul(1000) {
                break;
            }
        }
        let cycles = self.clock.now() - start;
        let irq = self.device.check_irq(1_000);
        let s = self.stats;
        let ok = s.mismatches == 0 && s.errors == 0;
        let mut hex_buf = [0u8; 64];
        serial_println!(
            "probe: result workload=blk-verify status={} requests={} bytes_written={} bytes_verified={} \
             mismatches={} errors={} irq={} sha256={} tsc_khz={} cycles={}",
            if ok { "ok" } else { "fail" },
            s.requests,
            s.bytes_written,
            s.bytes_verified,
            s.mismatches,
            s.errors,
            irq.word(),
            hex(&digest, &mut hex_buf),
            self.clock.tsc_khz(),
            cycles
        );
        Ok(if ok {
            ExitCode::Ok
        } else {
            ExitCode::VerifyFailed
        })
    }

    /// A write of 1..=256 sectors (log-uniform sizes) at a random offset.
    fn random_write(&mut self) -> Request {
        let capacity = self.device.capacity();
        let low = 1u64 << self.rng.below(9);
        let sectors = (low + self.rng.below(low))
            .min(MAX_WRITE_SECTORS)
            .min(capacity);
        let sector = self.rng.below(capacity - sectors + 1);
        Request {
            kind: RequestKind::Write,
            sector,
            bytes: (sectors * SECTOR_SIZE as u64) as u32,
        }
    }

    fn write_pass(&mut self, pass: u64) -> Result<(), BlkError> {
        let start = self.clock.now();
        let target = self.device.capacity() * SECTOR_SIZE as u64;
        let (mut bytes, mut writes) = (0u64, 0u64);
        let mut progress = Deadline::after(&self.clock, PROGRESS_MS);
        while bytes < target || writes < MIN_WRITES {
            let request = self.random_write();
            let slot = self.slot_for_write(&request)?;
            let Some(generation) = self.table.next_generation() else {
                serial_println!("probe: error: out of generation numbers");
                exit(ExitCode::DeviceError);
            };
            let data = &mut self.slots.data_mut(slot)[..request.bytes as usize];
            for (i, sector) in data.as_chunks_mut::<SECTOR_SIZE>().0.iter_mut().enumerate() {
                pattern::fill_sector(self.seed, generation, request.sector + i as u64, sector);
            }
            self.table
                .record(request.sector, request.sectors(), generation);
            self.slots.submit(&mut self.device, slot, request)?;
            bytes += u64::from(request.bytes);
            writes += 1;
            if progress.passed(&self.clock) {
                serial_println!(
                    "probe: pass {pass}: written {bytes} of {target} bytes ({writes} writes)"
                );
                progress = Deadline::after(&self.clock, PROGRESS_MS);
            }
        }
        while self.slots.in_flight() > 0 {
            let completion = self.slots.wait_any(&mut self.device)?;
            self.finish_write(&completion);
        }
        self.stats.bytes_written += bytes;
        let ms = self.clock.millis(self.clock.now() - start);
        serial_println!("probe: pass {pass}: wrote {bytes} bytes in {writes} requests, {ms} ms");
        Ok(())
    }

    /// A free slot once no write in flight overlaps `request`.
    fn slot_for_write(&mut self, request: &Request) -> Result<usize, BlkError> {
        loop {
            let overlaps = self
                .slots
                .pending()
                .any(|p| p.kind == RequestKind::Write && p.overlaps(request));
            if let (Some(slot), false) = (self.slots.free_slot(), overlaps) {
                return Ok(slot);
            }
            let completion = self.slots.wait_any(&mut self.device)?;
            self.finish_write(&completion);
        }
    }

    fn finish_write(&mut self, completion: &Completion) {
        self.stats.requests += 1;
        if completion.status != S_OK {
            let request = completion.request;
            // What the device left there is unknown: stop comparing those sectors.
            self.table
                .record(request.sector, request.sectors(), UNKNOWN);
            self.request_failed(completion);
        }
    }

    fn request_failed(&mut self, completion: &Completion) {
        self.stats.errors += 1;
        self.report(format_args!(
            "request failed: {} status {:#x} used len {}",
            completion.request, completion.status, completion.used_len
        ));
    }

    fn report(&mut self, what: core::fmt::Arguments<'_>) {
        self.reports += 1;
        if self.reports <= MAX_REPORTS {
            serial_println!("probe: {what}");
        } else if self.reports == MAX_REPORTS + 1 {
            serial_println!("probe: (further problems are counted, not shown)");
        }
    }

    fn flush(&mut self) -> Result<(), BlkError> {
        if !self.device.has_flush() {
            serial_println!("probe: device does not offer VIRTIO_BLK_F_FLUSH; not flushing");
            return Ok(());
        }
        let request = Request {
            kind: RequestKind::Flush,
            sector: 0,
            bytes: 0,
        };
        self.slots.submit(&mut self.device, 0, request)?;
        let completion = self.slots.wait_any(&mut self.device)?;
        self.stats.requests += 1;
        if completion.status != S_OK {
            self.request_failed(&completion);
        }
        Ok(())
    }

    /// Reads the whole disk in 128 KiB chunks, several in flight, and checks and
    /// hashes them in sector order. Returns the SHA-256.
    fn verify_pass(&mut self, pass: u64) -> Result<[u8; 32], BlkError> {
        let start = self.clock.now();
        let capacity = self.device.capacity();
        let chunk = MAX_WRITE_SECTORS;
        let chunks = capacity.div_ceil(chunk);
        let width = self.slots.count() as u64;
        let mut hasher = Sha256::new();
        let mut done: [Option<Completion>; MAX_SLOTS] = [None; MAX_SLOTS];
        let verified_before = self.stats.bytes_verified;
        let (mut issued, mut checked) = (0u64, 0u64);
        while checked < chunks {
            while issued < chunks && issued < checked + width {
                let sector = issued * chunk;
                let bytes = (chunk.min(capacity - sector) * SECTOR_SIZE as u64) as u32;
                let request = Request {
                    kind: RequestKind::Read,
                    sector,
                    bytes,
                };
                self.slots
                    .submit(&mut self.device, (issued % width) as usize, request)?;
                issued += 1;
            }
            let slot = (checked % width) as usize;
            while done[slot].is_none() {
                let completion = self.slots.wait_any(&mut self.device)?;
                done[completion.slot] = Some(completion);
            }
            if let Some(completion) = done[slot].take() {
                self.check_read(&completion, &mut hasher);
            }
            checked += 1;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let ms = self.clock.millis(self.clock.now() - start);
        let verified = self.stats.bytes_verified - verified_before;
        serial_println!(
            "probe: pass {pass}: read back {} bytes, verified {verified} bytes, {} mismatches so far, {ms} ms",
            capacity * SECTOR_SIZE as u64,
            self.stats.mismatches
        );
        Ok(digest)
    }

    fn check_read(&mut self, completion: &Completion, hasher: &mut Sha256) {
        self.stats.requests += 1;
        if completion.status != S_OK {
            self.request_failed(completion);
        }
        let request = completion.request;
        let data = &self.slots.data(completion.slot)[..request.bytes as usize];
        hasher.update(data);
        let mut bad = [0u64; 4];
        let mut bad_count = 0;
        for (i, sector_data) in data.as_chunks::<SECTOR_SIZE>().0.iter().enumerate() {
            let sector = request.sector + i as u64;
            let Some(generation) = self.table.expected(sector) else {
                continue;
            };
            self.stats.bytes_verified += SECTOR_SIZE as u64;
            if !pattern::sector_matches(self.seed, generation, sector, sector_data) {
                self.stats.mismatches += 1;
                if bad_count < bad.len() {
                    bad[bad_count] = sector;
                    bad_count += 1;
                }
            }
        }
        for &sector in &bad[..bad_count] {
            self.report_mismatch(sector, &request, completion.slot);
        }
    }

    fn report_mismatch(&mut self, sector: u64, request: &Request, slot: usize) {
        let offset = ((sector - request.sector) as usize) * SECTOR_SIZE;
        let mut data = [0u8; SECTOR_SIZE];
        data.copy_from_slice(&self.slots.data(slot)[offset..offset + SECTOR_SIZE]);
        let expected = self.table.expected(sector).unwrap_or(0);
        match pattern::origin(&data) {
            Some(found) => self.report(format_args!(
                "mismatch at sector {sector}: expected generation {expected}, found sector {} generation {}",
                found.sector, found.generation
            )),
            None => self.report(format_args!(
                "mismatch at sector {sector}: expected generation {expected}, found data not written by the probe"
            )),
        }
    }
}
