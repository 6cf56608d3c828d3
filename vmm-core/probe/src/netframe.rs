//! net-echo's Ethernet frames (host-tested).
//!
//! ```text
//! 0      6      12        14    22    30
//! | dst  | src  | 0x88B5  | seq | tsc | fill ...                       |
//! ```
//!
//! EtherType 0x88B5 is IEEE 802's "local experimental" type, so no real stack takes
//! these frames for its own. `seq` and `tsc` are little-endian `u64`s: the sender's
//! sequence number and its TSC when it built the frame. The fill bytes up to the frame
//! size are a pure function of (seed, seq), so an echoed frame can be checked byte for
//! byte without keeping a copy of what was sent. Two sequence numbers are reserved:
//! [`SEQ_HELLO`] (the sender looking for its echo) and [`SEQ_STOP`] (the run is over).

use crate::rng::{mix64, SplitMix64};

/// EtherType of net-echo frames: IEEE 802 local experimental EtherType 1.
pub const ETHERTYPE: u16 = 0x88b5;
/// Ethernet header: destination, source, EtherType.
pub const ETH_HEADER: usize = 14;
/// Bytes before the fill: Ethernet header, `seq`, `tsc`.
pub const FIXED: usize = ETH_HEADER + 16;
/// Destination of the sender's hello frames.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// `seq` of a hello frame: the echo returns it like any other, which tells the sender
/// the echo's MAC address.
pub const SEQ_HELLO: u64 = u64::MAX - 1;
/// `seq` of a stop frame: the echo returns it once (the sender's acknowledgement) and
/// ends.
pub const SEQ_STOP: u64 = u64::MAX;

const SEQ_AT: usize = ETH_HEADER;
const TSC_AT: usize = ETH_HEADER + 8;

/// What a received frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not a net-echo frame (another EtherType, or too short to be one).
    Foreign,
    /// A net-echo frame whose fill matches its `seq`.
    Echo {
        /// Sequence number.
        seq: u64,
        /// The sender's TSC at sending.
        tsc: u64,
    },
    /// A net-echo frame whose fill does not match its `seq`.
    Corrupt {
        /// Sequence number as found in the frame.
        seq: u64,
    },
}

/// Writes a whole frame into `frame` (its length is the frame size, at least [`FIXED`]).
pub fn build(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], seed: u64, seq: u64, tsc: u64) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    frame[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
    frame[TSC_AT..TSC_AT + 8].copy_from_slice(&tsc.to_le_bytes());
    let mut rng = fill_rng(seed, seq);
    for chunk in frame[FIXED..].chunks_mut(8) {
        let value = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&value[..chunk.len()]);
    }
}

/// Classifies a received frame and checks its fill.
pub fn parse(frame: &[u8], seed: u64) -> Parsed {
    if frame.len() < FIXED || frame[12..14] != ETHERTYPE.to_be_bytes() {
        return Parsed::Foreign;
    }
    let seq = read_u64(frame, SEQ_AT);
    let tsc = read_u64(frame, TSC_AT);
    let mut rng = fill_rng(seed, seq);
    let intact = frame[FIXED..].chunks(8).all(|chunk| {
        let value = rng.next_u64().to_le_bytes();
        *chunk == value[..chunk.len()]
    });
    if intact {
        Parsed::Echo { seq, tsc }
    } else {
        Parsed::Corrupt { seq }
    }
}

/// The `seq` of a net-echo frame, without checking the fill.
pub fn seq_of(frame: &[u8]) -> Option<u64> {
    (frame.len() >= FIXED && frame[12..14] == ETHERTYPE.to_be_bytes())
        .then(|| read_u64(frame, SEQ_AT))
}

/// Destination MAC address.
pub fn dst(frame: &[u8]) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[0..6]);
    mac
}

/// Source MAC address.
pub fn src(frame: &[u8]) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[6..12]);
    mac
}

/// Turns a received frame into its answer: destination = the old source, source = us.
/// Everything after the MAC addresses is left as it came.
pub fn answer(frame: &mut [u8], own: [u8; 6]) {
    let from = src(frame);
    frame[0..6].copy_from_slice(&from);
    frame[6..12].copy_from_slice(&own);
}

/// A locally administered unicast address for a device without `VIRTIO_NET_F_MAC`:
/// `02:70:72:` ("pr") then a role byte and two bytes of the seed.
pub fn local_mac(role: u8, seed: u64) -> [u8; 6] {
    let s = seed.to_le_bytes();
    [0x02, 0x70, 0x72, role, s[1], s[0]]
}

fn read_u64(frame: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&frame[at..at + 8]);
    u64::from_le_bytes(bytes)
}

fn fill_rng(seed: u64, seq: u64) -> SplitMix64 {
    SplitMix64::new(mix64(seed) ^ seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn frames_round_trip_at_every_size_boundary() {
        for size in [60usize, 61, 64, 67, 1513, 1514] {
            let mut frame = vec![0u8; size];
            build(&mut frame, B, A, 7, 42, 0x1234);
            assert_eq!(dst(&frame), B);
            assert_eq!(src(&frame), A);
            assert_eq!(
                parse(&frame, 7),
                Parsed::Echo {
                    seq: 42,
                    tsc: 0x1234
                }
            );
            assert_eq!(seq_of(&frame), Some(42));
        }
    }

    #[test]
    fn any_changed_fill_byte_is_corruption() {
        let mut frame = vec![0u8; 128];
        build(&mut frame, B, A, 7, 9, 1);
        for at in FIXED..frame.len() {
            frame[at] ^= 0x10;
            assert_eq!(parse(&frame, 7), Parsed::Corrupt { seq: 9 }, "byte {at}");
            frame[at] ^= 0x10;
        }
        // Another seed, or a changed sequence number, does not match the fill either.
        assert_eq!(parse(&frame, 8), Parsed::Corrupt { seq: 9 });
        frame[SEQ_AT] ^= 1;
        assert_eq!(parse(&frame, 7), Parsed::Corrupt { seq: 8 });
    }

    #[test]
    fn fill_differs_between_sequence_numbers() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        build(&mut a, B, A, 1, 1, 0);
        build(&mut b, B, A, 1, 2, 0);
        assert_ne!(a[FIXED..], b[FIXED..]);
    }

    #[test]
    fn foreign_and_short_frames() {
        let mut frame = vec![0u8; 60];
        build(&mut frame, B, A, 1, 1, 0);
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse(&frame, 1), Parsed::Foreign);
        assert_eq!(seq_of(&frame), None);
        assert_eq!(parse(&[0u8; 10], 1), Parsed::Foreign);
        assert_eq!(parse(&[], 1), Parsed::Foreign);
    }

    #[test]
    fn answer_swaps_addresses_and_keeps_the_rest() {
        let mut frame = vec![0u8; 100];
        build(&mut frame, BROADCAST, A, 3, SEQ_HELLO, 5);
        let before = frame.clone();
        answer(&mut frame, B);
        assert_eq!((dst(&frame), src(&frame)), (A, B));
        assert_eq!(frame[12..], before[12..]);
        assert_eq!(
            parse(&frame, 3),
            Parsed::Echo {
                seq: SEQ_HELLO,
                tsc: 5
            }
        );
    }

    #[test]
    fn local_macs_are_unicast_and_locally_administered() {
        let mac = local_mac(1, 0x0102);
        assert_eq!(mac[0] & 1, 0);
        assert_eq!(mac[0] & 2, 2);
        assert_ne!(local_mac(1, 5), local_mac(2, 5));
    }
}
