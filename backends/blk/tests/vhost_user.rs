//! In-process frontend ↔ backend tests: the backend's serve loop runs in a thread on a
//! temporary socket; the test drives it with `vhost::vhost_user::Frontend` over a real
//! Unix socket, with guest memory in a memfd shared with the backend, a split virtqueue
//! built in that memory, and real kick/call eventfds.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use plexvm_backend_support::guard::ServeThread;
use plexvm_backend_support::server::ServeError;
use plexvm_blk::disk::{Disk, DiskOptions};
use plexvm_blk::request::BlockDevice;
use plexvm_blk::server::{BlockServer, ServerError};
use plexvm_blk::vhu_blk::{QueueLayout, WorkerOptions};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const IMAGE_SECTORS: u64 = 2048;
const MEM_SIZE: usize = 0x10_0000;
const QUEUE_SIZE: u16 = 16;
const SERIAL: [u8; 20] = *b"vhost-user-test-disk";
/// Guard against a hung backend; not a timing assertion.
const HANG_GUARD_MS: i32 = 20_000;

fn pattern(offset: usize) -> u8 {
    ((offset / 512) * 13 + offset % 241) as u8
}

/// The backend's serve loop in a thread ([`ServeThread`]: shut down and joined on drop).
struct ServerGuard {
    serving: ServeThread<ServerError>,
    socket: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerGuard {
    fn start(queues: u16, readonly: bool) -> ServerGuard {
        ServerGuard::start_polling(queues, readonly, Duration::ZERO)
    }

    /// A server whose queue workers busy-poll for at most `poll_max`.
    fn start_polling(queues: u16, readonly: bool, poll_max: Duration) -> ServerGuard {
        ServerGuard::start_with(
            queues,
            readonly,
            WorkerOptions {
                poll_max,
                ..WorkerOptions::default()
            },
        )
    }

    /// A server whose queue workers run with `options`.
    fn start_with(queues: u16, readonly: bool, options: WorkerOptions) -> ServerGuard {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let bytes: Vec<u8> = (0..(IMAGE_SECTORS * 512) as usize).map(pattern).collect();
        File::create(&image).unwrap().write_all(&bytes).unwrap();
        let socket = dir.path().join("blk.sock");
        let disk = Disk::open(
            &image,
            DiskOptions {
                readonly,
                direct: false,
            },
        )
        .unwrap();
        let device = Arc::new(BlockDevice::new(disk, SERIAL));
        let layout = QueueLayout {
            queues,
            queue_size: 256,
        };
        // Bound before the thread starts, so connecting cannot race the listener.
        let mut server = BlockServer::bind(&socket, device, layout).unwrap();
        server.set_worker_options(options);
        ServerGuard {
            serving: ServeThread::spawn(move |shutdown| server.serve(shutdown)),
            socket,
            image,
            _dir: dir,
        }
    }

    fn connect(&self) -> Frontend {
        let stream = UnixStream::connect(&self.socket).unwrap();
        Frontend::from_stream(stream, 64)
    }

    fn stop(self) -> Result<(), ServerError> {
        self.serving.stop()
    }
}

/// Feature and protocol negotiation with REPLY_ACK, so every message is acknowledged.
fn negotiate(frontend: &mut Frontend) -> u64 {
    negotiate_without(frontend, 0)
}

/// [`negotiate`], leaving out the feature bits in `drop`.
fn negotiate_without(frontend: &mut Frontend, drop: u64) -> u64 {
    let features = frontend.get_features().unwrap() & !drop;
    let proto = frontend.get_protocol_features().unwrap();
    assert!(proto.contains(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
    ));
    frontend.set_features(features).unwrap();
    frontend.set_protocol_features(proto).unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    features
}

#[test]
fn negotiation_and_config_space() {
    let server = ServerGuard::start(4, true);
    let mut frontend = server.connect();
    let features = negotiate(&mut frontend);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_RO,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(frontend.get_queue_num().unwrap(), 4);
    frontend.set_owner().unwrap();
    let (_, cfg) = frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        IMAGE_SECTORS
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 4);
    server.stop().unwrap();
}

