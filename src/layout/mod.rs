//! Pure geometry: where each volume byte, and each stripe's parity, lives on the members.
//!
//! No I/O here. The volume layer asks [`Geometry::map`] how a request splits into stripes and
//! data shards, and [`Geometry::shard_member`] which member holds a shard of a stripe.
//!
//! Volume byte order: stripe `s` holds volume bytes `[s*k*chunk, (s+1)*k*chunk)`; within it
//! data shard `i` holds `[i*chunk, (i+1)*chunk)`. Every shard of stripe `s` sits at the same
//! offset, `s*chunk`, in its member's data area, so a stripe is one aligned chunk per member.

#[cfg(test)]
mod tests;

use std::fmt;

/// RAID level. RAID-6 is [`Level::Ec`] with two parity shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Level {
    Raid0,
    Raid1,
    Raid5,
    Ec,
}

impl Level {
    /// Every level, in code order; handy for CLI help and tests.
    pub const ALL: [Level; 4] = [Level::Raid0, Level::Raid1, Level::Raid5, Level::Ec];

    /// The name used on the command line and in status output.
    pub fn name(&self) -> &'static str {
        match self {
            Level::Raid0 => "raid0",
            Level::Raid1 => "raid1",
            Level::Raid5 => "raid5",
            Level::Ec => "ec",
        }
    }

    /// Stable code stored in the superblock; never renumber these.
    pub fn code(&self) -> u32 {
        match self {
            Level::Raid0 => 0,
            Level::Raid1 => 1,
            Level::Raid5 => 5,
            Level::Ec => 100,
        }
    }

    pub fn from_code(code: u32) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.code() == code)
    }

    /// Inverse of [`Level::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Level {
    type Err = LayoutError;
    fn from_str(s: &str) -> Result<Level, LayoutError> {
        Level::from_name(s).ok_or_else(|| LayoutError::UnknownLevel(s.to_string()))
    }
}

/// Smallest chunk: one page, the unit of O_DIRECT I/O on members.
pub const MIN_CHUNK: u64 = 4096;
/// Largest chunk: keeps a full-stripe buffer (k+m chunks) within reason.
pub const MAX_CHUNK: u64 = 64 << 20;
/// Members per volume at most: the superblock keeps a table entry per slot in one 4 KiB block
/// (and GF(2^8) Reed-Solomon allows 256 shards in any case).
pub const MAX_MEMBERS: u32 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub level: Level,
    /// n
    pub members: u32,
    /// k: raid0 n, raid1 1, raid5 n-1, ec K
    pub data_shards: u32,
    /// m: raid0 0, raid1 n-1 (the extra copies), raid5 1, ec M
    pub parity_shards: u32,
    /// Bytes per shard per stripe; a multiple of 4096.
    pub chunk: u64,
    /// Stripes on each member = member data bytes / chunk.
    pub stripes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{level} needs at least {min} members, got {got}")]
    TooFewMembers { level: Level, min: u32, got: u32 },
    #[error("at most {MAX_MEMBERS} members are supported, got {0}")]
    TooManyMembers(u32),
    #[error("ec needs --data K and --parity M")]
    MissingEcShape,
    #[error("--data/--parity only apply to level ec, not {0}")]
    UnexpectedEcShape(Level),
    #[error("ec needs at least 2 data shards, got {0}")]
    TooFewDataShards(u32),
    #[error("ec needs at least 1 parity shard, got {0}")]
    TooFewParityShards(u32),
    #[error("ec with {data} data + {parity} parity shards needs {} members, got {members}", *data as u64 + *parity as u64)]
    ShardCountMismatch { data: u32, parity: u32, members: u32 },
    #[error("chunk size {0} is not a multiple of 4096 bytes")]
    ChunkNotAligned(u64),
    #[error("chunk size {0} is outside 4 KiB ..= 64 MiB")]
    ChunkOutOfRange(u64),
    #[error("member data area of {member_bytes} bytes is smaller than one chunk ({chunk} bytes)")]
    MemberTooSmall { member_bytes: u64, chunk: u64 },
    #[error("volume size overflows 64 bits")]
    VolumeTooLarge,
    #[error("unknown level {0:?}; expected raid0, raid1, raid5 or ec")]
    UnknownLevel(String),
}

