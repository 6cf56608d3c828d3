//! In-process frontend ↔ backend tests: a two- or three-port switch serves in a thread
//! on temporary sockets; each test guest is a `vhost::vhost_user::Frontend` over a real
//! Unix socket, with guest memory in a memfd shared with the backend, a receive and a
//! transmit split queue in that memory, and real kick/call eventfds. Frames travel from
//! one guest's transmit queue into another guest's receive buffers.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use plexvm_backend_support::guard::ServeThread;
use plexvm_net::config::NetConfig;
use plexvm_net::frame::VnetHdr;
use plexvm_net::mac_table::MacAddr;
use plexvm_net::server::{NetServer, ServerError};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 32;
/// Guard against a hung backend; not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// Ring layout of queue `q` (0 = receive, 1 = transmit) in guest memory.
fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x8000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}
const RX_BUFS: u64 = 0x20000;
const TX_BUFS: u64 = 0x60000;
const BUF_LEN: u32 = 2048;

/// The switch serving in a thread ([`ServeThread`]: shut down and joined on drop).
struct SwitchGuard {
    serving: ServeThread<ServerError>,
    sockets: Vec<PathBuf>,
    server_stats: std::sync::Arc<plexvm_net::switch::Switch>,
    _dir: tempfile::TempDir,
}

impl SwitchGuard {
    fn start(ports: usize) -> SwitchGuard {
        let dir = tempfile::tempdir().unwrap();
        let sockets: Vec<PathBuf> = (0..ports)
            .map(|i| dir.path().join(format!("p{i}.sock")))
            .collect();
        let config = NetConfig {
            sockets: sockets
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), MacAddr([2, 0, 0, 0, 0, i as u8 + 1])))
                .collect(),
            taps: Vec::new(),
            queue_pairs: 1,
            queue_size: 256,
            mtu: None,
            ageing: Duration::from_secs(300),
            stats_file: None,
        };
        // Bound before the thread starts, so connecting cannot race the listeners.
        let mut server = NetServer::new(&config).unwrap();
        let switch = server.switch().clone();
        SwitchGuard {
            serving: ServeThread::spawn(move |shutdown| server.serve(shutdown)),
            sockets,
            server_stats: switch,
            _dir: dir,
        }
    }

    fn connect(&self, port: usize) -> Frontend {
        self.connect_raw(port).0
    }

    /// A frontend and a second handle on its socket, for messages the `vhost` crate's
    /// frontend would refuse to send.
    fn connect_raw(&self, port: usize) -> (Frontend, UnixStream) {
        let stream = UnixStream::connect(&self.sockets[port]).unwrap();
        let raw = stream.try_clone().unwrap();
        (Frontend::from_stream(stream, 2), raw)
    }

    fn counters(&self, port: usize) -> plexvm_net::stats::CounterSnapshot {
        self.server_stats.stats().ports[port].counters
    }

    fn stop(self) -> Result<(), ServerError> {
        self.serving.stop()
    }
}

