//! The RAID block device: a volume assembled from member superblocks, serving byte-addressed
//! reads and writes by splitting them into stripes, computing parity and ordering writes.
//!
//! Knows nothing of sockets: the NBD server reaches it through an adapter in `cli::serve`.

mod assemble;
mod check;
mod create;
mod io;
mod locks;
#[cfg(test)]
mod tests;

pub use assemble::{assemble, AssembleError};
pub use check::{check, CheckReport};
pub use create::{create, CreateError, CreateSpec};

use crate::codec::Codec;
use crate::layout::Geometry;
use crate::member::{Member, MemberError};
use crate::meta::Superblock;
use locks::StripeLocks;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error("request [{offset}, +{len}) is beyond the volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("parity computation failed: {0}")]
    Codec(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// An assembled volume. All methods take `&self` and may run concurrently.
pub struct Volume {
    name: String,
    uuid: [u8; 16],
    geometry: Geometry,
    codec: Codec,
    /// Indexed by slot: `members[i]` holds slot `i`.
    members: Vec<Member>,
    /// Where the data area starts on every member.
    data_offset: u64,
    locks: StripeLocks,
    /// The newest superblock, as a template for rewriting members' copies.
    superblock: Superblock,
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> &[u8; 16] {
        &self.uuid
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn size(&self) -> u64 {
        self.geometry.volume_size()
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }
}
