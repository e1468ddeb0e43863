//! Self-healing: a block that fails its checksum is rebuilt from the volume's redundancy and
//! rewritten in place.
//!
//! Healing re-reads the rows concerned on every readable member under the stripe lock, so a
//! read that raced a write (and saw the block between its checksum update and its data write)
//! finds nothing to heal. A rebuilt block is written only if it matches what the damaged
//! member's own checksum table says belongs there (for parity levels), so a second damaged
//! shard in the row cannot be mistaken for good data; what cannot be rebuilt stays as it is and
//! is answered with EIO.

use super::io::{faults_of, member_read, member_write, reclaim, Fault};
use super::{Volume, VolumeError};
use crate::buf::{AlignedBuf, ALIGN};
use crate::layout::Level;
use crate::member::{Member, MemberError, PageWrites};
use std::sync::Arc;

const BLOCK: u64 = ALIGN as u64;

/// What healing some rows came to, in blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Healed {
    pub damaged: u64,
    pub repaired: u64,
    pub unrepairable: u64,
    /// Blocks of deferred writes cut off by a crash, taken as they are (not counted in
    /// `damaged`): their checksum entries had not reached the disk.
    pub adopted: u64,
}

impl Healed {
    pub fn add(&mut self, o: Healed) {
        self.damaged += o.damaged;
        self.repaired += o.repaired;
        self.unrepairable += o.unrepairable;
        self.adopted += o.adopted;
    }
}

impl Volume {
    /// Heals the rows [lo, lo + len) (a block-aligned range within the chunk) of `stripe` on
    /// every member. Caller holds the stripe lock.
    pub(super) async fn heal_rows(&self, stripe: u64, lo: u64, len: u64) -> Result<Healed, VolumeError> {
        let g = self.geometry;
        let n = g.members as usize;
        let pos = self.member_pos(stripe, lo);
        // Healing rewrites blocks with the data they should hold, which a cached copy of the
        // stripe already has; dropping it keeps the rule that only a client write fills one.
        self.stripe_cache.invalidate(stripe..stripe + 1);
        'attempt: loop {
            let h = self.health();
            let readable: Vec<Option<Arc<Member>>> = (0..n).map(|slot| h.readable(slot, stripe, &self.progress).cloned()).collect();
            let Some((bufs, damage)) = self.read_rows(&readable, pos, len).await else { continue 'attempt };
            let mut bufs: Vec<AlignedBuf> = bufs.into_iter().map(reclaim).collect::<Result<_, _>>()?;
            // Per slot: damaged block indexes within the range.
            let mut bad: Vec<Vec<u64>> = vec![Vec::new(); n];
            for f in &damage {
                if let Some((slot, _)) = h.slot_of(&f.member) {
                    bad[slot] = damaged_positions(f).iter().map(|p| (p - pos) / BLOCK).collect();
                }
            }
            let rows: std::collections::BTreeSet<u64> = bad.iter().flatten().copied().collect();
            let mut rewrites: Vec<(usize, u64)> = Vec::new();
            for row in rows {
                let fixed = match g.level {
                    Level::Raid0 => Vec::new(),
                    Level::Raid1 => self.heal_mirror_row(&readable, &bad, &mut bufs, row),
                    Level::Raid5 | Level::Ec => self.heal_parity_row(stripe, &readable, &bad, &mut bufs, row, pos)?,
                };
                rewrites.extend(fixed.into_iter().map(|slot| (slot, row)));
            }
            let adopted = self.adopt_unhealed(&readable, &mut bad, &rewrites, &bufs, pos);
            let damaged = bad.iter().map(|b| b.len() as u64).sum::<u64>();
            let healed = |repaired: u64| Healed { damaged, repaired, unrepairable: damaged - repaired, adopted };
            if rewrites.is_empty() {
                self.note_heal(&readable, &bad, &rewrites, stripe);
                return Ok(healed(0));
            }
            let _marked = self.intent.mark(stripe, stripe).await;
            let bufs: Vec<Arc<AlignedBuf>> = bufs.into_iter().map(Arc::new).collect();
            let mut writes = Vec::new();
            for &(slot, row) in &rewrites {
                for t in h.targets(slot, stripe, &self.progress) {
                    let b = &bufs[slot];
                    writes.push(async move { member_write(&t, pos + row * BLOCK, b, row * BLOCK, BLOCK).await });
                }
            }
            let faults: Vec<Fault> = faults_of(writes).await;
            if !faults.is_empty() {
                self.fail_all_io(faults).await;
                continue 'attempt;
            }
            self.note_heal(&readable, &bad, &rewrites, stripe);
            return Ok(healed(rewrites.len() as u64));
        }
    }

