//! Logging for backends: anything a guest can trigger is logged rate-limited.
//!
//! A guest that keeps handing a backend bad descriptors, or a frontend that keeps
//! failing, must not turn the backend's stderr (forwarded line by line into the core's
//! log) into a flood. So, as Firecracker does, the plain `tracing::warn!`/`error!` are
//! disallowed in backends by `clippy.toml` (`disallowed-macros`), and every warning goes
//! through one of two macros that say which kind it is:
//!
//! - [`guest_warn!`](crate::guest_warn): a guest- or frontend-triggerable event; each
//!   call site logs its 1st, 2nd, 4th, 8th, ... occurrence, with the running `count`;
//! - [`host_warn!`](crate::host_warn) / [`host_error!`](crate::host_error): a host-side
//!   event (start-up, a file the operator named, a failed accept), logged every time.
//!
//! They expand to `tracing::event!` with the level, not to the disallowed macros:
//! clippy reports a disallowed macro at the outermost call site, even inside another
//! crate's macro.

use std::sync::atomic::{AtomicU64, Ordering};

#[doc(hidden)]
pub use tracing as __tracing;

/// Counts the events of one call site and tells which to log: the powers of two.
#[derive(Debug, Default)]
pub struct RateLimit(AtomicU64);

impl RateLimit {
    /// A counter at zero (usable in a `static`).
    pub const fn new() -> RateLimit {
        RateLimit(AtomicU64::new(0))
    }

    /// Counts one event; `Some(count)` when this one is to be logged.
    pub fn hit(&self) -> Option<u64> {
        let count = self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        count.is_power_of_two().then_some(count)
    }
}

/// A warning about something a guest or frontend can repeat at will, logged at the
/// 1st, 2nd, 4th, ... occurrence with a `count` field. Takes what `tracing::warn!`
/// takes; counts per call site, or, written `guest_warn!(count = N; ...)`, logs when
/// the caller's own counter `N` (e.g. a per-port statistic, already incremented) is a
/// power of two.
#[macro_export]
macro_rules! guest_warn {
    (count = $count:expr; $($arg:tt)+) => {{
        let count: u64 = $count;
        if count.is_power_of_two() {
            $crate::log::__tracing::event!($crate::log::__tracing::Level::WARN, count, $($arg)+);
        }
    }};
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log::RateLimit = $crate::log::RateLimit::new();
        if let Some(count) = LIMIT.hit() {
            $crate::log::__tracing::event!($crate::log::__tracing::Level::WARN, count, $($arg)+);
        }
    }};
}

/// A warning about a host-side event no guest can repeat; logged every time.
#[macro_export]
macro_rules! host_warn {
    ($($arg:tt)+) => {{
        $crate::log::__tracing::event!($crate::log::__tracing::Level::WARN, $($arg)+);
    }};
}

/// An error about a host-side event no guest can repeat; logged every time.
#[macro_export]
macro_rules! host_error {
    ($($arg:tt)+) => {{
        $crate::log::__tracing::event!($crate::log::__tracing::Level::ERROR, $($arg)+);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_powers_of_two_are_logged() {
        let limit = RateLimit::new();
        let logged: Vec<u64> = (0..100).filter_map(|_| limit.hit()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64]);
    }

    #[test]
    fn each_call_site_counts_for_itself() {
        // Both expand and run without panicking; the counters are per call site.
        for _ in 0..3 {
            crate::guest_warn!("first site");
            crate::guest_warn!(queue = 1, "second site {}", 2);
            crate::guest_warn!(count = 3; queue = 1, "caller's counter");
        }
    }
}
