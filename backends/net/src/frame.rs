//! Frames as they travel through the switch: the virtio-net header (virtio 1.2, 5.1.6)
//! and the Ethernet frame behind it.
//!
//! Every port speaks the same header: guests in their virtqueues (10 bytes for legacy
//! drivers without `VIRTIO_NET_F_MRG_RXBUF`, 12 bytes otherwise) and tap devices through
//! `IFF_VNET_HDR` (set to 12 bytes with TUNSETVNETHDRSZ). Inside the switch a frame is a
//! [`Packet`]: the decoded header plus the frame bytes, so a frame from one port reaches
//! another with its checksum and segmentation offload requests intact.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Length of `struct virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Length of the legacy `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN_LEGACY: usize = 10;

/// Length of an Ethernet header (destination, source, EtherType).
pub const ETH_HLEN: usize = 14;

/// Largest frame (without the virtio-net header) the switch carries: a 64 KiB GSO
/// packet plus its Ethernet and VLAN headers, the largest a Linux guest sends.
pub const MAX_FRAME_LEN: usize = 65562;

/// The virtio-net header length a driver uses with `features` (virtio 1.2, 5.1.6:
/// `num_buffers` is present with VERSION_1 or MRG_RXBUF).
pub fn vnet_hdr_len(features: u64) -> usize {
    if features & (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        VNET_HDR_LEN
    } else {
        VNET_HDR_LEN_LEGACY
    }
}

/// Segmentation offload a frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// A TCP/IPv4 super-frame to be cut into `mss`-byte segments.
    Tcp4 {
        /// Payload bytes per segment (`gso_size`).
        mss: u16,
    },
    /// A TCP/IPv6 super-frame.
    Tcp6 {
        /// Payload bytes per segment.
        mss: u16,
    },
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a virtio-net header plus an Ethernet header.
    #[error("frame of {0} bytes is shorter than its headers")]
    TooShort(usize),
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("frame is longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    /// A segmentation type the switch does not offer (UDP, USO, unknown).
    #[error("unsupported gso_type {0:#x}")]
    UnsupportedGso(u8),
    /// GSO with a zero segment size, or without a partial checksum.
    #[error("GSO frame without gso_size or NEEDS_CSUM")]
    BadGso,
    /// The checksum position lies outside the frame.
    #[error("checksum at {start}+{offset} lies outside the frame")]
    BadChecksumOffset {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
    },
}