fn memfd() -> File {
    // SAFETY: the name is a NUL-terminated literal; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"plexvm-net-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A test guest: memory, one queue pair, and the driver-side ring indices.
struct Guest {
    mem: GuestMemoryMmap,
    host_base: u64,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    rx_posted: u16,
    rx_seen: u16,
    tx_posted: u16,
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
        let ev = || EventFd::new(EFD_NONBLOCK).unwrap();
        Guest {
            mem,
            host_base,
            kicks: [ev(), ev()],
            calls: [ev(), ev()],
            rx_posted: 0,
            rx_seen: 0,
            tx_posted: 0,
        }
    }

    /// Bring-up as QEMU 7.2 does it for vhost-user-net: SET_VRING_ENABLE arrives before
    /// SET_FEATURES (which acks VHOST_USER_F_PROTOCOL_FEATURES) and is not sent again.
    fn attach_like_qemu(&self, (frontend, raw): &mut (Frontend, UnixStream)) -> u64 {
        let features = frontend.get_features().unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(proto).unwrap();
        frontend.set_owner().unwrap();
        for q in 0u32..2 {
            // VHOST_USER_SET_VRING_ENABLE (18), version 1, no reply wanted; index, 1.
            let mut msg = Vec::new();
            for v in [18u32, 1, 8, q, 1] {
                msg.extend_from_slice(&v.to_le_bytes());
            }
            std::io::Write::write_all(raw, &msg).unwrap();
        }
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        frontend.set_features(features).unwrap();
        self.set_up_rings(frontend, false, true);
        features
    }

    /// Bring-up by the book: PROTOCOL_FEATURES acked, rings enabled at the end.
    fn attach(&self, frontend: &mut Frontend) -> u64 {
        let features = frontend.get_features().unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        frontend.set_features(features).unwrap();
        frontend.set_protocol_features(proto).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend.set_owner().unwrap();
        self.set_up_rings(frontend, true, false);
        features
    }

    /// Memory (ADD_MEM_REG as QEMU sends it, or SET_MEM_TABLE), then both rings.
    fn set_up_rings(&self, frontend: &mut Frontend, enable: bool, add_mem_reg: bool) {
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let regions = [VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()];
        if add_mem_reg {
            frontend.add_mem_region(&regions[0]).unwrap();
        } else {
            frontend.set_mem_table(&regions).unwrap();
        }
        for q in 0..2 {
            let (desc, avail, used) = ring(q);
            frontend.set_vring_num(q, QSIZE).unwrap();
            let config = VringConfigData {
                queue_max_size: 256,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: self.host_base + desc,
                used_ring_addr: self.host_base + used,
                avail_ring_addr: self.host_base + avail,
                log_addr: None,
            };
            frontend.set_vring_addr(q, &config).unwrap();
            frontend.set_vring_base(q, 0).unwrap();
            frontend.set_vring_call(q, &self.calls[q]).unwrap();
            frontend.set_vring_kick(q, &self.kicks[q]).unwrap();
            if enable {
                frontend.set_vring_enable(q, true).unwrap();
            }
        }
    }

    /// The head index the next chain of queue `q` gets (two descriptors per chain).
    fn next_head(&self, q: usize) -> u16 {
        let posted = if q == 0 {
            self.rx_posted
        } else {
            self.tx_posted
        };
        (posted % (QSIZE / 2)) * 2
    }

    /// Writes a chain at `next_head(q)` and makes it available.
    fn publish(&mut self, q: usize, chain: &[(u64, u32, bool)]) {
        let (desc, avail, _) = ring(q);
        let posted = if q == 0 {
            self.rx_posted
        } else {
            self.tx_posted
        };
        let first = self.next_head(q);
        for (i, &(addr, len, writable)) in chain.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(index + 1).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(desc + 16 * u64::from(index)))
                .unwrap();
        }
        let slot = u64::from(posted % QSIZE);
        self.mem
            .write_obj(first, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let next = posted.wrapping_add(1);
        self.mem.write_obj(next, GuestAddress(avail + 2)).unwrap();
        if q == 0 {
            self.rx_posted = next;
        } else {
            self.tx_posted = next;
        }
        self.kicks[q].write(1).unwrap();
    }

    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let addr = RX_BUFS + u64::from(self.next_head(0)) * u64::from(BUF_LEN);
            self.publish(0, &[(addr, BUF_LEN, true)]);
        }
    }

    /// Sends `frame` with a plain 12-byte header, split over two descriptors.
    fn send(&mut self, frame: &[u8]) {
        self.send_chain(frame, false);
    }

    fn send_chain(&mut self, frame: &[u8], malformed: bool) {
        let addr = TX_BUFS + u64::from(self.next_head(1)) * 0x1000;
        let mut hdr = [0u8; 12];
        VnetHdr::default().write(&mut hdr);
        self.mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(addr + 0x100))
            .unwrap();
        self.publish(
            1,
            &[
                (addr, 12, false),
                (addr + 0x100, frame.len() as u32, malformed),
            ],
        );
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    /// Waits until queue `q`'s used index reaches `target` (call eventfd or polling).
    fn wait_used(&self, q: usize, target: u16) {
        let poll = Epoll::new().unwrap();
        poll.ctl(
            ControlOperation::Add,
            self.calls[q].as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + HANG_GUARD;
        while self.used_idx(q) != target {
            assert!(
                std::time::Instant::now() < deadline,
                "queue {q} never reached used index {target}"
            );
            let mut events = [EpollEvent::default(); 1];
            let _ = poll.wait(50, &mut events);
            let _ = self.calls[q].read();
        }
    }

    /// The next received frame (header, bytes) from the receive used ring.
    fn receive(&mut self) -> (VnetHdr, Vec<u8>) {
        let target = self.rx_seen.wrapping_add(1);
        self.wait_used(0, target);
        let at = ring(0).2 + 4 + 8 * u64::from(self.rx_seen % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.rx_seen = target;
        let mut bytes = vec![0u8; len as usize];
        let addr = RX_BUFS + u64::from(id) * u64::from(BUF_LEN);
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        (VnetHdr::parse(&bytes).unwrap(), bytes[12..].to_vec())
    }
}

fn eth(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..100).map(|i| i ^ tag));
    f
}

