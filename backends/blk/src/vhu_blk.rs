//! The vhost-user side of the device: features, config space and the queue workers.
//!
//! One [`VhostUserBlk`] exists per frontend connection (vhost-user-backend's handler
//! refuses a second SET_OWNER, rust-vmm/vhost#321); the [`BlockDevice`] behind it lives
//! as long as the process. Each queue gets its own worker thread (`queues_per_thread`
//! holds one bit per thread).
//!
//! In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) is offered: the two
//! messages are answered by the kit's interposer hook through this type's
//! [`InflightHandler`] implementation, each popped head is marked in the region before
//! `BlockDevice::process` and cleared after `add_used`, and the first time a queue runs
//! after SET_INFLIGHT_FD the heads a dead predecessor left in flight are resubmitted in
//! the order they were fetched. GET_VRING_BASE waits for the request a worker is
//! executing ([`VhostUserBackend::stop_vring`]), so the base it returns has nothing in
//! flight behind it.
//!
//! After draining its ring a worker may watch it for a short, adaptive while before it
//! turns notifications back on and sleeps ([`crate::poll`], `--poll-us`). Long requests
//! (O_DIRECT or large) may go to a thread pool so that they overlap
//! ([`crate::io_pool`], `--io-threads`); they complete out of order, each marked in
//! flight until it is in the used ring, and GET_VRING_BASE waits for them too.

use plexvm_backend_support::interposer::{InflightGeometry, InflightHandler};
use plexvm_backend_support::server::DaemonBackend;
use plexvm_backend_support::{guest_warn, host_warn, WorkerExitEvents};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::disk::SECTOR_SIZE;
use crate::inflight::InflightRegion;
use crate::io_pool::{BlockedTime, InPool, IoPool, Stopwatch, WORTH_A_THREAD};
use crate::poll::{self, AvailRing, PollOutcome, QueuePoll};
use crate::request::{BlockDevice, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};

/// Guest memory as the vring workers see it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Length of the config space this device fills (`struct virtio_blk_config` up to and
/// including `write_zeroes_may_unmap` and its padding, virtio 1.2, 5.2.4).
pub const CONFIG_SPACE_LEN: usize = 60;

/// Largest config space read answered (VHOST_USER_CONFIG_SIZE in the vhost-user spec).
const MAX_CONFIG_READ: u32 = 256;

/// Discard granularity advertised to the guest, in sectors (4 KiB: a file-system block,
/// so punched holes free whole blocks).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Requests at least this long (data bytes), or any with O_DIRECT, may go to the I/O
/// pool; shorter ones cost less than waking a pool thread.
pub const POOL_MIN_BYTES: u64 = 64 * 1024;

/// Errors creating the per-connection backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// The eventfd that stops a queue worker cannot be created.
    #[error("cannot create a worker exit eventfd")]
    ExitEvent(#[source] io::Error),
}

/// How the queue workers serve their rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Longest busy-poll of a drained ring (zero: never poll).
    pub poll_max: Duration,
    /// Most threads that execute long requests side by side, started as needed (zero:
    /// none, every request is executed by its queue's worker).
    pub io_threads: u16,
    /// Average execution time from which long requests go to the threads
    /// ([`crate::io_pool::WORTH_A_THREAD`] by default; zero: whenever they can overlap).
    pub offload_after: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            poll_max: Duration::ZERO,
            io_threads: 0,
            offload_after: WORTH_A_THREAD,
        }
    }
}

/// Queue geometry of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Number of queues.
    pub queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
}

/// The `VhostUserBackend` of one connection.
#[derive(Debug)]
pub struct VhostUserBlk {
    device: Arc<BlockDevice>,
    layout: QueueLayout,
    mem: GuestMemory,
    ring_errors: Arc<AtomicU64>,
    exit_events: WorkerExitEvents,
    inflight: RwLock<Option<Arc<InflightRegion>>>,
    /// Per queue: resubmit from the in-flight region before the next pop.
    recover: Vec<AtomicBool>,
    /// Per queue: held while its worker moves requests (GET_VRING_BASE waits on it).
    busy: Vec<Mutex<()>>,
    /// Per queue: the busy-poll window and what it learnt (only its worker uses it).
    poll: Vec<Mutex<QueuePoll>>,
    /// Per queue: held while a request is put in the used ring (the worker and pool
    /// threads both do that; the in-flight region's used-ring protocol needs one at a
    /// time).
    used_lock: Vec<Arc<Mutex<()>>>,
    /// Per queue: requests in the pool.
    in_pool: Vec<Arc<InPool>>,
    /// Per queue: how long its long requests took to execute lately (ns, see
    /// [`crate::io_pool::BlockedTime`]).
    blocked_time: Vec<Arc<BlockedTime>>,
    /// Threads for long requests; dropped (joined) after the daemon's workers.
    pool: Option<IoPool>,
}

