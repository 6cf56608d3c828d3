//! Reading a frame from a guest's transmit queue (virtio 1.2, 5.1.6.2).
//!
//! A transmit chain is device-readable descriptors holding the virtio-net header and
//! the frame, in any layout. The bytes are copied once into the switch's buffer (so a
//! guest changing them while the switch decides where they go changes nothing), and the
//! header is checked before anything is forwarded. A malformed chain — a device-writable
//! descriptor, a descriptor outside guest memory, a frame too short or too long, offload
//! requests the switch did not offer — is returned to the driver and counted, never
//! forwarded.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::frame::{FrameError, Gso, Packet, VnetHdr, MAX_FRAME_LEN};

/// Why a transmit chain was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain contains a device-writable descriptor.
    #[error("transmit chain contains a device-writable descriptor")]
    WritableDescriptor,
    /// A descriptor points outside guest memory.
    #[error("transmit descriptor points outside guest memory")]
    BadAddress,
    /// The chain is shorter than the virtio-net header.
    #[error("transmit chain of {0} bytes is shorter than the virtio-net header")]
    NoHeader(usize),
    /// The header or frame is not acceptable.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Copies the chain's bytes into `pkt` (header decoded, frame at `pkt.frame()`) and
/// checks them. `hdr_len` is the driver's header length (10 or 12).
pub fn read_chain(
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
    hdr_len: usize,
    pkt: &mut Packet,
) -> Result<Option<Gso>, TxError> {
    let limit = hdr_len + MAX_FRAME_LEN;
    pkt.buf.clear();
    for desc in descriptors {
        if desc.is_write_only() {
            return Err(TxError::WritableDescriptor);
        }
        let len = desc.len() as usize;
        let at = pkt.buf.len();
        if at + len > limit {
            return Err(FrameError::TooLong.into());
        }
        pkt.buf.resize(at + len, 0);
        mem.read_slice(&mut pkt.buf[at..], desc.addr())
            .map_err(|_| TxError::BadAddress)?;
    }
    if pkt.buf.len() < hdr_len {
        return Err(TxError::NoHeader(pkt.buf.len()));
    }
    let mut hdr = VnetHdr::parse(&pkt.buf[..hdr_len]).ok_or(TxError::NoHeader(hdr_len))?;
    // num_buffers means nothing on transmit (5.1.6.2); it is set when delivered.
    hdr.num_buffers = 0;
    pkt.hdr = hdr;
    pkt.start = hdr_len;
    Ok(hdr.validate(pkt.buf.len() - hdr_len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
        let flags = if writable { 2 } else { 0 };
        Descriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn header_and_frame_across_descriptors() {
        let m = mem();
        let mut bytes = vec![0u8; 12];
        VnetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 9,
            ..VnetHdr::default()
        }
        .write(&mut bytes);
        bytes.extend((0..60u8).map(|b| b + 1));
        m.write_slice(&bytes[..5], GuestAddress(0x100)).unwrap();
        m.write_slice(&bytes[5..40], GuestAddress(0x200)).unwrap();
        m.write_slice(&bytes[40..], GuestAddress(0x300)).unwrap();
        let mut pkt = Packet::default();
        let chain = [
            desc(0x100, 5, false),
            desc(0x200, 35, false),
            desc(0x300, 32, false),
        ];
        let gso = read_chain(&m, chain.into_iter(), 12, &mut pkt).unwrap();
        assert_eq!(gso, None);
        assert_eq!(pkt.frame(), &bytes[12..]);
        assert!(pkt.hdr.needs_csum());
        assert_eq!(pkt.hdr.num_buffers, 0);
        // The legacy header is 10 bytes: the frame starts earlier.
        read_chain(&m, chain.into_iter(), 10, &mut pkt).unwrap();
        assert_eq!(pkt.frame(), &bytes[10..]);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        let mut pkt = Packet::default();
        let read =
            |chain: &[Descriptor], pkt: &mut Packet| read_chain(&m, chain.iter().copied(), 12, pkt);
        assert_eq!(
            read(&[desc(0x100, 100, true)], &mut pkt),
            Err(TxError::WritableDescriptor)
        );
        assert_eq!(
            read(
                &[desc(0x100, 10, false), desc(0xfff0, 0x100, false)],
                &mut pkt
            ),
            Err(TxError::BadAddress)
        );
        assert_eq!(read(&[], &mut pkt), Err(TxError::NoHeader(0)));
        assert_eq!(
            read(&[desc(0x100, 8, false)], &mut pkt),
            Err(TxError::NoHeader(8))
        );
        assert_eq!(
            read(&[desc(0x100, 20, false)], &mut pkt),
            Err(TxError::Frame(FrameError::TooShort(8)))
        );
        let many: Vec<Descriptor> = (0..40).map(|_| desc(0, 0x1000, false)).collect();
        assert_eq!(
            read(&many, &mut pkt),
            Err(TxError::Frame(FrameError::TooLong))
        );
        m.write_slice(&[0, 3], GuestAddress(0x100)).unwrap();
        assert_eq!(
            read(&[desc(0x100, 100, false)], &mut pkt),
            Err(TxError::Frame(FrameError::UnsupportedGso(3)))
        );
    }
}
