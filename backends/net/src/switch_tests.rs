//! Tests of the switch logic with real guest memory and real receive vrings (the same
//! `VringRwLock` type vhost-user-backend creates), without sockets: learning, ageing,
//! flooding, filtering, receivers without buffers, and offload resolution.

use std::path::PathBuf;
use std::sync::Arc;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::frame::VnetHdr;
use crate::port::GuestLink;

const QSIZE: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x10000;
const BUF_LEN: u32 = 2048;

/// One guest behind a port: its memory and the receive ring the test posts into.
struct Guest {
    mem: GuestMemoryMmap,
    link: Arc<GuestLink>,
    posted: u16,
    _vring: VringRwLock<crate::port::GuestMemory>,
}

impl Guest {
    fn new(features: u64) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let link = Arc::new(GuestLink::new(1));
        link.memory().lock().unwrap().replace(mem.clone());
        link.set_features(features | 1 << VIRTIO_NET_F_MRG_RXBUF);
        let vring = VringRwLock::new(link.memory(), 256).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        link.publish_rx(0, &vring);
        Guest {
            mem,
            link,
            posted: 0,
            _vring: vring,
        }
    }

    /// Posts `n` receive buffers of BUF_LEN bytes.
    fn post(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.posted % QSIZE;
            let addr = BUFS + u64::from(i) * u64::from(BUF_LEN);
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&BUF_LEN.to_le_bytes());
            d[12..14].copy_from_slice(&2u16.to_le_bytes()); // VRING_DESC_F_WRITE
            self.mem
                .write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
                .unwrap();
            self.mem
                .write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
            self.posted = self.posted.wrapping_add(1);
            self.mem
                .write_obj(self.posted, GuestAddress(AVAIL + 2))
                .unwrap();
        }
    }

    /// Frames received so far: (header, frame bytes), merging `num_buffers` buffers.
    fn received(&self) -> Vec<(VnetHdr, Vec<u8>)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let buffers: Vec<Vec<u8>> = (0..idx)
            .map(|n| {
                let at = USED + 4 + 8 * u64::from(n % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                let mut bytes = vec![0u8; len as usize];
                let addr = BUFS + u64::from(id) * u64::from(BUF_LEN);
                self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                bytes
            })
            .collect();
        let mut frames = Vec::new();
        let mut rest = buffers.iter();
        while let Some(first) = rest.next() {
            let hdr = VnetHdr::parse(first).unwrap();
            let mut data = first[12..].to_vec();
            for _ in 1..hdr.num_buffers {
                data.extend_from_slice(rest.next().expect("all buffers of a frame"));
            }
            frames.push((hdr, data));
        }
        frames
    }
}

fn mac(n: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, n])
}

fn eth(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    f.extend((f.len()..len).map(|i| i as u8));
    f
}

fn switch_of(guests: &[&Guest]) -> Switch {
    let ports = guests
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let port = GuestPort::new(PathBuf::from(format!("/tmp/p{i}")), mac(i as u8));
            port.set_link(Some(g.link.clone()));
            Port::new(&format!("vm{i}"), PortKind::Guest(port))
        })
        .collect();
    Switch::new(ports, DEFAULT_AGEING)
}

fn send(sw: &Switch, src: PortId, frame: &[u8]) {
    let mut ctx = ForwardCtx::default();
    sw.forward(src, &Packet::new(VnetHdr::plain(), frame), &mut ctx);
    ctx.signals.flush();
}

#[test]
fn floods_unknown_then_learns() {
    let (mut a, mut b, mut c) = (Guest::new(0), Guest::new(0), Guest::new(0));
    for g in [&mut a, &mut b, &mut c] {
        g.post(8);
    }
    let sw = switch_of(&[&a, &b, &c]);
    let a_to_b = eth(mac(11), mac(10), 60);
    send(&sw, 0, &a_to_b);
    assert_eq!(b.received().len(), 1, "unknown unicast is flooded");
    assert_eq!(c.received().len(), 1);
    assert!(a.received().is_empty(), "never back to the source");
    assert_eq!(b.received()[0].1, a_to_b);

    send(&sw, 1, &eth(mac(10), mac(11), 70));
    assert_eq!(a.received().len(), 1, "A was learned on port 0");
    assert_eq!(c.received().len(), 1, "so C does not see B's reply");
    send(&sw, 0, &a_to_b);
    assert_eq!((b.received().len(), c.received().len()), (2, 1));

    send(&sw, 2, &eth(MacAddr::BROADCAST, mac(12), 60));
    let multicast = MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]);
    send(&sw, 2, &eth(multicast, mac(12), 60));
    assert_eq!((a.received().len(), b.received().len()), (3, 4));

    send(&sw, 0, &eth(mac(10), mac(13), 60));
    assert_eq!(
        a.received().len(),
        3,
        "filtered: destination is on the source port"
    );
    let stats = sw.stats();
    assert_eq!(stats.ports[0].counters.rx_packets, 3);
    assert_eq!(stats.ports[1].counters.tx_packets, 4);
    assert_eq!(stats.mac_table_entries, 4);
}

