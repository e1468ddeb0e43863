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
    /// Stripes not checked because a member holding part of them is lost.
    pub skipped: u64,
}

pub async fn check(volume: &Volume) -> Result<CheckReport, VolumeError> {
    let g = volume.geometry;
    let mut report = CheckReport { stripes: g.stripes, redundant: g.level != Level::Raid0, ..Default::default() };
    if !report.redundant {
        return Ok(report);
    }
    let mut results = stream::iter(0..g.stripes).map(|s| async move { (s, volume.stripe_consistent(s).await) }).buffer_unordered(STRIPES_IN_FLIGHT);
    let mut bad = Vec::new();
    while let Some((stripe, verdict)) = results.next().await {
        match verdict? {
            Some(true) => {}
            Some(false) => bad.push(stripe),
            None => report.skipped += 1,
        }
    }
    bad.sort_unstable();
    report.inconsistent = bad.len() as u64;
    bad.truncate(LISTED);
    report.first_inconsistent = bad;
    Ok(report)
}

impl Volume {
    /// Reads every shard of `stripe` and asks the codec whether parity matches data; `None` if
    /// some shard is not readable.
    async fn stripe_consistent(&self, stripe: u64) -> Result<Option<bool>, VolumeError> {
        let chunk = self.geometry.chunk;
        let n = self.geometry.shards();
        let h = self.health();
        let members: Option<Vec<_>> =
            (0..n).map(|shard| h.readable(self.geometry.shard_member(stripe, shard) as usize, stripe, &self.progress).cloned()).collect();
        let Some(members) = members else { return Ok(None) };
        let buf = Arc::new(AlignedBuf::zeroed((n as u64 * chunk) as usize));
        let pos = self.member_pos(stripe, 0);
        let reads = members.iter().enumerate().map(|(shard, m)| super::io::member_read(m, pos, &buf, shard as u64 * chunk, chunk));
        if let Some(f) = super::io::faults_of(reads.collect::<Vec<_>>()).await.into_iter().next() {
            return Err(f.error.into());
        }
        let buf = super::io::reclaim(buf)?;
        let shards: Vec<&[u8]> = buf.chunks(chunk as usize).collect();
        self.codec.verify(&shards).map(Some).map_err(|e| VolumeError::Codec(e.to_string()))
    }
}
