//! The member superblock: who this member is and what volume it belongs to.
//!
//! Format (version 2), one 4096-byte block, little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `NBRAIDSB` |
//! | 8 | 4 | format version |
//! | 12 | 4 | block length (4096) |
//! | 16 | 16 | volume UUID |
//! | 32 | 16 | member UUID (this disk's own identity) |
//! | 48 | 8 | creation time, seconds since the epoch |
//! | 56 | 8 | event counter (bumped on every membership change) |
//! | 64 | 4 | level code (see `layout::Level::code`) |
//! | 68 | 4 | members |
//! | 72 | 4 | data shards |
//! | 76 | 4 | parity shards |
//! | 80 | 8 | chunk bytes |
//! | 88 | 8 | data offset: where the data area starts on every member |
//! | 96 | 8 | data bytes per member (whole stripes) |
//! | 104 | 8 | volume size in bytes |
//! | 112 | 4 | this member's slot index |
//! | 116 | 4 | flags: bit 0 spare, bit 1 replacement, bit 2 deferred checksum pages (others must be 0) |
//! | 120 | 4 | name length |
//! | 124 | 64 | volume name, UTF-8 |
//! | 192 | 128 | slot states, one byte per slot (see [`SlotState`]) |
//! | 320 | 1024 | per slot, u64: rebuild checkpoint (stripes done) for rebuilding/replacing slots |
//! | 1344 | 1024 | per slot, u64: id of the member that holds the slot (see [`member_id`]) |
//! | 2368 | 1024 | per slot, u64: id of the replacement being built for the slot, or 0 |
//! | 3392 | 8 | checksum table offset (see `meta::checksums`), 0 when the volume keeps no block checksums |
//! | 3400 | 8 | partial-parity log offset (see `meta::ppl`), 0 for levels without parity |
//! | 3408 | 4 | partial-parity log slots |
//! | 4092 | 4 | crc32c of bytes 0..4092 |
//!
//! Two copies live at [`SUPERBLOCK_OFFSETS`]; a new superblock is written to the copy selected by
//! its event counter's parity, so a torn superblock write always leaves the previous one intact.

use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"NBRAIDSB";
pub const VERSION: u32 = 2;
pub const SUPERBLOCK_SIZE: usize = 4096;
/// Byte offsets of the two superblock copies on every member.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, 4096];
/// Bytes reserved at the start of every member for metadata; the data area starts here.
pub const METADATA_RESERVED: u64 = 1 << 20;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_SLOTS: usize = 128;

const CRC_OFFSET: usize = SUPERBLOCK_SIZE - 4;

/// What the volume believes about one slot (member position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SlotState {
    /// In sync and serving.
    Active,
    /// Failed or removed; holds no trustworthy data.
    Failed,
    /// Being rebuilt; data below the rebuild checkpoint is valid.
    Rebuilding,
    /// Serving, while a replacement member is built for it up to the checkpoint.
    Replacing,
}

