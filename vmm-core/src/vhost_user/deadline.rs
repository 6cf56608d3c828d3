//! [`RoundTripClock`]: a deadline on every vhost-user round trip.
//!
//! The `vhost` crate reads a reply with blocking `recvmsg` calls and retries on EAGAIN,
//! so a socket receive timeout (SO_RCVTIMEO) would only make it spin: a backend that
//! is stopped (SIGSTOP, a debugger), deadlocked or stuck in D state keeps its socket
//! open and says nothing (DESIGN.md, "Containment facts"). Instead each frontend arms
//! its clock before a request and disarms it after the reply; one watchdog thread per
//! process shuts the socket down (`shutdown(SHUT_RDWR)`) when an armed clock runs out.
//! The blocked `recvmsg` then returns end-of-file, the request fails, and the
//! supervisor, which watches a duplicate of the same socket for hang-up, sees the
//! backend as gone: a missed deadline is a dead backend. The connection is never used
//! again (a late reply would answer the wrong request).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The deadline of one round trip unless the spec sets `reply_timeout_ms`.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// The deadline state of one connection.
#[derive(Debug)]
pub struct RoundTripClock {
    socket: OwnedFd,
    timeout: Mutex<Duration>,
    /// When the current round trip runs out, while one is in progress.
    armed: Mutex<Option<(Instant, &'static str)>>,
    /// Why the connection was ended (a missed deadline, a reply that broke the
    /// protocol), once it has been.
    broken: Mutex<Option<String>>,
    is_broken: AtomicBool,
}

struct Watchdog {
    clocks: Mutex<Vec<Weak<RoundTripClock>>>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn watchdog() -> Option<&'static Watchdog> {
    static WATCHDOG: OnceLock<Option<&'static Watchdog>> = OnceLock::new();
    *WATCHDOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            clocks: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("plexvm-deadline".into())
            .spawn(move || dog.run());
        match spawned {
            Ok(_) => Some(dog),
            Err(e) => {
                tracing::error!("vhost-user round trips have no deadline: {e}");
                None
            }
        }
    })
}

impl Watchdog {
    fn run(&self) {
        let mut clocks = lock(&self.clocks);
        loop {
            clocks.retain(|c| c.strong_count() > 0);
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for clock in clocks.iter().filter_map(Weak::upgrade) {
                let armed = *lock(&clock.armed);
                match armed {
                    Some((at, request)) if at <= now => clock.expire(request),
                    Some((at, _)) => next = Some(next.map_or(at, |n| n.min(at))),
                    None => {}
                }
            }
            clocks = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(clocks, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(clocks).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

impl RoundTripClock {
    /// A clock for the connection on `socket` (a duplicate of the frontend's socket).
    pub fn new(socket: OwnedFd) -> Arc<Self> {
        let clock = Arc::new(RoundTripClock {
            socket,
            timeout: Mutex::new(DEFAULT_REPLY_TIMEOUT),
            armed: Mutex::new(None),
            broken: Mutex::new(None),
            is_broken: AtomicBool::new(false),
        });
        if let Some(dog) = watchdog() {
            lock(&dog.clocks).push(Arc::downgrade(&clock));
        }
        clock
    }

    /// Sets the deadline of later round trips.
    pub fn set_timeout(&self, timeout: Duration) {
        *lock(&self.timeout) = timeout.max(Duration::from_millis(1));
    }

    /// The deadline of one round trip.
    pub fn timeout(&self) -> Duration {
        *lock(&self.timeout)
    }

    /// Why the connection was ended, if it was: it is dead.
    pub fn broken(&self) -> Option<String> {
        if !self.is_broken.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.broken).clone()
    }

    /// Ends the connection for good (the first reason is kept): the backend's
    /// socket is shut down, so the supervisor sees it as gone.
    pub fn break_off(&self, reason: String) {
        {
            let mut broken = lock(&self.broken);
            if broken.is_none() {
                *broken = Some(reason);
            }
        }
        self.is_broken.store(true, Ordering::Release);
        // SAFETY: shutdown on a socket fd we own; no memory is passed.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Runs one round trip `request` under the deadline.
    pub fn run<T>(&self, request: &'static str, op: impl FnOnce() -> T) -> T {
        let at = Instant::now() + self.timeout();
        *lock(&self.armed) = Some((at, request));
        if let Some(dog) = watchdog() {
            // Taking the lock orders this arming before the watchdog's next look.
            drop(lock(&dog.clocks));
            dog.wake.notify_one();
        }
        let result = op();
        *lock(&self.armed) = None;
        result
    }

    /// The deadline has passed: end the connection for good.
    fn expire(&self, request: &'static str) {
        *lock(&self.armed) = None;
        let ms = self.timeout().as_millis();
        self.break_off(format!("did not answer {request} within {ms} ms"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_round_trip_past_its_deadline_ends_the_connection() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let clock = RoundTripClock::new(OwnedFd::from(ours.try_clone().unwrap()));
        clock.set_timeout(Duration::from_millis(50));
        // A peer that answers in time.
        let ok = clock.run("GET_FEATURES", || 7);
        assert_eq!((ok, clock.broken()), (7, None));
        // A peer that never answers: the blocked read ends instead of hanging.
        let mut buf = [0u8; 1];
        let n = clock.run("GET_CONFIG", || ours.read(&mut buf));
        assert_eq!(n.unwrap(), 0, "end of file once the deadline has passed");
        assert_eq!(
            clock.broken().as_deref(),
            Some("did not answer GET_CONFIG within 50 ms")
        );
        // The peer sees the connection end too.
        let mut theirs = theirs;
        assert_eq!(theirs.read(&mut buf).unwrap(), 0);
    }
}
