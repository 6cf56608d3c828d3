//! A pool of threads, started as requests need them, that executes a queue's long
//! requests side by side (`--io-threads`).
//!
//! Why: a queue worker that executes each request itself serves one request at a time,
//! so O_DIRECT requests (each waits for the device) and large ones do not overlap.
//! Handing such a request to a pool thread lets the worker take the next one from the
//! ring; the pool thread puts the request in the used ring when it is done, in whatever
//! order requests finish (virtio 1.2, 2.7.8: used buffers need not be in avail order).
//!
//! Overlapping pays only for requests that wait for a device; requests served from the
//! page cache are CPU work (copies), and on a 2-core machine running them on more
//! threads gains nothing and adds a thread wake-up (tens of µs on the nested build
//! machines). Measured here: handing every long request over cost 45 % at O_DIRECT
//! 4 KiB QD32 on tmpfs and 24 % at 128 KiB QD8, while on ext4 on a virtual disk with
//! O_DIRECT it gained 2.7× at 4 KiB QD32. So the queue worker hands over a long request
//! (O_DIRECT, or at least 64 KiB) only when such requests lately spent time blocked,
//! not running ([`BlockedTime`]: wall-clock minus thread CPU time), and something can
//! overlap with it (see `VhostUserBlk::offload`).

use plexvm_backend_support::guest_warn;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Long requests that lately spent at least this long blocked go to the pool: a page
/// cache copy blocks for ~0, an O_DIRECT read from the build machine's virtual disk for
/// 50 µs to a few ms.
pub const WORTH_A_THREAD: Duration = Duration::from_micros(20);

/// The worker measures one in this many of the long requests it executes itself (a
/// measurement costs two syscalls, ~1 µs, against ~3 µs for a 4 KiB O_DIRECT read from
/// the page cache).
const SAMPLE_EVERY: u32 = 8;

/// Most threads `--io-threads` accepts (qemu's thread pool has the same cap).
pub const MAX_IO_THREADS: u16 = 64;

/// How long a pool thread waits for a job before it exits (qemu's thread pool waits
/// 10 s too): long enough that a workload's pauses do not make the pool start threads
/// over and over, short enough that a burst's threads do not stay for good.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

/// A request handed to the pool.
pub type Job = Box<dyn FnOnce() + Send>;

/// Threads for jobs that block, started when a job finds no thread waiting for one, up
/// to a cap, and ended after [`IDLE_EXIT`] without work; dropping the pool lets queued
/// jobs finish, then joins the threads.
///
/// Why on demand: at QD1 and from the page cache the queue worker executes every
/// request itself (see the module docs), so the pool then has no thread at all, and
/// under a queue of depth D it has about min(D, cap) threads. Why a cap below deep queue
/// depths (`--io-threads`, default 16): with fewer threads than requests in the pool,
/// a thread that finishes a request takes the next queued one without sleeping; with
/// one thread per request, each sleeps and is woken (30–40 µs on the build machines)
/// for every request. On the 2-core build machine, 4 KiB O_DIRECT reads at QD32 gave
/// 56–74k IOPS with 16 threads and 43–57k with 24 to 64 (README.md).
#[derive(Debug)]
pub struct IoPool {
    shared: Arc<Shared>,
    max_threads: u16,
    /// Threads started, including some that may have exited (joined when the next one
    /// starts, or on drop).
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Threads that could not be started (the first failure, then powers of two, are
    /// logged).
    spawn_errors: AtomicU64,
}

/// What the pool and its threads share.
#[derive(Debug)]
struct Shared {
    state: Mutex<PoolState>,
    /// Signalled once per queued job while a thread waits, and to all on drop.
    job_queued: Condvar,
    idle_exit: Duration,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    /// Threads started and not yet ended (running a job or waiting for one).
    live: u16,
    /// Threads waiting for a job.
    waiting: u16,
    /// The pool is dropped: threads end once the queue is empty.
    closing: bool,
}

impl std::fmt::Debug for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState")
            .field("jobs", &self.jobs.len())
            .field("live", &self.live)
            .field("waiting", &self.waiting)
            .field("closing", &self.closing)
            .finish()
    }
}

