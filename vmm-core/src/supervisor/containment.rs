//! Containment of a backend that lives but does not serve (issue 12): stall detection
//! from the rings ([`crate::stall`]), the `on_stall` policy, and fencing (SIGKILL and
//! reap) before another backend gets the device's rings.
//!
//! Fencing rule: a backend that may still hold the rings is dead — killed and reaped —
//! before any other backend is given them, so it can never complete a request late
//! (a late completion would repeat one the next backend completes, or write a buffer
//! the guest has already reused). The core can do that only for backends it spawned
//! (`exec`); a `socket` backend is never replaced while it may still run: on a stall
//! it is waited for (`on_stall = "wait"` is the only policy the spec accepts for it),
//! and after a missed deadline the core reconnects only when the backend answers again.

use std::time::{Duration, Instant};

use plexvm_protocol::api::BackendState;
use plexvm_protocol::spec::StallPolicy;

use super::{lock, Supervisor};
use crate::backend::Backend;
use crate::stall::StallEvent;

/// How often the rings are sampled for stalls: a tenth of the smallest `stall_ms`,
/// within these bounds.
const STALL_SAMPLE_MIN: Duration = Duration::from_millis(5);
const STALL_SAMPLE_MAX: Duration = Duration::from_millis(100);

/// How a backend that went away is to be handled.
pub(super) enum Loss {
    /// Its connection ended (hang-up, exit, or a missed deadline).
    Gone,
    /// It lives but stalled; `on_stall = "restart"`: fence it.
    Stalled(String),
}

impl Supervisor {
    /// The period of the stall check.
    pub(super) fn stall_period(&self) -> Duration {
        let smallest = self
            .devices
            .iter()
            .map(|d| d.restart.stall)
            .min()
            .unwrap_or(STALL_SAMPLE_MAX);
        (smallest / 10).clamp(STALL_SAMPLE_MIN, STALL_SAMPLE_MAX)
    }

    /// Samples every served device's rings for stalls when due.
    pub(super) fn check_stalls(&mut self) {
        let now = Instant::now();
        if now < self.next_stall_check {
            return;
        }
        self.next_stall_check = now + self.stall_period();
        for index in 0..self.devices.len() {
            self.check_stall(index, now);
        }
    }

    fn check_stall(&mut self, index: usize, now: Instant) {
        let dev = &mut self.devices[index];
        if dev.watch.is_none() || dev.state.is_retired() {
            dev.stall.reset();
            return;
        }
        let sample = lock(&dev.transport).progress();
        let limit = dev.restart.stall;
        match dev.stall.observe(sample.as_ref(), now, limit) {
            StallEvent::Quiet => {}
            StallEvent::Moved(after) => {
                lock(&dev.health).stalled_since = None;
                if dev.state.get() == BackendState::Stalled {
                    dev.state.set(BackendState::Up);
                }
                tracing::info!(
                    "device {}: the backend serves again after a stall of {} ms",
                    dev.id,
                    after.as_millis()
                );
            }
            StallEvent::Stalled(after) => self.on_stalled(index, after),
        }
    }

    /// Device `index` has just been seen stalled for `after`.
    fn on_stalled(&mut self, index: usize, after: Duration) {
        let dev = &mut self.devices[index];
        lock(&dev.health).stalled_since = dev.stall.stalled_since();
        dev.state.set(BackendState::Stalled);
        let pid = lock(&dev.transport).info().backend_pid;
        let what = format!(
            "stalled: requests outstanding and none completed for {} ms",
            after.as_millis()
        );
        match (dev.restart.on_stall, pid) {
            (StallPolicy::Restart, Some(_)) => {
                tracing::warn!(
                    "device {}: backend {what}; on_stall = \"restart\": killing it",
                    dev.id
                );
                self.lose(index, Loss::Stalled(what));
            }
            _ => {
                tracing::warn!(
                    "device {}: backend {what}; on_stall = \"wait\": the device waits for it (logged once per stall)",
                    dev.id
                );
            }
        }
    }

    /// Ends the backend that device `index` has just lost and says why: a spawned
    /// backend that stalled or missed a deadline is fenced (killed and reaped) first;
    /// one that closed its connection is stopped the usual way.
    pub(super) fn end_backend(&mut self, index: usize, backend: Backend, loss: &Loss) -> String {
        let missed = match loss {
            Loss::Stalled(why) => Some(why.clone()),
            Loss::Gone => self.devices[index].missed.take(),
        };
        match missed {
            Some(why) => self.fence(index, backend, &why).unwrap_or_else(|e| e),
            None => backend.stop_and_describe(),
        }
    }

    /// Kills and reaps a backend that may still hold device `index`'s rings. `Ok`: it
    /// is dead. `Err`: it may still run (a `socket` backend, or a process that does not
    /// die on SIGKILL, which is kept and the device given to no one until it dies).
    pub(super) fn fence(
        &mut self,
        index: usize,
        backend: Backend,
        why: &str,
    ) -> Result<String, String> {
        match backend.kill_and_describe(why) {
            Ok(text) => Ok(text),
            Err(backend) => match backend.pid() {
                Some(pid) => {
                    self.devices[index].unfenced = Some(backend);
                    Err(format!(
                        "backend (pid {pid}) {why}; it does not die on SIGKILL (stuck in the kernel?): the device stays down until it does"
                    ))
                }
                None => Err(format!(
                    "the backend at {} {why}",
                    backend.socket().display()
                )),
            },
        }
    }

    /// Whether device `index` may be given to a new backend: its previous backend, if
    /// it could not be killed yet, has died by now.
    pub(super) fn fenced(&mut self, index: usize) -> bool {
        let dev = &mut self.devices[index];
        match &dev.unfenced {
            None => true,
            Some(old) if old.is_reaped() => {
                tracing::info!("device {}: the stuck backend has died at last", dev.id);
                dev.unfenced = None;
                true
            }
            Some(_) => false,
        }
    }
}
