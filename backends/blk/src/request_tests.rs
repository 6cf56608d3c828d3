//! Unit tests of request parsing and execution against a mock split queue in a
//! `GuestMemoryMmap`: every request type and every malformed chain the probe guest's
//! `blk-abuse` workload posts. Each test also checks that no guest byte outside the
//! request's device-writable buffers changed.

use std::io::Write;

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_SECURE_ERASE;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::disk::DiskOptions;

const MEM_SIZE: usize = 0x10_0000;
const SECTORS: u64 = 64;
const SERIAL: &[u8; 20] = b"plexvm-test-serial-1";

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const DATA2: u64 = 0x3000;
const STATUS: u64 = 0x4000;
const OUTSIDE: u64 = 0x8000_0000;

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

struct Fixture {
    mem: GuestMemoryMmap,
    image: tempfile::NamedTempFile,
    device: BlockDevice,
}

fn pattern(offset: usize) -> u8 {
    ((offset / 512) * 7 + offset % 251) as u8
}

fn fixture_with(readonly: bool) -> Fixture {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let bytes: Vec<u8> = (0..(SECTORS * 512) as usize).map(pattern).collect();
    image.write_all(&bytes).unwrap();
    let disk = Disk::open(
        image.path(),
        DiskOptions {
            readonly,
            direct: false,
        },
    )
    .unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    // Fill guest memory with a marker so changes are visible.
    mem.write_slice(&vec![0x5a; MEM_SIZE], GuestAddress(0))
        .unwrap();
    Fixture {
        mem,
        image,
        device: BlockDevice::new(disk, *SERIAL),
    }
}

fn fixture() -> Fixture {
    fixture_with(false)
}

fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(f: &Fixture, request_type: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&request_type.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    f.mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut all = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut all, GuestAddress(0)).unwrap();
    all
}

/// Processes the chain and asserts that only bytes in `writable` ranges changed.
fn run(f: &Fixture, descs: &[RawDescriptor], writable: &[(u64, usize)]) -> Completion {
    // A fresh queue each time: the mock writes avail entries at idx without wrapping.
    f.mem.write_slice(&[0u8; 0x1000], GuestAddress(0)).unwrap();
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue.build_desc_chain(descs).unwrap();
    let before = snapshot(&f.mem);
    let completion = f.device.process(&f.mem, chain);
    let after = snapshot(&f.mem);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let allowed = writable
            .iter()
            .any(|&(start, len)| (i as u64) >= start && (i as u64) < start + len as u64);
        assert!(
            allowed || b == a,
            "guest byte {i:#x} changed outside the buffers"
        );
    }
    completion
}

fn read_guest(f: &Fixture, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    f.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

fn image_bytes(f: &Fixture) -> Vec<u8> {
    std::fs::read(f.image.path()).unwrap()
}

fn expect(completion: Completion, status: u8, used_len: u32) {
    assert_eq!(
        completion,
        Completion {
            used_len,
            status: Some(status)
        }
    );
}

fn failures(f: &Fixture, error: RequestError) -> u64 {
    f.device.stats().failed(error.kind())
}

#[test]
fn read_two_buffers() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_IN, 3);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(DATA2, 1024, true),
        desc(STATUS, 1, true),
    ];
    let c = run(&f, &descs, &[(DATA, 512), (DATA2, 1024), (STATUS, 1)]);
    expect(c, OK, 1537);
    let expected: Vec<u8> = (3 * 512..6 * 512).map(pattern).collect();
    assert_eq!(read_guest(&f, DATA, 512), expected[..512]);
    assert_eq!(read_guest(&f, DATA2, 1024), expected[512..]);
    assert_eq!(f.device.stats().completed(), 1);
}

#[test]
fn write_lands_in_image() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_OUT, 10);
    f.mem
        .write_slice(&[0xc3; 1024], GuestAddress(DATA))
        .unwrap();
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 1024, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), OK, 1);
    let image = image_bytes(&f);
    assert!(image[10 * 512..12 * 512].iter().all(|&b| b == 0xc3));
    assert_eq!(image[10 * 512 - 1], pattern(10 * 512 - 1));
    assert_eq!(image[12 * 512], pattern(12 * 512));
}

#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let f = fixture();
    // OUT: header and data in one descriptor.
    header(&f, VIRTIO_BLK_T_OUT, 0);
    f.mem
        .write_slice(&[0x77; 512], GuestAddress(HDR + 16))
        .unwrap();
    let descs = [desc(HDR, 16 + 512, false), desc(STATUS, 1, true)];
    expect(run(&f, &descs, &[(STATUS, 1)]), OK, 1);
    assert!(image_bytes(&f)[..512].iter().all(|&b| b == 0x77));
    // IN: data and status in one descriptor.
    header(&f, VIRTIO_BLK_T_IN, 1);
    let descs = [desc(HDR, 16, false), desc(DATA, 513, true)];
    expect(run(&f, &descs, &[(DATA, 513)]), OK, 513);
    let expected: Vec<u8> = (512..1024).map(pattern).collect();
    assert_eq!(read_guest(&f, DATA, 512), expected);
    assert_eq!(read_guest(&f, DATA + 512, 1), [OK]);
}

