//! Time from the TSC; its frequency from the hypervisor timing leaf 0x4000_0010
//! (docs/platform.md, "CPUID"), which the start code reads at CPL0.

use crate::arch::rdtsc;

/// Assumed TSC frequency when the hypervisor does not say: 1 GHz.
const FALLBACK_KHZ: u64 = 1_000_000;

/// TSC-based clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    tsc_khz: u64,
    assumed: bool,
}

impl Clock {
    /// A clock with a known frequency; 0 means unknown (1 GHz assumed).
    pub fn with_khz(khz: u64) -> Clock {
        if khz == 0 {
            Clock {
                tsc_khz: FALLBACK_KHZ,
                assumed: true,
            }
        } else {
            Clock {
                tsc_khz: khz,
                assumed: false,
            }
        }
    }

    /// TSC frequency in kHz (as used for conversions).
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Whether the frequency is the 1 GHz fallback.
    pub fn assumed(&self) -> bool {
        self.assumed
    }

    /// Current TSC value.
    pub fn now(&self) -> u64 {
        rdtsc()
    }

    /// TSC ticks in `ms` milliseconds.
    pub fn ticks(&self, ms: u64) -> u64 {
        self.tsc_khz.saturating_mul(ms)
    }

    /// Milliseconds in `ticks` TSC ticks.
    pub fn millis(&self, ticks: u64) -> u64 {
        ticks / self.tsc_khz
    }
}

/// A point in TSC time after which something counts as late.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: u64,
}

impl Deadline {
    /// `ms` from now.
    pub fn after(clock: &Clock, ms: u64) -> Deadline {
        Deadline {
            at: clock.now().saturating_add(clock.ticks(ms)),
        }
    }

    /// Whether the deadline has passed.
    pub fn passed(&self, clock: &Clock) -> bool {
        clock.now() >= self.at
    }
}

#[cfg(test)]
mod tests {
    use super::Clock;

    #[test]
    fn conversions() {
        let clock = Clock::with_khz(2_500_000);
        assert!(!clock.assumed());
        assert_eq!(clock.ticks(2), 5_000_000);
        assert_eq!(clock.millis(5_000_000), 2);
        let fallback = Clock::with_khz(0);
        assert!(fallback.assumed());
        assert_eq!(fallback.tsc_khz(), 1_000_000);
    }
}
