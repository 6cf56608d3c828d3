//! A small pool of threads that executes a queue's long requests side by side
//! (`--io-threads`).
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

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
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

/// Most threads `--io-threads` accepts.
pub const MAX_IO_THREADS: u16 = 64;

/// A request handed to the pool.
pub type Job = Box<dyn FnOnce() + Send>;

/// The pool; dropping it lets queued jobs finish, then joins the threads.
#[derive(Debug)]
pub struct IoPool {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// Starts `threads` threads (at least one).
    pub fn new(threads: u16) -> io::Result<IoPool> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut pool = IoPool {
            jobs: Some(jobs),
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let thread = std::thread::Builder::new()
                .name(format!("blk-io-{i}"))
                .spawn(move || run(&queue))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Queues `job`; gives it back when the pool has no thread left to run it.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

fn run(queue: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, not while running it.
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return, // the pool was dropped and the queue is empty
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
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
        let pool = IoPool::new(3).unwrap();
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