#[test]
fn flush() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_FLUSH, 0);
    let descs = [desc(HDR, 16, false), desc(STATUS, 1, true)];
    expect(run(&f, &descs, &[(STATUS, 1)]), OK, 1);
    assert_eq!(read_guest(&f, STATUS, 1), [OK]);
}

#[test]
fn get_id_full_and_short_buffer() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_GET_ID, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 20, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(DATA, 20), (STATUS, 1)]), OK, 21);
    assert_eq!(read_guest(&f, DATA, 20), SERIAL);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA2, 8, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(DATA2, 8), (STATUS, 1)]), OK, 9);
    assert_eq!(read_guest(&f, DATA2, 8), SERIAL[..8]);
    // A larger buffer gets 20 bytes; the rest is left alone.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA2, 64, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(DATA2, 20), (STATUS, 1)]), OK, 21);
}

fn discard_segment(f: &Fixture, addr: u64, sector: u64, sectors: u32, flags: u32) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..16].copy_from_slice(&flags.to_le_bytes());
    f.mem.write_slice(&raw, GuestAddress(addr)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let f = fixture();
    for (request_type, flags, sector) in [
        (VIRTIO_BLK_T_DISCARD, 0, 8),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0, 16),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            24,
        ),
    ] {
        header(&f, request_type, 0);
        discard_segment(&f, DATA, sector, 8, flags);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 16, false),
            desc(STATUS, 1, true),
        ];
        expect(run(&f, &descs, &[(STATUS, 1)]), OK, 1);
    }
    let image = image_bytes(&f);
    assert_eq!(image.len() as u64, SECTORS * 512, "size unchanged");
    assert!(image[8 * 512..32 * 512].iter().all(|&b| b == 0));
    assert_eq!(image[8 * 512 - 1], pattern(8 * 512 - 1));
    assert_eq!(image[32 * 512], pattern(32 * 512));
}

#[test]
fn write_zeroes_two_segments() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&f, DATA, 1, 1, 0);
    discard_segment(&f, DATA + 16, 5, 2, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 32, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), OK, 1);
    let image = image_bytes(&f);
    assert!(image[512..1024].iter().all(|&b| b == 0));
    assert!(image[5 * 512..7 * 512].iter().all(|&b| b == 0));
    assert_eq!(image[1024], pattern(1024));
    assert_eq!(image[7 * 512], pattern(7 * 512));
}

#[test]
fn discard_flags_are_unsupported() {
    let f = fixture();
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 16, false),
        desc(STATUS, 1, true),
    ];
    header(&f, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&f, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    expect(run(&f, &descs, &[(STATUS, 1)]), UNSUPP, 1);
    header(&f, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&f, DATA, 0, 1, 0x2);
    expect(run(&f, &descs, &[(STATUS, 1)]), UNSUPP, 1);
    assert_eq!(
        image_bytes(&f)[..512],
        (0..512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn malformed_discard_segments() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_DISCARD, 0);
    // Not whole segments.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 15, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // No segment at all.
    let descs = [desc(HDR, 16, false), desc(STATUS, 1, true)];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // Past the end of the disk, and a sector number that overflows.
    for (sector, sectors) in [(SECTORS - 1, 2), (u64::MAX / 256, 1)] {
        discard_segment(&f, DATA, sector, sectors, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 16, false),
            desc(STATUS, 1, true),
        ];
        expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    }
    // Too many segments.
    let count = MAX_DISCARD_SEGMENTS as u64 + 1;
    for i in 0..count {
        discard_segment(&f, DATA + 16 * i, i, 1, 0);
    }
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 16 * count as u32, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // Writable segment buffer.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 16, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(
        image_bytes(&f),
        (0..(SECTORS * 512) as usize)
            .map(pattern)
            .collect::<Vec<_>>()
    );
}

#[test]
fn unknown_types_are_unsupported() {
    let f = fixture();
    for request_type in [99, VIRTIO_BLK_T_SECURE_ERASE, 2, 10] {
        header(&f, request_type, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(STATUS, 1, true),
        ];
        expect(run(&f, &descs, &[(STATUS, 1)]), UNSUPP, 1);
    }
    assert_eq!(failures(&f, RequestError::UnsupportedType(0)), 4);
}

