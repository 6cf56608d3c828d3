//! Software fallbacks for the offloads a receiver did not negotiate.
//!
//! A frame may ask for a partial checksum to be completed (`NEEDS_CSUM`) or to be cut
//! into TCP segments (`GSO_TCPV4/6`). When the receiving guest negotiated the matching
//! `VIRTIO_NET_F_GUEST_*` features, or the receiver is a tap (the kernel takes both), the
//! header travels with the frame unchanged. Otherwise the switch does the work here, as
//! the Linux stack's `skb_checksum_help` and `skb_segment` would: checksums are completed
//! (RFC 1071 one's complement sum; the checksum field already holds the pseudo-header sum)
//! and TCP super-frames are cut into `mss`-byte segments with their IPv4 length, ID and
//! header checksum, IPv6 payload length, TCP sequence number, flags and checksum fixed.

use crate::frame::{Gso, Packet, VnetHdr, ETH_HLEN};

/// Most segments one super-frame may be cut into (64 KiB at Linux's minimum MSS of 48
/// is 1366); anything more is a malformed request.
pub const MAX_SEGMENTS: usize = 2048;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why an offload could not be done in software.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The checksum position lies outside the frame.
    #[error("checksum position outside the frame")]
    ChecksumOutOfRange,
    /// The frame is not Ethernet + IPv4/IPv6 (without extension headers) + TCP.
    #[error("GSO frame is not TCP over IPv4/IPv6: {0}")]
    NotTcp(&'static str),
    /// The GSO type does not match the IP version found.
    #[error("GSO type does not match the IP version")]
    WrongIpVersion,
    /// More than [`MAX_SEGMENTS`] segments.
    #[error("GSO frame would need more than {MAX_SEGMENTS} segments")]
    TooManySegments,
}

/// RFC 1071 one's complement sum, accumulated over several slices.
#[derive(Debug, Default, Clone, Copy)]
struct Checksum(u64);

