//! One measurement and the statistics over repetitions.

use std::collections::BTreeMap;

use serde::Serialize;

/// One measurement of one (scenario, storage, subject) repetition.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Completed requests in the measured time.
    pub ios: u64,
    /// Requests per second (by the measuring side's clock: the guest TSC in VMs).
    pub iops: f64,
    /// MiB/s.
    pub mib_s: f64,
    /// Failed requests.
    pub errors: u64,
    /// Latency statistics, ns: min, mean, p50, p90, p99, p99.9, max.
    pub lat_ns: Latencies,
    /// Measured seconds by the measuring side's clock (guest TSC or host).
    pub seconds: f64,
    /// The same interval timed by the host's wall clock (VMs: between the guest's
    /// `bench go` and `bench stop` serial lines as the harness read them).
    pub host_seconds: f64,
    /// QueueNotify writes the guest made in the measured time (VMs only).
    pub notifies: Option<u64>,
    /// Whether the guest used VIRTIO_F_EVENT_IDX (VMs only).
    pub event_idx: Option<bool>,
    /// Latency histogram: (bucket lower bound ns, count).
    pub histogram: Vec<(u64, u64)>,
}

/// Latency statistics in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latencies {
    /// Minimum.
    pub min: u64,
    /// Mean.
    pub mean: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

/// Median and range of one metric over repetitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Over `values` (all zero when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// Statistics of one (scenario, storage, subject) over its repetitions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Repetitions that produced a sample.
    pub reps: usize,
    /// IOPS.
    pub iops: Spread,
    /// MiB/s.
    pub mib_s: Spread,
    /// Median latency, µs.
    pub p50_us: Spread,
    /// 99th percentile latency, µs.
    pub p99_us: Spread,
    /// Host wall time over the measuring side's time (1.0 = clocks agree).
    pub clock_ratio: Spread,
    /// Failed requests, all repetitions.
    pub errors: u64,
}

impl Summary {
    /// Over the samples of one group.
    pub fn of(samples: &[&Sample]) -> Summary {
        Summary {
            reps: samples.len(),
            iops: Spread::of(samples.iter().map(|s| s.iops)),
            mib_s: Spread::of(samples.iter().map(|s| s.mib_s)),
            p50_us: Spread::of(samples.iter().map(|s| s.lat_ns.p50 as f64 / 1000.0)),
            p99_us: Spread::of(samples.iter().map(|s| s.lat_ns.p99 as f64 / 1000.0)),
            clock_ratio: Spread::of(
                samples
                    .iter()
                    .filter(|s| s.seconds > 0.0)
                    .map(|s| s.host_seconds / s.seconds),
            ),
            errors: samples.iter().map(|s| s.errors).sum(),
        }
    }
}

/// Parses the probe's `key=value` result fields into a sample.
pub fn from_probe_fields(
    fields: &BTreeMap<String, String>,
    histogram: Vec<(u64, u64)>,
    host_seconds: f64,
) -> Option<Sample> {
    let num = |key: &str| fields.get(key)?.parse::<u64>().ok();
    let tsc_khz = num("tsc_khz")?.max(1);
    let seconds = num("cycles")? as f64 / (tsc_khz as f64 * 1000.0);
    let ios = num("ios")?;
    let bytes = num("bytes")?;
    let per_sec = |n: u64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    Some(Sample {
        ios,
        iops: per_sec(ios),
        mib_s: per_sec(bytes) / (1024.0 * 1024.0),
        errors: num("errors")?,
        lat_ns: Latencies {
            min: num("lat_min_ns")?,
            mean: num("lat_mean_ns")?,
            p50: num("lat_p50_ns")?,
            p90: num("lat_p90_ns")?,
            p99: num("lat_p99_ns")?,
            p999: num("lat_p999_ns")?,
            max: num("lat_max_ns")?,
        },
        seconds,
        host_seconds,
        notifies: num("notifies"),
        event_idx: fields.get("event_idx").map(|v| v == "on"),
        histogram,
    })
}

/// Parses the probe's `histogram unit=ns low:count ...` words.
pub fn parse_histogram(text: &str) -> Vec<(u64, u64)> {
    text.split_whitespace()
        .filter_map(|w| {
            let (low, n) = w.split_once(':')?;
            Some((low.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::parse_fields;

    #[test]
    fn spread() {
        let s = Spread::of([3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0]).median, 2.5);
        assert_eq!(Spread::of([]), Spread::default());
    }

    #[test]
    fn probe_result_line() {
        let fields = parse_fields(
            "workload=blk-bench status=ok rw=randread bs=4096 qd=1 irq=off event_idx=on \
             ios=2000 reads=2000 writes=0 bytes=8192000 errors=0 notifies=2000 iops=1000 \
             lat_min_ns=900 lat_mean_ns=1000 lat_p50_ns=990 lat_p90_ns=1100 lat_p99_ns=1500 \
             lat_p999_ns=3000 lat_max_ns=9000 tsc_khz=2000000 cycles=4000000000",
        );
        let hist = parse_histogram("unit=ns 896:10 960:20");
        let s = from_probe_fields(&fields, hist, 2.01).unwrap();
        assert_eq!(s.seconds, 2.0);
        assert_eq!(s.iops, 1000.0);
        assert!((s.mib_s - 3.90625).abs() < 1e-9);
        assert_eq!(s.lat_ns.p99, 1500);
        assert_eq!(s.histogram, [(896, 10), (960, 20)]);
        assert_eq!(s.event_idx, Some(true));
        let summary = Summary::of(&[&s]);
        assert!((summary.clock_ratio.median - 1.005).abs() < 1e-9);
        let mut bad = fields.clone();
        bad.remove("cycles");
        assert!(from_probe_fields(&bad, vec![], 0.0).is_none());
    }
}