#[test]
fn chain_without_header() {
    let f = fixture();
    expect(run(&f, &[desc(STATUS, 1, true)], &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(read_guest(&f, STATUS, 1), [IOERR]);
    // A writable first descriptor is not a header either.
    header(&f, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 16, true),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(failures(&f, RequestError::MissingHeader), 2);
}

#[test]
fn chain_without_status() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_IN, 0);
    let c = run(&f, &[desc(HDR, 16, false)], &[]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None
        }
    );
    // Data buffer present, but the last descriptor is device-readable.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, false),
    ];
    let c = run(&f, &descs, &[]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None
        }
    );
    // Zero-length status descriptor.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 0, true),
    ];
    let c = run(&f, &descs, &[]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None
        }
    );
    // Status outside guest memory.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(OUTSIDE, 1, true),
    ];
    let c = run(&f, &descs, &[]);
    assert_eq!(
        c,
        Completion {
            used_len: 0,
            status: None
        }
    );
    assert_eq!(failures(&f, RequestError::NoStatus), 4);
}

#[test]
fn short_header() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 8, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(failures(&f, RequestError::ShortHeader), 1);
}

#[test]
fn wrong_data_direction() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // Mixed directions are wrong too.
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(DATA2, 512, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    header(&f, VIRTIO_BLK_T_OUT, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    header(&f, VIRTIO_BLK_T_GET_ID, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 20, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(failures(&f, RequestError::WrongDirection), 4);
    assert_eq!(
        image_bytes(&f),
        (0..(SECTORS * 512) as usize)
            .map(pattern)
            .collect::<Vec<_>>()
    );
}

#[test]
fn addresses_outside_guest_memory() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(OUTSIDE, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // Straddling the end of guest memory.
    let edge = MEM_SIZE as u64 - 256;
    let descs = [
        desc(HDR, 16, false),
        desc(edge, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // Address arithmetic that would wrap.
    let descs = [
        desc(HDR, 16, false),
        desc(u64::MAX - 100, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    // Header outside.
    let descs = [
        desc(OUTSIDE, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(failures(&f, RequestError::BadAddress), 4);
}

#[test]
fn past_end_of_disk() {
    let f = fixture();
    for (request_type, sector) in [
        (VIRTIO_BLK_T_IN, SECTORS - 1),
        (VIRTIO_BLK_T_IN, SECTORS),
        (VIRTIO_BLK_T_IN, u64::MAX),
        (VIRTIO_BLK_T_OUT, SECTORS - 1),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1),
    ] {
        header(&f, request_type, sector);
        let writable = request_type == VIRTIO_BLK_T_IN;
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 1024, writable),
            desc(STATUS, 1, true),
        ];
        expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    }
    assert_eq!(failures(&f, RequestError::OutOfRange), 5);
    // The last sector itself is fine.
    header(&f, VIRTIO_BLK_T_IN, SECTORS - 1);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(DATA, 512), (STATUS, 1)]), OK, 513);
    assert_eq!(
        image_bytes(&f),
        (0..(SECTORS * 512) as usize)
            .map(pattern)
            .collect::<Vec<_>>()
    );
}

#[test]
fn unaligned_length() {
    let f = fixture();
    header(&f, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 500, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    header(&f, VIRTIO_BLK_T_OUT, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 513, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    assert_eq!(failures(&f, RequestError::UnalignedLength), 2);
}

#[test]
fn read_only_disk() {
    let f = fixture_with(true);
    header(&f, VIRTIO_BLK_T_OUT, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, false),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&f, request_type, 0);
        discard_segment(&f, DATA, 0, 1, 0);
        let descs = [
            desc(HDR, 16, false),
            desc(DATA, 16, false),
            desc(STATUS, 1, true),
        ];
        expect(run(&f, &descs, &[(STATUS, 1)]), IOERR, 1);
    }
    assert_eq!(failures(&f, RequestError::ReadOnly), 3);
    // Reads and flushes still work.
    header(&f, VIRTIO_BLK_T_IN, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(DATA, 512), (STATUS, 1)]), OK, 513);
    header(&f, VIRTIO_BLK_T_FLUSH, 0);
    let descs = [desc(HDR, 16, false), desc(STATUS, 1, true)];
    expect(run(&f, &descs, &[(STATUS, 1)]), OK, 1);
    assert_eq!(
        image_bytes(&f),
        (0..(SECTORS * 512) as usize)
            .map(pattern)
            .collect::<Vec<_>>()
    );
}

#[test]
fn device_keeps_working_after_errors() {
    let f = fixture();
    header(&f, 1234, 0);
    expect(
        run(
            &f,
            &[desc(HDR, 16, false), desc(STATUS, 1, true)],
            &[(STATUS, 1)],
        ),
        UNSUPP,
        1,
    );
    run(&f, &[desc(HDR, 16, false)], &[]);
    header(&f, VIRTIO_BLK_T_IN, 2);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, true),
        desc(STATUS, 1, true),
    ];
    expect(run(&f, &descs, &[(DATA, 512), (STATUS, 1)]), OK, 513);
    assert_eq!(f.device.stats().failed_total(), 2);
    assert_eq!(f.device.stats().completed(), 1);
}