    /// During the crash resync of a volume with deferred checksum pages, a damaged block that
    /// redundancy could not rebuild is one whose deferred write the crash cut off before its
    /// entry reached the disk: it is taken as it is, and dropped from `bad`. (A block that rotted
    /// in a dirty region is taken too: the price of deferring, documented in the README.)
    /// Returns how many were taken.
    fn adopt_unhealed(&self, readable: &[Option<Arc<Member>>], bad: &mut [Vec<u64>], rewrites: &[(usize, u64)], bufs: &[AlignedBuf], pos: u64) -> u64 {
        if self.page_writes != PageWrites::Deferred {
            return 0;
        }
        let mut adopted = 0;
        for (slot, m) in readable.iter().enumerate() {
            let Some(m) = m.as_ref().filter(|m| m.in_checksum_recovery()) else { continue };
            bad[slot].retain(|&row| {
                if rewrites.contains(&(slot, row)) {
                    return true;
                }
                let at = (row * BLOCK) as usize;
                m.adopt_checksums(pos + row * BLOCK, &bufs[slot][at..at + ALIGN]);
                adopted += 1;
                false
            });
        }
        if adopted > 0 {
            tracing::debug!("crash resync: {adopted} block(s) written just before the unclean stop taken as they are (their checksums were deferred)");
        }
        adopted
    }

    /// Reads [pos, pos + len) of every member in `readable` (one buffer per slot, zeros for a
    /// lost one). Checksum damage is returned with the buffers; `None` if a member failed
    /// instead (it has been failed: read again with what is left).
    pub(super) async fn read_rows(&self, readable: &[Option<Arc<Member>>], pos: u64, len: u64) -> Option<(Vec<Arc<AlignedBuf>>, Vec<Fault>)> {
        let bufs: Vec<Arc<AlignedBuf>> = readable.iter().map(|_| Arc::new(AlignedBuf::zeroed(len as usize))).collect();
        let reads = readable.iter().zip(&bufs).filter_map(|(m, b)| m.as_ref().map(|m| member_read(m, pos, b, 0, len)));
        let (damage, io): (Vec<Fault>, Vec<Fault>) = faults_of(reads.collect::<Vec<_>>()).await.into_iter().partition(|f| f.error.is_checksum());
        if !io.is_empty() {
            self.fail_all_io(io).await;
            return None;
        }
        Some((bufs, damage))
    }

    /// The stripe and the offset within its chunk of a member offset in the data area.
    pub(super) fn stripe_of(&self, member_pos: u64) -> (u64, u64) {
        let rel = member_pos - self.data_offset;
        (rel / self.geometry.chunk, rel % self.geometry.chunk)
    }

    /// Counts and logs, per member, the damage found and the blocks rewritten.
    fn note_heal(&self, readable: &[Option<Arc<Member>>], bad: &[Vec<u64>], rewrites: &[(usize, u64)], stripe: u64) {
        for (slot, m) in readable.iter().enumerate() {
            let Some(m) = m else { continue };
            let found = bad[slot].len() as u64;
            let fixed = rewrites.iter().filter(|(s, _)| *s == slot).count() as u64;
            if found == 0 {
                continue;
            }
            m.note_checksum_errors(found);
            m.note_repaired(fixed);
            if fixed == found {
                tracing::warn!("{}: {found} block(s) of stripe {stripe} failed their checksum; rewritten from redundancy", m.path().display());
            } else {
                tracing::error!("{}: {found} block(s) of stripe {stripe} failed their checksum; {} could not be repaired", m.path().display(), found - fixed);
            }
        }
    }

