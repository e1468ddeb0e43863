//! The partial-parity log in use (format and reasoning in `meta::ppl`): writing a record
//! before each parity-level stripe write, and, after a crash that also lost a member, rebuilding
//! that member's untouched data from the records so the stripe can be made consistent.

use super::health::Health;
use super::io::{faults_of, member_read, member_write, reclaim, Fault};
use super::{Volume, VolumeError};
use crate::buf::AlignedBuf;
use crate::layout::StripeExtent;
use crate::meta::ppl::{self as fmt, BlockCrcs, LoggedPiece, Record};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where the ring is on every member, and each slot's place in its ring.
pub(super) struct PartialParityLog {
    offset: u64,
    slots: u32,
    slot_bytes: u64,
    /// Volume-wide record sequence: the next record's number.
    seq: AtomicU64,
    /// Per volume slot (member position): its ring.
    rings: Vec<Ring>,
    /// Volume flushes begun, and the highest-numbered one completed: a slot released before
    /// flush `n` began may be overwritten once a flush numbered `n` or later has completed.
    flushes_begun: AtomicU64,
    flushes_done: AtomicU64,
    /// One flush at a time on behalf of the rings; writers that find a slot waiting for a
    /// flush queue here, and all but the first find it done.
    flushing: tokio::sync::Mutex<()>,
}

struct Ring {
    state: Mutex<RingState>,
    freed: tokio::sync::Notify,
}

struct RingState {
    /// Position of the next record; the ring slot is `next % slots`.
    next: u64,
    /// Per ring slot: whether the record in it may be overwritten yet.
    uses: Vec<SlotUse>,
    /// Per slot: the stripe of the valid record it holds on the member, if any. A full-stripe
    /// write needs a record only to outrank an older one for its stripe.
    stripes: Vec<Option<u64>>,
}

#[derive(Clone, Copy)]
enum SlotUse {
    /// Never used since start-up.
    Free,
    /// Its stripe write has not completed: not to be overwritten.
    InFlight,
    /// Its stripe write completed when this many flushes had begun. The stripe's data and
    /// parity may still sit in a volatile write cache until a later flush completes, and
    /// until then the record is what closes that stripe's write hole.
    Released { flushes_begun: u64 },
}

/// What [`PartialParityLog::acquire`] found.
enum Acquired<'a> {
    Slot(LogSlot<'a>, u64),
    /// The next slot's stripe write completed, but is not durable until a flush that begins
    /// after flush number `.0` completes.
    NeedsFlushAfter(u64),
}

/// Keeps a ring slot's record alive until the stripe write it covers has completed.
pub(super) struct LogSlot<'a> {
    log: &'a PartialParityLog,
    ring: usize,
    slot: usize,
}

impl Drop for LogSlot<'_> {
    fn drop(&mut self) {
        let r = &self.log.rings[self.ring];
        let begun = self.log.flushes_begun.load(Ordering::SeqCst);
        let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
        st.uses[self.slot] = SlotUse::Released { flushes_begun: begun };
        drop(st);
        r.freed.notify_waiters();
    }
}

/// The newest valid record of each stripe found in the rings, with its partial parity.
pub(super) type Records = HashMap<u64, (Record, Vec<u8>)>;

/// What the rings held at start-up.
#[derive(Default)]
pub(super) struct LogContents {
    pub newest: Records,
    /// The block checksums of every valid record, with its stripe: contents those blocks may
    /// hold after a crash although their table pages on disk predate them.
    pub logged: Vec<(u64, BlockCrcs)>,
}

