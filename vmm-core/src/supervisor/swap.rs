//! Swapping a device's backend ([`super::BackendSupervisor::swap`]): the new backend
//! is started first; the old one's rings are stopped (GET_VRING_BASE) and its last
//! requests awaited, or, when it is stuck, it is fenced (containment.rs); then the
//! device is handed over and the old one stopped.

use std::path::PathBuf;
use std::time::Instant;

use plexvm_protocol::api::BackendState;
use plexvm_protocol::spec::BackendSource;

use super::containment::Loss;
use super::{lock, Supervisor, SupervisorError};
use crate::backend;
use crate::error_chain;

impl Supervisor {
    /// A swap of device `index` to `source`.
    pub(super) fn swap(
        &mut self,
        index: usize,
        source: BackendSource,
    ) -> Result<(), SupervisorError> {
        let dev = &mut self.devices[index];
        if dev.state.is_retired() {
            return Err(SupervisorError::Stopped);
        }
        let socket = backend::spawn_socket(&self.runtime_dir, &dev.id, dev.spawns);
        dev.spawns += 1;
        if lock(&dev.transport).is_attached() {
            self.hand_over(index, source, socket)
        } else {
            self.swap_down(index, source, socket)
        }
    }

    /// A swap of a device that is down: the new source becomes the one to (re)start, and
    /// is started right now.
    fn swap_down(
        &mut self,
        index: usize,
        source: BackendSource,
        socket: PathBuf,
    ) -> Result<(), SupervisorError> {
        let dev = &mut self.devices[index];
        dev.source = source;
        dev.exec_socket = socket;
        dev.streak = 0;
        dev.retry_at = None;
        self.restart(index);
        let dev = &self.devices[index];
        match dev.state.get() {
            BackendState::Up => Ok(()),
            _ => Err(SupervisorError::Refused {
                device: dev.id.clone(),
                reason: lock(&dev.health).last_exit.clone().unwrap_or_default(),
            }),
        }
    }

    /// A swap of a device that is up: start the new backend, quiesce the old one, hand
    /// the device over, stop the old one.
    fn hand_over(
        &mut self,
        index: usize,
        source: BackendSource,
        socket: PathBuf,
    ) -> Result<(), SupervisorError> {
        let id = self.devices[index].id.clone();
        let refused = |reason: String| SupervisorError::Refused {
            device: id.clone(),
            reason,
        };
        let stalled = self.devices[index].state.get() == BackendState::Stalled;
        if stalled
            && lock(&self.devices[index].transport)
                .info()
                .backend_pid
                .is_none()
        {
            return Err(refused(
                "the backend is stalled and the core cannot kill a `socket` backend: it is not replaced while it may still complete requests (it is waited for)".into(),
            ));
        }
        let (backend, frontend) = self.bring_up(index, &source, &socket).map_err(refused)?;
        // Not watched while it is stopped on purpose: that is no crash.
        self.unwatch(index);
        let transport = self.devices[index].transport.clone();
        let mut t = lock(&transport);
        let drained = !stalled && t.broken().is_none() && t.quiesce();
        let broken = t.broken();
        let stuck = stalled || broken.is_some();
        let mut old = t.detach();
        if stuck {
            // The old backend may still hold the rings: it must be dead before the new
            // one gets them (containment.rs, fencing rule).
            drop(t);
            self.devices[index].missed = None;
            let why = broken.unwrap_or_else(|| "was stalled".into());
            if let Some(stuck) = old.take() {
                match self.fence(index, stuck, &why) {
                    Ok(text) => tracing::warn!("device {id}: swapping away: {text}"),
                    Err(text) => {
                        drop(backend);
                        let reason = format!("{text}; a backend that may still complete requests is not replaced (the core cannot kill a `socket` backend)");
                        self.lose(index, Loss::Gone);
                        return Err(refused(reason));
                    }
                }
            }
            t = lock(&transport);
        }
        let result = t.attach(frontend).map(|known| {
            t.install_backend(backend);
            drained || known
        });
        drop(t);
        // The old backend is stopped only now, outside the device lock.
        drop(old);
        let dev = &mut self.devices[index];
        match result {
            Ok(known) => {
                dev.source = source;
                dev.exec_socket = socket;
                dev.streak = 0;
                dev.up_since = Some(Instant::now());
                lock(&dev.health).inflight_state_known = known;
                self.watch(index);
                let pid = lock(&self.devices[index].transport).info().backend_pid;
                let pid = pid.map_or_else(|| "attached".to_string(), |p| format!("pid {p}"));
                tracing::info!("device {id}: backend swapped ({pid})");
                Ok(())
            }
            Err(e) => {
                // Both are gone now; the old source is restarted as after a crash.
                let reason = format!("the new backend failed to take over: {}", error_chain(&e));
                dev.up_since = None;
                {
                    let mut h = lock(&dev.health);
                    h.last_exit = Some(reason.clone());
                    h.down_since = Some(Instant::now());
                }
                let plan = self.schedule(index);
                tracing::warn!("device {id}: {reason}; {plan}");
                Err(refused(reason))
            }
        }
    }
}