/// Everything putting a request in a queue's used ring needs, owned, so a pool thread
/// can do it.
#[derive(Clone)]
struct UsedRing {
    queue: u16,
    vring: VringRwLock<GuestMemory>,
    region: Option<Arc<InflightRegion>>,
    lock: Arc<Mutex<()>>,
    errors: Arc<AtomicU64>,
}

impl UsedRing {
    /// Puts `head` in the used ring, keeping the in-flight region in step; false when
    /// the used ring cannot be written.
    fn complete(&self, head: u16, len: u32) -> bool {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = &self.region {
            r.prepare_used(self.queue, head);
        }
        if let Err(e) = self.vring.add_used(head, len) {
            // A used ring outside guest memory: the guest's fault, so rate-limited.
            let count = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
            guest_warn!(count = count; "cannot put used element {head}: {e}");
            return false;
        }
        if let Some(r) = &self.region {
            let next_used = self.vring.get_ref().get_queue().next_used();
            r.commit_used(self.queue, head, next_used);
        }
        true
    }

    /// Signals the driver if it wants to hear of the used elements added so far.
    fn notify(&self) {
        match self.vring.needs_notification() {
            Ok(true) => {
                if let Err(e) = self.vring.signal_used_queue() {
                    guest_warn!("cannot signal used queue: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => guest_warn!("cannot read used_event: {e}"),
        }
    }
}

/// Marks a pool request as gone from the pool however its job ends.
struct LeavePool(Arc<InPool>);

impl Drop for LeavePool {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// What one pass over a queue's avail ring did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Drained {
    /// Requests put in the used ring.
    served: usize,
    /// The used ring could not be written: serving more is pointless.
    stalled: bool,
}

/// The avail ring of a vring, as the poll loop looks at it.
struct VringAvail<'a> {
    vring: &'a VringRwLock<GuestMemory>,
    mem: &'a GuestMemoryMmap,
}

impl AvailRing for VringAvail<'_> {
    fn has_work(&self) -> Option<bool> {
        let state = self.vring.get_ref();
        let queue = state.get_queue();
        // GET_VRING_BASE makes the queue not ready: stop looking, the ring is handed over.
        if !queue.ready() {
            return None;
        }
        queue
            .avail_idx(self.mem, std::sync::atomic::Ordering::Acquire)
            .ok()
            .map(|idx| idx.0 != queue.next_avail())
    }
}

impl VhostUserBlk {
    /// Creates the backend for one connection, with empty guest memory; each queue
    /// worker busy-polls its ring for at most `poll_max` after draining it (zero: never).
    pub fn new(
        device: Arc<BlockDevice>,
        layout: QueueLayout,
        options: WorkerOptions,
    ) -> Result<Self, VhostUserBlkError> {
        let exit_events = WorkerExitEvents::new(usize::from(layout.queues))
            .map_err(VhostUserBlkError::ExitEvent)?;
        let pool = match options.io_threads {
            0 => None,
            n => Some(IoPool::new(n)),
        };
        let per_queue = || 0..layout.queues;
        Ok(VhostUserBlk {
            device,
            layout,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            ring_errors: Arc::new(AtomicU64::new(0)),
            exit_events,
            inflight: RwLock::new(None),
            recover: per_queue().map(|_| AtomicBool::new(false)).collect(),
            busy: per_queue().map(|_| Mutex::new(())).collect(),
            poll: per_queue()
                .map(|_| Mutex::new(QueuePoll::new(options.poll_max)))
                .collect(),
            used_lock: per_queue().map(|_| Arc::default()).collect(),
            in_pool: per_queue().map(|_| Arc::default()).collect(),
            blocked_time: per_queue()
                .map(|_| Arc::new(BlockedTime::new(options.offload_after)))
                .collect(),
            pool,
        })
    }