impl PartialParityLog {
    pub fn new(offset: u64, slots: u32, chunk: u64, members: usize) -> PartialParityLog {
        let rings = (0..members)
            .map(|_| Ring {
                state: Mutex::new(RingState { next: 0, uses: vec![SlotUse::Free; slots as usize], stripes: vec![None; slots as usize] }),
                freed: tokio::sync::Notify::new(),
            })
            .collect();
        PartialParityLog {
            offset,
            slots,
            slot_bytes: fmt::slot_bytes(chunk),
            seq: AtomicU64::new(1),
            rings,
            flushes_begun: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// A volume flush is beginning: returns its number, for [`PartialParityLog::flush_done`].
    pub fn flush_begins(&self) -> u64 {
        self.flushes_begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Flush `n` completed: every write completed before it began is durable.
    pub fn flush_done(&self, n: u64) {
        self.flushes_done.fetch_max(n, Ordering::SeqCst);
    }

    fn flushed_after(&self, released_at: u64) -> bool {
        self.flushes_done.load(Ordering::SeqCst) > released_at
    }

    pub(super) fn holds_record_for(&self, ring: usize, stripe: u64) -> bool {
        self.rings[ring].state.lock().unwrap_or_else(|p| p.into_inner()).stripes.contains(&Some(stripe))
    }

    /// The record in `slot` of `ring` is on the member and covers `stripe`.
    fn holds(&self, ring: usize, slot: usize, stripe: u64) {
        self.rings[ring].state.lock().unwrap_or_else(|p| p.into_inner()).stripes[slot] = Some(stripe);
    }

    /// Takes the next slot of `ring`, strictly in order (so records are overwritten oldest
    /// first), waiting while it still covers a write in flight. Returns it with the record's
    /// sequence number, or says which flush must complete first.
    async fn acquire(&self, ring: usize) -> Acquired<'_> {
        let r = &self.rings[ring];
        loop {
            let freed = r.freed.notified();
            {
                let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
                let slot = (st.next % self.slots as u64) as usize;
                let usable = match st.uses[slot] {
                    SlotUse::Free => true,
                    SlotUse::InFlight => false,
                    SlotUse::Released { flushes_begun } if !self.flushed_after(flushes_begun) => return Acquired::NeedsFlushAfter(flushes_begun),
                    SlotUse::Released { .. } => true,
                };
                if usable {
                    st.uses[slot] = SlotUse::InFlight;
                    st.next += 1;
                    // Numbered under the ring lock, so numbers rise in ring order.
                    let seq = self.seq.fetch_add(1, Ordering::SeqCst);
                    return Acquired::Slot(LogSlot { log: self, ring, slot }, seq);
                }
            }
            freed.await;
        }
    }

    fn slot_pos(&self, slot: usize) -> u64 {
        self.offset + slot as u64 * self.slot_bytes
    }
}

impl Volume {
    /// The member slot whose ring takes the record of a write to `ext` (`partial`: not a
    /// full-stripe write), if a record is to be written: the ring of the stripe's first parity
    /// member, unless that member is lost (every data shard is then present and nothing needs
    /// the record).
    pub(super) fn record_ring(&self, h: &Health, ext: &StripeExtent, partial: bool) -> Option<usize> {
        let log = self.ppl.as_ref()?;
        let s = ext.stripe;
        let ring = self.geometry.shard_member(s, self.geometry.data_shards) as usize;
        h.readable(ring, s, &self.progress)?;
        // Recovery treats a full-stripe record like no record at all (the stripe is whatever the
        // survivors encode), so one is written only to outrank an older partial record of this
        // stripe, still in the ring, whose partial parity the write makes stale. Writes to one
        // stripe are serialised by its lock, so no record for it can appear meanwhile.
        (partial || log.holds_record_for(ring, s)).then_some(ring)
    }

    /// Writes the record for a stripe write to the ring of [`Volume::record_ring`] and returns
    /// once it is on the member (`None` if no record is due). `partial_parity` covers rows
    /// [lo, lo + len); `None` for a full-stripe write. `block_crcs`: blocks on the ring's member
    /// whose table page the record stands in for.
    pub(super) async fn log_stripe_write(
        &self,
        h: &Health,
        ext: &StripeExtent,
        lo: u64,
        partial_parity: Option<&[u8]>,
        block_crcs: Vec<BlockCrcs>,
    ) -> Result<Option<LogSlot<'_>>, Fault> {
        let Some(log) = &self.ppl else { return Ok(None) };
        let s = ext.stripe;
        let Some(ring) = self.record_ring(h, ext, partial_parity.is_some()) else { return Ok(None) };
        let Some(member) = h.readable(ring, s, &self.progress).cloned() else { return Ok(None) };
        let (slot, seq) = loop {
            match log.acquire(ring).await {
                Acquired::Slot(slot, seq) => break (slot, seq),
                Acquired::NeedsFlushAfter(at) => {
                    let _one = log.flushing.lock().await;
                    if !log.flushed_after(at) {
                        if let Err(e) = self.flush_writes().await {
                            // The volume is failing: this write goes ahead unlogged rather than wait
                            // on a flush that cannot succeed.
                            tracing::warn!("write-hole log: flush before reusing a slot failed ({e}); writing stripe {s} without a record");
                            return Ok(None);
                        }
                    }
                }
            }
        };
        let pp = partial_parity.unwrap_or(&[]);
        let record = Record {
            seq,
            stripe: s,
            lo: if partial_parity.is_some() { lo } else { 0 },
            len: pp.len() as u64,
            full: partial_parity.is_none(),
            pieces: ext.pieces.iter().take(fmt::MAX_PIECES).map(|p| LoggedPiece { shard: p.shard, chunk_offset: p.chunk_offset, len: p.len }).collect(),
            parity_crc: crate::codec::crc32c(pp),
            block_crcs,
        };
        let mut buf = AlignedBuf::zeroed(fmt::HEADER + pp.len());
        fmt::encode_header(&mut buf[..fmt::HEADER], &self.uuid, slot.slot as u32, &record);
        buf[fmt::HEADER..].copy_from_slice(pp);
        let len = buf.len() as u64;
        // Durable before the stripe's data and parity are written: a record still in the
        // member's write cache at a power cut would leave the write hole open.
        let range = crate::uring::BufRange::new(Arc::new(buf), 0, len as usize);
        member.write_durable_at(log.slot_pos(slot.slot), range).await.map_err(Fault::on(&member))?;
        log.holds(ring, slot.slot, s);
        Ok(Some(slot))
    }

    /// Reads every readable member's ring: the newest valid record per stripe and every
    /// record's block checksums, and the next sequence number and ring positions to continue
    /// from, so new records outrank old ones.
    pub(super) async fn read_partial_parity_log(&self, h: &Health) -> LogContents {
        let Some(log) = &self.ppl else { return LogContents::default() };
        let mut newest: Records = HashMap::new();
        let mut logged = Vec::new();
        let mut max_seq = 0;
        for (ring, e) in h.slots.iter().enumerate() {
            let Some(m) = e.member.as_ref().filter(|_| h.readable(ring, 0, &self.progress).is_some()) else { continue };
            let len = log.slot_bytes * log.slots as u64;
            let buf = Arc::new(AlignedBuf::zeroed(len as usize));
            if let Err(f) = member_read(m, log.offset, &buf, 0, len).await {
                tracing::error!("cannot read the partial-parity log: {}", f.error);
                continue;
            }
            let Ok(buf) = reclaim(buf) else { continue };
            let mut ring_max = None;
            for (slot, raw) in buf.chunks(log.slot_bytes as usize).enumerate() {
                let Some(r) = fmt::decode_header(raw, &self.uuid, slot as u32, self.geometry.chunk) else { continue };
                let pp = &raw[fmt::HEADER..][..r.len as usize];
                if crate::codec::crc32c(pp) != r.parity_crc || r.stripe >= self.geometry.stripes {
                    continue; // torn: its stripe write was never issued
                }
                log.holds(ring, slot, r.stripe);
                max_seq = max_seq.max(r.seq);
                if ring_max.is_none_or(|(s, _)| r.seq > s) {
                    ring_max = Some((r.seq, slot));
                }
                logged.extend(r.block_crcs.iter().map(|b| (r.stripe, b.clone())));
                if newest.get(&r.stripe).is_none_or(|(old, _)| r.seq > old.seq) {
                    newest.insert(r.stripe, (r.clone(), pp.to_vec()));
                }
            }
            if let Some((_, slot)) = ring_max {
                log.rings[ring].state.lock().unwrap_or_else(|p| p.into_inner()).next = slot as u64 + 1;
            }
        }
        log.seq.fetch_max(max_seq + 1, Ordering::SeqCst);
        LogContents { newest, logged }
    }

    /// Before a crash resync (or an offline check of a volume that was not stopped cleanly):
    /// the blocks that records name may hold what the records say, as well as what their table
    /// entries say. Each record sits on the member holding the blocks it names.
    pub(super) fn accept_logged_blocks(&self, h: &Health, contents: &LogContents) {
        for (stripe, b) in &contents.logged {
            if b.shard >= self.geometry.shards() {
                continue;
            }
            let slot = self.geometry.shard_member(*stripe, b.shard) as usize;
            if let Some(m) = h.slots.get(slot).and_then(|e| e.member.as_ref()) {
                m.also_accept_after_crash(self.member_pos(*stripe, b.chunk_offset), &b.crcs);
            }
        }
    }

    /// After a crash, for a dirty stripe with exactly one shard lost: makes the stripe
    /// consistent so that the lost shard reads back right. Caller holds the stripe lock.
    /// Returns false if the stripe cannot be made whole (rows of the lost member that the
    /// interrupted write was changing: that write was never acknowledged, so no acknowledged
    /// data is lost, but those rows read as whatever the survivors now encode).
    pub(super) async fn recover_stripe(&self, stripe: u64, records: &Records) -> Result<bool, VolumeError> {
        let g = self.geometry;
        let (k, n) = (g.data_shards as usize, g.shards() as usize);
        loop {
            let h = self.health();
            let lost: Vec<usize> =
                (0..n).filter(|&shard| h.readable(g.shard_member(stripe, shard as u32) as usize, stripe, &self.progress).is_none()).collect();
            if lost.len() != 1 {
                return Ok(false);
            }
            let x = lost[0];
            // A lost parity shard: the data is all there, so the other parity is recomputed over
            // the whole chunk, record or not (the record may have been on the lost member).
            if x >= k && n - k == 1 {
                return Ok(true);
            }
            let record = match records.get(&stripe) {
                _ if x >= k => None,
                // No record: no write was in flight, the stripe is consistent.
                None => return Ok(true),
                // A full-stripe write was changing every row of the lost shard: none of it was
                // acknowledged, and the survivors encode some version of it.
                Some((r, _)) if r.full => return Ok(true),
                Some(r) => Some(r),
            };
            let (lo, len) = match record {
                Some((r, _)) => (r.lo, r.len),
                None => (0, g.chunk),
            };
            if len == 0 {
                return Ok(true);
            }
            let pos = self.member_pos(stripe, lo);
            let shards = Arc::new(AlignedBuf::zeroed(n * len as usize));
            let reads = (0..n).filter(|&s| s != x).filter_map(|shard| {
                let m = h.readable(g.shard_member(stripe, shard as u32) as usize, stripe, &self.progress)?;
                Some(member_read(m, pos, &shards, shard as u64 * len, len))
            });
            let faults = faults_of(reads.collect::<Vec<_>>()).await;
            if !faults.is_empty() {
                self.settle_faults(faults).await?;
                continue;
            }
            let mut shards = reclaim(shards)?;
            let slab = len as usize;
            if let Some((r, pp)) = record {
                // The lost data as the survivors encode it (right only where they agree)...
                let mut classic = shards.to_vec();
                let mut present = vec![true; n];
                present[x] = false;
                {
                    let mut slices: Vec<&mut [u8]> = classic.chunks_mut(slab).collect();
                    self.codec.reconstruct(&mut slices, &present).map_err(|e| VolumeError::Codec(e.to_string()))?;
                }
                // ...and as the partial parity (standing in for parity 0) and the data the write
                // left alone give it; the pieces being changed count as zeros, as in the record.
                let mut basis = shards[..k * slab].to_vec();
                for p in &r.pieces {
                    let (from, to) = (p.chunk_offset.max(lo), (p.chunk_offset + p.len).min(lo + len));
                    if from < to && (p.shard as usize) < k {
                        let at = p.shard as usize * slab + (from - lo) as usize;
                        basis[at..at + (to - from) as usize].fill(0);
                    }
                }
                basis.resize(n * slab, 0);
                basis[k * slab..(k + 1) * slab].copy_from_slice(pp);
                let mut present = vec![true; n];
                present[x] = false;
                present[k + 1..].iter_mut().for_each(|p| *p = false);
                {
                    let mut slices: Vec<&mut [u8]> = basis.chunks_mut(slab).collect();
                    self.codec.reconstruct(&mut slices, &present).map_err(|e| VolumeError::Codec(e.to_string()))?;
                }
                // Rows the write left alone come from the log; rows it was changing (never
                // acknowledged) keep what the survivors encode.
                for row in (0..len).step_by(crate::buf::ALIGN) {
                    let src = if r.modifies(x as u32, lo + row) { &classic } else { &basis };
                    let at = x * slab + row as usize;
                    let end = at + crate::buf::ALIGN.min(slab - row as usize);
                    shards[at..end].copy_from_slice(&src[at..end]);
                }
            }
            // Parity afresh from the data as it now is (each piece old or new, both valid).
            let parity = self.encode_parity(shards[..k * slab].chunks(slab).collect(), slab)?;
            let mut writes = Vec::new();
            for j in 0..(n - k) {
                if k + j == x {
                    continue;
                }
                for t in self.targets(&h, stripe, (k + j) as u32) {
                    let parity = &parity;
                    writes.push(async move { member_write(&t, pos, parity, (j * slab) as u64, len).await });
                }
            }
            let faults = faults_of(writes).await;
            if !faults.is_empty() {
                self.fail_all_io(faults).await;
                continue;
            }
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_slot(a: &Acquired<'_>) -> bool {
        matches!(a, Acquired::Slot(..))
    }

    #[tokio::test]
    async fn a_slot_is_reused_only_after_a_flush_that_began_after_its_write_completed() {
        let log = PartialParityLog::new(0, 2, 65536, 1);
        let (a, b) = (log.acquire(0).await, log.acquire(0).await);
        assert!(is_slot(&a) && is_slot(&b), "a fresh ring hands out its slots");
        // A flush that begins while the writes are in flight does not cover them.
        let early = log.flush_begins();
        drop((a, b));
        log.flush_done(early);
        let Acquired::NeedsFlushAfter(at) = log.acquire(0).await else { panic!("slot reused before its stripe write was flushed") };
        let late = log.flush_begins();
        assert!(matches!(log.acquire(0).await, Acquired::NeedsFlushAfter(_)), "a flush still running does not free the slot");
        log.flush_done(late);
        assert!(late > at);
        let c = log.acquire(0).await;
        assert!(is_slot(&c), "the flush after the write frees the slot");
        // The second slot was released at the same time and is covered by the same flush.
        assert!(is_slot(&log.acquire(0).await));
        drop(c);
        assert!(matches!(log.acquire(0).await, Acquired::NeedsFlushAfter(_)), "a slot released again needs a new flush");
    }
}
