//! Offline consistency check: every stripe's parity (or every mirror copy) against its data.

use super::{Volume, VolumeError};
use crate::buf::AlignedBuf;
use crate::layout::Level;
use futures::stream::{self, StreamExt};
use std::sync::Arc;

/// Stripes read at once; enough to keep every member busy without holding much memory.
const STRIPES_IN_FLIGHT: usize = 16;
/// How many inconsistent stripe numbers the report lists.
const LISTED: usize = 32;

#[derive(Debug, Default)]
pub struct CheckReport {
    pub stripes: u64,
    pub inconsistent: u64,
    /// The first few inconsistent stripes, ascending.
    pub first_inconsistent: Vec<u64>,
    /// False for raid0, which has nothing to check against.
    pub redundant: bool,
}

pub async fn check(volume: &Volume) -> Result<CheckReport, VolumeError> {
    let g = volume.geometry;
    let mut report = CheckReport { stripes: g.stripes, redundant: g.level != Level::Raid0, ..Default::default() };
    if !report.redundant {
        return Ok(report);
    }
    let mut results = stream::iter(0..g.stripes).map(|s| async move { (s, volume.stripe_consistent(s).await) }).buffer_unordered(STRIPES_IN_FLIGHT);
    let mut bad = Vec::new();
    while let Some((stripe, ok)) = results.next().await {
        if !ok? {
            bad.push(stripe);
        }
    }
    bad.sort_unstable();
    report.inconsistent = bad.len() as u64;
    bad.truncate(LISTED);
    report.first_inconsistent = bad;
    Ok(report)
}

impl Volume {
    /// Reads every shard of `stripe` and asks the codec whether parity matches data.
    async fn stripe_consistent(&self, stripe: u64) -> Result<bool, VolumeError> {
        let chunk = self.geometry.chunk;
        let n = self.geometry.shards();
        let buf = Arc::new(AlignedBuf::zeroed((n as u64 * chunk) as usize));
        let pos = self.data_offset + self.geometry.member_offset(stripe);
        let reads = (0..n).map(|shard| {
            let member = &self.members[self.geometry.shard_member(stripe, shard) as usize];
            self.read_into(member, pos, &buf, shard as u64 * chunk, chunk)
        });
        super::io::all(reads.collect::<Vec<_>>()).await?;
        let buf = super::io::reclaim(buf)?;
        let shards: Vec<&[u8]> = buf.chunks(chunk as usize).collect();
        self.codec.verify(&shards).map_err(|e| VolumeError::Codec(e.to_string()))
    }
}
