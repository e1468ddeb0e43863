//! The partial-parity log (PPL) that closes the RAID-5 write hole.
//!
//! Before a parity level writes any shard of a stripe, it writes a record to a ring on the
//! member holding the stripe's first parity shard. The record names the pieces the write
//! modifies and carries the *partial parity*: the first parity row computed as if the modified
//! pieces were zeros, i.e. from the stripe's data that the write leaves alone. If the daemon
//! dies mid-write and a member is lost too, the lost member's untouched data is rebuilt from the
//! partial parity and the other untouched data, whatever mix of old and new the modified pieces
//! and the parity were left in. (That is md's PPL; a full-stripe write logs a header alone, so
//! the stripe's older records stop counting.)
//!
//! A record also carries the checksums of blocks it stands in for: the rows of the first parity
//! shard the write changes live on the ring's own member, so their checksum-table page need not
//! be made durable before them. After a crash those blocks are accepted if they hold what the
//! table or a record says (see `volume::ppl`).
//!
//! Format (version 2; version 1 records, without block checksums, are still read). The ring is
//! `slots` slots of `4096 + chunk` bytes at the superblock's `ppl_offset`; slots are reused
//! strictly in order, so a record is overwritten only after every older record of the ring.
//! Slot layout: a 4096-byte header, then `len` bytes of partial parity.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `NBRAIDPL` |
//! | 8 | 4 | format version |
//! | 12 | 4 | piece count `p` (at most [`MAX_PIECES`]) |
//! | 16 | 8 | sequence number (volume-wide, increasing) |
//! | 24 | 8 | stripe |
//! | 32 | 8 | first row: offset within the chunk of the partial parity |
//! | 40 | 8 | rows: bytes of partial parity (0 for a full-stripe write) |
//! | 48 | 4 | crc32c of the partial parity |
//! | 52 | 4 | flags: bit 0 full-stripe write |
//! | 56 | 4 | runs of block checksums `r` (version 2) |
//! | 64 | 24·p | pieces: shard (u32), reserved (u32), chunk offset (u64), length (u64) |
//! | 64 + 24·p | | `r` runs: shard (u32), block count `c` (u32), chunk offset (u64), then `c` crc32c (u32) of consecutive 4 KiB blocks |
//! | 4092 | 4 | crc32c of (volume UUID, slot number, bytes 0..4092) |

pub const MAGIC: &[u8; 8] = b"NBRAIDPL";
pub const FORMAT_VERSION: u32 = 2;
/// Records of this version and later carry block checksums.
const FIRST_WITH_CRCS: u32 = 2;
pub const HEADER: usize = 4096;
pub const MAX_PIECES: usize = 128;
const RUNS_AT: usize = 56;
const PIECES_AT: usize = 64;
const RUN_HEADER: usize = 16;
const BLOCK: u64 = 4096;
const CRC_AT: usize = 4092;
const FLAG_FULL: u32 = 1;

/// One modified piece of a stripe: `len` bytes of `shard` at `chunk_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedPiece {
    pub shard: u32,
    pub chunk_offset: u64,
    pub len: u64,
}

/// The crc32c of `crcs.len()` consecutive 4 KiB blocks of `shard`, from `chunk_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockCrcs {
    pub shard: u32,
    pub chunk_offset: u64,
    pub crcs: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub stripe: u64,
    pub lo: u64,
    pub len: u64,
    pub full: bool,
    pub pieces: Vec<LoggedPiece>,
    pub parity_crc: u32,
    /// Checksums of blocks the write changes whose table pages were not made durable first.
    pub block_crcs: Vec<BlockCrcs>,
}

/// Whether a header with `pieces` pieces and runs of these block counts fits in 4096 bytes.
pub fn fits(pieces: usize, run_blocks: impl IntoIterator<Item = usize>) -> bool {
    pieces <= MAX_PIECES
        && run_blocks.into_iter().try_fold(PIECES_AT + 24 * pieces, |at, n| at.checked_add(RUN_HEADER + 4 * n)).is_some_and(|end| end <= CRC_AT)
}

impl Record {
    /// Whether the write modified `shard` at row offset `row` (within the chunk).
    pub fn modifies(&self, shard: u32, row: u64) -> bool {
        self.full || self.pieces.iter().any(|p| p.shard == shard && row >= p.chunk_offset && row < p.chunk_offset + p.len)
    }

    /// Whether the write modified any part of `shard`.
    pub fn touches(&self, shard: u32) -> bool {
        self.full || self.pieces.iter().any(|p| p.shard == shard)
    }
}

/// Ring slots for a chunk size: about 4 MiB of ring, between 16 and 64 slots (a slot is busy
/// only while its stripe write is in flight, so this bounds partial-stripe writes in flight
/// per member).
pub fn slots_for(chunk: u64) -> u32 {
    ((4 << 20) / slot_bytes(chunk)).clamp(16, 64) as u32
}

