//! `probe.workload=blk-abuse`: malformed descriptor chains a block device must
//! survive. Each must come back on the used ring, with the status byte (pre-filled
//! with 0xff) set to IOERR or UNSUPP wherever it is device-writable, and without the
//! device touching anything it may not write: every buffer sits in a scratch area
//! filled with canary bytes, and after each case everything outside the
//! device-writable buffers must be as the probe left it. Then a normal write, flush
//! and read-back must still work.

use super::{open_block_device, Env};
use crate::console::{Chain, ExitCode};
use crate::memory::PAGE_SIZE;
use crate::pattern::{self, SECTOR_SIZE};
use crate::serial_println;
use crate::time::Deadline;
use crate::virtio::blk::{
    BlkDevice, BlkError, HEADER_SIZE, STATUS_UNSET, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_IN, T_OUT,
};
use crate::virtio::queue::Buffer;

const SCRATCH: usize = 16 * 1024;
const GAP: usize = 64;
const CANARY: u8 = 0xa5;
const TIMEOUT_MS: u64 = 10_000;
/// An address in the hole below 4 GiB: neither RAM nor a device window.
const OUTSIDE_RAM: u64 = 0xf000_0000;
/// Sectors of the normal round trip at the end.
const ROUND_TRIP_SECTORS: u64 = 8;

/// One buffer of a test chain.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// Request header; `len` may be short on purpose.
    Header { kind: u32, sector: u64, len: u32 },
    /// Data in the scratch area, filled with a pattern (or zeroes when writable).
    Data { len: u32, writable: bool },
    /// Data at a foreign address.
    Foreign { addr: u64, len: u32 },
    /// The status byte.
    Status { writable: bool },
}

/// What a correct device does with the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Status IOERR or UNSUPP.
    Error,
    /// Status UNSUPP.
    Unsupported,
    /// No status can be written: used length 0.
    NoStatus,
}

/// The outcome of one chain.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    status: Option<u8>,
    used_len: u32,
}

impl core::fmt::Display for Outcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.status {
            Some(status) => write!(f, "status {status:#04x}, used len {}", self.used_len),
            None => write!(f, "no writable status, used len {}", self.used_len),
        }
    }
}

const HDR: u32 = HEADER_SIZE;
const S: u32 = SECTOR_SIZE as u32;

/// One malformed chain and what a correct device does with it.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    parts: [Part; 3],
    len: usize,
    expect: Expect,
}

impl Case {
    fn new(name: &'static str, parts: &[Part], expect: Expect) -> Case {
        let mut padded = [Part::Status { writable: true }; 3];
        let len = parts.len().min(3);
        padded[..len].copy_from_slice(&parts[..len]);
        Case {
            name,
            parts: padded,
            len,
            expect,
        }
    }

    fn parts(&self) -> &[Part] {
        &self.parts[..self.len]
    }
}

/// The malformed cases (a)..(i); `capacity` and `ram_end` pick sectors and addresses.
fn cases(capacity: u64, ram_end: u64) -> [Case; 10] {
    use Part::*;
    let hdr = |kind, sector| Header {
        kind,
        sector,
        len: HDR,
    };
    let data = |len, writable| Data { len, writable };
    let status = Status { writable: true };
    let past_ram = ram_end.next_multiple_of(PAGE_SIZE);
    [
        Case::new("a header only", &[hdr(T_IN, 0)], Expect::NoStatus),
        Case::new(
            "b 8-byte header",
            &[
                Header {
                    kind: T_IN,
                    sector: 0,
                    len: 8,
                },
                data(S, true),
                status,
            ],
            Expect::Error,
        ),
        Case::new(
            "c status read-only",
            &[hdr(T_IN, 0), data(S, true), Status { writable: false }],
            Expect::NoStatus,
        ),
        Case::new(
            "d read into readable",
            &[hdr(T_IN, 0), data(S, false), status],
            Expect::Error,
        ),
        Case::new(
            "e write from writable",
            &[hdr(T_OUT, 0), data(S, true), status],
            Expect::Error,
        ),
        Case::new(
            "f data outside RAM",
            &[
                hdr(T_IN, 0),
                Foreign {
                    addr: OUTSIDE_RAM,
                    len: S,
                },
                status,
            ],
            Expect::Error,
        ),
        Case::new(
            "f data past RAM end",
            &[
                hdr(T_IN, 0),
                Foreign {
                    addr: past_ram,
                    len: S,
                },
                status,
            ],
            Expect::Error,
        ),
        Case::new(
            "g past end of disk",
            &[hdr(T_IN, capacity - 1), data(2 * S, true), status],
            Expect::Error,
        ),
        Case::new(
            "h length not sector multiple",
            &[hdr(T_IN, 0), data(100, true), status],
            Expect::Error,
        ),
        Case::new(
            "i unknown type",
            &[hdr(0x7fff_00de, 0), status],
            Expect::Unsupported,
        ),
    ]
}

