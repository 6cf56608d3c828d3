//! Reading a descriptor chain from its head index, for requests resubmitted from the
//! in-flight region: virtio-queue builds `DescriptorChain`s only while popping the avail
//! ring, and a resubmitted head is no longer there.
//!
//! The rules are those of a split ring (virtio 1.2, 2.7.5 and 2.7.5.3): follow `next`
//! while VIRTQ_DESC_F_NEXT is set, at most `queue_size` descriptors; an indirect
//! descriptor switches once to its table (16-byte aligned length, no nested indirect);
//! a chain never carries more than 2^32 bytes. A chain that breaks a rule ends there, and
//! the request code turns a short chain into an error status.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const DESC_SIZE: u64 = 16;

/// The descriptors of the chain starting at `head` in the table at `desc_table` of a
/// queue of `queue_size` entries.
pub fn descriptors<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let (mut table, mut size, mut index) = (desc_table, queue_size, head);
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && index < size {
        let Some(addr) = table.checked_add(u64::from(index) * DESC_SIZE) else {
            break;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else {
            break;
        };
        if desc.refers_to_indirect_table() {
            let entries = desc.len() / DESC_SIZE as u32;
            if indirect
                || desc.len() % DESC_SIZE as u32 != 0
                || entries == 0
                || entries > u32::from(u16::MAX)
            {
                break;
            }
            indirect = true;
            table = desc.addr();
            size = entries as u16;
            ttl = size;
            index = 0;
            continue;
        }
        let Some(total) = bytes.checked_add(desc.len()) else {
            break;
        };
        bytes = total;
        out.push(desc);
        if !desc.has_next() {
            break;
        }
        index = desc.next();
        ttl -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, index: u64, d: Descriptor) {
        mem.write_obj(d, GuestAddress(table + 16 * index)).unwrap();
    }

    #[test]
    fn follows_next_and_indirect_tables() {
        let m = mem();
        put(&m, 0x1000, 3, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&m, 0x1000, 1, Descriptor::new(0x2000, 32, INDIRECT, 0));
        put(&m, 0x2000, 0, Descriptor::new(0x5000, 512, NEXT, 1));
        put(&m, 0x2000, 1, Descriptor::new(0x6000, 1, 2, 0));
        let chain = descriptors(&m, GuestAddress(0x1000), 8, 3);
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, vec![0x4000, 0x5000, 0x6000]);
    }

    #[test]
    fn loops_and_bad_heads_end_the_chain() {
        let m = mem();
        put(&m, 0x1000, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&m, 0x1000, 1, Descriptor::new(0x4000, 16, NEXT, 0));
        assert_eq!(descriptors(&m, GuestAddress(0x1000), 4, 0).len(), 4);
        assert!(descriptors(&m, GuestAddress(0x1000), 4, 4).is_empty());
        assert!(descriptors(&m, GuestAddress(0xfff0), 4, 1).is_empty());
        // A nested indirect table is refused.
        put(&m, 0x1000, 2, Descriptor::new(0x2000, 16, INDIRECT, 0));
        put(&m, 0x2000, 0, Descriptor::new(0x2000, 16, INDIRECT, 0));
        assert!(descriptors(&m, GuestAddress(0x1000), 4, 2).is_empty());
    }
}