pub fn slot_bytes(chunk: u64) -> u64 {
    HEADER as u64 + chunk
}

pub fn ring_bytes(chunk: u64, slots: u32) -> u64 {
    slot_bytes(chunk) * slots as u64
}

fn header_crc(uuid: &[u8; 16], slot: u32, b: &[u8]) -> u32 {
    let mut seed = [0u8; 20];
    seed[..16].copy_from_slice(uuid);
    seed[16..].copy_from_slice(&slot.to_le_bytes());
    crate::codec::crc32c_append(crate::codec::crc32c(&seed), &b[..CRC_AT])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

/// Encodes the header of `r` for ring slot `slot` into `out` (4096 bytes).
pub fn encode_header(out: &mut [u8], uuid: &[u8; 16], slot: u32, r: &Record) {
    assert!(out.len() == HEADER && fits(r.pieces.len(), r.block_crcs.iter().map(|b| b.crcs.len())), "PPL header shape");
    out.fill(0);
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&(r.pieces.len() as u32).to_le_bytes());
    out[16..24].copy_from_slice(&r.seq.to_le_bytes());
    out[24..32].copy_from_slice(&r.stripe.to_le_bytes());
    out[32..40].copy_from_slice(&r.lo.to_le_bytes());
    out[40..48].copy_from_slice(&r.len.to_le_bytes());
    out[48..52].copy_from_slice(&r.parity_crc.to_le_bytes());
    out[52..56].copy_from_slice(&(if r.full { FLAG_FULL } else { 0 }).to_le_bytes());
    for (i, p) in r.pieces.iter().enumerate() {
        let at = PIECES_AT + 24 * i;
        out[at..at + 4].copy_from_slice(&p.shard.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&p.chunk_offset.to_le_bytes());
        out[at + 16..at + 24].copy_from_slice(&p.len.to_le_bytes());
    }
    out[RUNS_AT..RUNS_AT + 4].copy_from_slice(&(r.block_crcs.len() as u32).to_le_bytes());
    let mut at = PIECES_AT + 24 * r.pieces.len();
    for run in &r.block_crcs {
        out[at..at + 4].copy_from_slice(&run.shard.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&(run.crcs.len() as u32).to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&run.chunk_offset.to_le_bytes());
        at += RUN_HEADER;
        for crc in &run.crcs {
            out[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            at += 4;
        }
    }
    let crc = header_crc(uuid, slot, out);
    out[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a slot's header; `None` if it is not a valid record of this volume and slot.
/// `max_len` bounds the partial parity length (the chunk size). Never panics.
pub fn decode_header(b: &[u8], uuid: &[u8; 16], slot: u32, max_len: u64) -> Option<Record> {
    let version = if b.len() >= HEADER { u32_at(b, 8) } else { 0 };
    if b.len() < HEADER || &b[..8] != MAGIC || header_crc(uuid, slot, b) != u32_at(b, CRC_AT) || !(1..=FORMAT_VERSION).contains(&version) {
        return None;
    }
    let count = u32_at(b, 12) as usize;
    let (lo, len) = (u64_at(b, 32), u64_at(b, 40));
    if count > MAX_PIECES || len > max_len || lo.checked_add(len).is_none_or(|end| end > max_len) {
        return None;
    }
    let pieces = (0..count)
        .map(|i| {
            let at = PIECES_AT + 24 * i;
            LoggedPiece { shard: u32_at(b, at), chunk_offset: u64_at(b, at + 8), len: u64_at(b, at + 16) }
        })
        .collect();
    let block_crcs = if version >= FIRST_WITH_CRCS { decode_runs(b, PIECES_AT + 24 * count, u32_at(b, RUNS_AT) as usize, max_len)? } else { Vec::new() };
    Some(Record { seq: u64_at(b, 16), stripe: u64_at(b, 24), lo, len, full: u32_at(b, 52) & FLAG_FULL != 0, pieces, parity_crc: u32_at(b, 48), block_crcs })
}

/// The `runs` runs of block checksums from byte `at` of a header; `None` if they overrun the
/// header or name blocks beyond a chunk of `chunk` bytes.
fn decode_runs(b: &[u8], mut at: usize, runs: usize, chunk: u64) -> Option<Vec<BlockCrcs>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        if at + RUN_HEADER > CRC_AT {
            return None;
        }
        let (shard, n, chunk_offset) = (u32_at(b, at), u32_at(b, at + 4) as usize, u64_at(b, at + 8));
        at += RUN_HEADER;
        let end_in_chunk = (n as u64).checked_mul(BLOCK).and_then(|len| len.checked_add(chunk_offset));
        if at + 4 * n > CRC_AT || !chunk_offset.is_multiple_of(BLOCK) || end_in_chunk.is_none_or(|end| end > chunk) {
            return None;
        }
        let crcs = (0..n).map(|i| u32_at(b, at + 4 * i)).collect();
        at += 4 * n;
        out.push(BlockCrcs { shard, chunk_offset, crcs });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: [u8; 16] = [5; 16];

    fn sample() -> Record {
        Record {
            seq: 77,
            stripe: 12,
            lo: 4096,
            len: 8192,
            full: false,
            pieces: vec![LoggedPiece { shard: 0, chunk_offset: 4096, len: 8192 }, LoggedPiece { shard: 2, chunk_offset: 8192, len: 4096 }],
            parity_crc: 0xdead_beef,
            block_crcs: vec![BlockCrcs { shard: 4, chunk_offset: 4096, crcs: vec![1, 2, 3] }],
        }
    }

    #[test]
    fn header_roundtrip_and_rejections() {
        let mut b = vec![0u8; HEADER];
        encode_header(&mut b, &UUID, 3, &sample());
        assert_eq!(decode_header(&b, &UUID, 3, 65536), Some(sample()));
        assert_eq!(decode_header(&b, &UUID, 4, 65536), None, "wrong slot");
        assert_eq!(decode_header(&b, &[6; 16], 3, 65536), None, "other volume");
        assert_eq!(decode_header(&b, &UUID, 3, 8192), None, "longer than a chunk");
        let mut flipped = b.clone();
        flipped[30] ^= 1;
        assert_eq!(decode_header(&flipped, &UUID, 3, 65536), None, "flipped bit");
        assert_eq!(decode_header(&vec![0u8; HEADER], &UUID, 0, 65536), None, "blank slot");
    }

    #[test]
    fn block_checksums_fit_in_the_header_or_are_refused() {
        // 64 KiB chunks: a whole chunk of parity rows and every piece of a wide stripe fit.
        assert!(fits(15, [16, 16]));
        // 1 MiB chunks: 256 rows fit beside a few pieces, not beside the most there can be.
        assert!(fits(4, [256]));
        assert!(!fits(MAX_PIECES, [256]));
        assert!(!fits(0, [1024]));
        assert!(!fits(MAX_PIECES + 1, []));
        // A run naming blocks beyond the chunk is not a record of this volume.
        let mut r = sample();
        r.block_crcs[0].chunk_offset = 65536 - 8192;
        let mut b = vec![0u8; HEADER];
        encode_header(&mut b, &UUID, 3, &r);
        assert_eq!(decode_header(&b, &UUID, 3, 65536), None);
        assert!(decode_header(&b, &UUID, 3, 65536 + 4096).is_some());
    }

    #[test]
    fn version_1_records_are_read_without_block_checksums() {
        let mut b = vec![0u8; HEADER];
        encode_header(&mut b, &UUID, 3, &Record { block_crcs: Vec::new(), ..sample() });
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        // A version 1 writer left these bytes zero; anything there is ignored.
        b[RUNS_AT..RUNS_AT + 4].copy_from_slice(&7u32.to_le_bytes());
        let crc = header_crc(&UUID, 3, &b);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&b, &UUID, 3, 65536), Some(Record { block_crcs: Vec::new(), ..sample() }));
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = header_crc(&UUID, 3, &b);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&b, &UUID, 3, 65536), None, "a newer version is not guessed at");
    }

    #[test]
    fn modified_rows() {
        let r = sample();
        assert!(r.modifies(0, 4096) && r.modifies(0, 12287) && !r.modifies(0, 12288));
        assert!(!r.modifies(2, 4096) && r.modifies(2, 8192));
        assert!(!r.modifies(1, 8192) && !r.touches(1) && r.touches(2));
        let full = Record { full: true, ..sample() };
        assert!(full.modifies(1, 0) && full.touches(3));
    }

    #[test]
    fn ring_shape() {
        assert_eq!(slots_for(64 << 10), 60);
        assert_eq!(slots_for(4 << 10), 64);
        assert_eq!(slots_for(1 << 20), 16);
        assert_eq!(ring_bytes(4096, 2), 16384);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000), slot in any::<u32>()) {
            let _ = decode_header(&bytes, &UUID, slot, 1 << 20);
        }

        /// Any record whose header fits decodes to itself, checksums and all.
        #[test]
        fn records_roundtrip(pieces in 0usize..20, runs in proptest::collection::vec((0u32..8, 0u64..16, proptest::collection::vec(any::<u32>(), 0..17)), 0..4)) {
            let block_crcs: Vec<BlockCrcs> = runs.into_iter().map(|(shard, row, crcs)| BlockCrcs { shard, chunk_offset: row * 4096, crcs }).collect();
            let r = Record { pieces: (0..pieces as u32).map(|i| LoggedPiece { shard: i, chunk_offset: 0, len: 4096 }).collect(), block_crcs, ..sample() };
            prop_assume!(fits(r.pieces.len(), r.block_crcs.iter().map(|b| b.crcs.len())));
            let mut b = vec![0u8; HEADER];
            encode_header(&mut b, &UUID, 9, &r);
            prop_assert_eq!(decode_header(&b, &UUID, 9, 1 << 17), Some(r));
        }
    }
}
