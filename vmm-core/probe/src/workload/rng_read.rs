//! `rng-read`: reads [`RNG_BYTES`] bytes from the first entropy device and reports what
//! it got, so a test can check them against the backend's source: the count, the
//! requests it took, an FNV-1a hash of all of them, the first 32 in hex, how many of
//! the 256 byte values occur, and whether any 64-byte block repeats the one before.

use crate::console::{Chain, ExitCode};
use crate::serial_println;
use crate::virtio::rng::{RngDevice, DEVICE_ID_RNG, REQUEST_BYTES};

use super::{find_transport, Env};

/// Bytes the workload reads.
pub const RNG_BYTES: usize = 16 * 1024;
/// The device may write fewer bytes than asked (5.4.6), but a device that keeps
/// writing nothing must not hang the probe: this many requests at most.
const MAX_REQUESTS: u64 = 4 * (RNG_BYTES / REQUEST_BYTES) as u64 + 16;
/// Blocks compared with their predecessor for the repetition check.
const BLOCK: usize = 64;

/// What the bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// FNV-1a 64 over all bytes.
    pub fnv64: u64,
    /// Distinct byte values.
    pub distinct: u32,
    /// Zero bytes.
    pub zeros: usize,
    /// Whether some 64-byte block equals the block before it.
    pub repeats: bool,
}

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Summarises `bytes`.
pub fn summarise(bytes: &[u8]) -> Summary {
    let mut seen = [false; 256];
    for &b in bytes {
        seen[usize::from(b)] = true;
    }
    Summary {
        fnv64: fnv1a64(bytes),
        distinct: seen.iter().filter(|&&s| s).count() as u32,
        zeros: bytes.iter().filter(|&&b| b == 0).count(),
        repeats: any_repeat(bytes),
    }
}

/// Whether some 64-byte block of `bytes` equals the block before it.
fn any_repeat(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(BLOCK);
    let Some(mut previous) = blocks.next() else {
        return false;
    };
    for block in blocks {
        if block == previous {
            return true;
        }
        previous = block;
    }
    false
}

/// Runs the workload.
pub fn run(env: &mut Env) -> ExitCode {
    let Some(transport) = find_transport(env, DEVICE_ID_RNG) else {
        serial_println!("probe: error: no virtio entropy device");
        serial_println!("probe: result workload=rng-read status=fail reason=no-device");
        return ExitCode::DeviceError;
    };
    let mut rng = match RngDevice::open(transport, &mut env.alloc, env.clock) {
        Ok(rng) => rng,
        Err(error) => {
            serial_println!("probe: error: entropy device: {}", Chain(&error));
            serial_println!("probe: result workload=rng-read status=fail reason=open");
            return ExitCode::DeviceError;
        }
    };
    let bytes = match env.alloc.alloc_bytes(RNG_BYTES) {
        Ok(bytes) => bytes,
        Err(_) => {
            serial_println!("probe: result workload=rng-read status=fail reason=memory");
            return ExitCode::DeviceError;
        }
    };
    let config = read_config(&rng, env.config.config_bytes);
    let mut got = 0;
    while got < RNG_BYTES && rng.requests() < MAX_REQUESTS {
        match rng.read(&mut bytes[got..]) {
            Ok(n) => got += n,
            Err(error) => {
                serial_println!("probe: error: entropy request: {}", Chain(&error));
                serial_println!(
                    "probe: result workload=rng-read status=fail reason=request bytes={got}"
                );
                return ExitCode::DeviceError;
            }
        }
    }
    report(&bytes[..got], rng.requests(), &config)
}

/// The first `len` config-space bytes in hex (`probe.config=`).
fn read_config(rng: &RngDevice, len: u8) -> Hex<128> {
    let mut hex = Hex::default();
    for offset in (0..usize::from(len)).step_by(4) {
        hex.push(&rng.config_u32(offset).to_le_bytes());
    }
    hex
}

/// Bytes as lowercase hex, in a fixed buffer of `N` characters.
#[derive(Debug)]
struct Hex<const N: usize> {
    text: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Hex<N> {
    fn default() -> Self {
        Hex {
            text: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Hex<N> {
    fn push(&mut self, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in bytes {
            if self.len + 2 > N {
                return;
            }
            self.text[self.len] = DIGITS[usize::from(b >> 4)];
            self.text[self.len + 1] = DIGITS[usize::from(b & 0xf)];
            self.len += 2;
        }
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.text[..self.len]).unwrap_or("")
    }
}

/// Prints the result line; ok when all bytes came and look random.
fn report(bytes: &[u8], requests: u64, config: &Hex<128>) -> ExitCode {
    let s = summarise(bytes);
    let complete = bytes.len() == RNG_BYTES;
    // 16 KiB of uniform bytes miss one of the 256 values with probability ~1e-25.
    let ok = complete && s.distinct == 256 && !s.repeats;
    let mut head = Hex::<64>::default();
    head.push(&bytes[..bytes.len().min(32)]);
    serial_println!(
        "probe: result workload=rng-read status={} bytes={} requests={requests} \
         fnv64={:#018x} distinct={} zeros={} repeats={} head={} config={}",
        if ok { "ok" } else { "fail" },
        bytes.len(),
        s.fnv64,
        s.distinct,
        s.zeros,
        u8::from(s.repeats),
        head.as_str(),
        config.as_str(),
    );
    if ok {
        ExitCode::Ok
    } else {
        ExitCode::VerifyFailed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn zeros_and_repeats_are_seen() {
        let zeros = [0u8; 256];
        let s = summarise(&zeros);
        assert_eq!((s.distinct, s.zeros, s.repeats), (1, 256, true));
        let mut rng = crate::rng::SplitMix64::new(7);
        let mut random = [0u8; 4096];
        for chunk in random.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let s = summarise(&random);
        assert_eq!((s.distinct, s.repeats), (256, false));
        random.copy_within(0..64, 64);
        assert!(summarise(&random).repeats);
    }
}