impl PoolState {
    /// Whether the job just queued should start a thread.
    fn wants_a_thread(&self, max_threads: u16) -> bool {
        let queued = self.jobs.len();
        // Each waiting thread takes one job; the jobs beyond them need a new thread.
        self.live < max_threads && queued > usize::from(self.waiting)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl IoPool {
    /// A pool of at most `max_threads` threads (at least one); none runs yet.
    pub fn new(max_threads: u16) -> IoPool {
        IoPool::with_idle_exit(max_threads, IDLE_EXIT)
    }

    /// Like [`IoPool::new`], with threads that end after `idle_exit` without work.
    pub fn with_idle_exit(max_threads: u16, idle_exit: Duration) -> IoPool {
        IoPool {
            shared: Arc::new(Shared {
                state: Mutex::new(PoolState::default()),
                job_queued: Condvar::new(),
                idle_exit,
            }),
            max_threads: max_threads.max(1),
            handles: Mutex::new(Vec::new()),
            spawn_errors: AtomicU64::new(0),
        }
    }

    /// Queues `job`, starting a thread for it when no waiting thread is left for it and
    /// the cap allows; gives it back when no thread runs and none can be started.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let mut state = self.shared.lock();
        state.jobs.push_back(job);
        let wake = state.waiting > 0;
        let start = state.wants_a_thread(self.max_threads);
        if start {
            state.live += 1;
        }
        drop(state);
        // Signalled after unlocking, so the thread it wakes does not block at once on
        // the lock this thread still holds.
        if wake {
            self.shared.job_queued.notify_one();
        }
        if !start {
            return Ok(());
        }
        // Started outside the lock: a thread start takes tens of µs, during which the
        // other threads keep taking jobs.
        let Err(e) = self.spawn() else {
            return Ok(());
        };
        let count = self.spawn_errors.fetch_add(1, Ordering::Relaxed) + 1;
        guest_warn!(count = count; "cannot start an I/O thread: {e}");
        let mut state = self.shared.lock();
        state.live -= 1;
        match state.live {
            // No thread would ever take a queued job: hand one back (any of them; each
            // completes its own request) for the caller to run.
            0 => state.jobs.pop_back().map_or(Ok(()), Err),
            _ => Ok(()),
        }
    }

    /// Threads running now (for tests and diagnostics).
    pub fn threads(&self) -> u16 {
        self.shared.lock().live
    }

    fn spawn(&self) -> io::Result<()> {
        let shared = self.shared.clone();
        let mut handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        // Join threads that ended for want of work, so handles do not pile up.
        let mut i = 0;
        while i < handles.len() {
            if handles[i].is_finished() {
                let _ = handles.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
        let handle = std::thread::Builder::new()
            .name("blk-io".to_string())
            .spawn(move || serve_jobs(&shared))?;
        handles.push(handle);
        Ok(())
    }
}

/// Counts a pool thread out of `live` however it ends (a job that panics included).
struct LiveThread<'a>(&'a Shared);

impl Drop for LiveThread<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.live = state.live.saturating_sub(1);
    }
}

/// A pool thread: runs queued jobs until it waited [`Shared::idle_exit`] for one in vain,
/// or the pool is dropped and the queue is empty.
fn serve_jobs(shared: &Shared) {
    // Declared before `state`, so dropped after it: its drop takes the lock again.
    let _live = LiveThread(shared);
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            job();
            state = shared.lock();
            continue;
        }
        if state.closing {
            return;
        }
        state.waiting += 1;
        let (woken, wait) = shared
            .job_queued
            .wait_timeout(state, shared.idle_exit)
            .unwrap_or_else(PoisonError::into_inner);
        state = woken;
        state.waiting -= 1;
        if wait.timed_out() && state.jobs.is_empty() {
            return;
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.job_queued.notify_all();
        let handles = std::mem::take(
            self.handles
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in handles {
            let _ = handle.join();
        }
    }
}

/// Counts a queue's requests that are in the pool, so GET_VRING_BASE can wait for them.
#[derive(Debug, Default)]
pub struct InPool {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InPool {
    /// How many requests are in the pool now.
    pub fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One more request goes to the pool.
    pub fn enter(&self) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }

    /// A request left the pool (it is in the used ring, or was dropped).
    pub fn leave(&self) {
        let mut count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until no request is in the pool.
    pub fn wait_idle(&self) {
        let mut count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        while *count > 0 {
            count = self
                .idle
                .wait(count)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A moving average (weight 1/8 for each new sample) of how long a queue's long
/// requests spent blocked while executing, in ns, against the time that makes them
/// worth a thread.
#[derive(Debug)]
pub struct BlockedTime {
    average_ns: AtomicU64,
    threshold_ns: u64,
    executed: AtomicU32,
}

impl BlockedTime {
    /// Long requests are worth a thread once they take `threshold` on average
    /// ([`WORTH_A_THREAD`] unless tuned; zero: always).
    pub fn new(threshold: Duration) -> BlockedTime {
        BlockedTime {
            average_ns: AtomicU64::new(0),
            threshold_ns: u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX),
            executed: AtomicU32::new(0),
        }
    }

    /// Whether the worker should measure the long request it is about to execute.
    pub fn sample_next(&self) -> bool {
        self.executed.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY == 0
    }

    /// Adds the time one request spent blocked.
    pub fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // Worker and pool threads may race here; losing one sample of an average is fine.
        let old = self.average_ns.load(Ordering::Relaxed);
        self.average_ns
            .store(moving_average(old, sample), Ordering::Relaxed);
    }

    /// Whether long requests lately blocked long enough to be worth a pool thread.
    pub fn worth_a_thread(&self) -> bool {
        self.average_ns.load(Ordering::Relaxed) >= self.threshold_ns
    }
}

/// Wall-clock and CPU time of the calling thread at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch {
    wall: Instant,
    cpu: Duration,
}

impl Stopwatch {
    /// Starts measuring on the calling thread.
    pub fn start() -> Stopwatch {
        Stopwatch {
            wall: Instant::now(),
            cpu: thread_cpu_time(),
        }
    }

