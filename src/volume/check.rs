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
    /// Whether block checksums were verified (the volume keeps them).
    pub checksums: bool,
    /// Blocks that fail their checksum, and the first few of them as (member, offset).
    pub checksum_errors: u64,
    pub first_damaged: Vec<(std::path::PathBuf, u64)>,
    /// Regions the write-intent bitmap marks dirty (an unclean stop not yet resynced); blocks
    /// there may hold the data from before their last write, which is accepted.
    pub dirty_regions: u64,
    /// Blocks in dirty regions of a volume with deferred checksum pages that fail their
    /// checksum: most likely writes cut off before their checksums reached the disk, which the
    /// next `serve` takes as they are. Not counted in `checksum_errors`.
    pub unverified: u64,
}

pub async fn check(volume: &Volume) -> Result<CheckReport, VolumeError> {
    let g = volume.geometry;
    let mut report = CheckReport { stripes: g.stripes, redundant: g.level != Level::Raid0, checksums: volume.checksums.is_some(), ..Default::default() };
    if !report.redundant && !report.checksums {
        return Ok(report);
    }
    let h = volume.health();
    let dirty = volume.dirty_regions_on_disk(&h).await;
    report.dirty_regions = dirty.as_ref().map_or(volume.intent.regions, |d| d.len() as u64);
    if report.dirty_regions > 0 {
        // Offline, nothing is written: the settled entries are forgotten with the process.
        let log = volume.read_partial_parity_log(&h).await;
        volume.accept_logged_blocks(&h, &log);
        h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter())).for_each(|m| m.set_checksum_recovery(true));
    }
    let mut results = stream::iter(0..g.stripes).map(|s| async move { (s, volume.stripe_consistent(s).await) }).buffer_unordered(STRIPES_IN_FLIGHT);
    let mut bad = Vec::new();
    while let Some((stripe, verdict)) = results.next().await {
        let (verdict, mut damaged) = verdict?;
        if volume.page_writes == crate::member::PageWrites::Deferred {
            let region = |pos: u64| volume.stripe_of(pos).0 / volume.intent.region_stripes;
            let before = damaged.len();
            damaged.retain(|(_, pos)| dirty.as_ref().is_some_and(|d| !d.contains(&region(*pos))));
            report.unverified += (before - damaged.len()) as u64;
        }
        report.checksum_errors += damaged.len() as u64;
        for d in damaged {
            if report.first_damaged.len() < LISTED {
                report.first_damaged.push(d);
            }
        }
        match verdict {
            Some(true) => {}
            Some(false) => bad.push(stripe),
            None => report.skipped += 1,
        }
    }
    report.first_damaged.sort();
    bad.sort_unstable();
    report.inconsistent = bad.len() as u64;
    bad.truncate(LISTED);
    report.first_inconsistent = bad;
    Ok(report)
}

impl Volume {
    /// Reads every readable shard of `stripe` and says whether they agree: with every shard
    /// present the codec verifies parity; with some lost but more than k left, the shards beyond
    /// the first k are rebuilt from those k and compared with what is on disk. `None` when only
    /// k (or fewer) shards are left, so nothing can be cross-checked. Also returns the blocks
    /// that fail their checksums; a stripe with such blocks is not cross-checked (its damage is
    /// reported as such).
    async fn stripe_consistent(&self, stripe: u64) -> Result<(Option<bool>, Vec<(std::path::PathBuf, u64)>), VolumeError> {
        let chunk = self.geometry.chunk as usize;
        let n = self.geometry.shards() as usize;
        let k = self.geometry.data_shards as usize;
        let h = self.health();
        let members: Vec<_> =
            (0..n as u32).map(|shard| h.readable(self.geometry.shard_member(stripe, shard) as usize, stripe, &self.progress).cloned()).collect();
        let present: Vec<bool> = members.iter().map(Option::is_some).collect();
        let count = present.iter().filter(|&&p| p).count();
        let redundant = self.geometry.level != Level::Raid0;
        if redundant && count <= k && count < n && self.checksums.is_none() {
            return Ok((None, Vec::new()));
        }
        let buf = Arc::new(AlignedBuf::zeroed(n * chunk));
        let pos = self.member_pos(stripe, 0);
        let reads =
            members.iter().enumerate().filter_map(|(shard, m)| m.as_ref().map(|m| super::io::member_read(m, pos, &buf, (shard * chunk) as u64, chunk as u64)));
        let mut damaged = Vec::new();
        for f in super::io::faults_of(reads.collect::<Vec<_>>()).await {
            if !f.error.is_checksum() {
                return Err(f.error.into());
            }
            damaged.extend(super::heal::damaged_positions(&f).into_iter().map(|p| (f.member.path().to_path_buf(), p)));
        }
        let mut buf = super::io::reclaim(buf)?;
        if !damaged.is_empty() || !redundant {
            return Ok((Some(true), damaged));
        }
        if count <= k && count < n {
            return Ok((None, damaged));
        }
        if count == n {
            let shards: Vec<&[u8]> = buf.chunks(chunk).collect();
            return self.codec.verify(&shards).map(|ok| (Some(ok), damaged)).map_err(|e| VolumeError::Codec(e.to_string()));
        }
        // Rebuild everything from the first k present shards; the other present ones are the check.
        let basis: Vec<bool> = {
            let mut seen = 0;
            present
                .iter()
                .map(|&p| {
                    p && {
                        seen += 1;
                        seen <= k
                    }
                })
                .collect()
        };
        let extra: Vec<(usize, Vec<u8>)> = (0..n).filter(|&i| present[i] && !basis[i]).map(|i| (i, buf[i * chunk..(i + 1) * chunk].to_vec())).collect();
        {
            let mut slices: Vec<&mut [u8]> = buf.chunks_mut(chunk).collect();
            self.codec.reconstruct(&mut slices, &basis).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        Ok((Some(extra.iter().all(|(i, on_disk)| buf[i * chunk..(i + 1) * chunk] == on_disk[..])), damaged))
    }
}