/// The scratch area: buffers separated by canaries, and a copy of it as posted.
struct Scratch {
    area: &'static mut [u8],
    reference: &'static mut [u8],
    /// Device-writable ranges (offset, len) of the current chain.
    writable: [(usize, usize); 3],
    writable_count: usize,
    next: usize,
}

impl Scratch {
    fn reset(&mut self) {
        self.area.fill(CANARY);
        self.writable_count = 0;
        self.next = GAP;
    }

    /// Places `len` bytes; returns the offset.
    fn place(&mut self, len: usize, writable: bool) -> usize {
        let offset = self.next;
        self.next = (offset + len + GAP).next_multiple_of(GAP);
        if writable && self.writable_count < self.writable.len() {
            self.writable[self.writable_count] = (offset, len);
            self.writable_count += 1;
        }
        offset
    }

    fn addr(&self, offset: usize) -> u64 {
        self.area[offset..].as_ptr() as u64
    }

    fn snapshot(&mut self) {
        self.reference.copy_from_slice(self.area);
    }

    /// First byte outside the writable buffers that the device changed.
    fn first_trampled(&self) -> Option<usize> {
        // SAFETY: the scratch area is ours; volatile because the device wrote it.
        let read = |i: usize| unsafe { core::ptr::read_volatile(&self.area[i]) };
        let writable = |i: usize| {
            self.writable[..self.writable_count]
                .iter()
                .any(|&(o, l)| (o..o + l).contains(&i))
        };
        (0..self.area.len()).find(|&i| !writable(i) && read(i) != self.reference[i])
    }

    fn byte(&self, offset: usize) -> u8 {
        // SAFETY: as in `first_trampled`.
        unsafe { core::ptr::read_volatile(&self.area[offset]) }
    }
}

struct Abuser {
    device: BlkDevice,
    scratch: Scratch,
    seed: u64,
    hung: bool,
}

/// Runs the workload; returns the exit code.
pub fn run(env: &mut Env) -> ExitCode {
    let Some(device) = open_block_device(env) else {
        return ExitCode::DeviceError;
    };
    if device.capacity() < ROUND_TRIP_SECTORS {
        serial_println!(
            "probe: error: disk too small ({} sectors)",
            device.capacity()
        );
        return ExitCode::DeviceError;
    }
    let (Ok(area), Ok(reference)) = (
        env.alloc.alloc_bytes(SCRATCH),
        env.alloc.alloc_bytes(SCRATCH),
    ) else {
        serial_println!("probe: error: not enough guest RAM for the scratch area");
        return ExitCode::DeviceError;
    };
    let scratch = Scratch {
        area,
        reference,
        writable: [(0, 0); 3],
        writable_count: 0,
        next: GAP,
    };
    let mut abuser = Abuser {
        device,
        scratch,
        seed: env.config.seed,
        hung: false,
    };
    match abuser.run(env.ram_end) {
        Ok(code) => code,
        Err(error) => {
            serial_println!("probe: error: {}", Chain(&error));
            ExitCode::DeviceError
        }
    }
}

impl Abuser {
    fn run(&mut self, ram_end: u64) -> Result<ExitCode, BlkError> {
        let (mut count, mut failed) = (0u32, 0u32);
        for case in cases(self.device.capacity(), ram_end) {
            count += 1;
            if !self.case(case.name, case.parts(), case.expect)? {
                failed += 1;
            }
        }
        count += 1;
        if !self.round_trip()? {
            failed += 1;
        }
        let irq = self.device.check_irq(1_000);
        let ok = failed == 0;
        serial_println!(
            "probe: result workload=blk-abuse status={} cases={count} failed={failed} irq={}",
            if ok { "ok" } else { "fail" },
            irq.word()
        );
        Ok(match (ok, self.hung) {
            (_, true) => ExitCode::DeviceError,
            (true, false) => ExitCode::Ok,
            (false, false) => ExitCode::VerifyFailed,
        })
    }

