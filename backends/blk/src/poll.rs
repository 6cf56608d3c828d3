//! Adaptive busy-polling of a queue's avail ring (`--poll-us`).
//!
//! Why: on the nested (PVM) machines this runs on, a worker that sleeps in `epoll_wait`
//! and is woken by the guest's kick (ioeventfd → eventfd → a halted host CPU) pays tens
//! of µs per wake-up, far more than a 4 KiB read from the page cache (≈ 1.5 µs). A worker
//! that keeps notifications off and watches the avail ring for a short while after
//! draining it catches the next request of a guest that waits for each completion (QD1)
//! without any wake-up at all.
//!
//! How long to watch adapts per queue the way KVM's halt-polling does
//! (Documentation/virt/kvm/halt-polling.rst): the window grows when the worker slept
//! only briefly after a poll that gave up (a longer poll would have caught the next
//! request), shrinks when it slept long (the guest was idle, polling only burnt CPU),
//! and stays while polling keeps finding work. A guest that stops issuing requests
//! costs at most one window of spinning: the worker then sleeps until the next kick.
//!
//! Spinning only pays while this worker has a CPU to itself. The guest's vCPU thread
//! polls its used ring at full speed, so a worker spinning on the same CPU keeps the
//! very thread that would produce the next request off it (measured here: QD1 p50 went
//! from 35 µs to 85 µs on a loaded machine, and yielding in the loop made it worse,
//! 4 ms, the scheduler tick, because the vCPU never yields back). So, like KVM's
//! halt-polling gives up when another task is runnable (`single_task_running`), the
//! worker polls only while the host has no more runnable tasks than CPUs
//! ([`CpuLoad`], `/proc/loadavg`, looked at no more than once a millisecond), and it
//! gives up a poll in which it was itself descheduled.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Smallest window the adaptation grows to from zero (KVM's `halt_poll_ns_grow_start`
/// is 10 µs too).
pub const GROW_START: Duration = Duration::from_micros(10);

/// A gap this long between two looks at the ring means the worker was descheduled.
pub const PREEMPTED: Duration = Duration::from_micros(50);

/// How long a look at the host's runnable-task count stays valid.
pub const LOAD_REFRESH: Duration = Duration::from_millis(1);

/// The poll window of one queue worker and its adaptation; pure, so it is unit-tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    current: Duration,
    max: Duration,
}

impl PollWindow {
    /// A window that adapts between zero and `max` (zero turns polling off), starting
    /// at the grow start.
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            current: GROW_START.min(max),
            max,
        }
    }

    /// How long the next poll may spin.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The worker slept `slept` (from enabling notifications to the kick that woke it)
    /// after a poll of the current window found nothing.
    pub fn after_sleep(&mut self, slept: Duration) {
        if slept <= self.max {
            self.grow();
        } else {
            self.shrink();
        }
    }

    /// Polling was cut short because another task wanted this CPU.
    pub fn after_preemption(&mut self) {
        self.shrink();
    }

    fn grow(&mut self) {
        let start = GROW_START.min(self.max);
        self.current = (self.current * 2).clamp(start, self.max);
    }

    fn shrink(&mut self) {
        let half = self.current / 2;
        self.current = if half < GROW_START.min(self.max) {
            Duration::ZERO
        } else {
            half
        };
    }
}

/// Whether the host has a CPU to spare for spinning: no more runnable tasks (this worker
/// included) than online CPUs. The count is the fourth field of `/proc/loadavg`
/// (`running/total`, the kernel's instantaneous `nr_running`).
#[derive(Debug)]
pub struct CpuLoad {
    loadavg: Option<File>,
    cpus: u32,
    checked: Option<Instant>,
    spare: bool,
}

impl CpuLoad {
    /// Opens `/proc/loadavg`; without it (no procfs) spinning is always allowed, still
    /// bounded by the window and by the preemption check.
    pub fn open() -> CpuLoad {
        // SAFETY: sysconf only reads a system value.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        CpuLoad {
            loadavg: File::open("/proc/loadavg").ok(),
            cpus: u32::try_from(online).unwrap_or(1).max(1),
            checked: None,
            spare: true,
        }
    }

    /// Whether spinning at `now` leaves every other runnable task a CPU.
    pub fn has_spare_cpu(&mut self, now: Instant) -> bool {
        let fresh = self
            .checked
            .is_some_and(|at| now.saturating_duration_since(at) < LOAD_REFRESH);
        if !fresh {
            self.checked = Some(now);
            self.spare = self
                .running_tasks()
                .is_none_or(|running| running <= self.cpus);
        }
        self.spare
    }

    fn running_tasks(&self) -> Option<u32> {
        let mut buf = [0u8; 128];
        let len = self.loadavg.as_ref()?.read_at(&mut buf, 0).ok()?;
        running_tasks(buf.get(..len)?)
    }
}

