//! Online scrub: walks every stripe of a running volume, verifies that parity (or every mirror
//! copy) agrees with the data, and with `repair` rewrites what disagrees.
//!
//! Without per-block checksums there is no telling which side of a mismatch is wrong, so repair
//! follows md's rule: the data shards are trusted and parity is recomputed; for raid1 the copy
//! in slot 0 is written to the others. Stripes with a lost member are skipped and counted.
//!
//! Batches run under the stripe locks, so a scrub never sees a write half done and never
//! repairs over a concurrent write.

use super::heal::{damaged_positions, Healed};
use super::io::{faults_of, member_write, reclaim, Fault};
use super::status::ScrubStatus;
use super::{Volume, VolumeError};
use crate::buf::{AlignedBuf, ALIGN};
use crate::layout::Level;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes of each member read per batch.
const BATCH_BYTES: u64 = 1 << 20;

#[derive(Default)]
pub(super) struct ScrubState {
    running: AtomicBool,
    /// The running or last finished scrub.
    status: Mutex<Option<ScrubStatus>>,
}

impl ScrubState {
    pub fn status(&self) -> Option<ScrubStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ScrubStatus)) {
        if let Some(s) = self.status.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            f(s)
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What a scrub batch found.
struct BatchResult {
    verdicts: Vec<Verdict>,
    /// Checksum damage found, and healed with `repair`.
    healed: Healed,
    /// Blocks read and verified.
    blocks: u64,
}

/// What the crash resync of some stripes came to.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Resynced {
    /// Stripes whose parity or mirrors disagreed and were rewritten.
    pub repaired: u64,
    /// Stripes that could not be made whole (a member is lost).
    pub skipped: u64,
    /// Blocks of deferred-page writes taken as found (see `Volume::adopt_unhealed`).
    pub adopted: u64,
}

impl Resynced {
    pub fn add(&mut self, o: Resynced) {
        self.repaired += o.repaired;
        self.skipped += o.skipped;
        self.adopted += o.adopted;
    }
}

/// What one stripe of a scrub batch came to.
enum Verdict {
    Consistent,
    /// Parity (or a mirror copy) disagreed with the data.
    Mismatch,
    /// A member holding part of the stripe is lost.
    Skipped,
}

impl Volume {
    /// Starts a scrub in the background; refused while one is running.
    pub fn start_scrub(self: &Arc<Self>, repair: bool, max_rate: Option<u64>) -> Result<String, super::AdminError> {
        if self.geometry.level == Level::Raid0 && self.checksums.is_none() {
            return Err(super::AdminError::Refused("raid0 without checksums has nothing to scrub against".into()));
        }
        if self.scrub.running.swap(true, Ordering::SeqCst) {
            return Err(super::AdminError::Refused("a scrub is already running".into()));
        }
        *self.scrub.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(ScrubStatus {
            running: true,
            repair,
            stripes_done: 0,
            stripes_total: self.geometry.stripes,
            bytes_checked: 0,
            blocks_checked: 0,
            checksum_errors: 0,
            mismatches: 0,
            repaired: 0,
            unrepairable: 0,
            skipped: 0,
            started_unix: now_unix(),
            finished_unix: None,
            error: None,
        });
        let volume = self.clone();
        tokio::spawn(async move {
            let result = volume.scrub_all(repair, max_rate).await;
            volume.scrub.update(|s| {
                s.running = false;
                s.finished_unix = Some(now_unix());
                s.error = result.err().map(|e| e.to_string());
            });
            volume.scrub.running.store(false, Ordering::SeqCst);
            if let Some(s) = volume.scrub.status() {
                tracing::info!(
                    "scrub finished: {} stripes, {} blocks checked, {} checksum errors, {} mismatches, {} repaired, {} unrepairable, {} skipped{}",
                    s.stripes_done,
                    s.blocks_checked,
                    s.checksum_errors,
                    s.mismatches,
                    s.repaired,
                    s.unrepairable,
                    s.skipped,
                    s.error.map(|e| format!(", stopped: {e}")).unwrap_or_default()
                );
            }
        });
        Ok(format!("scrub started{}", if repair { " (repairing)" } else { "" }))
    }

    pub fn scrub_status(&self) -> Option<ScrubStatus> {
        self.scrub.status()
    }