impl SlotState {
    fn code(self) -> u8 {
        match self {
            SlotState::Active => 0,
            SlotState::Failed => 1,
            SlotState::Rebuilding => 2,
            SlotState::Replacing => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(SlotState::Active),
            1 => Some(SlotState::Failed),
            2 => Some(SlotState::Rebuilding),
            3 => Some(SlotState::Replacing),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_uuid: [u8; 16],
    pub member_uuid: [u8; 16],
    pub created: u64,
    pub event: u64,
    pub level_code: u32,
    pub members: u32,
    pub data_shards: u32,
    pub parity_shards: u32,
    pub chunk: u64,
    pub data_offset: u64,
    pub member_data_bytes: u64,
    pub volume_size: u64,
    pub member_index: u32,
    pub name: String,
    /// One entry per slot, `members` long.
    pub slots: Vec<SlotState>,
    /// Per slot: stripes already rebuilt, for `Rebuilding` and `Replacing` slots (else 0).
    pub checkpoints: Vec<u64>,
    /// Per slot: [`member_id`] of the member the volume has in the slot. A disk that claims a
    /// slot under another id was replaced there and is never trusted.
    pub slot_ids: Vec<u64>,
    /// Per slot: [`member_id`] of the replacement being built for it, or 0.
    pub replacement_ids: Vec<u64>,
    /// This member is a hot spare of the volume; `member_index` is meaningless.
    pub spare: bool,
    /// This member is being built to replace the member in slot `member_index`.
    pub replacement: bool,
    /// Where the per-block checksum table starts; 0 when the volume keeps none.
    pub checksum_offset: u64,
    /// Checksum table pages changed by client writes are written at the next flush instead of
    /// before each data write (see `member::checksums`); only with a checksum table.
    pub deferred_checksum_pages: bool,
    /// Where the partial-parity log ring starts, and its slots; 0 for levels without parity.
    pub ppl_offset: u64,
    pub ppl_slots: u32,
}

const FLAG_SPARE: u32 = 1;
const FLAG_REPLACEMENT: u32 = 2;
const FLAG_DEFERRED_PAGES: u32 = 4;
const STATES_OFFSET: usize = 192;
const CHECKPOINTS_OFFSET: usize = 320;
const SLOT_IDS_OFFSET: usize = 1344;
const REPLACEMENT_IDS_OFFSET: usize = 2368;
const CHECKSUM_OFFSET_AT: usize = 3392;
const PPL_OFFSET_AT: usize = 3400;
const PPL_SLOTS_AT: usize = 3408;
const MAX_PPL_SLOTS: u32 = 1024;

/// A member's short identity: the first 8 bytes of its member UUID.
pub fn member_id(uuid: &[u8; 16]) -> u64 {
    u64::from_le_bytes(uuid[..8].try_into().expect("8 of 16 bytes"))
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("no nbraid superblock (not a member of any volume)")]
    NoMagic,
    #[error("superblock checksum mismatch (corrupt superblock)")]
    BadChecksum,
    #[error("superblock format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("superblock is malformed: {0}")]
    Malformed(&'static str),
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

impl Superblock {
    /// Which of the two copies this superblock is written to.
    pub fn copy_index(&self) -> usize {
        (self.event % 2) as usize
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SUPERBLOCK_SIZE as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_uuid);
        b[32..48].copy_from_slice(&self.member_uuid);
        b[48..56].copy_from_slice(&self.created.to_le_bytes());
        b[56..64].copy_from_slice(&self.event.to_le_bytes());
        b[64..68].copy_from_slice(&self.level_code.to_le_bytes());
        b[68..72].copy_from_slice(&self.members.to_le_bytes());
        b[72..76].copy_from_slice(&self.data_shards.to_le_bytes());
        b[76..80].copy_from_slice(&self.parity_shards.to_le_bytes());
        b[80..88].copy_from_slice(&self.chunk.to_le_bytes());
        b[88..96].copy_from_slice(&self.data_offset.to_le_bytes());
        b[96..104].copy_from_slice(&self.member_data_bytes.to_le_bytes());
        b[104..112].copy_from_slice(&self.volume_size.to_le_bytes());
        b[112..116].copy_from_slice(&self.member_index.to_le_bytes());
        let flags = if self.spare { FLAG_SPARE } else { 0 }
            | if self.replacement { FLAG_REPLACEMENT } else { 0 }
            | if self.deferred_checksum_pages { FLAG_DEFERRED_PAGES } else { 0 };
        b[116..120].copy_from_slice(&flags.to_le_bytes());
        let name = &self.name[..self.name.floor_char_boundary(MAX_NAME_LEN)];
        b[120..124].copy_from_slice(&(name.len() as u32).to_le_bytes());
        b[124..124 + name.len()].copy_from_slice(name.as_bytes());
        for (i, s) in self.slots.iter().take(MAX_SLOTS).enumerate() {
            b[STATES_OFFSET + i] = s.code();
        }
        for (table, values) in [(CHECKPOINTS_OFFSET, &self.checkpoints), (SLOT_IDS_OFFSET, &self.slot_ids), (REPLACEMENT_IDS_OFFSET, &self.replacement_ids)] {
            for (i, v) in values.iter().take(MAX_SLOTS).enumerate() {
                let at = table + 8 * i;
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        b[CHECKSUM_OFFSET_AT..CHECKSUM_OFFSET_AT + 8].copy_from_slice(&self.checksum_offset.to_le_bytes());
        b[PPL_OFFSET_AT..PPL_OFFSET_AT + 8].copy_from_slice(&self.ppl_offset.to_le_bytes());
        b[PPL_SLOTS_AT..PPL_SLOTS_AT + 4].copy_from_slice(&self.ppl_slots.to_le_bytes());
        let crc = crate::codec::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses one superblock copy. Never panics, whatever the bytes.
    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < SUPERBLOCK_SIZE {
            return Err(SuperblockError::Malformed("shorter than a superblock"));
        }
        if &b[0..8] != MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        let stored = u32_at(b, CRC_OFFSET);
        if crate::codec::crc32c(&b[..CRC_OFFSET]) != stored {
            return Err(SuperblockError::BadChecksum);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        if u32_at(b, 12) as usize != SUPERBLOCK_SIZE {
            return Err(SuperblockError::Malformed("unexpected block length"));
        }
        let flags = u32_at(b, 116);
        if flags & !(FLAG_SPARE | FLAG_REPLACEMENT | FLAG_DEFERRED_PAGES) != 0 || flags & (FLAG_SPARE | FLAG_REPLACEMENT) == FLAG_SPARE | FLAG_REPLACEMENT {
            return Err(SuperblockError::Malformed("unknown flags set"));
        }
        let members = u32_at(b, 68);
        if members == 0 || members as usize > MAX_SLOTS {
            return Err(SuperblockError::Malformed("member count out of range"));
        }
        let member_index = u32_at(b, 112);
        if member_index >= members {
            return Err(SuperblockError::Malformed("member index beyond member count"));
        }
        let data_offset = u64_at(b, 88);
        if data_offset < SUPERBLOCK_OFFSETS[1] + SUPERBLOCK_SIZE as u64 || !data_offset.is_multiple_of(SUPERBLOCK_SIZE as u64) {
            return Err(SuperblockError::Malformed("data area overlaps the superblocks or is unaligned"));
        }
        if data_offset.checked_add(u64_at(b, 96)).is_none() {
            return Err(SuperblockError::Malformed("data area extends beyond 2^64 bytes"));
        }
        let checksum_offset = u64_at(b, CHECKSUM_OFFSET_AT);
        if checksum_offset != 0 {
            let table_end = checksum_offset.checked_add(super::checksums::table_bytes(u64_at(b, 96)));
            if checksum_offset < SUPERBLOCK_OFFSETS[1] + SUPERBLOCK_SIZE as u64
                || !checksum_offset.is_multiple_of(SUPERBLOCK_SIZE as u64)
                || table_end.is_none_or(|end| end > data_offset)
            {
                return Err(SuperblockError::Malformed("checksum table overlaps other metadata or the data area"));
            }
        } else if flags & FLAG_DEFERRED_PAGES != 0 {
            return Err(SuperblockError::Malformed("deferred checksum pages without a checksum table"));
        }
        let (ppl_offset, ppl_slots) = (u64_at(b, PPL_OFFSET_AT), u32_at(b, PPL_SLOTS_AT));
        if ppl_offset != 0 {
            let ring_end = super::ppl::slot_bytes(u64_at(b, 80)).checked_mul(ppl_slots as u64).and_then(|r| r.checked_add(ppl_offset));
            if ppl_slots == 0
                || ppl_slots > MAX_PPL_SLOTS
                || ppl_offset < SUPERBLOCK_OFFSETS[1] + SUPERBLOCK_SIZE as u64
                || !ppl_offset.is_multiple_of(SUPERBLOCK_SIZE as u64)
                || ring_end.is_none_or(|end| end > data_offset)
            {
                return Err(SuperblockError::Malformed("partial-parity log overlaps other metadata or the data area"));
            }
        }
        let name_len = u32_at(b, 120) as usize;
        if name_len > MAX_NAME_LEN {
            return Err(SuperblockError::Malformed("name too long"));
        }
        let name = std::str::from_utf8(&b[124..124 + name_len]).map_err(|_| SuperblockError::Malformed("name is not UTF-8"))?.to_string();
        let mut slots = Vec::with_capacity(members as usize);
        for i in 0..members as usize {
            slots.push(SlotState::from_code(b[STATES_OFFSET + i]).ok_or(SuperblockError::Malformed("unknown slot state"))?);
        }
        let table = |at: usize| (0..members as usize).map(|i| u64_at(b, at + 8 * i)).collect::<Vec<u64>>();
        Ok(Superblock {
            volume_uuid: b[16..32].try_into().expect("16-byte slice"),
            member_uuid: b[32..48].try_into().expect("16-byte slice"),
            created: u64_at(b, 48),
            event: u64_at(b, 56),
            level_code: u32_at(b, 64),
            members,
            data_shards: u32_at(b, 72),
            parity_shards: u32_at(b, 76),
            chunk: u64_at(b, 80),
            data_offset,
            member_data_bytes: u64_at(b, 96),
            volume_size: u64_at(b, 104),
            member_index,
            name,
            slots,
            checkpoints: table(CHECKPOINTS_OFFSET),
            slot_ids: table(SLOT_IDS_OFFSET),
            replacement_ids: table(REPLACEMENT_IDS_OFFSET),
            spare: flags & FLAG_SPARE != 0,
            replacement: flags & FLAG_REPLACEMENT != 0,
            checksum_offset,
            deferred_checksum_pages: flags & FLAG_DEFERRED_PAGES != 0,
            ppl_offset,
            ppl_slots,
        })
    }

    /// Picks the newest valid copy out of the two read from a member. The error, if neither copy is
    /// valid, is the more telling one (a corrupt superblock beats "no superblock").
    pub fn newest(copies: [&[u8]; 2]) -> Result<Superblock, SuperblockError> {
        let a = Superblock::decode(copies[0]);
        let b = Superblock::decode(copies[1]);
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.event > a.event { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(ea), Err(eb)) => Err(if ea == SuperblockError::NoMagic { eb } else { ea }),
        }
    }

    /// True if `other` describes the same volume layout (everything but per-member fields and
    /// the event counter and slot states).
    pub fn same_geometry(&self, other: &Superblock) -> bool {
        self.volume_uuid == other.volume_uuid
            && self.level_code == other.level_code
            && self.members == other.members
            && self.data_shards == other.data_shards
            && self.parity_shards == other.parity_shards
            && self.chunk == other.chunk
            && self.data_offset == other.data_offset
            && self.member_data_bytes == other.member_data_bytes
            && self.volume_size == other.volume_size
            && self.checksum_offset == other.checksum_offset
            && self.deferred_checksum_pages == other.deferred_checksum_pages
            && self.ppl_offset == other.ppl_offset
            && self.ppl_slots == other.ppl_slots
    }
}

/// Formats a UUID the usual 8-4-4-4-12 way.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A random (version 4) UUID from the kernel's CSPRNG.
pub fn random_uuid() -> std::io::Result<[u8; 16]> {
    let mut u = [0u8; 16];
    let mut filled = 0;
    while filled < u.len() {
        // SAFETY: writes at most the remaining bytes of `u`.
        let n = unsafe { libc::getrandom(u[filled..].as_mut_ptr() as *mut libc::c_void, u.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            volume_uuid: [1; 16],
            member_uuid: [2; 16],
            created: 1_700_000_000,
            event: 7,
            level_code: 5,
            members: 4,
            data_shards: 3,
            parity_shards: 1,
            chunk: 65536,
            data_offset: METADATA_RESERVED + (8 << 20),
            member_data_bytes: 1 << 30,
            volume_size: 3 << 30,
            member_index: 2,
            name: "vol0".into(),
            slots: vec![SlotState::Active, SlotState::Failed, SlotState::Active, SlotState::Rebuilding],
            checkpoints: vec![0, 0, 0, 12345],
            slot_ids: vec![11, 22, 33, 44],
            replacement_ids: vec![0, 0, 0, 55],
            spare: false,
            replacement: true,
            checksum_offset: 1 << 20,
            deferred_checksum_pages: false,
            ppl_offset: METADATA_RESERVED + (4 << 20),
            ppl_slots: 32,
        }
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn deferred_checksum_pages_roundtrip_and_need_a_table() {
        let mut sb = sample();
        sb.deferred_checksum_pages = true;
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        assert!(!sb.same_geometry(&sample()));
        sb.checksum_offset = 0;
        assert_eq!(Superblock::decode(&sb.encode()), Err(SuperblockError::Malformed("deferred checksum pages without a checksum table")));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let enc = sample().encode();
        for bit in 0..SUPERBLOCK_SIZE * 8 {
            let mut b = enc;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(Superblock::decode(&b).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn newest_copy_wins_and_torn_copy_is_ignored() {
        let mut old = sample();
        old.event = 8;
        let mut new = sample();
        new.event = 9;
        assert_eq!(Superblock::newest([&old.encode(), &new.encode()]).unwrap().event, 9);
        let mut torn = new.encode();
        torn[100] ^= 0xff;
        assert_eq!(Superblock::newest([&old.encode(), &torn]).unwrap().event, 8);
        assert_eq!(Superblock::newest([&[0u8; 4096], &[0u8; 4096]]), Err(SuperblockError::NoMagic));
        assert_eq!(Superblock::newest([&[0u8; 4096], &torn]), Err(SuperblockError::BadChecksum));
    }

    #[test]
    fn uuid_is_random_v4() {
        let a = random_uuid().unwrap();
        assert_ne!(a, random_uuid().unwrap());
        assert_eq!(a[6] >> 4, 4);
        assert_eq!(uuid_string(&[0xab; 16]).len(), 36);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_with_valid_magic_and_crc(mut bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            bytes[0..8].copy_from_slice(MAGIC);
            let crc = crate::codec::crc32c(&bytes[..CRC_OFFSET]);
            bytes[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
            let _ = Superblock::decode(&bytes);
        }
    }
}