/// The runnable-task count in `/proc/loadavg` text (`0.50 0.40 0.30 2/105 4242`).
pub fn running_tasks(loadavg: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split_once('/')?.0.parse().ok()
}

/// How a poll ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    /// The ring has buffers to serve.
    Work,
    /// The window passed with nothing new.
    Expired,
    /// The worker was descheduled while it spun: another task wanted its CPU.
    Preempted,
    /// Spinning would take a CPU another task needs; not polled.
    NoSpareCpu,
    /// The ring cannot be read or the queue was stopped: go back to notifications.
    Stopped,
}

/// What the poll loop looks at; a trait so the loop is tested without a vring.
pub trait AvailRing {
    /// `Some(true)` when the driver has made buffers available that the device has not
    /// taken, `None` when the ring cannot be read or the queue is stopped.
    fn has_work(&self) -> Option<bool>;
}

/// Watches `ring` for up to `window` while `spare_cpu` (asked with the current time)
/// says spinning takes no CPU another task needs.
pub fn poll(
    ring: &impl AvailRing,
    window: Duration,
    mut spare_cpu: impl FnMut(Instant) -> bool,
) -> PollOutcome {
    let start = Instant::now();
    let mut before = start;
    loop {
        match ring.has_work() {
            Some(true) => return PollOutcome::Work,
            Some(false) => {}
            None => return PollOutcome::Stopped,
        }
        if before.duration_since(start) >= window {
            return PollOutcome::Expired;
        }
        if !spare_cpu(before) {
            return PollOutcome::NoSpareCpu;
        }
        std::hint::spin_loop();
        let now = Instant::now();
        if now.duration_since(before) > PREEMPTED {
            // One last look: the preempting task may have been the one that produced it.
            return match ring.has_work() {
                Some(true) => PollOutcome::Work,
                _ => PollOutcome::Preempted,
            };
        }
        before = now;
    }
}

/// Per-queue polling state kept by the worker between events.
#[derive(Debug)]
pub struct QueuePoll {
    /// The adapting window.
    pub window: PollWindow,
    /// Whether spinning is affordable right now.
    pub load: CpuLoad,
    /// When the worker last enabled notifications after a poll gave up (and went to
    /// sleep); `None` when polling is off or the last poll did not give up.
    asleep_since: Option<Instant>,
}

impl QueuePoll {
    /// State for a worker polling at most `max` (zero: never).
    pub fn new(max: Duration) -> QueuePoll {
        QueuePoll {
            window: PollWindow::new(max),
            load: CpuLoad::open(),
            asleep_since: None,
        }
    }

    /// The worker was woken by a kick at `now`.
    pub fn woke(&mut self, now: Instant) {
        if let Some(since) = self.asleep_since.take() {
            self.window
                .after_sleep(now.saturating_duration_since(since));
        }
    }

    /// The worker goes to sleep at `now` after a poll ended with `outcome` (`None`:
    /// no poll ran, e.g. the window is zero).
    pub fn sleeping(&mut self, now: Instant, outcome: Option<PollOutcome>) {
        self.asleep_since = match outcome {
            Some(PollOutcome::Expired) => Some(now),
            // A zero window still learns from short sleeps, or it could never reopen.
            None if self.window.max > Duration::ZERO => Some(now),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MAX: Duration = Duration::from_micros(80);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn short_sleeps_grow_the_window_to_the_maximum() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.current(), GROW_START);
        let mut seen = vec![w.current()];
        for _ in 0..5 {
            w.after_sleep(us(30));
            seen.push(w.current());
        }
        assert_eq!(seen, [us(10), us(20), us(40), us(80), us(80), us(80)]);
    }