    /// Posts one chain and judges the outcome; prints a line; returns pass/fail.
    fn case(&mut self, name: &str, parts: &[Part], expect: Expect) -> Result<bool, BlkError> {
        let Some(outcome) = self.post(parts, |_| {})? else {
            serial_println!("probe: case {name}: FAILED: no completion within {TIMEOUT_MS} ms");
            self.hung = true;
            return Ok(false);
        };
        let verdict = judge(outcome, expect);
        let trampled = self.scratch.first_trampled();
        match (verdict, trampled) {
            (Ok(()), None) => {
                serial_println!("probe: case {name}: ok ({outcome})");
                Ok(true)
            }
            (Err(why), _) => {
                serial_println!("probe: case {name}: FAILED: {why} ({outcome})");
                Ok(false)
            }
            (Ok(()), Some(offset)) => {
                serial_println!("probe: case {name}: FAILED: device wrote a byte it may not (scratch offset {offset})");
                Ok(false)
            }
        }
    }

    /// Lays out and posts a chain, waits for it. `fill` may write the data buffers
    /// (given their offsets) before the snapshot. `None` if it never came back.
    fn post(
        &mut self,
        parts: &[Part],
        fill: impl Fn(&mut [u8]),
    ) -> Result<Option<Outcome>, BlkError> {
        self.scratch.reset();
        let mut chain = [Buffer::readable(0, 0); 3];
        let mut status_at = None;
        for (buffer, part) in chain.iter_mut().zip(parts) {
            *buffer = self.lay_out(*part, &mut status_at);
        }
        fill(self.scratch.area);
        self.scratch.snapshot();
        let head = self.device.submit(&chain[..parts.len()])?;
        let clock = *self.device.clock();
        let deadline = Deadline::after(&clock, TIMEOUT_MS);
        loop {
            if let Some(used) = self.device.poll()? {
                if used.head == head {
                    let status = status_at.map(|at| self.scratch.byte(at));
                    return Ok(Some(Outcome {
                        status,
                        used_len: used.len,
                    }));
                }
                serial_println!(
                    "probe: late completion of an earlier chain (head {})",
                    used.head
                );
            }
            if deadline.passed(&clock) {
                return Ok(None);
            }
        }
    }

