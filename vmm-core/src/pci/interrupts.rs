//! A virtio-pci function's interrupts: its MSI-X table, the vector of each queue and of
//! configuration changes, and where each queue's call eventfd goes.
//!
//! A queue whose vector is deliverable (MSI-X on, function and entry unmasked) has its
//! backend's call eventfd registered as a KVM irqfd on the vector's GSI: a completion
//! goes backend → KVM → guest and the core is not on the path. Any other queue's call
//! eventfd is watched by the core's event thread ([`PciEventHandler`]), which sets the
//! vector's pending bit while it is masked and sends it when it is unmasked (PCI 3.0,
//! 6.8.3.5). The call eventfds belong to the core and a reconnected or swapped backend
//! gets the same ones (SET_VRING_CALL), so the irqfds stay valid across reconnects.
//!
//! Moving a queue off KVM unregisters the irqfd first and only then lets the event
//! thread watch the eventfd; moving it to KVM registers the irqfd first: a signal in
//! between is seen by one of the two (KVM injects an irqfd already signalled when it is
//! assigned), and at worst delivered twice, which virtio drivers tolerate.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::msix::{MsiError, MsiRouter, MsixTable};
use crate::virtio::registers::{INT_CONFIG, INT_VRING};

/// "No vector" (virtio 1.2 spec, 4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;

/// What the vCPU threads and the event thread share.
#[derive(Debug)]
pub struct VectorState {
    /// The table and PBA.
    pub table: MsixTable,
    /// config_msix_vector.
    pub config_vector: u16,
    /// queue_msix_vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// The GSI each queue's call eventfd is a KVM irqfd on now, if it is one.
    routed: Vec<Option<u32>>,
}

/// The interrupts of one function.
#[derive(Debug)]
pub struct PciInterrupts {
    device: String,
    state: Mutex<VectorState>,
    router: Arc<MsiRouter>,
    gsis: Vec<u32>,
    calls: Vec<EventFd>,
    isr: Arc<AtomicU32>,
    reroute: EventFd,
}

impl PciInterrupts {
    /// Interrupts for `queues` queues (one vector each, plus one for configuration
    /// changes); `calls` are the queues' call eventfds, `isr` the ISR status bits.
    pub fn new(
        device: &str,
        router: Arc<MsiRouter>,
        calls: Vec<EventFd>,
        isr: Arc<AtomicU32>,
    ) -> Result<Self, MsiError> {
        let queues = calls.len();
        let vectors = queues + 1;
        let gsis = (0..vectors)
            .map(|_| router.allocate_gsi())
            .collect::<Result<Vec<_>, _>>()?;
        let reroute = EventFd::new(EFD_NONBLOCK).map_err(|e| MsiError::Kvm {
            what: "eventfd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        Ok(PciInterrupts {
            device: device.to_string(),
            state: Mutex::new(VectorState {
                table: MsixTable::new(vectors),
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
                routed: vec![None; queues],
            }),
            router,
            gsis,
            calls,
            isr,
            reroute,
        })
    }

    /// The VM the irqfds are registered with.
    pub fn vm(&self) -> Arc<kvm_ioctls::VmFd> {
        self.router.vm().clone()
    }

    /// The shared state, locked.
    pub fn lock(&self) -> MutexGuard<'_, VectorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Vector `v`'s message changed: commit its route.
    pub fn message_changed(&self, state: &VectorState, v: usize) {
        if let (Some(e), Some(&gsi)) = (state.table.entry(v), self.gsis.get(v)) {
            if let Err(e) = self.router.set_route(gsi, e.message()) {
                tracing::error!("device {}: cannot route MSI-X vector {v}: {e}", self.device);
            }
        }
    }

    /// Sends vector `v` now, or marks it pending while it is masked. Without MSI-X there
    /// is no INTx pin to raise: only the ISR bit tells (drivers that poll see it). The
    /// configuration bit is set in any case, the queue bit only without MSI-X (4.1.4.5).
    pub fn deliver(&self, state: &mut VectorState, v: u16, isr_bit: u32) {
        if isr_bit == INT_CONFIG || !state.table.enabled {
            self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        }
        let v = usize::from(v);
        if !state.table.enabled || v >= state.table.len() {
            return;
        }
        if state.table.is_masked(v) {
            return state.table.set_pending(v);
        }
        if let Some(e) = state.table.entry(v) {
            if let Err(e) = self.router.signal(e.message()) {
                tracing::error!("device {}: cannot send MSI-X vector {v}: {e}", self.device);
            }
        }
    }

    /// Sends the pending bits of `vectors`, which just became deliverable.
    pub fn send_pending(&self, state: &mut VectorState, vectors: &[usize]) {
        for &v in vectors {
            if state.table.take_pending(v) {
                self.deliver(state, v as u16, 0);
            }
        }
    }