    /// raid1: copies a good mirror's block over the damaged ones. Returns the slots fixed.
    fn heal_mirror_row(&self, readable: &[Option<Arc<Member>>], bad: &[Vec<u64>], bufs: &mut [AlignedBuf], row: u64) -> Vec<usize> {
        let is_bad = |slot: usize| bad[slot].contains(&row);
        let Some(good) = (0..readable.len()).find(|&s| readable[s].is_some() && !is_bad(s)) else { return Vec::new() };
        let at = (row * BLOCK) as usize;
        let block = bufs[good][at..at + ALIGN].to_vec();
        let fixed: Vec<usize> = (0..readable.len()).filter(|&s| readable[s].is_some() && is_bad(s)).collect();
        for &s in &fixed {
            bufs[s][at..at + ALIGN].copy_from_slice(&block);
        }
        fixed
    }

    /// Parity levels: rebuilds the row's damaged shards from k good ones and keeps each rebuilt
    /// block only if its own member's checksum accepts it. Returns the slots fixed.
    fn heal_parity_row(
        &self,
        stripe: u64,
        readable: &[Option<Arc<Member>>],
        bad: &[Vec<u64>],
        bufs: &mut [AlignedBuf],
        row: u64,
        pos: u64,
    ) -> Result<Vec<usize>, VolumeError> {
        let g = self.geometry;
        let shards = g.shards() as usize;
        let at = (row * BLOCK) as usize;
        let slot_of = |shard: usize| g.shard_member(stripe, shard as u32) as usize;
        let good = |slot: usize| readable[slot].is_some() && !bad[slot].contains(&row);
        let present: Vec<bool> = (0..shards).map(|shard| good(slot_of(shard))).collect();
        if present.iter().filter(|&&p| p).count() < g.data_shards as usize {
            return Ok(Vec::new());
        }
        let mut row_bufs: Vec<Vec<u8>> =
            (0..shards).map(|shard| if present[shard] { bufs[slot_of(shard)][at..at + ALIGN].to_vec() } else { vec![0; ALIGN] }).collect();
        {
            let mut slices: Vec<&mut [u8]> = row_bufs.iter_mut().map(|b| &mut b[..]).collect();
            self.codec.reconstruct(&mut slices, &present).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        let mut fixed = Vec::new();
        for shard in (0..shards).filter(|&s| !present[s]) {
            let slot = slot_of(shard);
            let Some(m) = &readable[slot] else { continue };
            if m.checksum_accepts(pos + row * BLOCK, &row_bufs[shard]) {
                bufs[slot][at..at + ALIGN].copy_from_slice(&row_bufs[shard]);
                fixed.push(slot);
            }
        }
        Ok(fixed)
    }

    /// Deals with failed member reads while holding the locks of the stripes they touched:
    /// I/O errors fail the member; checksum errors are healed. Err if a damaged block cannot be
    /// rebuilt.
    pub(super) async fn settle_faults(&self, faults: Vec<Fault>) -> Result<Healed, VolumeError> {
        let (damage, io): (Vec<Fault>, Vec<Fault>) = faults.into_iter().partition(|f| f.error.is_checksum());
        self.fail_all_io(io).await;
        let healed = self.heal_damage(&damage).await?;
        if healed.unrepairable > 0 {
            let stripe = damage.iter().flat_map(damaged_positions).next().map_or(0, |p| self.stripe_of(p).0);
            return Err(VolumeError::Corrupt { stripe });
        }
        Ok(healed)
    }

    /// Heals every block that `damage` (checksum faults) names. Caller holds the stripe locks.
    pub(super) async fn heal_damage(&self, damage: &[Fault]) -> Result<Healed, VolumeError> {
        let mut blocks: Vec<(u64, u64)> = damage.iter().flat_map(damaged_positions).map(|p| self.stripe_of(p)).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut total = Healed::default();
        // Contiguous damaged blocks of one stripe are healed together.
        let mut i = 0;
        while i < blocks.len() {
            let (stripe, lo) = blocks[i];
            let mut hi = lo + BLOCK;
            while i + 1 < blocks.len() && blocks[i + 1] == (stripe, hi) {
                hi += BLOCK;
                i += 1;
            }
            total.add(self.heal_rows(stripe, lo, hi - lo).await?);
            i += 1;
        }
        Ok(total)
    }
}

/// Member offsets of the blocks a checksum fault names.
pub(super) fn damaged_positions(f: &Fault) -> Vec<u64> {
    match &f.error {
        MemberError::Checksum { bad, .. } => bad.clone(),
        _ => Vec::new(),
    }
}