    fn region(&self) -> Option<Arc<InflightRegion>> {
        self.inflight
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves every available request of queue `queue` (`vring`), then notifies the
    /// driver if it wants.
    fn process_queue(&self, queue: u16, vring: &VringRwLock<GuestMemory>) -> Drained {
        let mut drained = Drained {
            served: 0,
            stalled: false,
        };
        let Some(busy) = self.busy.get(usize::from(queue)) else {
            drained.stalled = true;
            return drained;
        };
        let _busy = busy.lock().unwrap_or_else(PoisonError::into_inner);
        let mem = self.mem.memory();
        let used = self.used_ring(queue, vring);
        if let Some(r) = &used.region {
            if self.recover[usize::from(queue)].swap(false, Ordering::AcqRel) {
                drained.served = self.resubmit(&used, r, &mem);
            }
        }
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if let Some(r) = &used.region {
                r.set_inflight(queue, head);
            }
            let completion = if self.pool.is_some() {
                let descriptors: Vec<Descriptor> = chain.collect();
                if !self.is_long(&descriptors) {
                    self.device.process(&mem, descriptors)
                } else {
                    match self.offload(&used, &mem, head, descriptors) {
                        Ok(()) => {
                            drained.served += 1;
                            continue;
                        }
                        Err(descriptors) => {
                            let blocked = &self.blocked_time[usize::from(queue)];
                            let watch = blocked.sample_next().then(Stopwatch::start);
                            let completion = self.device.process(&mem, descriptors);
                            if let Some(watch) = watch {
                                blocked.record(watch.blocked());
                            }
                            completion
                        }
                    }
                }
            } else {
                self.device.process(&mem, chain)
            };
            if !used.complete(head, completion.used_len) {
                drained.stalled = true;
                break;
            }
            drained.served += 1;
        }
        if drained.served > 0 {
            used.notify();
        }
        drained
    }

    fn used_ring(&self, queue: u16, vring: &VringRwLock<GuestMemory>) -> UsedRing {
        UsedRing {
            queue,
            vring: vring.clone(),
            region: self.region(),
            lock: self.used_lock[usize::from(queue)].clone(),
            errors: self.ring_errors.clone(),
        }
    }

    /// Whether a request may go to the pool: O_DIRECT, or at least [`POOL_MIN_BYTES`].
    fn is_long(&self, descriptors: &[Descriptor]) -> bool {
        let bytes: u64 = descriptors.iter().map(|d| u64::from(d.len())).sum();
        self.device.disk().is_direct() || bytes >= POOL_MIN_BYTES
    }

    /// Hands the long request `head` to the I/O pool when such requests lately took
    /// long enough to be worth a thread wake-up ([`BlockedTime::worth_a_thread`]: from
    /// the page cache they do not, from a disk they do) and something can overlap with
    /// it (another request is in the pool or waits in the ring); gives the descriptors
    /// back otherwise.
    fn offload(
        &self,
        used: &UsedRing,
        mem: &GuestMemoryMmap,
        head: u16,
        descriptors: Vec<Descriptor>,
    ) -> Result<(), Vec<Descriptor>> {
        let Some(pool) = &self.pool else {
            return Err(descriptors);
        };
        let in_pool = &self.in_pool[usize::from(used.queue)];
        let blocked_time = &self.blocked_time[usize::from(used.queue)];
        let overlaps = || {
            in_pool.count() > 0
                || VringAvail {
                    vring: &used.vring,
                    mem,
                }
                .has_work()
                    == Some(true)
        };
        if !blocked_time.worth_a_thread() || !overlaps() {
            return Err(descriptors);
        }
        let (device, used_ring, mem) = (self.device.clone(), used.clone(), self.mem.memory());
        let blocked_time = blocked_time.clone();
        in_pool.enter();
        let leave = LeavePool(in_pool.clone());
        let job = Box::new(move || {
            let _leave = leave;
            let watch = Stopwatch::start();
            let completion = device.process(&mem, descriptors.iter().copied());
            blocked_time.record(watch.blocked());
            if used_ring.complete(head, completion.used_len) {
                used_ring.notify();
            }
        });
        // A pool without threads (cannot happen while `self` lives) runs it here.
        pool.submit(job).or_else(|job| {
            job();
            Ok(())
        })
    }

