//! The per-block checksum table: one crc32c per 4096-byte block of a member's data area,
//! stored on that member.
//!
//! Format (version 1). The table is a run of 4096-byte pages starting at the superblock's
//! `checksum_offset`; page `p` covers data blocks `[p * 511, (p + 1) * 511)` and is stored twice,
//! copy `c` (0 or 1) at `checksum_offset + (2p + c) * 4096`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4088 | 511 entries of 8 bytes: `current` crc32c (u32), `previous` crc32c (u32) |
//! | 4088 | 4 | generation: bumped on every write of the page; the copy written is `generation % 2` |
//! | 4092 | 4 | crc32c of (format version, volume UUID, page number, bytes 0..4092) |
//!
//! Why two copies: a page write torn by a crash leaves the other copy, one generation older,
//! intact. Why two crcs per block: the page is written durably (RWF_DSYNC) before the data block it
//! describes, so after a crash the block holds either the data `current` describes or the data
//! `previous` describes; anything else is damage. Outside crash recovery only `current` is
//! accepted, so a write the disk claimed and then lost is caught as well.
//!
//! The page crc is seeded with the volume UUID and page number, so a page of another volume or
//! one written to the wrong place never verifies.

/// Bytes of data each entry covers.
pub const BLOCK: u64 = 4096;
pub const PAGE: usize = 4096;
pub const ENTRIES_PER_PAGE: u64 = 511;
pub const FORMAT_VERSION: u32 = 1;
const GENERATION_OFFSET: usize = 4088;
const CRC_OFFSET: usize = 4092;

/// The checksums of one block: what it holds now, and what it held before the last write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub current: u32,
    pub previous: u32,
}

/// The entry of a block whose content is not known (a member being rebuilt, or a page whose
/// both copies were lost): reads of it are healed from redundancy, never trusted.
pub const UNKNOWN: Entry = Entry { current: 0, previous: 0 };

/// What a block's bytes are, judged by its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Current,
    /// The data from before the last write: only right after a crash (see the module doc).
    Previous,
    Unknown,
    Bad,
}

impl Entry {
    pub fn judge(&self, crc: u32) -> Verdict {
        if *self == UNKNOWN {
            Verdict::Unknown
        } else if crc == self.current {
            Verdict::Current
        } else if crc == self.previous {
            Verdict::Previous
        } else {
            Verdict::Bad
        }
    }
}

/// crc32c of one data block.
pub fn block_crc(block: &[u8]) -> u32 {
    crate::codec::crc32c(block)
}

/// Entry of a block of zeros (every block of a freshly created member).
pub fn zero_entry() -> Entry {
    let crc = block_crc(&[0u8; BLOCK as usize]);
    Entry { current: crc, previous: crc }
}

/// Pages needed for `data_bytes` of member data.
pub fn pages_for(data_bytes: u64) -> u64 {
    data_bytes.div_ceil(BLOCK).div_ceil(ENTRIES_PER_PAGE)
}

/// Bytes of member space the table (both copies of every page) takes.
pub fn table_bytes(data_bytes: u64) -> u64 {
    pages_for(data_bytes) * 2 * PAGE as u64
}

/// Where copy `copy` of page `page` lives, relative to the table's start.
pub fn page_offset(page: u64, copy: u32) -> u64 {
    (2 * page + copy as u64) * PAGE as u64
}

