//! What every sector of the disk should hold, and the table that says which write
//! last covered it.
//!
//! A sector's content is a pure function of (seed, generation, sector), so the probe
//! stores only one `u32` generation per 512-byte sector, not the data. The first two
//! words name the sector and generation so a misplaced or stale sector can be told
//! apart from a corrupted one.

use crate::rng::{mix64, SplitMix64};

/// virtio-blk sectors are always 512 bytes (virtio 1.2, 5.2.6).
pub const SECTOR_SIZE: usize = 512;

const WORDS: usize = SECTOR_SIZE / 8;
const MAGIC: u64 = 0x4d56_5850; // "PXVM"

/// Where a sector's content came from, as far as its header words tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorOrigin {
    /// The sector number in the header word.
    pub sector: u64,
    /// The generation in the header word.
    pub generation: u32,
}

fn words(seed: u64, generation: u32, sector: u64) -> impl Iterator<Item = u64> {
    let key = mix64(seed ^ mix64(u64::from(generation) ^ mix64(sector ^ 0x5eed_5ec7)));
    let mut rng = SplitMix64::new(key);
    let header = [sector, (u64::from(generation) << 32) | MAGIC];
    header
        .into_iter()
        .chain(core::iter::repeat_with(move || rng.next_u64()))
        .take(WORDS)
}

/// Writes the expected content of `sector` at `generation` into `out`.
pub fn fill_sector(seed: u64, generation: u32, sector: u64, out: &mut [u8; SECTOR_SIZE]) {
    for (chunk, word) in out.chunks_exact_mut(8).zip(words(seed, generation, sector)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
}

/// Whether `data` is the expected content of `sector` at `generation`.
pub fn sector_matches(seed: u64, generation: u32, sector: u64, data: &[u8; SECTOR_SIZE]) -> bool {
    data.chunks_exact(8)
        .zip(words(seed, generation, sector))
        .all(|(chunk, word)| chunk == word.to_le_bytes())
}

/// Reads the header words of a sector written by the probe, if they look like one.
pub fn origin(data: &[u8; SECTOR_SIZE]) -> Option<SectorOrigin> {
    let word = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&data[i * 8..i * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    let tagged = word(1);
    (tagged & 0xffff_ffff == MAGIC).then(|| SectorOrigin {
        sector: word(0),
        generation: (tagged >> 32) as u32,
    })
}

/// Per-sector generation of the last write: 0 = never written, [`UNKNOWN`] = a write
/// failed so the content is undefined. Neither is compared.
#[derive(Debug)]
pub struct GenerationTable<'a> {
    table: &'a mut [u32],
    next: u32,
}

/// Generation of sectors whose last write failed.
pub const UNKNOWN: u32 = u32::MAX;

impl<'a> GenerationTable<'a> {
    /// A table over `table.len()` sectors; all entries are reset to "never written".
    pub fn new(table: &'a mut [u32]) -> Self {
        table.fill(0);
        GenerationTable { table, next: 1 }
    }

    /// Number of sectors covered.
    pub fn sectors(&self) -> u64 {
        self.table.len() as u64
    }

    /// Takes the next generation number; `None` once they run out (4 billion writes).
    pub fn next_generation(&mut self) -> Option<u32> {
        let generation = self.next;
        if generation == UNKNOWN {
            return None;
        }
        self.next += 1;
        Some(generation)
    }

    /// Records that sectors `start..start + count` now hold `generation`.
    /// Out-of-range parts are ignored (the caller never issues them).
    pub fn record(&mut self, start: u64, count: u64, generation: u32) {
        if let Some(range) = self.range(start, count) {
            range.fill(generation);
        }
    }

    /// Expected generation of `sector` if it should be compared.
    pub fn expected(&self, sector: u64) -> Option<u32> {
        let generation = *self.table.get(usize::try_from(sector).ok()?)?;
        (generation != 0 && generation != UNKNOWN).then_some(generation)
    }

    fn range(&mut self, start: u64, count: u64) -> Option<&mut [u32]> {
        let start = usize::try_from(start).ok()?;
        let end = start.checked_add(usize::try_from(count).ok()?)?;
        self.table.get_mut(start..end.min(self.table.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_distinct() {
        let mut a = [0u8; SECTOR_SIZE];
        let mut b = [0u8; SECTOR_SIZE];
        fill_sector(1, 5, 77, &mut a);
        fill_sector(1, 5, 77, &mut b);
        assert_eq!(a, b);
        assert!(sector_matches(1, 5, 77, &a));
        for (seed, generation, sector) in [(2, 5, 77), (1, 6, 77), (1, 5, 78)] {
            fill_sector(seed, generation, sector, &mut b);
            assert_ne!(a, b);
            assert!(!sector_matches(1, 5, 77, &b));
        }
    }

    #[test]
    fn single_bit_flip_is_caught() {
        let mut a = [0u8; SECTOR_SIZE];
        fill_sector(9, 1, 0, &mut a);
        for bit in [0, 100, 511 * 8 + 7] {
            let mut c = a;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(!sector_matches(9, 1, 0, &c));
        }
    }

    #[test]
    fn origin_names_sector_and_generation() {
        let mut a = [0u8; SECTOR_SIZE];
        fill_sector(3, 12, 4096, &mut a);
        assert_eq!(
            origin(&a),
            Some(SectorOrigin {
                sector: 4096,
                generation: 12
            })
        );
        assert_eq!(origin(&[0u8; SECTOR_SIZE]), None);
    }

    #[test]
    fn table_tracks_last_write() {
        let mut storage = vec![7u32; 16];
        let mut table = GenerationTable::new(&mut storage);
        assert_eq!(table.expected(3), None);
        let g1 = table.next_generation().unwrap();
        let g2 = table.next_generation().unwrap();
        table.record(0, 8, g1);
        table.record(4, 100, g2); // clipped at the end
        assert_eq!(table.expected(0), Some(g1));
        assert_eq!(table.expected(3), Some(g1));
        assert_eq!(table.expected(4), Some(g2));
        assert_eq!(table.expected(15), Some(g2));
        assert_eq!(table.expected(16), None);
        table.record(2, 2, UNKNOWN);
        assert_eq!(table.expected(2), None);
        table.record(u64::MAX, 2, g1); // ignored, no overflow
    }

    #[test]
    fn generations_run_out_cleanly() {
        let mut storage = [0u32; 1];
        let mut table = GenerationTable::new(&mut storage);
        table.next = UNKNOWN - 1;
        assert_eq!(table.next_generation(), Some(UNKNOWN - 1));
        assert_eq!(table.next_generation(), None);
    }
}
