//! [`StallDetector`]: tells a backend that lives but does not serve.
//!
//! A stopped, deadlocked or D-state backend keeps its socket open (DESIGN.md,
//! "Containment facts"), so only the rings tell. The supervisor samples every started
//! ring of a device ([`RingProgress`], taken by
//! [`crate::virtio::VirtioMmioTransport::progress`]) and counts a ring as *waiting*
//! when the guest has requests outstanding on it (available index ≠ used index). The
//! device is stalled once some ring has been waiting, and no used index has moved, for
//! `stall_ms`; it stops being stalled as soon as a used index moves or nothing waits.
//!
//! Receive queues are the exception ([`is_input_queue`]): the driver keeps buffers
//! there for the device to fill when input arrives (virtio-net rx with no traffic), so
//! outstanding buffers say nothing. Such a ring waits only while its notification is
//! unread as well (the kick eventfd still has a count): a live backend reads its kick
//! eventfd as soon as it is written. Knowing which queues are receive queues is the
//! one piece of per-device knowledge here; it comes from the virtio spec's queue
//! layout of each device type.

use std::time::{Duration, Instant};

use plexvm_protocol::spec::DeviceKind;

/// Whether queue `queue` of a `kind` device holds buffers the device fills only when
/// input arrives (virtio 1.2: net 5.1.2 receiveqN = even queues; console 5.3.2
/// receiveqs = 0, 2 (control), 4, 6, ...; vsock 5.10.2 rx = 0, event = 2).
pub fn is_input_queue(kind: DeviceKind, queue: usize) -> bool {
    match kind {
        DeviceKind::Net | DeviceKind::Console => queue % 2 == 0,
        DeviceKind::Vsock => queue == 0 || queue == 2,
        DeviceKind::Blk | DeviceKind::Rng | DeviceKind::Fs => false,
        // Unknown queue layout: judge every queue like a receive queue (stalled only
        // while a kick stays unread), so an idle input queue is never a false stall.
        DeviceKind::Generic => true,
    }
}

/// One sample of a device's started rings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingProgress {
    /// The used index of every started ring, in queue order.
    pub used: Vec<u16>,
    /// Whether some ring has requests outstanding (a receive queue: and its kick
    /// unread).
    pub waiting: bool,
}

/// What a sample changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallEvent {
    /// Nothing to report.
    Quiet,
    /// The device has just become stalled: no progress for this long.
    Stalled(Duration),
    /// A stalled device moved again after this long.
    Moved(Duration),
}

/// Per-device stall state (see the module docs).
#[derive(Debug, Default)]
pub struct StallDetector {
    last_used: Vec<u16>,
    /// Since when some ring has been waiting without progress.
    since: Option<Instant>,
    stalled: bool,
}

impl StallDetector {
    /// Forgets everything (a new backend, or a device that is not served).
    pub fn reset(&mut self) {
        *self = StallDetector::default();
    }

    /// Whether the device is stalled now, and since when.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.since.filter(|_| self.stalled)
    }

    /// Takes one sample (`None`: no started rings) at `now` against `limit`.
    pub fn observe(
        &mut self,
        sample: Option<&RingProgress>,
        now: Instant,
        limit: Duration,
    ) -> StallEvent {
        let (moved, waiting) = match sample {
            Some(s) => {
                let moved = s.used != self.last_used;
                self.last_used.clone_from(&s.used);
                (moved, s.waiting)
            }
            None => {
                self.last_used.clear();
                (false, false)
            }
        };
        if moved || !waiting {
            let was = self.stalled_since();
            self.since = None;
            self.stalled = false;
            return match was {
                Some(t) => StallEvent::Moved(now.saturating_duration_since(t)),
                None => StallEvent::Quiet,
            };
        }
        let since = *self.since.get_or_insert(now);
        let still = now.saturating_duration_since(since);
        if !self.stalled && still >= limit {
            self.stalled = true;
            return StallEvent::Stalled(still);
        }
        StallEvent::Quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(used: &[u16], waiting: bool) -> RingProgress {
        RingProgress {
            used: used.to_vec(),
            waiting,
        }
    }

    #[test]
    fn waiting_without_progress_for_the_limit_is_a_stall_reported_once() {
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = StallDetector::default();
        assert_eq!(
            d.observe(Some(&s(&[3], true)), ms(0), limit),
            StallEvent::Quiet
        );
        assert_eq!(
            d.observe(Some(&s(&[3], true)), ms(10), limit),
            StallEvent::Quiet
        );
        assert_eq!(
            d.observe(Some(&s(&[3], true)), ms(99), limit),
            StallEvent::Quiet
        );
        assert_eq!(
            d.observe(Some(&s(&[3], true)), ms(110), limit),
            StallEvent::Stalled(Duration::from_millis(100))
        );
        assert_eq!(d.stalled_since(), Some(ms(10)));
        assert_eq!(
            d.observe(Some(&s(&[3], true)), ms(500), limit),
            StallEvent::Quiet
        );
        assert_eq!(
            d.observe(Some(&s(&[4], true)), ms(600), limit),
            StallEvent::Moved(Duration::from_millis(590))
        );
        assert_eq!(d.stalled_since(), None);
    }

    #[test]
    fn receive_queues_are_known_per_device_type() {
        assert!(is_input_queue(DeviceKind::Net, 0));
        assert!(!is_input_queue(DeviceKind::Net, 1));
        assert!(is_input_queue(DeviceKind::Net, 2));
        assert!(!is_input_queue(DeviceKind::Blk, 0));
        assert!(is_input_queue(DeviceKind::Vsock, 2));
        assert!(!is_input_queue(DeviceKind::Vsock, 1));
        assert!(!is_input_queue(DeviceKind::Rng, 0));
    }

    #[test]
    fn progress_or_nothing_waiting_restarts_the_window() {
        let limit = Duration::from_millis(100);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = StallDetector::default();
        d.observe(Some(&s(&[1, 1], true)), ms(0), limit);
        d.observe(Some(&s(&[1, 1], true)), ms(1), limit);
        // Used moves every sample: a busy backend with kicks pending is no stall.
        for i in 2..50u16 {
            let e = d.observe(Some(&s(&[i, 1], true)), ms(u64::from(i) * 10), limit);
            assert_eq!(e, StallEvent::Quiet);
        }
        // An idle receive queue: outstanding buffers, kick read — never a stall.
        for i in 0..50 {
            let e = d.observe(Some(&s(&[49, 1], false)), ms(1000 + i * 10), limit);
            assert_eq!(e, StallEvent::Quiet);
        }
        // No started rings at all.
        assert_eq!(d.observe(None, ms(5000), limit), StallEvent::Quiet);
        assert_eq!(d.stalled_since(), None);
    }
}