/// The virtio-net header, decoded (all fields little-endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// Receive buffers the frame uses (MRG_RXBUF); 1 otherwise.
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Decodes the first 10 or 12 bytes of `bytes` (12 when `bytes` holds them).
    pub fn parse(bytes: &[u8]) -> Option<VnetHdr> {
        let b = bytes.get(..VNET_HDR_LEN_LEGACY)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let num_buffers = bytes
            .get(10..12)
            .map_or(0, |n| u16::from_le_bytes([n[0], n[1]]));
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers,
        })
    }

    /// Encodes into `out` (10 or 12 bytes: `num_buffers` only fits in 12).
    pub fn write(&self, out: &mut [u8]) {
        let mut full = [0u8; VNET_HDR_LEN];
        full[0] = self.flags;
        full[1] = self.gso_type;
        full[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        full[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        full[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        full[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        full[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        let n = out.len().min(VNET_HDR_LEN);
        out[..n].copy_from_slice(&full[..n]);
    }

    /// Whether the frame carries a partial checksum to be completed.
    pub fn needs_csum(&self) -> bool {
        u32::from(self.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }

    /// The segmentation the frame asks for, if any.
    pub fn gso(&self) -> Result<Option<Gso>, FrameError> {
        let kind = u32::from(self.gso_type) & !VIRTIO_NET_HDR_GSO_ECN;
        if u32::from(self.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0 {
            // HOST_ECN is not offered, so the ECN bit is never valid here.
            return Err(FrameError::UnsupportedGso(self.gso_type));
        }
        let mss = self.gso_size;
        match kind {
            VIRTIO_NET_HDR_GSO_NONE => Ok(None),
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => {
                if mss == 0 || !self.needs_csum() {
                    return Err(FrameError::BadGso);
                }
                Ok(Some(if kind == VIRTIO_NET_HDR_GSO_TCPV4 {
                    Gso::Tcp4 { mss }
                } else {
                    Gso::Tcp6 { mss }
                }))
            }
            _ => Err(FrameError::UnsupportedGso(self.gso_type)),
        }
    }

    /// Checks the header against a frame of `frame_len` bytes (without the header):
    /// known offloads only, checksum position inside the frame.
    pub fn validate(&self, frame_len: usize) -> Result<Option<Gso>, FrameError> {
        if frame_len < ETH_HLEN {
            return Err(FrameError::TooShort(frame_len));
        }
        if frame_len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong);
        }
        let gso = self.gso()?;
        if self.needs_csum() {
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(FrameError::BadChecksumOffset {
                    start: self.csum_start,
                    offset: self.csum_offset,
                });
            }
        }
        Ok(gso)
    }

    /// A header that asks for nothing (a complete, checksummed frame).
    pub fn plain() -> VnetHdr {
        VnetHdr {
            num_buffers: 1,
            ..VnetHdr::default()
        }
    }
}

/// One frame inside the switch: a header and the Ethernet frame in a reusable buffer
/// (`buf[start..]`), so the bytes read from a guest or a tap need no second copy.
#[derive(Debug, Clone, Default)]
pub struct Packet {
    /// The decoded virtio-net header.
    pub hdr: VnetHdr,
    /// Backing storage; the frame is `buf[start..]`.
    pub buf: Vec<u8>,
    /// Where the frame starts in `buf` (after the raw header bytes).
    pub start: usize,
}

impl Packet {
    /// A packet holding a copy of `frame` with header `hdr`.
    pub fn new(hdr: VnetHdr, frame: &[u8]) -> Packet {
        Packet {
            hdr,
            buf: frame.to_vec(),
            start: 0,
        }
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or(&[])
    }

    /// The Ethernet frame, writable (for completing a checksum in place).
    pub fn frame_mut(&mut self) -> &mut [u8] {
        let start = self.start.min(self.buf.len());
        &mut self.buf[start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_features() {
        assert_eq!(vnet_hdr_len(0), 10);
        assert_eq!(vnet_hdr_len(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
        assert_eq!(vnet_hdr_len(1 << VIRTIO_F_VERSION_1), 12);
    }

    #[test]
    fn header_round_trip() {
        let hdr = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 74,
            gso_size: 1440,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut raw = [0u8; 12];
        hdr.write(&mut raw);
        assert_eq!(VnetHdr::parse(&raw), Some(hdr));
        let mut legacy = [0u8; 10];
        hdr.write(&mut legacy);
        assert_eq!(
            VnetHdr::parse(&legacy),
            Some(VnetHdr {
                num_buffers: 0,
                ..hdr
            })
        );
        assert_eq!(VnetHdr::parse(&raw[..9]), None);
    }

    #[test]
    fn validation() {
        let plain = VnetHdr::plain();
        assert_eq!(plain.validate(60), Ok(None));
        assert_eq!(plain.validate(13), Err(FrameError::TooShort(13)));
        assert_eq!(plain.validate(MAX_FRAME_LEN + 1), Err(FrameError::TooLong));
        let csum = VnetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 16,
            ..plain
        };
        assert_eq!(csum.validate(52), Ok(None));
        assert!(matches!(
            csum.validate(51),
            Err(FrameError::BadChecksumOffset { .. })
        ));
        let tso = VnetHdr {
            gso_type: 1,
            gso_size: 1448,
            ..csum
        };
        assert_eq!(tso.validate(9000), Ok(Some(Gso::Tcp4 { mss: 1448 })));
        let tso6 = VnetHdr { gso_type: 4, ..tso };
        assert_eq!(tso6.validate(9000), Ok(Some(Gso::Tcp6 { mss: 1448 })));
        for bad in [VnetHdr { gso_size: 0, ..tso }, VnetHdr { flags: 0, ..tso }] {
            assert_eq!(bad.validate(9000), Err(FrameError::BadGso));
        }
        for gso_type in [3u8, 5, 0x81, 9] {
            assert_eq!(
                VnetHdr { gso_type, ..tso }.validate(9000),
                Err(FrameError::UnsupportedGso(gso_type))
            );
        }
    }

    #[test]
    fn packet_views() {
        let mut p = Packet {
            hdr: VnetHdr::plain(),
            buf: vec![9, 9, 1, 2, 3],
            start: 2,
        };
        assert_eq!(p.frame(), &[1, 2, 3]);
        p.frame_mut()[0] = 7;
        assert_eq!(p.frame(), &[7, 2, 3]);
        p.start = 10;
        assert!(p.frame().is_empty());
        assert!(p.frame_mut().is_empty());
    }
}