    /// Executes again, in fetch order, the requests a previous backend took from the
    /// avail ring of `queue` and never completed, and moves the ring's next index past
    /// them (vhost-user spec, "Inflight I/O tracking", "When reconnecting").
    fn resubmit(&self, ring: &UsedRing, region: &InflightRegion, mem: &GuestMemoryMmap) -> usize {
        let (queue, vring) = (ring.queue, &ring.vring);
        let Ok(used) = vring.queue_used_idx() else {
            return 0;
        };
        let heads = region.recover(queue, used);
        vring.set_queue_next_avail(used.wrapping_add(heads.len() as u16));
        vring.set_queue_next_used(used);
        if !heads.is_empty() {
            tracing::info!(
                queue,
                count = heads.len(),
                "resubmitting in-flight requests"
            );
        }
        let (table, size) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (GuestAddress(q.desc_table()), q.size())
        };
        let mut served = 0;
        for head in heads {
            let descriptors = crate::chain::descriptors(mem, table, size, head);
            let completion = self.device.process(mem, descriptors);
            if !ring.complete(head, completion.used_len) {
                break;
            }
            served += 1;
        }
        served
    }

    /// Serves `queue` until its ring stays empty with notifications on; returns how the
    /// last busy-poll (of at most `window`) ended, if one ran.
    ///
    /// Notification suppression (virtio 1.2, 2.7.10 with EVENT_IDX, 2.7.7.1 flags
    /// without): with notifications off, drain, then watch the ring for up to `window`;
    /// turn them back on and drain again if the driver added buffers before it saw that.
    fn serve(
        &self,
        queue: u16,
        vring: &VringRwLock<GuestMemory>,
        state: &mut QueuePoll,
    ) -> Option<PollOutcome> {
        let window = state.window.current();
        let mut outcome = None;
        let mut empty_passes = 0;
        loop {
            if let Err(e) = vring.disable_notification() {
                guest_warn!("cannot disable queue notifications: {e}");
            }
            let drained = self.process_queue(queue, vring);
            empty_passes = if drained.served == 0 {
                empty_passes + 1
            } else {
                0
            };
            // The avail index says there is work, yet nothing can be taken twice in a
            // row (the queue was stopped, or the guest moved its avail index too far,
            // or its used ring is unwritable): wait for a kick rather than spin.
            if drained.stalled || empty_passes > 1 {
                Self::enable_notification(vring);
                return outcome;
            }
            if drained.served > 0 && !window.is_zero() {
                let mem = self.mem.memory();
                let ring = VringAvail { vring, mem: &mem };
                let polled = poll::poll(&ring, window, |now| state.load.has_spare_cpu(now));
                outcome = Some(polled);
                if polled == PollOutcome::Work {
                    continue;
                }
            }
            if !Self::enable_notification(vring) {
                return outcome;
            }
        }
    }

    /// Turns notifications back on; true when the driver made buffers available before
    /// it could see that (the re-check virtio 1.2, 2.7.10 requires).
    fn enable_notification(vring: &VringRwLock<GuestMemory>) -> bool {
        match vring.enable_notification() {
            Ok(more) => more,
            Err(e) => {
                guest_warn!("cannot enable queue notifications: {e}");
                false
            }
        }
    }

    /// The `struct virtio_blk_config` bytes (little-endian, virtio 1.2, 5.2.4).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut cfg = [0u8; CONFIG_SPACE_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            cfg[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &self.device.disk().capacity_sectors().to_le_bytes());
        // seg_max: header and status take one descriptor each.
        put(
            12,
            &u32::from(self.layout.queue_size.saturating_sub(2).max(1)).to_le_bytes(),
        );
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &self.layout.queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        cfg
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemory>;