    /// Puts each queue's call eventfd where its vector says (see the module docs).
    pub fn reroute(&self, state: &mut VectorState) {
        let mut changed = false;
        for q in 0..state.queue_vectors.len() {
            let v = usize::from(state.queue_vectors[q]);
            let deliverable = v < state.table.len() && !state.table.is_masked(v);
            let want = if deliverable {
                self.gsis.get(v).copied()
            } else {
                None
            };
            let Some(call) = self.calls.get(q) else {
                continue;
            };
            if want == state.routed[q] {
                continue;
            }
            if let Some(old) = state.routed[q].take() {
                self.unregister(call, old, q);
            }
            if let Some(gsi) = want {
                match self.router.vm().register_irqfd(call, gsi) {
                    Ok(()) => state.routed[q] = Some(gsi),
                    Err(e) => tracing::error!(
                        "device {}: queue {q} stays on the core's event thread, irqfd refused: {e}",
                        self.device
                    ),
                }
            }
            changed = true;
        }
        if changed {
            // EAGAIN means a reroute is already pending: the handler re-reads all.
            let _ = self.reroute.write(1);
        }
    }

    fn unregister(&self, call: &EventFd, gsi: u32, q: usize) {
        if let Err(e) = self.router.vm().unregister_irqfd(call, gsi) {
            tracing::error!(
                "device {}: cannot unregister the irqfd of queue {q}: {e}",
                self.device
            );
        }
    }

    /// The event-thread subscriber for this function's call, error and config eventfds.
    pub fn event_handler(
        self: &Arc<Self>,
        errs: Vec<EventFd>,
        config: EventFd,
    ) -> std::io::Result<PciEventHandler> {
        Ok(PciEventHandler {
            interrupts: self.clone(),
            calls: self
                .calls
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()?,
            watching: vec![false; self.calls.len()],
            errs,
            config,
            reroute: self.reroute.try_clone()?,
            err_reported: false,
        })
    }

    /// Which queues are KVM irqfds now (for tests and the API).
    pub fn routed_queues(&self) -> Vec<bool> {
        self.lock().routed.iter().map(Option::is_some).collect()
    }
}

impl Drop for PciInterrupts {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (call, gsi) in self.calls.iter().zip(&state.routed) {
            if let Some(gsi) = gsi {
                let _ = self.router.vm().unregister_irqfd(call, *gsi);
            }
        }
    }
}

// Event tokens: kind in the high 16 bits, queue index in the low 16.
const CALL: u32 = 0;
const ERR: u32 = 1 << 16;
const CONFIG: u32 = 2 << 16;
const REROUTE: u32 = 3 << 16;

/// The core's event-thread subscriber of one virtio-pci function: call eventfds of the
/// queues KVM does not route, error eventfds, configuration interrupts.
#[derive(Debug)]
pub struct PciEventHandler {
    interrupts: Arc<PciInterrupts>,
    calls: Vec<EventFd>,
    watching: Vec<bool>,
    errs: Vec<EventFd>,
    config: EventFd,
    reroute: EventFd,
    err_reported: bool,
}

impl PciEventHandler {
    fn watch(&self, ops: &mut EventOps, fd: &EventFd, token: u32, on: bool) {
        let events = Events::with_data_raw(fd.as_raw_fd(), token, EventSet::IN);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        if let Err(e) = result {
            tracing::error!(
                "device {}: cannot (un)watch an eventfd: {e}",
                self.interrupts.device
            );
        }
    }

    fn sync_watches(&mut self, ops: &mut EventOps) {
        let routed = self.interrupts.routed_queues();
        for (q, routed) in routed.iter().enumerate().take(self.calls.len()) {
            let want = !routed;
            if want != self.watching[q] {
                self.watch(ops, &self.calls[q], CALL | q as u32, want);
                self.watching[q] = want;
            }
        }
    }

    fn on_call(&self, q: usize) {
        if self.calls.get(q).is_some_and(|c| c.read().is_ok()) {
            let i = &self.interrupts;
            let mut state = i.lock();
            let v = state.queue_vectors[q];
            i.deliver(&mut state, v, INT_VRING);
        }
    }

    fn on_config(&self) {
        if self.config.read().is_ok()
            && self.interrupts.isr.load(Ordering::Acquire) & INT_CONFIG != 0
        {
            let i = &self.interrupts;
            let mut state = i.lock();
            let v = state.config_vector;
            i.deliver(&mut state, v, INT_CONFIG);
        }
    }

    fn on_err(&mut self, q: usize) {
        if self.errs.get(q).is_some_and(|e| e.read().is_ok()) && !self.err_reported {
            self.err_reported = true;
            tracing::warn!(
                "device {}: the backend reported an error on queue {q} (further ones are not logged)",
                self.interrupts.device
            );
        }
    }
}

impl MutEventSubscriber for PciEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (q, fd) in self.errs.iter().enumerate() {
            self.watch(ops, fd, ERR | q as u32, true);
        }
        self.watch(ops, &self.config, CONFIG, true);
        self.watch(ops, &self.reroute, REROUTE, true);
        self.sync_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        let q = (token & 0xffff) as usize;
        match token & !0xffff {
            CALL => self.on_call(q),
            ERR => self.on_err(q),
            CONFIG => self.on_config(),
            REROUTE => {
                let _ = self.reroute.read();
                self.sync_watches(ops);
            }
            _ => {}
        }
    }
}