/// Where one volume byte lives: stripe, data shard, and offset inside that shard's chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub stripe: u64,
    pub shard: u32,
    pub chunk_offset: u64,
}

impl Geometry {
    /// Validates: raid0 >= 2 members, raid1 >= 2, raid5 >= 3, ec: data >= 2, parity >= 1,
    /// data+parity == members, members <= 128 total; chunk a multiple of 4096 and between
    /// 4 KiB and 64 MiB; member_data_bytes >= chunk.
    /// `ec` is Some((k, m)) only for Level::Ec. stripes = member_data_bytes / chunk (remainder unused).
    pub fn new(level: Level, members: u32, ec: Option<(u32, u32)>, chunk: u64, member_data_bytes: u64) -> Result<Geometry, LayoutError> {
        let min = match level {
            Level::Raid0 | Level::Raid1 => 2,
            Level::Raid5 => 3,
            Level::Ec => 3,
        };
        let (data_shards, parity_shards) = match (level, ec) {
            (Level::Ec, None) => return Err(LayoutError::MissingEcShape),
            (Level::Ec, Some((k, m))) => {
                if k < 2 {
                    return Err(LayoutError::TooFewDataShards(k));
                }
                if m < 1 {
                    return Err(LayoutError::TooFewParityShards(m));
                }
                if k as u64 + m as u64 != members as u64 {
                    return Err(LayoutError::ShardCountMismatch { data: k, parity: m, members });
                }
                (k, m)
            }
            (_, Some(_)) => return Err(LayoutError::UnexpectedEcShape(level)),
            (Level::Raid0, None) => (members, 0),
            (Level::Raid1, None) => (1, members.saturating_sub(1)),
            (Level::Raid5, None) => (members.saturating_sub(1), 1),
        };
        if members < min {
            return Err(LayoutError::TooFewMembers { level, min, got: members });
        }
        if members > MAX_MEMBERS {
            return Err(LayoutError::TooManyMembers(members));
        }
        if !chunk.is_multiple_of(MIN_CHUNK) {
            return Err(LayoutError::ChunkNotAligned(chunk));
        }
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(LayoutError::ChunkOutOfRange(chunk));
        }
        if member_data_bytes < chunk {
            return Err(LayoutError::MemberTooSmall { member_bytes: member_data_bytes, chunk });
        }
        let stripes = member_data_bytes / chunk;
        // volume_size() and map() do unchecked arithmetic up to stripes*k*chunk; prove it fits here.
        stripes.checked_mul(chunk).and_then(|b| b.checked_mul(data_shards as u64)).ok_or(LayoutError::VolumeTooLarge)?;
        Ok(Geometry { level, members, data_shards, parity_shards, chunk, stripes })
    }

    /// k * chunk (raid1: chunk).
    pub fn stripe_data_bytes(&self) -> u64 {
        self.data_shards as u64 * self.chunk
    }

    /// stripes * stripe_data_bytes.
    pub fn volume_size(&self) -> u64 {
        self.stripes * self.stripe_data_bytes()
    }

    /// k + m == members.
    pub fn shards(&self) -> u32 {
        self.data_shards + self.parity_shards
    }

    /// True if `shard` is a parity shard (or, for raid1, a mirror copy).
    pub fn is_parity_shard(&self, shard: u32) -> bool {
        shard >= self.data_shards
    }

    fn rotates(&self) -> bool {
        matches!(self.level, Level::Raid5 | Level::Ec)
    }

    /// Which member holds shard `shard` (0..k data, k..k+m parity/copies) of `stripe`.
    /// raid0 and raid1: member = shard (no rotation).
    /// raid5 and ec: member = (shard + n - (stripe % n)) % n — parity rotates one member to
    /// the left each stripe and data follows it (md's left-symmetric for raid5), so parity
    /// writes spread over all members and sequential reads touch every member.
    pub fn shard_member(&self, stripe: u64, shard: u32) -> u32 {
        if !self.rotates() {
            return shard;
        }
        let n = self.members as u64;
        // u64 so a stray shard index cannot overflow; out-of-range input stays out of range.
        ((shard as u64 + n - stripe % n) % n) as u32
    }

    /// Inverse of [`Geometry::shard_member`]: which shard of `stripe` member `member` holds.
    pub fn member_shard(&self, stripe: u64, member: u32) -> u32 {
        if !self.rotates() {
            return member;
        }
        let n = self.members as u64;
        ((member as u64 + stripe % n) % n) as u32
    }

    /// Byte offset of `stripe`'s chunk inside every member's data area (= stripe * chunk).
    pub fn member_offset(&self, stripe: u64) -> u64 {
        stripe * self.chunk
    }

    /// Where volume byte `offset` lives. Caller guarantees `offset < volume_size()`.
    pub fn locate(&self, offset: u64) -> Location {
        let sb = self.stripe_data_bytes();
        let within = offset % sb;
        Location { stripe: offset / sb, shard: (within / self.chunk) as u32, chunk_offset: within % self.chunk }
    }

    /// Splits a volume extent into per-stripe pieces in ascending order. Caller guarantees
    /// offset+len <= volume_size (returns an empty Vec for len 0).
    pub fn map(&self, offset: u64, len: u64) -> Vec<StripeExtent> {
        let mut out: Vec<StripeExtent> = Vec::new();
        if len == 0 {
            return out;
        }
        let sb = self.stripe_data_bytes();
        let end = offset.saturating_add(len);
        let first = offset / sb;
        let last = (end - 1) / sb;
        out.reserve((last - first + 1) as usize);
        let mut pos = offset;
        while pos < end {
            let loc = self.locate(pos);
            let piece_len = (self.chunk - loc.chunk_offset).min(end - pos);
            let piece = Piece { shard: loc.shard, chunk_offset: loc.chunk_offset, len: piece_len, buf_offset: pos - offset };
            match out.last_mut() {
                Some(se) if se.stripe == loc.stripe => se.pieces.push(piece),
                _ => out.push(StripeExtent { stripe: loc.stripe, pieces: vec![piece] }),
            }
            pos += piece_len;
        }
        out
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}+{} on {} members, chunk {} B, {} stripes", self.level, self.data_shards, self.parity_shards, self.members, self.chunk, self.stripes)
    }
}