    fn num_queues(&self) -> usize {
        usize::from(self.layout.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.layout.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.layout.queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.device.disk().is_read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE has made the queue not ready, so its worker pops nothing more;
        // wait for the request it may be executing, and those in the pool, to reach the
        // used ring.
        if let Some(busy) = self.busy.get(queue_index as usize) {
            drop(busy.lock().unwrap_or_else(PoisonError::into_inner));
        }
        if let Some(in_pool) = self.in_pool.get(queue_index as usize) {
            in_pool.wait_idle();
        }
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on every vring too, and the queue's own notification
        // calls follow it; the worker loop is the same either way.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The reply must be exactly `size` bytes; what lies beyond our fields reads 0.
        // vhost already bounds offset + size by the 256-byte vhost-user config limit;
        // bound the allocation here too rather than trust every caller.
        let mut out = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        let cfg = self.config_space();
        if let Some(tail) = cfg.get(offset as usize..) {
            let count = tail.len().min(out.len());
            out[..count].copy_from_slice(&tail[..count]);
        }
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "config space is read-only",
        ))
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // The handler updates the atomic we handed it in `memory()`, which is ours.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per queue: entry i is the bitmask of thread i's queues.
        (0..self.layout.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.take(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the worker thread for good, so nothing the guest can
        // cause is returned as one.
        if evset != EventSet::IN {
            guest_warn!("unexpected event set {evset:?} on queue event {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            guest_warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        // One worker per queue (`queues_per_thread`): the thread index is the queue's.
        let queue = thread_id as u16;
        let Some(state) = self.poll.get(usize::from(queue)) else {
            return Ok(());
        };
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        state.woke(Instant::now());
        let outcome = self.serve(queue, vring, &mut state);
        if outcome == Some(PollOutcome::Preempted) {
            state.window.after_preemption();
        }
        state.sleeping(Instant::now(), outcome);
        Ok(())
    }
}

impl DaemonBackend for VhostUserBlk {
    /// The vrings and this backend share it.
    fn memory(&self) -> GuestMemory {
        self.mem.clone()
    }

    fn exit_events(&self) -> &WorkerExitEvents {
        &self.exit_events
    }
}

impl InflightHandler for VhostUserBlk {
    fn get_inflight_fd(&self, num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        let (region, file, size) =
            InflightRegion::create(num_queues, queue_size).map_err(io::Error::other)?;
        self.install(region);
        Ok((file, size))
    }

    fn set_inflight_fd(&self, file: File, g: InflightGeometry) -> io::Result<()> {
        let region = InflightRegion::open(
            &file,
            g.mmap_offset,
            g.mmap_size,
            g.num_queues,
            g.queue_size,
        )
        .map_err(io::Error::other)?;
        self.install(region);
        Ok(())
    }
}

impl VhostUserBlk {
    /// Uses `region` from now on; every queue checks it for requests to resubmit before
    /// it pops the next one.
    fn install(&self, region: InflightRegion) {
        if region.queues() < self.layout.queues {
            host_warn!(
                "the in-flight region covers {} of {} queues",
                region.queues(),
                self.layout.queues
            );
        }
        *self
            .inflight
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(region));
        for flag in &self.recover {
            flag.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Disk, DiskOptions};

    fn backend(queues: u16, readonly: bool) -> VhostUserBlk {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(1 << 20).unwrap();
        let disk = Disk::open(
            image.path(),
            DiskOptions {
                readonly,
                direct: false,
            },
        )
        .unwrap();
        let device = Arc::new(BlockDevice::new(disk, [0; 20]));
        VhostUserBlk::new(
            device,
            QueueLayout {
                queues,
                queue_size: 128,
            },
            WorkerOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn features_follow_options() {
        let single = backend(1, false).features();
        assert_ne!(single & 1 << VIRTIO_F_VERSION_1, 0);
        assert_ne!(single & 1 << VIRTIO_RING_F_EVENT_IDX, 0);
        assert_ne!(
            single & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert_eq!(single & 1 << VIRTIO_BLK_F_MQ, 0);
        assert_eq!(single & 1 << VIRTIO_BLK_F_RO, 0);
        let multi_ro = backend(4, true).features();
        assert_ne!(multi_ro & 1 << VIRTIO_BLK_F_MQ, 0);
        assert_ne!(multi_ro & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn config_space_fields() {
        let b = backend(4, false);
        let cfg = b.get_config(0, CONFIG_SPACE_LEN as u32);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(cfg[40..44].try_into().unwrap()),
            MAX_DISCARD_SEGMENTS
        );
        assert_eq!(cfg[56], 1);
        // Partial and out-of-range reads have the requested size.
        assert_eq!(b.get_config(34, 2), vec![4, 0]);
        assert_eq!(b.get_config(56, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(200, 4), vec![0; 4]);
    }

    #[test]
    fn one_thread_per_queue() {
        assert_eq!(backend(3, false).queues_per_thread(), vec![1, 2, 4]);
    }

    #[test]
    fn exit_events_are_handed_out_once() {
        let b = backend(2, false);
        assert!(b.exit_event(0).is_some());
        assert!(b.exit_event(0).is_none());
        assert!(b.exit_event(1).is_some());
        assert!(b.exit_event(2).is_none());
    }
}