const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

#[test]
fn negotiation_and_config_space() {
    let switch = SwitchGuard::start(1);
    let mut frontend = switch.connect(0);
    let features = frontend.get_features().unwrap();
    for bit in [
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(features & 1 << bit, 0, "bit {bit}");
    }
    let proto = frontend.get_protocol_features().unwrap();
    frontend.set_features(features).unwrap();
    frontend.set_protocol_features(proto).unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 2);
    frontend.set_owner().unwrap();
    let (_, cfg) = frontend
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .unwrap();
    assert_eq!(&cfg[..6], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    switch.stop().unwrap();
}

#[test]
fn frames_go_guest_to_guest_and_bad_chains_are_counted() {
    let switch = SwitchGuard::start(3);
    let (mut a, mut b, c) = (Guest::new(), Guest::new(), Guest::new());
    let (mut fa, mut fb, mut fc) = (switch.connect(0), switch.connect_raw(1), switch.connect(2));
    a.attach(&mut fa);
    b.attach_like_qemu(&mut fb);
    c.attach(&mut fc); // C never posts receive buffers.
    a.post_rx(4);
    b.post_rx(4);

    // Broadcast from A reaches B (C has no buffers: dropped and counted).
    let hello = eth([0xff; 6], A, 1);
    a.send(&hello);
    let (hdr, got) = b.receive();
    assert_eq!(got, hello);
    assert_eq!(hdr.num_buffers, 1);
    a.wait_used(1, 1);

    // B answers A by unicast: A is known now.
    let reply = eth(A, B, 2);
    b.send(&reply);
    assert_eq!(a.receive().1, reply);

    // A chain with a device-writable descriptor in the transmit queue is dropped,
    // counted, and returned; the next frame still goes through.
    a.send_chain(&eth(B, A, 3), true);
    a.wait_used(1, 2);
    let after = eth(B, A, 4);
    a.send(&after);
    assert_eq!(b.receive().1, after);

    let (ca, cb, cc) = (switch.counters(0), switch.counters(1), switch.counters(2));
    assert_eq!((ca.rx_packets, ca.rx_dropped, ca.tx_packets), (2, 1, 1));
    assert_eq!((cb.rx_packets, cb.tx_packets), (1, 2));
    assert_eq!(cc.tx_dropped_no_buffer, 1, "only the broadcast was for C");
    assert_eq!(cc.tx_packets, 0);
    drop((fa, fb, fc));
    switch.stop().unwrap();
}

#[test]
fn a_port_reconnects_and_others_keep_working() {
    let switch = SwitchGuard::start(2);
    let (mut a, mut b) = (Guest::new(), Guest::new());
    let mut fa = switch.connect(0);
    let mut fb = switch.connect(1);
    a.attach(&mut fa);
    b.attach(&mut fb);
    b.post_rx(8);
    a.send(&eth([0xff; 6], A, 1));
    assert_eq!(b.receive().1, eth([0xff; 6], A, 1));
    drop(fa);
    // A reconnects with fresh memory and rings (a rebooted VM).
    let mut a = Guest::new();
    let mut fa = switch.connect_raw(0);
    a.attach_like_qemu(&mut fa);
    a.send(&eth([0xff; 6], A, 5));
    assert_eq!(b.receive().1, eth([0xff; 6], A, 5));
    assert!(switch.server_stats.stats().ports[0].connected);
    drop(fa);
    switch.stop().unwrap();
}
