//! The ceiling: the scenario's access pattern run directly on the host against the
//! same image with the same concurrency — `qd` threads, each keeping one synchronous
//! `pread`/`pwrite` in flight (sequential patterns share one position, so `qd`
//! threads together read one stream) — so every VM result can be shown as a fraction
//! of what the machine itself does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::plan::Scenario;
use crate::sample::{Latencies, Sample};

/// Memory alignment for O_DIRECT buffers.
const ALIGN: usize = 4096;
/// Largest latency recorded (longer ones are clamped): 60 s.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Errors of the host-side reader.
#[derive(Debug, thiserror::Error)]
pub enum CeilingError {
    /// The image cannot be opened.
    #[error("{path}: cannot open{direct}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// " with O_DIRECT" or "".
        direct: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A read or write failed.
    #[error("{path}: I/O error at offset {offset}")]
    Io {
        /// Image path.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The image is smaller than one request.
    #[error("{path}: smaller than one {bs}-byte request")]
    TooSmall {
        /// Image path.
        path: PathBuf,
        /// Request size.
        bs: u32,
    },
}

/// What one thread measured.
struct ThreadResult {
    ios: u64,
    hist: Histogram<u64>,
}

/// Shared state of one run.
struct Run<'a> {
    file: File,
    path: &'a Path,
    scenario: &'a Scenario,
    blocks: u64,
    next_block: AtomicU64,
    barrier: Barrier,
    warmup: Duration,
    measure: Duration,
}

/// Runs `scenario` on the host against `image` for `warmup` + `seconds`.
pub fn run(
    image: &Path,
    scenario: &Scenario,
    direct: bool,
    warmup: u64,
    seconds: u64,
) -> Result<Sample, CeilingError> {
    let mut options = OpenOptions::new();
    options.read(true).write(scenario.writes());
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(image).map_err(|source| CeilingError::Open {
        path: image.to_path_buf(),
        direct: if direct { " with O_DIRECT" } else { "" },
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| CeilingError::Io {
            path: image.to_path_buf(),
            offset: 0,
            source,
        })?
        .len();
    let blocks = len / u64::from(scenario.bs);
    if blocks == 0 {
        return Err(CeilingError::TooSmall {
            path: image.to_path_buf(),
            bs: scenario.bs,
        });
    }
    let qd = usize::from(scenario.qd.max(1));
    let run = Run {
        file,
        path: image,
        scenario,
        blocks,
        next_block: AtomicU64::new(0),
        barrier: Barrier::new(qd),
        warmup: Duration::from_secs(warmup),
        measure: Duration::from_secs(seconds),
    };
    let results: Vec<Result<ThreadResult, CeilingError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..qd)
            .map(|i| {
                let run = &run;
                scope.spawn(move || run.worker(i as u64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut hist = new_histogram();
    let mut ios = 0;
    for result in results {
        let result = result?;
        ios += result.ios;
        // Same bounds on both sides: adding cannot fail.
        let _ = hist.add(&result.hist);
    }
    Ok(sample(ios, &hist, scenario.bs, seconds as f64))
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant digits over 1 ns..60 s: fixed bounds, cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).unwrap_or_else(|_| unreachable!())
}

fn sample(ios: u64, hist: &Histogram<u64>, bs: u32, seconds: f64) -> Sample {
    let q = |quantile: f64| hist.value_at_quantile(quantile);
    let histogram = hist
        .iter_log(100, 1.0905)
        .filter(|v| v.count_since_last_iteration() > 0)
        .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
        .collect();
    Sample {
        ios,
        iops: ios as f64 / seconds,
        mib_s: ios as f64 * f64::from(bs) / seconds / (1024.0 * 1024.0),
        errors: 0,
        lat_ns: Latencies {
            min: hist.min(),
            mean: hist.mean() as u64,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: hist.max(),
        },
        seconds,
        host_seconds: seconds,
        notifies: None,
        event_idx: None,
        histogram,
    }
}

impl Run<'_> {
    fn worker(&self, id: u64) -> Result<ThreadResult, CeilingError> {
        let bs = self.scenario.bs as usize;
        let mut raw = vec![0xa5u8; bs + ALIGN];
        let offset = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        let buf = &mut raw[offset..offset + bs];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(id + 1);
        let mut hist = new_histogram();
        let mut ios = 0;
        self.barrier.wait();
        let start = Instant::now();
        let measured_from = start + self.warmup;
        let end = measured_from + self.measure;
        loop {
            let (write, block) = self.next(&mut rng);
            let at = block * bs as u64;
            let before = Instant::now();
            let done = if write {
                self.file.write_all_at(buf, at)
            } else {
                self.file.read_exact_at(buf, at)
            };
            done.map_err(|source| CeilingError::Io {
                path: self.path.to_path_buf(),
                offset: at,
                source,
            })?;
            let after = Instant::now();
            if after >= end {
                break;
            }
            if after >= measured_from {
                ios += 1;
                let ns = u64::try_from((after - before).as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
            }
        }
        Ok(ThreadResult { ios, hist })
    }

    /// The next request: (is it a write, block number).
    fn next(&self, rng: &mut u64) -> (bool, u64) {
        let s = self.scenario;
        let write = match s.read_pct() {
            100 => false,
            0 => true,
            pct => splitmix(rng) % 100 >= u64::from(pct),
        };
        let block = if s.random() {
            splitmix(rng) % self.blocks
        } else {
            self.next_block.fetch_add(1, Ordering::Relaxed) % self.blocks
        };
        (write, block)
    }
}

/// SplitMix64 step (the probe uses the same generator).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::select_scenarios;

    #[test]
    fn reads_a_small_file() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(1 << 20).unwrap();
        let s = select_scenarios(&["randread-4k-qd32".into()], true).unwrap()[0];
        let sample = run(image.path(), &s, false, 0, 1).unwrap();
        assert!(sample.ios > 0);
        assert!(sample.lat_ns.p50 > 0 && sample.lat_ns.p50 <= sample.lat_ns.max);
        assert!(!sample.histogram.is_empty());
        let total: u64 = sample.histogram.iter().map(|(_, n)| n).sum();
        assert_eq!(total, sample.ios);
    }

    #[test]
    fn too_small_image() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let s = select_scenarios(&["read-128k-qd8".into()], true).unwrap()[0];
        assert!(matches!(
            run(image.path(), &s, false, 0, 1),
            Err(CeilingError::TooSmall { .. })
        ));
    }
}