    fn lay_out(&mut self, part: Part, status_at: &mut Option<usize>) -> Buffer {
        let s = &mut self.scratch;
        match part {
            Part::Header { kind, sector, len } => {
                let at = s.place(HDR as usize, false);
                s.area[at..at + 4].copy_from_slice(&kind.to_le_bytes());
                s.area[at + 4..at + 8].fill(0);
                s.area[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
                Buffer::readable(s.addr(at), len)
            }
            Part::Data { len, writable } => {
                let at = s.place(len as usize, writable);
                for (i, byte) in s.area[at..at + len as usize].iter_mut().enumerate() {
                    *byte = if writable { 0 } else { (i * 7 + 3) as u8 };
                }
                Buffer {
                    addr: s.addr(at),
                    len,
                    writable,
                }
            }
            Part::Foreign { addr, len } => Buffer::writable(addr, len),
            Part::Status { writable } => {
                let at = s.place(1, writable);
                s.area[at] = STATUS_UNSET;
                // Only a writable status byte is reported; a read-only one must stay
                // 0xff, which the canary check covers.
                if writable {
                    *status_at = Some(at);
                }
                Buffer {
                    addr: s.addr(at),
                    len: 1,
                    writable,
                }
            }
        }
    }

    /// Write, flush, read back a few sectors: the device must still work.
    fn round_trip(&mut self) -> Result<bool, BlkError> {
        let bytes = (ROUND_TRIP_SECTORS * SECTOR_SIZE as u64) as u32;
        let seed = self.seed;
        let fill = |area: &mut [u8]| {
            // The data buffer is the second part: right after the header and a gap.
            let at = data_offset();
            for (i, sector) in area[at..at + bytes as usize]
                .as_chunks_mut::<SECTOR_SIZE>()
                .0
                .iter_mut()
                .enumerate()
            {
                pattern::fill_sector(seed, 1, i as u64, sector);
            }
        };
        let write = [
            Part::Header {
                kind: T_OUT,
                sector: 0,
                len: HDR,
            },
            Part::Data {
                len: bytes,
                writable: false,
            },
            Part::Status { writable: true },
        ];
        let mut steps_ok = self.round_trip_step("write", &write, fill)?;
        if self.device.has_flush() {
            let flush = [
                Part::Header {
                    kind: T_FLUSH,
                    sector: 0,
                    len: HDR,
                },
                Part::Status { writable: true },
            ];
            steps_ok &= self.round_trip_step("flush", &flush, |_| {})?;
        }
        let read = [
            Part::Header {
                kind: T_IN,
                sector: 0,
                len: HDR,
            },
            Part::Data {
                len: bytes,
                writable: true,
            },
            Part::Status { writable: true },
        ];
        steps_ok &= self.round_trip_step("read", &read, |_| {})?;
        let at = data_offset();
        let area = &self.scratch.area[at..at + bytes as usize];
        let matches = area
            .as_chunks::<SECTOR_SIZE>()
            .0
            .iter()
            .enumerate()
            .all(|(i, sector)| pattern::sector_matches(seed, 1, i as u64, sector));
        if !matches {
            serial_println!(
                "probe: case j round trip: FAILED: read-back data differs from what was written"
            );
        } else if steps_ok {
            serial_println!("probe: case j round trip: ok");
        }
        Ok(steps_ok && matches)
    }

    fn round_trip_step(
        &mut self,
        step: &str,
        parts: &[Part],
        fill: impl Fn(&mut [u8]),
    ) -> Result<bool, BlkError> {
        let Some(outcome) = self.post(parts, fill)? else {
            serial_println!("probe: case j round trip: FAILED: {step} did not complete");
            self.hung = true;
            return Ok(false);
        };
        if outcome.status != Some(S_OK) {
            serial_println!("probe: case j round trip: FAILED: {step}: {outcome}");
            return Ok(false);
        }
        if let Some(offset) = self.scratch.first_trampled() {
            serial_println!("probe: case j round trip: FAILED: {step} wrote outside its buffers (offset {offset})");
            return Ok(false);
        }
        Ok(true)
    }
}

/// Offset of the second buffer of a chain whose first is a 16-byte header.
fn data_offset() -> usize {
    (GAP + HDR as usize + GAP).next_multiple_of(GAP)
}

/// Whether the outcome is what a correct device does.
fn judge(outcome: Outcome, expect: Expect) -> Result<(), &'static str> {
    match (expect, outcome.status) {
        (Expect::NoStatus, _) if outcome.used_len == 0 => Ok(()),
        (Expect::NoStatus, _) => Err("used len should be 0: there is no writable status byte"),
        (_, None) => Err("no status byte"),
        (Expect::Error, Some(S_IOERR | S_UNSUPP)) => Ok(()),
        (Expect::Unsupported, Some(S_UNSUPP)) => Ok(()),
        (_, Some(STATUS_UNSET)) => Err("status byte not written"),
        _ => Err("wrong status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judging() {
        let out = |status, used_len| Outcome { status, used_len };
        assert!(judge(out(None, 0), Expect::NoStatus).is_ok());
        assert!(judge(out(None, 1), Expect::NoStatus).is_err());
        assert!(judge(out(Some(S_IOERR), 1), Expect::Error).is_ok());
        assert!(judge(out(Some(S_UNSUPP), 1), Expect::Error).is_ok());
        assert!(judge(out(Some(S_OK), 1), Expect::Error).is_err());
        assert!(judge(out(Some(STATUS_UNSET), 0), Expect::Error).is_err());
        assert!(judge(out(Some(S_IOERR), 1), Expect::Unsupported).is_err());
        assert!(judge(out(Some(S_UNSUPP), 1), Expect::Unsupported).is_ok());
    }

    #[test]
    fn case_table_is_sane() {
        let table = cases(1000, 0x800_0000);
        assert_eq!(table.len(), 10);
        assert_eq!(table[0].parts().len(), 1);
        assert_eq!(table[9].parts().len(), 2);
        for case in table {
            assert!(
                matches!(case.parts()[0], Part::Header { .. }),
                "{}",
                case.name
            );
            assert!(
                case.parts().len() > 1 || case.expect == Expect::NoStatus,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn data_offset_matches_layout() {
        let region: &'static mut [u8] = Box::leak(vec![0u8; SCRATCH].into_boxed_slice());
        let reference: &'static mut [u8] = Box::leak(vec![0u8; SCRATCH].into_boxed_slice());
        let mut s = Scratch {
            area: region,
            reference,
            writable: [(0, 0); 3],
            writable_count: 0,
            next: GAP,
        };
        s.reset();
        s.place(HDR as usize, false);
        assert_eq!(s.place(4096, true), data_offset());
        s.snapshot();
        assert_eq!(s.first_trampled(), None);
        s.area[data_offset() + 10] = 1; // inside the writable buffer: fine
        assert_eq!(s.first_trampled(), None);
        s.area[data_offset() - 1] = 1; // canary just before it
        assert_eq!(s.first_trampled(), Some(data_offset() - 1));
    }
}
