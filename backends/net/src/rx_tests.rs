//! Tests of frame delivery into a receive queue, against a mock split queue in real
//! guest memory. Every test also checks that no byte outside the buffers' device-
//! writable descriptors changed.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use super::*;

const MEM_SIZE: usize = 0x10_0000;
const MARK: u8 = 0x5a;
const QSIZE: u16 = 16;

struct Fixture {
    mem: GuestMemoryMmap,
}

impl Fixture {
    fn new() -> Fixture {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Fixture { mem }
    }

    fn mark(&self, addr: u64, len: usize) {
        self.mem
            .write_slice(&vec![MARK; len], GuestAddress(addr))
            .unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Used ring index and elements (id, len) of `vq`.
    fn used(&self, vq: &MockSplitQueue<GuestMemoryMmap>) -> (u16, Vec<(u32, u32)>) {
        let base = vq.used_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
        let elems = (0..idx)
            .map(|i| {
                let at = base + 4 + 8 * u64::from(i % QSIZE);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect();
        (idx, elems)
    }
}

/// Descriptor helpers: `chains` is a list of chains, each a list of (addr, len, writable).
fn post(vq: &MockSplitQueue<GuestMemoryMmap>, chains: &[&[(u64, u32, bool)]], start: u16) {
    let mut raw = Vec::new();
    let mut index = start;
    for chain in chains {
        for (i, &(addr, len, writable)) in chain.iter().enumerate() {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags,
                index + 1,
            )));
            index += 1;
        }
    }
    vq.add_desc_chains(&raw, start).unwrap();
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

const MRG: RxFormat = RxFormat {
    hdr_len: 12,
    mergeable: true,
};
const BIG: RxFormat = RxFormat {
    hdr_len: 12,
    mergeable: false,
};

#[test]
fn one_big_buffer() {
    let f = Fixture::new();
    f.mark(0x10000, 0x1000);
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(&vq, &[&[(0x10000, 2048, true)]], 0);
    let data = frame(100);
    let hdr = VnetHdr {
        flags: 2,
        ..VnetHdr::default()
    };
    let r = deliver(&mut q, &f.mem, BIG, &hdr, &data, &mut RxScratch::default());
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 1 });
    assert_eq!(r.bad_buffers, 0);
    assert!(r.notify);
    assert_eq!(f.used(&vq), (1, vec![(0, 112)]));
    let written = f.read(0x10000, 113);
    let got = VnetHdr::parse(&written[..12]).unwrap();
    assert_eq!((got.flags, got.num_buffers), (2, 1));
    assert_eq!(&written[12..112], &data[..]);
    assert_eq!(written[112], MARK, "nothing past the frame");
}

#[test]
fn mergeable_buffers_are_filled_in_order_and_published_together() {
    let f = Fixture::new();
    f.mark(0x10000, 0x4000);
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    // Three buffers of 100 bytes; the second is two descriptors of 40 + 60.
    post(
        &vq,
        &[
            &[(0x10000, 100, true)],
            &[(0x11000, 40, true), (0x11800, 60, true)],
            &[(0x12000, 100, true)],
            &[(0x13000, 100, true)],
        ],
        0,
    );
    let data = frame(250);
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &data,
        &mut RxScratch::default(),
    );
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 3 });
    assert_eq!(f.used(&vq), (3, vec![(0, 100), (1, 100), (3, 62)]));
    let mut stream = f.read(0x10000, 100);
    stream.extend(f.read(0x11000, 40));
    stream.extend(f.read(0x11800, 60));
    stream.extend(f.read(0x12000, 62));
    assert_eq!(VnetHdr::parse(&stream[..12]).unwrap().num_buffers, 3);
    assert_eq!(&stream[12..], &data[..]);
    assert_eq!(f.read(0x12000 + 62, 1)[0], MARK);
    assert_eq!(f.read(0x13000, 1)[0], MARK, "fourth buffer untouched");
    assert_eq!(q.next_avail(), 3);
}

#[test]
fn no_buffers_drops_without_touching_the_queue() {
    let f = Fixture::new();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &frame(60),
        &mut RxScratch::default(),
    );
    assert_eq!(r.outcome, RxOutcome::NoBuffers);
    assert!(!r.notify);
    assert_eq!(f.used(&vq).0, 0);
    assert_eq!(q.next_avail(), 0);
}

#[test]
fn not_enough_space_rolls_back_and_keeps_the_buffers() {
    let f = Fixture::new();
    f.mark(0x10000, 0x4000);
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(&vq, &[&[(0x10000, 100, true)], &[(0x11000, 100, true)]], 0);
    let mut scratch = RxScratch::default();
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &frame(300),
        &mut scratch,
    );
    assert_eq!(r.outcome, RxOutcome::TooSmall);
    assert_eq!((f.used(&vq).0, q.next_avail()), (0, 0));
    assert_eq!(f.read(0x10000, 100), vec![MARK; 100], "nothing written");
    // A frame that fits still gets them.
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &frame(150),
        &mut scratch,
    );
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 2 });

    // Without MRG_RXBUF a too-small buffer is left for a smaller frame.
    let f = Fixture::new();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(&vq, &[&[(0x10000, 100, true)], &[(0x11000, 2000, true)]], 0);
    let r = deliver(
        &mut q,
        &f.mem,
        BIG,
        &VnetHdr::plain(),
        &frame(1000),
        &mut scratch,
    );
    assert_eq!(r.outcome, RxOutcome::TooSmall);
    let r = deliver(
        &mut q,
        &f.mem,
        BIG,
        &VnetHdr::plain(),
        &frame(60),
        &mut scratch,
    );
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 1 });
    assert_eq!(f.used(&vq), (1, vec![(0, 72)]));
}

