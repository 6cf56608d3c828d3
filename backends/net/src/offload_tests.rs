//! Tests of the software offloads. Checksums are verified with a separate, naive
//! implementation of the Internet checksum (RFC 1071), not with the code under test.

use super::*;

/// Naive RFC 1071 sum over the concatenation of `parts`, folded; 0xffff means valid.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u32 = 0;
    for i in (0..bytes.len()).step_by(2) {
        let hi = u32::from(bytes[i]) << 8;
        let lo = bytes.get(i + 1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    sum as u16
}

const MAC_HDR: [u8; 14] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0, 0];

fn tcp_header(seq: u32, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5001u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// An Ethernet + IPv4 + TCP frame whose TCP checksum field holds the pseudo-header
/// sum, as a Linux sender with checksum offload leaves it.
fn ipv4_tcp(payload: &[u8], flags: u8) -> Vec<u8> {
    let mut f = MAC_HDR.to_vec();
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2,
    ];
    let total = (20 + 20 + payload.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(1000, flags));
    f.extend_from_slice(payload);
    let tcp_len = (20 + payload.len()) as u16;
    let pseudo = !ones_sum(&[&ip[12..20], &[0, 6], &tcp_len.to_be_bytes()]);
    // The partial checksum is the (uncomplemented) pseudo-header sum.
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&(!pseudo).to_be_bytes());
    f
}

fn ipv6_tcp(payload: &[u8], flags: u8) -> Vec<u8> {
    let mut f = MAC_HDR.to_vec();
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
    ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let plen = (20 + payload.len()) as u16;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp_header(7, flags));
    f.extend_from_slice(payload);
    f
}

fn tcp_checksum_ok(seg: &[u8], l3: usize, ipv6: bool) -> bool {
    if ipv6 {
        let l4 = l3 + 40;
        let len = ((seg.len() - l4) as u32).to_be_bytes();
        ones_sum(&[&seg[l3 + 8..l3 + 40], &len, &[0, 0, 0, 6], &seg[l4..]]) == 0xffff
    } else {
        let l4 = l3 + 20;
        let len = ((seg.len() - l4) as u16).to_be_bytes();
        ones_sum(&[&seg[l3 + 12..l3 + 20], &[0, 6], &len, &seg[l4..]]) == 0xffff
    }
}

#[test]
fn completes_a_partial_checksum() {
    for len in [0usize, 1, 2, 1000, 1001] {
        let mut f = ipv4_tcp(&payload(len), 0x18);
        assert!(!tcp_checksum_ok(&f, 14, false) || len == 0);
        complete_checksum(&mut f, 34, 16).unwrap();
        assert!(tcp_checksum_ok(&f, 14, false), "payload {len}");
    }
    let mut short = vec![0u8; 40];
    assert_eq!(
        complete_checksum(&mut short, 34, 6),
        Err(OffloadError::ChecksumOutOfRange)
    );
    assert_eq!(
        complete_checksum(&mut short, usize::MAX, 6),
        Err(OffloadError::ChecksumOutOfRange)
    );
}

#[test]
fn segments_ipv4_tcp() {
    let data = payload(3500);
    let frame = ipv4_tcp(&data, 0x19); // FIN | PSH | ACK... (0x19 = FIN|PSH|ACK)
    let mut out = Vec::new();
    segment_tcp(&frame, Gso::Tcp4 { mss: 1448 }, &mut out).unwrap();
    assert_eq!(out.len(), 3);
    let mut joined = Vec::new();
    for (i, p) in out.iter().enumerate() {
        let seg = p.frame();
        assert_eq!(p.hdr, VnetHdr::plain());
        assert_eq!(seg[..14], frame[..14]);
        let total = u16::from_be_bytes([seg[16], seg[17]]) as usize;
        assert_eq!(total, seg.len() - 14);
        assert_eq!(ones_sum(&[&seg[14..34]]), 0xffff, "IPv4 header checksum");
        assert_eq!(u16::from_be_bytes([seg[18], seg[19]]), 0x1234 + i as u16);
        let seq = u32::from_be_bytes(seg[38..42].try_into().unwrap());
        assert_eq!(seq, 1000 + (i * 1448) as u32);
        let fin_psh = seg[47] & 0x09;
        assert_eq!(fin_psh, if i == 2 { 0x09 } else { 0 }, "segment {i}");
        assert!(tcp_checksum_ok(seg, 14, false), "segment {i}");
        joined.extend_from_slice(&seg[54..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn segments_ipv6_tcp_behind_a_vlan_tag() {
    let data = payload(2000);
    let plain = ipv6_tcp(&data, 0x80 | 0x10); // CWR | ACK
    let mut frame = plain[..12].to_vec();
    frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    frame.extend_from_slice(&plain[12..]);
    let mut out = Vec::new();
    segment_tcp(&frame, Gso::Tcp6 { mss: 1000 }, &mut out).unwrap();
    assert_eq!(out.len(), 2);
    for (i, p) in out.iter().enumerate() {
        let seg = p.frame();
        assert_eq!(
            u16::from_be_bytes([seg[22], seg[23]]) as usize,
            seg.len() - 58
        );
        assert!(tcp_checksum_ok(seg, 18, true), "segment {i}");
        assert_eq!(
            seg[18 + 40 + 13] & 0x80 != 0,
            i == 0,
            "CWR only on the first"
        );
        assert_eq!(&seg[78..], &data[i * 1000..(i + 1) * 1000]);
    }
}

#[test]
fn rejects_what_it_cannot_segment() {
    let mut out = Vec::new();
    let v4 = ipv4_tcp(&payload(100), 0x10);
    assert_eq!(
        segment_tcp(&v4, Gso::Tcp6 { mss: 10 }, &mut out),
        Err(OffloadError::WrongIpVersion)
    );
    let mut udp = v4.clone();
    udp[23] = 17;
    assert!(matches!(
        segment_tcp(&udp, Gso::Tcp4 { mss: 10 }, &mut out),
        Err(OffloadError::NotTcp(_))
    ));
    assert!(matches!(
        segment_tcp(&v4[..40], Gso::Tcp4 { mss: 10 }, &mut out),
        Err(OffloadError::NotTcp(_))
    ));
    let mut arp = v4.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert!(segment_tcp(&arp, Gso::Tcp4 { mss: 10 }, &mut out).is_err());
    let big = ipv4_tcp(&payload(3000), 0x10);
    assert_eq!(
        segment_tcp(&big, Gso::Tcp4 { mss: 1 }, &mut out),
        Err(OffloadError::TooManySegments)
    );
    assert!(out.is_empty(), "nothing emitted on failure");
}

#[test]
fn resolve_picks_segmentation_or_checksum() {
    let frame = ipv4_tcp(&payload(3000), 0x18);
    let tso = VnetHdr {
        flags: 1,
        gso_type: 1,
        gso_size: 1000,
        csum_start: 34,
        csum_offset: 16,
        hdr_len: 54,
        num_buffers: 0,
    };
    let mut out = Vec::new();
    resolve_offloads(&Packet::new(tso, &frame), &mut out).unwrap();
    assert_eq!(out.len(), 3);
    out.clear();
    let csum = VnetHdr {
        gso_type: 0,
        gso_size: 0,
        ..tso
    };
    resolve_offloads(&Packet::new(csum, &frame), &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].hdr, VnetHdr::plain());
    assert!(tcp_checksum_ok(out[0].frame(), 14, false));
}
