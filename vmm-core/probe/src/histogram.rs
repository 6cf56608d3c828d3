//! A latency histogram with log-linear buckets (the HdrHistogram idea, fixed size):
//! values below 16 get a bucket each, every power of two above is split into 16
//! equal sub-buckets, so a bucket is at most 1/16 (6.25 %) wide relative to its
//! lower bound. Fixed memory (no allocation), cheap to record, host-tested.

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Highest power of two covered (values up to 2^52 ns = 52 days; larger are clamped).
const MAX_EXP: u32 = 52;
/// Number of buckets.
pub const BUCKETS: usize = SUB + (MAX_EXP - SUB_BITS + 1) as usize * SUB;

/// Counts of values per bucket, plus exact count, sum, minimum and maximum.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: [u64; BUCKETS],
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

/// Bucket index of `value`.
fn index_of(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let exp = value.ilog2().min(MAX_EXP);
    if exp == MAX_EXP && value >> MAX_EXP > 1 {
        return BUCKETS - 1;
    }
    let sub = (value >> (exp - SUB_BITS)) as usize & (SUB - 1);
    SUB + (exp - SUB_BITS) as usize * SUB + sub
}

/// Lowest value that falls into bucket `index`.
pub fn bucket_low(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let exp = (index - SUB) / SUB + SUB_BITS as usize;
    let sub = ((index - SUB) % SUB) as u64;
    (1u64 << exp) + (sub << (exp - SUB_BITS as usize))
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.buckets[index_of(value)] += 1;
        self.count += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean, rounded down (0 when empty).
    pub fn mean(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        (self.sum / u128::from(self.count)) as u64
    }

    /// The value below which `per_mille`/1000 of the values lie: the upper end of the
    /// bucket that holds that rank (clamped to the maximum seen), 0 when empty.
    pub fn percentile(&self, per_mille: u64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = (self.count * per_mille.min(1000)).div_ceil(1000).max(1);
        let mut seen = 0;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = if index + 1 < BUCKETS {
                    bucket_low(index + 1) - 1
                } else {
                    u64::MAX
                };
                return upper.min(self.max).max(self.min());
            }
        }
        self.max
    }

    /// Non-empty buckets as (lowest value, count), in increasing order.
    pub fn nonzero(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (bucket_low(i), n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        for index in 0..BUCKETS - 1 {
            let low = bucket_low(index);
            let next = bucket_low(index + 1);
            assert!(next > low, "bucket {index}");
            assert_eq!(index_of(low), index);
            assert_eq!(index_of(next - 1), index);
        }
        assert_eq!(index_of(u64::MAX), BUCKETS - 1);
        assert_eq!(index_of(0), 0);
        assert_eq!(index_of(15), 15);
        assert_eq!(index_of(16), 16);
        assert_eq!(bucket_low(index_of(1000)), 992);
    }

    #[test]
    fn statistics() {
        let mut h = Histogram::default();
        assert_eq!((h.percentile(500), h.mean(), h.min()), (0, 0, 0));
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.min(), 1000);
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.mean(), 500_500);
        // Within one bucket width (6.25 %) above the exact value.
        for (pm, exact) in [(500, 500_000u64), (990, 990_000), (999, 999_000)] {
            let p = h.percentile(pm);
            assert!(p >= exact && p <= exact + exact / 16, "p{pm} = {p}");
        }
        assert_eq!(h.percentile(1000), 1_000_000);
        let total: u64 = h.nonzero().map(|(_, n)| n).sum();
        assert_eq!(total, 1000);
    }
}