#[test]
fn ageing_and_port_down_bring_back_flooding() {
    let sw = switch_of(&[&Guest::new(0), &Guest::new(0)]);
    let t0 = Instant::now();
    let from_a = eth(mac(11), mac(10), 60);
    assert_eq!(sw.destination(0, &from_a, t0), Destination::Flood);
    let to_a = eth(mac(10), mac(11), 60);
    assert_eq!(sw.destination(1, &to_a, t0), Destination::Port(0));
    assert_eq!(
        sw.destination(1, &to_a, t0 + DEFAULT_AGEING),
        Destination::Flood
    );
    sw.destination(0, &from_a, t0);
    sw.port_down(0);
    assert_eq!(sw.destination(1, &to_a, t0), Destination::Flood);
    assert_eq!(sw.destination(1, &[0u8; 8], t0), Destination::Filtered);
}

#[test]
fn a_receiver_without_buffers_drops_and_others_still_receive() {
    let (mut a, mut b, c) = (Guest::new(0), Guest::new(0), Guest::new(0));
    a.post(4);
    b.post(2);
    let sw = switch_of(&[&a, &b, &c]);
    for _ in 0..5 {
        send(&sw, 0, &eth(MacAddr::BROADCAST, mac(10), 100));
    }
    assert_eq!(b.received().len(), 2);
    let stats = sw.stats();
    assert_eq!(stats.ports[1].counters.tx_dropped_no_buffer, 3);
    assert_eq!(stats.ports[2].counters.tx_dropped_no_buffer, 5);
    assert_eq!(stats.ports[2].counters.tx_packets, 0);
    b.post(1);
    send(&sw, 0, &eth(MacAddr::BROADCAST, mac(10), 100));
    assert_eq!(b.received().len(), 3, "buffers posted later are used");
}

#[test]
fn disconnected_ports_are_skipped() {
    let mut a = Guest::new(0);
    a.post(4);
    let sw = switch_of(&[&a, &Guest::new(0)]);
    sw.ports()[1].guest().unwrap().set_link(None);
    send(&sw, 0, &eth(MacAddr::BROADCAST, mac(10), 60));
    let stats = sw.stats();
    assert!(!stats.ports[1].connected);
    assert_eq!(stats.ports[1].counters.tx_dropped_no_buffer, 0);
    assert_eq!(stats.ports[0].counters.rx_packets, 1);
}

/// An IPv4/TCP super-frame of `payload` bytes asking for segmentation into `mss`.
fn tso_frame(payload: usize, mss: u16) -> Packet {
    let mut f = eth(MacAddr::BROADCAST, mac(10), 14);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2,
    ];
    let total = (40 + payload) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    f.extend_from_slice(&tcp);
    f.extend((0..payload).map(|i| i as u8));
    let hdr = VnetHdr {
        flags: 1,
        gso_type: 1,
        gso_size: mss,
        csum_start: 34,
        csum_offset: 16,
        hdr_len: 54,
        num_buffers: 0,
    };
    Packet::new(hdr, &f)
}

#[test]
fn offloads_pass_to_capable_receivers_and_are_resolved_for_others() {
    let tso = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4;
    let (a, mut b, mut c) = (Guest::new(0), Guest::new(tso), Guest::new(0));
    b.post(8);
    c.post(8);
    let sw = switch_of(&[&a, &b, &c]);
    let pkt = tso_frame(3000, 1000);
    let mut ctx = ForwardCtx::default();
    sw.forward(0, &pkt, &mut ctx);
    ctx.signals.flush();
    let got_b = b.received();
    assert_eq!(got_b.len(), 1, "B takes the super-frame");
    assert_eq!(got_b[0].0.gso_type, 1);
    assert_eq!(got_b[0].1, pkt.frame());
    let got_c = c.received();
    assert_eq!(got_c.len(), 3, "C gets segments");
    for (hdr, seg) in &got_c {
        assert_eq!((hdr.flags, hdr.gso_type), (0, 0));
        assert!(seg.len() <= 54 + 1000);
    }
    let stats = sw.stats();
    assert_eq!(stats.ports[2].counters.tx_packets, 3);
    assert_eq!(stats.ports[0].counters.rx_dropped, 0);

    // A GSO request on something that is not TCP: capable receivers get it unchanged,
    // the others cannot, and the source's drop counter says so.
    let mut bad = tso_frame(3000, 1000);
    bad.buf[23] = 17;
    sw.forward(0, &bad, &mut ctx);
    assert_eq!(b.received().len(), 2);
    assert_eq!(c.received().len(), 3);
    assert_eq!(sw.stats().ports[0].counters.rx_dropped, 1);
}

#[test]
fn flow_hash_keeps_flows_apart() {
    let one = eth(mac(1), mac(2), 60);
    let other = eth(mac(1), mac(3), 60);
    assert_eq!(flow_hash(&one), flow_hash(&one.clone()));
    assert_ne!(flow_hash(&one), flow_hash(&other));
    assert_eq!(flow_hash(&[]), flow_hash(&[]));
    let p = tso_frame(10, 5);
    let mut q = tso_frame(10, 5);
    q.buf[35] = 9; // another source port
    assert_ne!(flow_hash(p.frame()), flow_hash(q.frame()));
}