impl Checksum {
    /// Adds `bytes` as big-endian 16-bit words (an odd last byte is padded with zero).
    /// Every slice but the last must have even length.
    fn add(mut self, bytes: &[u8]) -> Checksum {
        let mut chunks = bytes.chunks_exact(2);
        for w in &mut chunks {
            self.0 += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = chunks.remainder() {
            self.0 += u64::from(*last) << 8;
        }
        self
    }

    fn add_u16(mut self, v: u16) -> Checksum {
        self.0 += u64::from(v);
        self
    }

    /// The folded sum, complemented: the value to store in a checksum field.
    fn finish(self) -> u16 {
        let mut s = self.0;
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

/// Completes a partial checksum in place: the one's complement sum of
/// `frame[start..]` (whose checksum field holds the pseudo-header sum) is stored at
/// `start + offset`.
pub fn complete_checksum(
    frame: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), OffloadError> {
    let field = start
        .checked_add(offset)
        .filter(|f| f + 2 <= frame.len())
        .ok_or(OffloadError::ChecksumOutOfRange)?;
    let sum = Checksum::default().add(&frame[start..]).finish();
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Header layout of a TCP frame.
#[derive(Debug, Clone, Copy)]
struct TcpLayout {
    l3: usize,
    l4: usize,
    payload: usize,
    ipv6: bool,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Finds the IP and TCP headers (up to two VLAN tags, no IPv6 extension headers).
fn tcp_layout(frame: &[u8]) -> Result<TcpLayout, OffloadError> {
    let short = || OffloadError::NotTcp("truncated headers");
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(frame.get(..ETH_HLEN).ok_or_else(short)?, 12);
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        ethertype = be16(frame.get(..l3 + 4).ok_or_else(short)?, l3 + 2);
        l3 += 4;
    }
    let (l4, ipv6) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ip = frame.get(l3..l3 + 20).ok_or_else(short)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Err(OffloadError::NotTcp("bad IPv4 header"));
            }
            if ip[9] != IPPROTO_TCP {
                return Err(OffloadError::NotTcp("IPv4 payload is not TCP"));
            }
            (l3 + ihl, false)
        }
        ETHERTYPE_IPV6 => {
            let ip = frame.get(l3..l3 + 40).ok_or_else(short)?;
            if ip[0] >> 4 != 6 {
                return Err(OffloadError::NotTcp("bad IPv6 header"));
            }
            if ip[6] != IPPROTO_TCP {
                return Err(OffloadError::NotTcp("IPv6 next header is not TCP"));
            }
            (l3 + 40, true)
        }
        _ => return Err(OffloadError::NotTcp("not IP")),
    };
    let tcp = frame.get(l4..l4 + 20).ok_or_else(short)?;
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || l4 + doff > frame.len() {
        return Err(OffloadError::NotTcp("bad TCP header"));
    }
    Ok(TcpLayout {
        l3,
        l4,
        payload: l4 + doff,
        ipv6,
    })
}

/// Fixes lengths and checksums of one TCP segment built in `seg` (headers + payload).
fn finish_segment(seg: &mut [u8], lay: TcpLayout) {
    let l4_len = seg.len() - lay.l4;
    if lay.ipv6 {
        seg[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let total = (seg.len() - lay.l3) as u16;
        seg[lay.l3 + 2..lay.l3 + 4].copy_from_slice(&total.to_be_bytes());
        seg[lay.l3 + 10..lay.l3 + 12].fill(0);
        let sum = Checksum::default().add(&seg[lay.l3..lay.l4]).finish();
        seg[lay.l3 + 10..lay.l3 + 12].copy_from_slice(&sum.to_be_bytes());
    }
    seg[lay.l4 + 16..lay.l4 + 18].fill(0);
    let pseudo = if lay.ipv6 {
        Checksum::default()
            .add(&seg[lay.l3 + 8..lay.l3 + 40])
            .add_u16((l4_len >> 16) as u16)
            .add_u16(l4_len as u16)
    } else {
        Checksum::default()
            .add(&seg[lay.l3 + 12..lay.l3 + 20])
            .add_u16(l4_len as u16)
    };
    let sum = pseudo
        .add_u16(u16::from(IPPROTO_TCP))
        .add(&seg[lay.l4..])
        .finish();
    seg[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&sum.to_be_bytes());
}

/// Cuts a TCP super-frame into complete segments of at most `mss` payload bytes each,
/// appended to `out` with plain headers (checksums computed).
pub fn segment_tcp(frame: &[u8], gso: Gso, out: &mut Vec<Packet>) -> Result<(), OffloadError> {
    let lay = tcp_layout(frame)?;
    let (mss, want_v6) = match gso {
        Gso::Tcp4 { mss } => (usize::from(mss), false),
        Gso::Tcp6 { mss } => (usize::from(mss), true),
    };
    if lay.ipv6 != want_v6 {
        return Err(OffloadError::WrongIpVersion);
    }
    let headers = &frame[..lay.payload];
    let payload = &frame[lay.payload..];
    let count = payload.len().div_ceil(mss).max(1);
    if count > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments);
    }
    let seq = u32::from_be_bytes(frame[lay.l4 + 4..lay.l4 + 8].try_into().unwrap_or([0; 4]));
    let ip_id = be16(frame, lay.l3 + 4);
    let flags = frame[lay.l4 + 13];
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        let mut seg = Vec::with_capacity(headers.len() + chunk.len());
        seg.extend_from_slice(headers);
        seg.extend_from_slice(chunk);
        let offset = (i * mss) as u32;
        seg[lay.l4 + 4..lay.l4 + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        seg[lay.l4 + 13] = f;
        if !lay.ipv6 {
            let id = ip_id.wrapping_add(i as u16);
            seg[lay.l3 + 4..lay.l3 + 6].copy_from_slice(&id.to_be_bytes());
        }
        finish_segment(&mut seg, lay);
        out.push(Packet::new(VnetHdr::plain(), &seg));
    }
    Ok(())
}

/// Turns `pkt` into frames that need no offload from the receiver: segments of a GSO
/// frame, or the frame with its checksum completed. Appends them to `out`.
pub fn resolve_offloads(pkt: &Packet, out: &mut Vec<Packet>) -> Result<(), OffloadError> {
    let gso = pkt
        .hdr
        .gso()
        .map_err(|_| OffloadError::NotTcp("unsupported GSO type"))?;
    if let Some(gso) = gso {
        return segment_tcp(pkt.frame(), gso, out);
    }
    let mut plain = Packet::new(VnetHdr::plain(), pkt.frame());
    if pkt.hdr.needs_csum() {
        complete_checksum(
            plain.frame_mut(),
            usize::from(pkt.hdr.csum_start),
            usize::from(pkt.hdr.csum_offset),
        )?;
    }
    out.push(plain);
    Ok(())
}

#[cfg(test)]
#[path = "offload_tests.rs"]
mod tests;