    async fn scrub_all(&self, repair: bool, max_rate: Option<u64>) -> Result<(), VolumeError> {
        let g = self.geometry;
        let batch_stripes = (BATCH_BYTES / g.chunk).max(1);
        let started = Instant::now();
        let mut read = 0u64;
        let mut first = 0;
        while first < g.stripes {
            if self.rebuild_stopping() {
                return Err(VolumeError::Internal("daemon shutting down"));
            }
            let batch = batch_stripes.min(g.stripes - first);
            let result = {
                let _guards = self.locks.lock_all(first..first + batch).await;
                self.scrub_batch(first, batch, repair).await?
            };
            let Some(result) = result else { continue }; // a member failed: batch again
            self.scrub.update(|s| {
                s.blocks_checked += result.blocks;
                s.checksum_errors += result.healed.damaged;
                s.repaired += result.healed.repaired;
                s.unrepairable += result.healed.unrepairable;
                for v in &result.verdicts {
                    match v {
                        Verdict::Consistent => {}
                        Verdict::Mismatch => {
                            s.mismatches += 1;
                            if repair {
                                s.repaired += 1;
                            }
                        }
                        Verdict::Skipped => s.skipped += 1,
                    }
                }
                s.stripes_done = first + batch;
                s.bytes_checked += batch * g.chunk * g.members as u64;
            });
            read += batch * g.chunk * g.members as u64;
            first += batch;
            if let Some(rate) = max_rate.filter(|&r| r > 0) {
                let due = Duration::from_secs_f64(read as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(())
    }

    /// Resync after a crash: makes stripes [first, end) consistent; a stripe with a lost shard
    /// is made consistent from the partial-parity log `records`.
    pub(super) async fn resync_range(&self, first: u64, end: u64, records: &super::ppl::Records) -> Resynced {
        let batch_stripes = (BATCH_BYTES / self.geometry.chunk).max(1);
        let (mut repaired, mut skipped, mut adopted) = (0, 0, 0);
        let mut s = first;
        while s < end {
            let batch = batch_stripes.min(end - s);
            let _guards = self.locks.lock_all(s..s + batch).await;
            match self.scrub_batch(s, batch, true).await {
                Ok(Some(BatchResult { verdicts: v, healed, .. })) => {
                    adopted += healed.adopted;
                    repaired += v.iter().filter(|v| matches!(v, Verdict::Mismatch)).count() as u64;
                    for (i, v) in v.iter().enumerate() {
                        if !matches!(v, Verdict::Skipped) {
                            continue;
                        }
                        match self.recover_stripe(s + i as u64, records).await {
                            Ok(true) => {}
                            Ok(false) => skipped += 1,
                            Err(e) => {
                                tracing::error!("resync of stripe {}: {e}", s + i as u64);
                                skipped += 1;
                            }
                        }
                    }
                }
                Ok(None) => continue, // a member failed: this batch again, with what is left
                Err(e) => {
                    tracing::error!("resync of stripes {s}..{} failed: {e}", s + batch);
                    skipped += batch;
                }
            }
            s += batch;
        }
        Resynced { repaired, skipped, adopted }
    }

    /// Checks (and repairs) stripes [first, first + batch): every block against its checksum,
    /// then parity or mirrors of the stripes whose blocks all passed. `None` if a member failed
    /// on the way and the batch must be done again. Caller holds the stripe locks.
    async fn scrub_batch(&self, first: u64, batch: u64, repair: bool) -> Result<Option<BatchResult>, VolumeError> {
        if repair {
            // Repairs and resync writes change blocks under the stripe cache's feet.
            self.stripe_cache.invalidate(first..first + batch);
        }
        let g = self.geometry;
        let n = g.members as usize;
        let chunk = g.chunk as usize;
        let len = batch * g.chunk;
        let pos = self.member_pos(first, 0);
        let h = self.health();
        let last = first + batch - 1;
        // Slots readable for the whole batch; a slot rebuilding mid-batch counts as lost here.
        let readable: Vec<Option<_>> = (0..n).map(|j| h.readable(j, last, &self.progress).cloned()).collect();
        let Some((mut bufs, damage)) = self.read_rows(&readable, pos, len).await else { return Ok(None) };
        let mut result = BatchResult {
            verdicts: Vec::with_capacity(batch as usize),
            healed: Healed::default(),
            blocks: readable.iter().flatten().count() as u64 * len / ALIGN as u64,
        };
        let stripes_of = |damage: &[Fault]| -> BTreeSet<u64> { damage.iter().flat_map(damaged_positions).map(|p| self.stripe_of(p).0).collect() };
        let mut damaged_stripes = stripes_of(&damage);
        if !repair {
            for f in &damage {
                let found = damaged_positions(f).len() as u64;
                f.member.note_checksum_errors(found);
                result.healed.damaged += found;
                tracing::warn!("scrub: {}: {found} block(s) fail their checksum", f.member.path().display());
            }
        } else if !damage.is_empty() {
            result.healed = self.heal_damage(&damage).await?;
            // Healed blocks hold old or new data (after a crash either is right), and the
            // parity of their rows must now be checked like any other: read the batch again.
            let Some((again, damage)) = self.read_rows(&readable, pos, len).await else { return Ok(None) };
            bufs = again;
            damaged_stripes = stripes_of(&damage);
        }
        let mut bufs: Vec<AlignedBuf> = bufs.into_iter().map(reclaim).collect::<Result<_, _>>()?;
        // Per slot, the stripes of this batch that repair rewrote.
        let mut rewrites: Vec<Vec<u64>> = vec![Vec::new(); n];
        for s in first..=last {
            let at = ((s - first) as usize) * chunk;
            if readable.iter().any(|m| m.is_none()) {
                result.verdicts.push(Verdict::Skipped);
                continue;
            }
            // Stripes with damage left could not be checked against the rest; raid0 has only
            // the checksums.
            if damaged_stripes.contains(&s) || g.level == Level::Raid0 {
                result.verdicts.push(Verdict::Consistent);
                continue;
            }
            let by_shard: Vec<usize> = (0..g.shards()).map(|shard| g.shard_member(s, shard) as usize).collect();
            let ok = {
                let shards: Vec<&[u8]> = by_shard.iter().map(|&slot| &bufs[slot][at..at + chunk]).collect();
                self.codec.verify(&shards).map_err(|e| VolumeError::Codec(e.to_string()))?
            };
            if ok {
                result.verdicts.push(Verdict::Consistent);
                continue;
            }
            tracing::warn!("scrub: stripe {s} is inconsistent{}", if repair { "; repairing" } else { "" });
            if repair {
                self.repair_in_buffers(&mut bufs, &by_shard, at, chunk)?;
                for &slot in &by_shard[g.data_shards as usize..] {
                    rewrites[slot].push(s);
                }
            }
            result.verdicts.push(Verdict::Mismatch);
        }
        if rewrites.iter().any(|r| !r.is_empty()) {
            // A crash during the repair writes must leave these stripes marked for resync.
            let _marked = self.intent.mark(first, last).await;
            let bufs: Vec<Arc<AlignedBuf>> = bufs.into_iter().map(Arc::new).collect();
            let mut writes = Vec::new();
            for (slot, stripes) in rewrites.iter().enumerate() {
                for &s in stripes {
                    // Write to every member that must hold this slot's data (incl. a replacement).
                    for t in h.targets(slot, s, &self.progress) {
                        let off = (s - first) * g.chunk;
                        let b = &bufs[slot];
                        writes.push(async move { member_write(&t, self.member_pos(s, 0), b, off, g.chunk).await });
                    }
                }
            }
            let faults = faults_of(writes).await;
            if !faults.is_empty() {
                self.fail_all_io(faults).await;
            }
        }
        Ok(Some(result))
    }

    /// Recomputes the redundant shards of one stripe in the batch buffers from its data shards.
    fn repair_in_buffers(&self, bufs: &mut [AlignedBuf], by_shard: &[usize], at: usize, chunk: usize) -> Result<(), VolumeError> {
        let k = self.geometry.data_shards as usize;
        let data: Vec<Vec<u8>> = by_shard[..k].iter().map(|&slot| bufs[slot][at..at + chunk].to_vec()).collect();
        let mut parity: Vec<Vec<u8>> = vec![vec![0u8; chunk]; by_shard.len() - k];
        {
            let data_refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
            let mut parity_refs: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[..]).collect();
            self.codec.encode(&data_refs, &mut parity_refs).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        for (p, &slot) in parity.iter().zip(&by_shard[k..]) {
            bufs[slot][at..at + chunk].copy_from_slice(p);
        }
        Ok(())
    }
}
