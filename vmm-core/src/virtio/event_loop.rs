//! The core's event thread (DESIGN.md: "one event-manager thread for sockets/eventfds").
//!
//! [`EventLoop`] runs an `event_manager::EventManager` on its own thread; subscribers are
//! added from any thread through its remote endpoint. [`DeviceEventHandler`] is the
//! subscriber of one virtio device: backend call eventfd → InterruptStatus bit 0 + irqfd,
//! backend error eventfd → one log line. The eventfds belong to the core and outlive any
//! one backend, so the handler stays registered across restarts and swaps; noticing a
//! backend that goes away is the supervisor's job ([`crate::supervisor`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId,
};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::InterruptLine;
use super::registers::INT_VRING;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The event manager could not be created or reached.
    #[error("event loop failure")]
    Manager(#[source] event_manager::Error),
    /// The thread could not be started.
    #[error("cannot start the event thread")]
    Thread(#[source] std::io::Error),
}

impl From<event_manager::Error> for EventLoopError {
    fn from(e: event_manager::Error) -> Self {
        EventLoopError::Manager(e)
    }
}

/// What the event loop holds: any subscriber that can move to its thread.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The event thread. Dropping it (or [`EventLoop::stop`]) stops and joins the thread.
pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the event thread with no subscribers.
    pub fn start() -> Result<Self, EventLoopError> {
        let manager = EventManager::<Subscriber>::new()?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("plexvm-events".into())
            .spawn(move || run(manager, &flag))
            .map_err(EventLoopError::Thread)?;
        Ok(EventLoop {
            endpoint,
            stop,
            thread: Some(thread),
        })
    }

    /// Adds a subscriber; its `init` runs on the event thread before this returns.
    pub fn add(
        &self,
        subscriber: impl MutEventSubscriber + Send + 'static,
    ) -> Result<SubscriberId, EventLoopError> {
        self.endpoint.call_blocking(move |ops| {
            Ok::<_, EventLoopError>(ops.add_subscriber(Box::new(subscriber)))
        })
    }

    /// Removes a subscriber and drops it (closing the fds it owns).
    pub fn remove(&self, id: SubscriberId) -> Result<(), EventLoopError> {
        self.endpoint
            .call_blocking(move |ops| ops.remove_subscriber(id).map(drop).map_err(Into::into))
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the event thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(mut manager: EventManager<Subscriber>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            tracing::error!("event loop stopped: {e}");
            return;
        }
    }
}

// Event tokens: the kind in the high 16 bits, the queue index in the low 16.
const CALL: u32 = 0;
const ERR: u32 = 1 << 16;

/// The event-loop subscriber of one virtio device (see the module docs).
#[derive(Debug)]
pub struct DeviceEventHandler {
    device: String,
    calls: Vec<EventFd>,
    errs: Vec<EventFd>,
    interrupt: Arc<InterruptLine>,
    err_reported: bool,
}

impl DeviceEventHandler {
    /// A handler for device `device`: `calls` and `errs` are the backend's per-queue call
    /// and error eventfds.
    pub fn new(
        device: String,
        calls: Vec<EventFd>,
        errs: Vec<EventFd>,
        interrupt: Arc<InterruptLine>,
    ) -> Self {
        DeviceEventHandler {
            device,
            calls,
            errs,
            interrupt,
            err_reported: false,
        }
    }

    fn add(&self, ops: &mut EventOps, fd: i32, token: u32, events: EventSet) {
        if let Err(e) = ops.add(Events::with_data_raw(fd, token, events)) {
            tracing::error!("device {}: cannot watch an fd: {e}", self.device);
        }
    }

    fn on_call(&self, queue: usize) {
        if let Some(call) = self.calls.get(queue) {
            // Non-blocking: a spurious wake-up reads EAGAIN and still raises nothing new.
            if call.read().is_ok() {
                self.interrupt.signal(INT_VRING);
            }
        }
    }

    fn on_err(&mut self, queue: usize) {
        if let Some(err) = self.errs.get(queue) {
            let _ = err.read();
            if !self.err_reported {
                self.err_reported = true;
                tracing::warn!(
                    "device {}: the backend reported an error on queue {queue} (further ones are not logged)",
                    self.device
                );
            }
        }
    }
}

impl MutEventSubscriber for DeviceEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, fd) in self.calls.iter().enumerate() {
            self.add(ops, fd.as_raw_fd(), CALL | i as u32, EventSet::IN);
        }
        for (i, fd) in self.errs.iter().enumerate() {
            self.add(ops, fd.as_raw_fd(), ERR | i as u32, EventSet::IN);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        let queue = (token & 0xffff) as usize;
        match token & !0xffff {
            CALL => self.on_call(queue),
            ERR => self.on_err(queue),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A subscriber that forwards every event on one eventfd to a channel.
    struct Probe(EventFd, mpsc::Sender<u64>);

    impl MutEventSubscriber for Probe {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.1.send(self.0.read().unwrap());
        }
    }

    #[test]
    fn subscribers_added_while_running_get_events_and_stop_joins() {
        let el = EventLoop::start().unwrap();
        let (tx, rx) = mpsc::channel();
        let evt = EventFd::new(0).unwrap();
        el.add(Probe(evt.try_clone().unwrap(), tx)).unwrap();
        evt.write(5).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 5);
        el.stop();
        // The subscriber (and its sender) went with the thread.
        assert!(rx.recv().is_err());
    }

    fn device_handler() -> (DeviceEventHandler, EventFd, Arc<AtomicU32>) {
        let call = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let err = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(InterruptLine::new().unwrap());
        let status = interrupt.status();
        let h = DeviceEventHandler::new(
            "d0".into(),
            vec![call.try_clone().unwrap()],
            vec![err],
            interrupt,
        );
        (h, call, status)
    }

    #[test]
    fn call_sets_interrupt_status_and_fires_the_irqfd() {
        let (h, call, status) = device_handler();
        let irq = h.interrupt.clone();
        let el = EventLoop::start().unwrap();
        el.add(h).unwrap();
        call.write(1).unwrap();
        // Blocking read of a non-blocking eventfd: poll it.
        let mut fds = [libc::pollfd {
            fd: irq.irq_eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) };
        assert_eq!(n, 1);
        assert_eq!(irq.irq_eventfd().read().unwrap(), 1);
        assert_eq!(status.load(Ordering::Acquire) & INT_VRING, INT_VRING);
    }
}