fn page_crc(uuid: &[u8; 16], page: u64, bytes: &[u8]) -> u32 {
    let mut seed = [0u8; 28];
    seed[..4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    seed[4..20].copy_from_slice(uuid);
    seed[20..].copy_from_slice(&page.to_le_bytes());
    crate::codec::crc32c_append(crate::codec::crc32c(&seed), &bytes[..CRC_OFFSET])
}

/// Encodes page `page` with `entries` (at most 511; the rest are [`UNKNOWN`]) into `out`.
pub fn encode_page(out: &mut [u8], uuid: &[u8; 16], page: u64, generation: u32, entries: &[Entry]) {
    assert!(out.len() == PAGE && entries.len() as u64 <= ENTRIES_PER_PAGE, "checksum page shape");
    out.fill(0);
    for (i, e) in entries.iter().enumerate() {
        out[8 * i..8 * i + 4].copy_from_slice(&e.current.to_le_bytes());
        out[8 * i + 4..8 * i + 8].copy_from_slice(&e.previous.to_le_bytes());
    }
    out[GENERATION_OFFSET..CRC_OFFSET].copy_from_slice(&generation.to_le_bytes());
    let crc = page_crc(uuid, page, out);
    out[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// A page copy that verified: its generation and its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedPage {
    pub generation: u32,
    pub entries: Vec<Entry>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

/// Decodes one page copy; `None` if it does not verify (torn, foreign, misplaced, never written).
pub fn decode_page(bytes: &[u8], uuid: &[u8; 16], page: u64) -> Option<DecodedPage> {
    if bytes.len() != PAGE || page_crc(uuid, page, bytes) != u32_at(bytes, CRC_OFFSET) {
        return None;
    }
    let entries = (0..ENTRIES_PER_PAGE as usize).map(|i| Entry { current: u32_at(bytes, 8 * i), previous: u32_at(bytes, 8 * i + 4) }).collect();
    Some(DecodedPage { generation: u32_at(bytes, GENERATION_OFFSET), entries })
}

/// The newer of two page copies (generations compare with wrap-around); `None` if neither verifies.
pub fn newest_page(copies: [&[u8]; 2], uuid: &[u8; 16], page: u64) -> Option<DecodedPage> {
    match (decode_page(copies[0], uuid, page), decode_page(copies[1], uuid, page)) {
        (Some(a), Some(b)) => Some(if (b.generation.wrapping_sub(a.generation) as i32) > 0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [7; 16];

    fn sample_entries() -> Vec<Entry> {
        (0..ENTRIES_PER_PAGE as u32).map(|i| Entry { current: i.wrapping_mul(2654435761), previous: i }).collect()
    }

    #[test]
    fn page_roundtrip() {
        let mut page = vec![0u8; PAGE];
        encode_page(&mut page, &UUID, 3, 9, &sample_entries());
        let d = decode_page(&page, &UUID, 3).unwrap();
        assert_eq!(d.generation, 9);
        assert_eq!(d.entries, sample_entries());
    }

    #[test]
    fn foreign_misplaced_and_flipped_pages_do_not_verify() {
        let mut page = vec![0u8; PAGE];
        encode_page(&mut page, &UUID, 3, 9, &sample_entries());
        assert!(decode_page(&page, &[8; 16], 3).is_none(), "another volume's page");
        assert!(decode_page(&page, &UUID, 4).is_none(), "a page written to the wrong place");
        for bit in (0..PAGE * 8).step_by(37) {
            let mut p = page.clone();
            p[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_page(&p, &UUID, 3).is_none(), "bit {bit} flipped");
        }
        assert!(decode_page(&vec![0u8; PAGE], &UUID, 0).is_none(), "a never-written page");
    }

    #[test]
    fn newest_copy_wins_across_wraparound_and_torn_copy_is_ignored() {
        let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
        encode_page(&mut a, &UUID, 0, u32::MAX, &[Entry { current: 1, previous: 2 }]);
        encode_page(&mut b, &UUID, 0, 0, &[Entry { current: 3, previous: 1 }]);
        assert_eq!(newest_page([&a, &b], &UUID, 0).unwrap().generation, 0);
        b[100] ^= 0xff;
        assert_eq!(newest_page([&a, &b], &UUID, 0).unwrap().generation, u32::MAX);
        a[5] ^= 1;
        assert!(newest_page([&a, &b], &UUID, 0).is_none());
    }

    #[test]
    fn judging_blocks() {
        let e = Entry { current: 5, previous: 6 };
        assert_eq!(e.judge(5), Verdict::Current);
        assert_eq!(e.judge(6), Verdict::Previous);
        assert_eq!(e.judge(7), Verdict::Bad);
        assert_eq!(UNKNOWN.judge(0), Verdict::Unknown);
        assert_eq!(zero_entry().judge(block_crc(&[0u8; 4096])), Verdict::Current);
    }

    #[test]
    fn table_size() {
        assert_eq!(pages_for(0), 0);
        assert_eq!(pages_for(4096), 1);
        assert_eq!(pages_for(511 * 4096), 1);
        assert_eq!(pages_for(511 * 4096 + 1), 2);
        assert_eq!(table_bytes(1 << 30), 514 * 2 * 4096);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000), page in any::<u64>()) {
            let _ = decode_page(&bytes, &UUID, page);
        }
    }
}
