//! The RAID block device: a volume assembled from member superblocks, serving byte-addressed
//! reads and writes by splitting them into stripes, computing parity and ordering writes, and
//! surviving member failures (degraded service, rebuild, replace).
//!
//! Knows nothing of sockets: the NBD server reaches it through an adapter in `cli::serve`.

mod admin;
mod assemble;
mod check;
mod combine;
mod create;
mod failure;
#[cfg(test)]
mod failure_tests;
mod heal;
mod health;
mod intent;
mod io;
mod locks;
mod ppl;
mod rebuild;
mod scrub;
pub mod status;
mod stripe_cache;
#[cfg(test)]
mod tests;

pub use admin::AdminError;
pub use assemble::{assemble, AssembleError};
pub use check::{check, CheckReport};
pub use create::{create, CreateError, CreateSpec};

use crate::codec::Codec;
use crate::layout::Geometry;
use crate::member::MemberError;
use crate::meta::Superblock;
use health::{Health, Progress};
use locks::StripeLocks;
use std::sync::{Arc, RwLock};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error("request [{offset}, +{len}) is beyond the volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("stripe {stripe}: too many members lost to serve it")]
    Unavailable { stripe: u64 },
    #[error("parity computation failed: {0}")]
    Codec(String),
    #[error("stripe {stripe}: a block fails its checksum and cannot be rebuilt from redundancy")]
    Corrupt { stripe: u64 },
    #[error("the volume has lost more members than it tolerates")]
    Exhausted,
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The write of a stripe that combined this request's part with others failed.
    #[error("combined stripe write failed: {0}")]
    CombinedWrite(String),
}

/// An assembled volume. All methods take `&self` and may run concurrently.
pub struct Volume {
    name: String,
    uuid: [u8; 16],
    geometry: Geometry,
    codec: Codec,
    /// Where the data area starts on every member.
    data_offset: u64,
    locks: StripeLocks,
    health: RwLock<Arc<Health>>,
    progress: Progress,
    /// Serializes membership changes and superblock writes; holds the newest superblock.
    meta: tokio::sync::Mutex<Superblock>,
    rebuild: Arc<rebuild::RebuildControl>,
    scrub: scrub::ScrubState,
    intent: intent::Intent,
    /// For opening members added at run time.
    engine: Arc<crate::uring::Engine>,
    /// Where the per-block checksums live on every member; `None` for a volume created without.
    checksums: Option<crate::member::ChecksumLayout>,
    /// How client writes order their checksum pages (see `member::checksums`).
    page_writes: crate::member::PageWrites,
    /// The partial-parity log (parity levels).
    ppl: Option<ppl::PartialParityLog>,
    /// Partial-stripe parts of aligned parity-level writes, waiting to be written together.
    combiner: combine::Combiner,
    /// Aligned parity-level writes in progress (see `Volume::write_combining`).
    combining_writes: std::sync::atomic::AtomicUsize,
    /// Stripes that streams of small writes are working through (parity levels).
    stripe_cache: stripe_cache::StripeCache,
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

    /// The current membership snapshot.
    fn health(&self) -> Arc<Health> {
        self.health.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_health(&self, h: Health) {
        *self.health.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(h);
        // Cached stripes hold logical data, which a membership change does not alter; but
        // which member serves what has changed, and nothing is gained by reasoning about it.
        self.stripe_cache.clear();
    }

    /// Paths of the members serving each slot (`None` for a lost slot), for logs.
    pub fn member_paths(&self) -> Vec<Option<(std::path::PathBuf, bool)>> {
        self.health().slots.iter().map(|e| e.member.as_ref().map(|m| (m.path().to_path_buf(), m.is_direct()))).collect()
    }
}