    /// Time since `start` that the calling thread (the one that started it) did not
    /// run: blocked in I/O, or waiting for a CPU.
    pub fn blocked(&self) -> Duration {
        let cpu = thread_cpu_time().saturating_sub(self.cpu);
        self.wall.elapsed().saturating_sub(cpu)
    }
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos.min(999_999_999))
}

/// `old` moved an eighth of the way towards `sample`.
pub fn moving_average(old: u64, sample: u64) -> u64 {
    if sample >= old {
        old + (sample - old) / 8
    } else {
        old - (old - sample) / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_side_by_side_and_all_finish_before_drop_returns() {
        let pool = IoPool::new(3);
        // Three jobs that each wait for the other two: they finish only if they overlap.
        let barrier = Arc::new(Barrier::new(3));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (barrier, done) = (barrier.clone(), done.clone());
            pool.submit(Box::new(move || {
                barrier.wait();
                done.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap_or_else(|_| panic!("pool refused a job"));
        }
        drop(pool);
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    /// Polls `done` for up to 5 s.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done()
    }

    #[test]
    fn threads_start_as_jobs_need_them_up_to_the_cap_and_end_when_idle() {
        let pool = IoPool::with_idle_exit(2, Duration::from_millis(50));
        assert_eq!(pool.threads(), 0, "no thread before the first job");
        // Five jobs that block until the gate opens: only two run, the cap.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (running, most, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        for _ in 0..5 {
            let (gate, running, most, done) =
                (gate.clone(), running.clone(), most.clone(), done.clone());
            pool.submit(Box::new(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let (open, opened) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = opened.wait(open).unwrap();
                }
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap_or_else(|_| panic!("pool refused a job"));
        }
        assert!(eventually(|| running.load(Ordering::SeqCst) == 2));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(pool.threads(), 2);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        assert!(eventually(|| done.load(Ordering::SeqCst) == 5));
        assert_eq!(most.load(Ordering::SeqCst), 2, "never more than the cap");
        assert!(eventually(|| pool.threads() == 0), "idle threads end");
        // And the pool starts one again for the next job.
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        pool.submit(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
        .unwrap_or_else(|_| panic!("pool refused a job"));
        drop(pool);
        assert_eq!(ran.load(Ordering::SeqCst), 1, "drop waits for queued jobs");
    }

    #[test]
    fn the_average_follows_the_samples_without_overflow() {
        assert_eq!(moving_average(0, 800), 100);
        assert_eq!(moving_average(800, 0), 700);
        assert_eq!(moving_average(100, 100), 100);
        assert_eq!(moving_average(u64::MAX, 0), u64::MAX - u64::MAX / 8);
        assert_eq!(moving_average(0, u64::MAX), u64::MAX / 8);
        let t = BlockedTime::new(WORTH_A_THREAD);
        assert!(!t.worth_a_thread(), "fresh: execute in the worker");
        // Copies from the page cache do not block: never worth it.
        for _ in 0..100 {
            t.record(Duration::ZERO);
        }
        assert!(!t.worth_a_thread());
        // Disk speed: worth it after a few requests.
        let mut n = 0;
        while !t.worth_a_thread() {
            t.record(Duration::from_micros(800));
            n += 1;
        }
        assert_eq!(n, 1, "one disk-speed sample is enough");
        let sampled = (0..32).filter(|_| t.sample_next()).count();
        assert_eq!(sampled, 4, "one in eight");
        for _ in 0..100 {
            t.record(Duration::from_micros(800));
        }
        // And back once requests stop blocking, after a while.
        let mut n = 0;
        while t.worth_a_thread() {
            t.record(Duration::ZERO);
            n += 1;
        }
        assert!((27..=29).contains(&n), "{n} samples");
        assert!(BlockedTime::new(Duration::ZERO).worth_a_thread());
    }

    #[test]
    fn a_stopwatch_tells_blocking_from_running() {
        let sleeping = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(20));
        assert!(sleeping.blocked() >= Duration::from_millis(15));
        // Spinning is running: it adds CPU time, so it is not counted as blocked (the
        // bound only needs to be below the spin's length).
        let running = Stopwatch::start();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        assert!(thread_cpu_time() > Duration::ZERO);
        assert!(running.blocked() < Duration::from_millis(20));
    }

    #[test]
    fn in_pool_counts_and_wakes_the_waiter() {
        let in_pool = Arc::new(InPool::default());
        in_pool.enter();
        in_pool.enter();
        assert_eq!(in_pool.count(), 2);
        let waiter = {
            let in_pool = in_pool.clone();
            std::thread::spawn(move || in_pool.wait_idle())
        };
        in_pool.leave();
        in_pool.leave();
        waiter.join().unwrap();
        assert_eq!(in_pool.count(), 0);
        in_pool.leave();
        assert_eq!(in_pool.count(), 0, "never below zero");
        in_pool.wait_idle();
    }
}