    #[test]
    fn long_sleeps_shrink_the_window_to_zero_and_short_ones_reopen_it() {
        let mut w = PollWindow::new(MAX);
        for _ in 0..3 {
            w.after_sleep(us(1));
        }
        assert_eq!(w.current(), MAX);
        let mut seen = vec![];
        for _ in 0..4 {
            w.after_sleep(Duration::from_millis(5));
            seen.push(w.current());
        }
        assert_eq!(seen, [us(40), us(20), us(10), Duration::ZERO]);
        w.after_sleep(Duration::from_secs(60));
        assert_eq!(w.current(), Duration::ZERO);
        w.after_sleep(us(35));
        assert_eq!(w.current(), GROW_START);
        w.after_preemption();
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn a_zero_maximum_never_polls_and_a_small_one_is_respected() {
        let mut off = PollWindow::new(Duration::ZERO);
        off.after_sleep(Duration::ZERO);
        off.after_sleep(us(1));
        assert_eq!(off.current(), Duration::ZERO);
        let mut small = PollWindow::new(us(4));
        assert_eq!(small.current(), us(4));
        small.after_sleep(us(2));
        assert_eq!(small.current(), us(4));
        small.after_sleep(us(5));
        assert_eq!(
            small.current(),
            Duration::ZERO,
            "half of 4 µs is below the start"
        );
    }

    #[test]
    fn queue_poll_learns_only_from_sleeps_after_an_expired_poll() {
        let t0 = Instant::now();
        let mut q = QueuePoll::new(MAX);
        // Work found: the next wake-up teaches nothing.
        q.sleeping(t0, Some(PollOutcome::Work));
        q.woke(t0 + Duration::from_secs(1));
        assert_eq!(q.window.current(), GROW_START);
        // Expired, then a short sleep: grow.
        q.sleeping(t0, Some(PollOutcome::Expired));
        q.woke(t0 + us(25));
        assert_eq!(q.window.current(), us(20));
        // Expired, then a long sleep: shrink.
        q.sleeping(t0, Some(PollOutcome::Expired));
        q.woke(t0 + Duration::from_millis(3));
        assert_eq!(q.window.current(), us(10));
        // A wake-up without a preceding sleep record changes nothing.
        q.woke(t0 + us(1));
        assert_eq!(q.window.current(), us(10));
        // Window at zero: sleeps still count, so polling can resume.
        q.window.after_preemption();
        q.sleeping(t0, None);
        q.woke(t0 + us(30));
        assert_eq!(q.window.current(), GROW_START);
        // Polling off entirely: nothing is recorded.
        let mut off = QueuePoll::new(Duration::ZERO);
        off.sleeping(t0, None);
        off.woke(t0 + us(1));
        assert_eq!(off.window.current(), Duration::ZERO);
    }

    struct Ring {
        looks: Cell<u32>,
        work_after: u32,
        stop_after: u32,
    }

    impl AvailRing for Ring {
        fn has_work(&self) -> Option<bool> {
            let n = self.looks.get() + 1;
            self.looks.set(n);
            if n > self.stop_after {
                None
            } else {
                Some(n > self.work_after)
            }
        }
    }

    fn ring(work_after: u32, stop_after: u32) -> Ring {
        Ring {
            looks: Cell::new(0),
            work_after,
            stop_after,
        }
    }

    #[test]
    fn poll_ends_on_work_stop_or_expiry() {
        let r = ring(3, u32::MAX);
        // A generous window: found on the fourth look (unless preempted, which ends
        // with a last look that also finds it).
        let spare = |_| true;
        assert_eq!(poll(&r, Duration::from_secs(10), spare), PollOutcome::Work);
        assert!(r.looks.get() >= 4);
        let r = ring(u32::MAX, 2);
        assert!(matches!(
            poll(&r, Duration::from_secs(10), spare),
            PollOutcome::Stopped | PollOutcome::Preempted
        ));
        let r = ring(u32::MAX, u32::MAX);
        assert_eq!(poll(&r, Duration::ZERO, spare), PollOutcome::Expired);
        assert_eq!(r.looks.get(), 1, "a zero window looks once");
        let r = ring(0, u32::MAX);
        assert_eq!(poll(&r, Duration::ZERO, spare), PollOutcome::Work);
    }

    #[test]
    fn poll_does_not_spin_without_a_spare_cpu() {
        let r = ring(5, u32::MAX);
        let mut asked = 0;
        let outcome = poll(&r, Duration::from_secs(10), |_| {
            asked += 1;
            asked < 3
        });
        assert_eq!(outcome, PollOutcome::NoSpareCpu);
        assert_eq!((r.looks.get(), asked), (3, 3));
        // Work already waiting is taken whatever the load.
        let r = ring(0, u32::MAX);
        assert_eq!(
            poll(&r, Duration::from_secs(10), |_| false),
            PollOutcome::Work
        );
    }

    #[test]
    fn running_tasks_from_loadavg() {
        assert_eq!(running_tasks(b"0.50 0.40 0.30 2/105 4242\n"), Some(2));
        assert_eq!(running_tasks(b"13.92 4.23 2.66 14/105 26907"), Some(14));
        assert_eq!(running_tasks(b"0.50 0.40 0.30"), None);
        assert_eq!(running_tasks(b"0.50 0.40 0.30 x/105 1"), None);
        assert_eq!(running_tasks(b"0.50 0.40 0.30 2105 1"), None);
        assert_eq!(running_tasks(&[0xff, 0xfe]), None);
        assert_eq!(running_tasks(b""), None);
    }

    #[test]
    fn cpu_load_reads_this_host() {
        let mut load = CpuLoad::open();
        assert!(load.cpus >= 1);
        if load.loadavg.is_some() {
            let now = Instant::now();
            // This test's own thread is running, so the count is at least one.
            assert!(load.running_tasks().is_some_and(|n| n >= 1));
            let first = load.has_spare_cpu(now);
            assert_eq!(load.checked, Some(now));
            // Within the refresh interval the answer is cached.
            load.spare = !first;
            assert_eq!(load.has_spare_cpu(now + Duration::from_micros(10)), !first);
            assert_eq!(load.checked, Some(now));
        }
    }
}