#[test]
fn unusable_buffers_are_returned_empty_and_never_written() {
    let f = Fixture::new();
    f.mark(0x10000, 0x4000);
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(
        &vq,
        &[
            &[(0x10000, 100, false)],                        // device-readable
            &[(0x11000, 50, true), (0x8000_0000, 50, true)], // partly outside memory
            &[(0x12000, 0, true)],                           // no space
            &[(0x13000, 200, true)],
        ],
        0,
    );
    let data = frame(100);
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &data,
        &mut RxScratch::default(),
    );
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 1 });
    assert_eq!(r.bad_buffers, 3);
    assert_eq!(f.used(&vq), (4, vec![(0, 0), (1, 0), (3, 0), (4, 112)]));
    assert_eq!(f.read(0x10000, 100), vec![MARK; 100]);
    assert_eq!(f.read(0x11000, 50), vec![MARK; 50]);
    assert_eq!(&f.read(0x13000, 112)[12..], &data[..]);
}

#[test]
fn a_bad_buffer_behind_good_ones_waits_for_the_next_frame() {
    let f = Fixture::new();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(
        &vq,
        &[
            &[(0x10000, 50, true)],
            &[(0x11000, 50, false)],
            &[(0x12000, 500, true)],
        ],
        0,
    );
    let mut scratch = RxScratch::default();
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &frame(200),
        &mut scratch,
    );
    assert_eq!((r.outcome, r.bad_buffers), (RxOutcome::TooSmall, 0));
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &frame(30),
        &mut scratch,
    );
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 1 });
    let r = deliver(
        &mut q,
        &f.mem,
        MRG,
        &VnetHdr::plain(),
        &frame(200),
        &mut scratch,
    );
    assert_eq!(
        (r.outcome, r.bad_buffers),
        (RxOutcome::Delivered { buffers: 1 }, 1)
    );
    assert_eq!(f.used(&vq), (3, vec![(0, 42), (1, 0), (2, 212)]));
}

#[test]
fn notifications_follow_used_event_and_no_interrupt() {
    let f = Fixture::new();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    let chains: Vec<[(u64, u32, bool); 1]> = (0..4)
        .map(|i| [(0x10000 + 0x1000 * i, 500, true)])
        .collect();
    let refs: Vec<&[(u64, u32, bool)]> = chains.iter().map(|c| &c[..]).collect();
    post(&vq, &refs, 0);
    let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE));
    f.mem.write_obj(0u16, used_event).unwrap();
    let mut scratch = RxScratch::default();
    let mut send = || {
        deliver(
            &mut q,
            &f.mem,
            BIG,
            &VnetHdr::plain(),
            &frame(60),
            &mut scratch,
        )
        .notify
    };
    assert!(send(), "used index passes used_event 0");
    assert!(!send(), "driver did not ask again");
    f.mem.write_obj(2u16, used_event).unwrap();
    assert!(send(), "used index passes used_event 2");

    // Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses the interrupt.
    let f = Fixture::new();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(&vq, &[&[(0x10000, 500, true)], &[(0x11000, 500, true)]], 0);
    f.mem.write_obj(1u16, vq.avail_addr()).unwrap();
    let r = deliver(
        &mut q,
        &f.mem,
        BIG,
        &VnetHdr::plain(),
        &frame(60),
        &mut scratch,
    );
    assert!(!r.notify);
    f.mem.write_obj(0u16, vq.avail_addr()).unwrap();
    let r = deliver(
        &mut q,
        &f.mem,
        BIG,
        &VnetHdr::plain(),
        &frame(60),
        &mut scratch,
    );
    assert!(r.notify);
}

#[test]
fn legacy_header_is_ten_bytes() {
    let f = Fixture::new();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0), QSIZE);
    let mut q: Queue = vq.create_queue().unwrap();
    post(&vq, &[&[(0x10000, 500, true)]], 0);
    let data = frame(60);
    let format = RxFormat {
        hdr_len: 10,
        mergeable: false,
    };
    let r = deliver(
        &mut q,
        &f.mem,
        format,
        &VnetHdr::plain(),
        &data,
        &mut RxScratch::default(),
    );
    assert_eq!(r.outcome, RxOutcome::Delivered { buffers: 1 });
    assert_eq!(f.used(&vq), (1, vec![(0, 70)]));
    assert_eq!(&f.read(0x10000, 70)[10..], &data[..]);
}