#[test]
fn second_set_owner_fails_but_reconnect_works() {
    let server = ServerGuard::start(1, false);
    let mut frontend = server.connect();
    negotiate(&mut frontend);
    frontend.set_owner().unwrap();
    frontend.set_owner().unwrap_err();
    drop(frontend);
    for _ in 0..3 {
        let mut frontend = server.connect();
        negotiate(&mut frontend);
        frontend.set_owner().unwrap();
        let (_, cfg) = frontend
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .unwrap();
        assert_eq!(
            u64::from_le_bytes(cfg[..8].try_into().unwrap()),
            IMAGE_SECTORS
        );
    }
    server.stop().unwrap();
}

/// Guest memory in a memfd, with one split queue at guest address 0.
struct Guest {
    mem: GuestMemoryMmap,
    host_base: u64,
    kick: EventFd,
    call: EventFd,
    call_poll: Epoll,
    used_seen: u16,
}

const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x3000;

fn memfd() -> File {
    // SAFETY: the name is a NUL-terminated literal; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"plexvm-blk-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Guest {
    fn new() -> Guest {
        let file = memfd();
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        let host_base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let call_poll = Epoll::new().unwrap();
        call_poll
            .ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        Guest {
            mem,
            host_base,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call,
            call_poll,
            used_seen: 0,
        }
    }

    /// Full device bring-up in the order QEMU uses (DESIGN.md).
    /// `add_mem_reg` picks ADD_MEM_REG (CONFIGURE_MEM_SLOTS) over SET_MEM_TABLE.
    fn attach(&self, frontend: &mut Frontend, queue: usize, add_mem_reg: bool) {
        self.attach_without(frontend, queue, add_mem_reg, 0);
    }

    /// [`Guest::attach`], leaving out the feature bits in `drop`.
    fn attach_without(&self, frontend: &mut Frontend, queue: usize, add_mem_reg: bool, drop: u64) {
        negotiate_without(frontend, drop);
        frontend.set_owner().unwrap();
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let regions = [VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()];
        if add_mem_reg {
            frontend.add_mem_region(&regions[0]).unwrap();
        } else {
            frontend.set_mem_table(&regions).unwrap();
        }
        frontend.set_vring_num(queue, QUEUE_SIZE).unwrap();
        let config = VringConfigData {
            queue_max_size: 256,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_base + DESC_TABLE,
            used_ring_addr: self.host_base + USED_RING,
            avail_ring_addr: self.host_base + AVAIL_RING,
            log_addr: None,
        };
        frontend.set_vring_addr(queue, &config).unwrap();
        frontend.set_vring_base(queue, 0).unwrap();
        frontend.set_vring_call(queue, &self.call).unwrap();
        frontend.set_vring_kick(queue, &self.kick).unwrap();
        frontend.set_vring_enable(queue, true).unwrap();
    }

    fn header(&self, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    }

    /// Posts one chain (descriptors from table index 0), kicks, and waits for its used
    /// element. Returns the element's len.
    fn submit(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        self.publish(descs);
        self.kick.write(1).unwrap();
        self.wait_used()
    }

    /// [`Guest::submit`], but kicks only when the device asks for it (`avail_event`
    /// with EVENT_IDX, else no `VRING_USED_F_NO_NOTIFY`; virtio 1.2, 2.7.10), as a real
    /// driver does: a device that leaves notifications off by mistake hangs here.
    /// Returns the element's len and whether it kicked.
    fn submit_suppressed(&mut self, descs: &[(u64, u32, bool)], event_idx: bool) -> (u32, bool) {
        let old = self.used_seen;
        self.publish(descs);
        let new = old.wrapping_add(1);
        // The device's suppression state is read after the index is published.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let kick = if event_idx {
            let avail_event: u16 = self
                .mem
                .read_obj(GuestAddress(USED_RING + 4 + 8 * u64::from(QUEUE_SIZE)))
                .unwrap();
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(USED_RING)).unwrap();
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if kick {
            self.kick.write(1).unwrap();
        }
        (self.wait_used(), kick)
    }

    /// Writes one chain (descriptors from table index 0) and makes it available.
    fn publish(&mut self, descs: &[(u64, u32, bool)]) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1));
            self.mem
                .write_obj(desc, GuestAddress(DESC_TABLE + 16 * i as u64))
                .unwrap();
        }
        // used_event (virtio 1.2, 2.7.10): ask for a notification for the next element.
        let used_event = AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem
            .write_obj(self.used_seen, GuestAddress(used_event))
            .unwrap();
        // Head 0 into the next avail slot, then publish it.
        let slot = u64::from(self.used_seen % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.used_seen.wrapping_add(1), GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    /// The used ring's element at position `pos`: (head id, length written).
    fn used_elem(&self, pos: u16) -> (u32, u32) {
        let at = USED_RING + 4 + 8 * u64::from(pos % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn wait_used(&mut self) -> u32 {
        let target = self.used_seen.wrapping_add(1);
        let mut events = [EpollEvent::default(); 1];
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if idx == target {
                break;
            }
            let ready = self.call_poll.wait(HANG_GUARD_MS, &mut events).unwrap();
            assert_eq!(ready, 1, "backend did not signal the call eventfd");
            let _ = self.call.read();
        }
        let (id, len) = self.used_elem(self.used_seen);
        assert_eq!(id, 0, "head index of the only chain");
        self.used_seen = target;
        len
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

#[test]
fn io_through_a_real_virtqueue_and_reconnect() {
    let server = ServerGuard::start(1, false);

    // Connection 1: write sector 7.
    let mut guest = Guest::new();
    let mut frontend = server.connect();
    guest.attach(&mut frontend, 0, false);
    guest.header(VIRTIO_BLK_T_OUT, 7);
    guest
        .mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    let len = guest.submit(&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
    assert_eq!((len, guest.status()), (1, 0));
    let image = std::fs::read(&server.image).unwrap();
    assert!(
        image[7 * 512..9 * 512].iter().all(|&b| b == 0xab),
        "written block is in the image"
    );
    assert_eq!(image[9 * 512], pattern(9 * 512));

    // A malformed chain (no status descriptor) completes with len 0, and the device
    // keeps working.
    guest.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(guest.submit(&[(HDR, 16, false)]), 0);
    guest.header(VIRTIO_BLK_T_GET_ID, 0);
    let len = guest.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!((len, guest.status()), (21, 0));
    let mut id = [0u8; 20];
    guest.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id, SERIAL);
    drop(frontend);

    // Connection 2, with fresh guest memory: read sector 7 back.
    let mut guest = Guest::new();
    let mut frontend = server.connect();
    guest.attach(&mut frontend, 0, false);
    guest.header(VIRTIO_BLK_T_IN, 6);
    let len = guest.submit(&[(HDR, 16, false), (DATA, 2048, true), (STATUS, 1, true)]);
    assert_eq!((len, guest.status()), (2049, 0));
    let mut data = vec![0u8; 2048];
    guest.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    let expected: Vec<u8> = (6 * 512..7 * 512).map(pattern).collect();
    assert_eq!(data[..512], expected[..]);
    assert!(data[512..1536].iter().all(|&b| b == 0xab));

    // Past the end of the disk: IOERR.
    guest.header(VIRTIO_BLK_T_IN, IMAGE_SECTORS);
    let len = guest.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!((len, guest.status()), (1, 1));
    drop(frontend);
    server.stop().unwrap();
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    File::create(&image).unwrap().set_len(4096).unwrap();
    let device = || {
        Arc::new(BlockDevice::new(
            Disk::open(&image, DiskOptions::default()).unwrap(),
            [0; 20],
        ))
    };
    let layout = QueueLayout {
        queues: 1,
        queue_size: 64,
    };
    let socket = dir.path().join("s");
    let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(stale);
    let server = BlockServer::bind(&socket, device(), layout).unwrap();
    UnixStream::connect(&socket).unwrap();
    drop(server);
    assert!(!socket.exists(), "socket removed when the server goes away");

    let regular = dir.path().join("not-a-socket");
    File::create(&regular).unwrap();
    let err = BlockServer::bind(&regular, device(), layout).unwrap_err();
    assert!(
        matches!(err, ServerError::Serve(ServeError::NotASocket(_))),
        "{err}"
    );
    assert!(Path::new(&regular).exists());
}

#[test]
fn io_on_every_queue_of_a_multiqueue_device_with_either_memory_message() {
    let server = ServerGuard::start(3, false);
    for queue in 0..3u64 {
        let mut guest = Guest::new();
        let mut frontend = server.connect();
        guest.attach(&mut frontend, queue as usize, queue % 2 == 1);
        guest.header(VIRTIO_BLK_T_OUT, 100 + queue);
        guest
            .mem
            .write_slice(&[0x10 + queue as u8; 512], GuestAddress(DATA))
            .unwrap();
        let len = guest.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!((len, guest.status()), (1, 0), "queue {queue}");
    }
    let image = std::fs::read(&server.image).unwrap();
    for queue in 0..3usize {
        let sector = &image[(100 + queue) * 512..(101 + queue) * 512];
        assert!(
            sector.iter().all(|&b| b == 0x10 + queue as u8),
            "queue {queue}"
        );
    }
    server.stop().unwrap();
}

/// Requests one after another, each announced only if the device asked for a kick, with
/// pauses now and then so that a polling worker gives up and sleeps: with and without
/// EVENT_IDX, with polling off and on, every request completes (none waits for a kick
/// the driver was told it need not send) and the data round-trips.
#[test]
fn notification_suppression_with_and_without_polling() {
    for poll_us in [0, 300] {
        for event_idx in [true, false] {
            let server = ServerGuard::start_polling(1, false, Duration::from_micros(poll_us));
            let mut guest = Guest::new();
            let mut frontend = server.connect();
            let left_out = if event_idx {
                0
            } else {
                1 << VIRTIO_RING_F_EVENT_IDX
            };
            guest.attach_without(&mut frontend, 0, false, left_out);
            let mut kicks = 0;
            for i in 0..120u64 {
                if i % 10 == 9 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let sector = 200 + i % 40;
                let (request, len) = if i < 40 {
                    guest.header(VIRTIO_BLK_T_OUT, sector);
                    let fill = vec![i as u8 ^ 0x5a; 512];
                    guest.mem.write_slice(&fill, GuestAddress(DATA)).unwrap();
                    ((DATA, 512, false), 1)
                } else {
                    guest.header(VIRTIO_BLK_T_IN, sector);
                    ((DATA, 512, true), 513)
                };
                let (used, kicked) = guest
                    .submit_suppressed(&[(HDR, 16, false), request, (STATUS, 1, true)], event_idx);
                kicks += u32::from(kicked);
                let what = format!("request {i}, poll {poll_us} µs, event_idx {event_idx}");
                assert_eq!((used, guest.status()), (len, 0), "{what}");
                if i >= 40 {
                    let mut data = [0u8; 512];
                    guest.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
                    let expected = (sector - 200) as u8 ^ 0x5a;
                    assert!(data.iter().all(|&b| b == expected), "{what}");
                }
            }
            // Every pause ends in a sleeping worker that needs a kick.
            assert!(
                kicks >= 11,
                "kicks {kicks}, poll {poll_us} µs, event_idx {event_idx}"
            );
            drop(frontend);
            server.stop().unwrap();
        }
    }
}

/// Posts `requests` (type, sector, data address, data length) at once, chain `i` in
/// descriptors 3i..3i+2, kicks once and waits until all are used; returns the used
/// elements (id, len) in used-ring order.
fn run_batch(guest: &mut Guest, requests: &[(u32, u64, u64, u32)]) -> Vec<(u32, u32)> {
    const HDRS: u64 = 0x4000;
    const STATUSES: u64 = 0x5000;
    let start = guest.used_seen;
    for (i, &(kind, sector, data, len)) in requests.iter().enumerate() {
        let i16 = i as u16;
        let hdr = HDRS + 16 * i as u64;
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        guest.mem.write_slice(&raw, GuestAddress(hdr)).unwrap();
        guest
            .mem
            .write_obj(0xffu8, GuestAddress(STATUSES + i as u64))
            .unwrap();
        let write = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        let next = VRING_DESC_F_NEXT as u16;
        let descs = [
            (hdr, 16, next, 3 * i16 + 1),
            (data, len, write | next, 3 * i16 + 2),
            (STATUSES + i as u64, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (j, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            let at = DESC_TABLE + 16 * (3 * i as u64 + j as u64);
            guest.mem.write_obj(desc, GuestAddress(at)).unwrap();
        }
        let slot = u64::from(start.wrapping_add(i16) % QUEUE_SIZE);
        guest
            .mem
            .write_obj(3 * i16, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
    }
    let end = start.wrapping_add(requests.len() as u16);
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    guest
        .mem
        .write_obj(end, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    guest.kick.write(1).unwrap();
    let guard = std::time::Instant::now();
    loop {
        let idx: u16 = guest.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        if idx == end {
            break;
        }
        assert!(
            guard.elapsed() < Duration::from_millis(HANG_GUARD_MS as u64),
            "backend did not complete the batch"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    guest.used_seen = end;
    (0..requests.len() as u16)
        .map(|k| {
            let (id, len) = guest.used_elem(start.wrapping_add(k));
            let status: u8 = guest
                .mem
                .read_obj(GuestAddress(STATUSES + u64::from(id) / 3))
                .unwrap();
            assert_eq!(status, 0, "status of chain {id}");
            (id, len)
        })
        .collect()
}

/// Large requests posted together go through the I/O pool (they may complete in any
/// order): every one completes once with the right length, the data lands where it
/// should, and GET_VRING_BASE afterwards reports them all consumed.
#[test]
fn large_requests_in_flight_together_through_the_io_pool() {
    const LEN: u32 = 64 * 1024;
    const COUNT: u64 = 5;
    let server = ServerGuard::start_with(
        1,
        false,
        WorkerOptions {
            io_threads: 3,
            // Temporary files are fast; hand over every request that can overlap.
            offload_after: Duration::ZERO,
            ..WorkerOptions::default()
        },
    );
    let mut guest = Guest::new();
    let mut frontend = server.connect();
    guest.attach(&mut frontend, 0, false);
    let data = |i: u64| 0x10000 + i * u64::from(LEN);
    let sector = |i: u64| 1 + i * u64::from(LEN / 512);
    let mut writes = vec![];
    for i in 0..COUNT {
        let fill = vec![0x30 + i as u8; LEN as usize];
        guest.mem.write_slice(&fill, GuestAddress(data(i))).unwrap();
        writes.push((VIRTIO_BLK_T_OUT, sector(i), data(i), LEN));
    }
    let mut used = run_batch(&mut guest, &writes);
    used.sort_unstable();
    let expected: Vec<(u32, u32)> = (0..COUNT as u32).map(|i| (3 * i, 1)).collect();
    assert_eq!(used, expected);

    for i in 0..COUNT {
        guest
            .mem
            .write_slice(&vec![0; LEN as usize], GuestAddress(data(i)))
            .unwrap();
    }
    let reads: Vec<_> = (0..COUNT)
        .map(|i| (VIRTIO_BLK_T_IN, sector(i), data(i), LEN))
        .collect();
    let mut used = run_batch(&mut guest, &reads);
    used.sort_unstable();
    let expected: Vec<(u32, u32)> = (0..COUNT as u32).map(|i| (3 * i, LEN + 1)).collect();
    assert_eq!(used, expected);
    for i in 0..COUNT {
        let mut back = vec![0u8; LEN as usize];
        guest
            .mem
            .read_slice(&mut back, GuestAddress(data(i)))
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x30 + i as u8), "request {i}");
    }
    let state = frontend.get_vring_base(0).unwrap();
    assert_eq!(state, 2 * COUNT as u32);
    let image = std::fs::read(&server.image).unwrap();
    assert_eq!(image[511], pattern(511), "the sector before is untouched");
    let last = (sector(COUNT) * 512) as usize;
    assert_eq!(image[last], pattern(last), "the sector after is untouched");
    drop(frontend);
    server.stop().unwrap();
}