/// The part of a request that falls in one stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeExtent {
    pub stripe: u64,
    /// In ascending volume order; each touches one data shard.
    pub pieces: Vec<Piece>,
}

impl StripeExtent {
    /// True if the pieces cover every data shard of the stripe completely, so parity can be
    /// computed from the new data alone without reading anything.
    pub fn is_full_stripe(&self, g: &Geometry) -> bool {
        self.pieces.iter().map(|p| p.len).sum::<u64>() == g.stripe_data_bytes()
    }

    /// The volume bytes the pieces cover, from the first one's start to the last one's end.
    pub fn volume_span(&self, g: &Geometry) -> std::ops::Range<u64> {
        let base = self.stripe * g.stripe_data_bytes();
        let start = self.pieces.iter().map(|p| p.stripe_data_offset(g)).min().unwrap_or(0);
        let end = self.pieces.iter().map(|p| p.stripe_data_offset(g) + p.len).max().unwrap_or(0);
        base + start..base + end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Data shard index.
    pub shard: u32,
    /// Offset within the chunk.
    pub chunk_offset: u64,
    pub len: u64,
    /// Offset within the caller's request buffer.
    pub buf_offset: u64,
}

impl Piece {
    /// Offset of the piece within its stripe's data, which is in volume order: shard 0's chunk,
    /// then shard 1's, and so on.
    pub fn stripe_data_offset(&self, g: &Geometry) -> u64 {
        self.shard as u64 * g.chunk + self.chunk_offset
    }
}
