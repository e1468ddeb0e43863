//! The data path: reads, writes, zeroing and flushes, split by stripe, optimal or degraded.
//!
//! Member I/O always happens in whole 4096-byte blocks at aligned offsets, so members can use
//! O_DIRECT. A client write that does not cover whole blocks is widened here by reading the
//! partial edge blocks first (under the stripe lock, so two sub-block writes to one block cannot
//! lose each other's bytes).
//!
//! Parity levels choose per stripe between:
//! - full-stripe write: parity from the new data alone, no reads;
//! - read-modify-write: read the old bytes being replaced and the parity, apply the difference;
//! - reconstruct-write: read the untouched rest of the stripe and encode parity afresh;
//!   whichever reads fewer member blocks;
//! - degraded write, when a shard of the stripe is unreadable: rebuild the stripe's slab from
//!   any k shards, overlay the new data, and write every shard that still has a home.
//!
//! A member error fails the member (see `failure.rs`) and the operation is retried from what is
//! left; a stripe that has lost more shards than the level tolerates answers EIO.

use super::health::Health;
use super::stripe_cache::CachedStripe;
use super::{combine, Volume, VolumeError};
use crate::buf::{AlignedBuf, ALIGN};
use crate::layout::{Level, Piece, StripeExtent};
use crate::member::{Member, MemberError, PageWrites};
use crate::meta::ppl::{self as fmt_ppl, BlockCrcs};
use crate::uring::BufRange;
use futures::future::join_all;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const BLOCK: u64 = ALIGN as u64;

/// Zeroing writes are issued in pieces of at most this many bytes, to bound memory.
const ZERO_WRITE_MAX: u64 = 8 << 20;

/// A member operation that failed, and on which member.
pub(super) struct Fault {
    pub member: Arc<Member>,
    pub error: MemberError,
}

impl Fault {
    /// For `map_err` on an operation of `member`: its error, with the member it happened on.
    pub(super) fn on(member: &Arc<Member>) -> impl FnOnce(MemberError) -> Fault + '_ {
        move |error| Fault { member: member.clone(), error }
    }
}

pub(super) async fn member_read(member: &Arc<Member>, pos: u64, buf: &Arc<AlignedBuf>, off: u64, len: u64) -> Result<(), Fault> {
    let range = BufRange::new(buf.clone(), off as usize, len as usize);
    member.read_at(pos, range).await.map_err(Fault::on(member))
}

pub(super) async fn member_write(member: &Arc<Member>, pos: u64, buf: &Arc<AlignedBuf>, off: u64, len: u64) -> Result<(), Fault> {
    let range = BufRange::new(buf.clone(), off as usize, len as usize);
    member.write_at(pos, range).await.map_err(Fault::on(member))
}

/// A client's write to a member: its checksum pages ordered as the volume says.
pub(super) async fn client_write(member: &Arc<Member>, pos: u64, buf: &Arc<AlignedBuf>, off: u64, len: u64, pages: PageWrites) -> Result<(), Fault> {
    let range = BufRange::new(buf.clone(), off as usize, len as usize);
    member.write_with_pages(pos, range, pages).await.map_err(Fault::on(member))
}

/// Runs every operation to completion (none may be left running: they hold stripe locks and
/// buffers) and returns the ones that failed.
pub(super) async fn faults_of<F>(ops: impl IntoIterator<Item = F>) -> Vec<Fault>
where
    F: Future<Output = Result<(), Fault>>,
{
    join_all(ops).await.into_iter().filter_map(Result::err).collect()
}

/// Waits for every operation, then reports the first error.
pub(super) async fn all<F>(ops: impl IntoIterator<Item = F>) -> Result<(), VolumeError>
where
    F: Future<Output = Result<(), VolumeError>>,
{
    join_all(ops).await.into_iter().collect()
}

/// Takes back sole ownership of a buffer whose I/O has completed.
pub(super) fn reclaim(buf: Arc<AlignedBuf>) -> Result<AlignedBuf, VolumeError> {
    Arc::try_unwrap(buf).map_err(|_| VolumeError::Internal("I/O buffer still shared after completion"))
}

/// Counts a write in progress for as long as it lives.
struct CountedWrite<'a>(&'a AtomicUsize);

impl<'a> CountedWrite<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        CountedWrite(count)
    }
}

impl Drop for CountedWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies `data` into `buf` at `off` while other regions of `buf` may be in flight.
fn fill_region(buf: &Arc<AlignedBuf>, off: usize, data: &[u8]) {
    assert!(off + data.len() <= buf.len(), "region beyond buffer");
    // SAFETY: in bounds (checked); the caller owns this region exclusively, exactly as a
    // kernel read into it would, and nobody reads the buffer until every region is complete.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.as_ptr_mut_shared().add(off), data.len()) }
}

/// New parity for a partial-stripe write with its partial parity (see `meta::ppl`), or the
/// reads that failed on the way to it.
type ParityOutcome = Result<Result<(Arc<AlignedBuf>, Vec<u8>), Vec<Fault>>, VolumeError>;

/// Copies the write's pieces into a buffer holding the slab [lo, lo + slab) of every shard,
/// shard after shard.
fn overlay_pieces(slabs: &mut [u8], ext: &StripeExtent, buf: &[u8], lo: u64, slab: u64) {
    for p in &ext.pieces {
        let at = (p.shard as u64 * slab + p.chunk_offset - lo) as usize;
        slabs[at..][..p.len as usize].copy_from_slice(&buf[p.buf_offset as usize..][..p.len as usize]);
    }
}

/// What one attempt at a stripe write came to.
enum Attempt {
    /// Writes issued; those that failed are listed.
    Written(Vec<Fault>),
    /// A read needed before writing failed: fail those members and try again.
    ReadFailed(Vec<Fault>),
}

impl Volume {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Byte position of `chunk_offset` within `stripe`'s chunk on any member.
    pub(super) fn member_pos(&self, stripe: u64, chunk_offset: u64) -> u64 {
        self.data_offset + self.geometry.member_offset(stripe) + chunk_offset
    }

    fn slot_of_shard(&self, stripe: u64, shard: u32) -> usize {
        self.geometry.shard_member(stripe, shard) as usize
    }

    /// Fails the members of I/O faults (never called with checksum damage: see `settle_faults`).
    pub(super) async fn fail_all_io(&self, faults: Vec<Fault>) {
        for f in faults {
            self.member_failed(&f.member, &f.error).await;
        }
    }

    /// Whether the part `ext` of a stripe can still be served: enough readable shards to
    /// decode the stripe, or for raid0 (nothing to decode from) the touched members themselves.
    fn serviceable(&self, h: &Health, ext: &StripeExtent) -> bool {
        let s = ext.stripe;
        if self.geometry.level == Level::Raid0 {
            return ext.pieces.iter().all(|p| h.readable(self.slot_of_shard(s, p.shard), s, &self.progress).is_some());
        }
        let readable = (0..self.geometry.members as usize).filter(|&slot| h.readable(slot, s, &self.progress).is_some()).count();
        readable >= self.geometry.data_shards as usize
    }

    /// k readable shards of `stripe`, data shards first (reading those needs no decoding).
    pub(super) fn pick_sources(&self, h: &Health, stripe: u64, skip_slot: Option<usize>) -> Result<Vec<(u32, Arc<Member>)>, VolumeError> {
        let k = self.geometry.data_shards as usize;
        let sources: Vec<(u32, Arc<Member>)> = (0..self.geometry.shards())
            .filter_map(|shard| {
                let slot = self.slot_of_shard(stripe, shard);
                if Some(slot) == skip_slot {
                    return None;
                }
                h.readable(slot, stripe, &self.progress).map(|m| (shard, m.clone()))
            })
            .take(k)
            .collect();
        if sources.len() < k {
            return Err(VolumeError::Unavailable { stripe });
        }
        Ok(sources)
    }

    /// Reads `len` bytes at `offset` (any alignment).
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, VolumeError> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(AlignedBuf::zeroed(0));
        }
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len as u64).div_ceil(BLOCK) * BLOCK;
        let buf = self.read_aligned(start, end - start, false).await?;
        if start == offset && end - start == len as u64 {
            return Ok(buf);
        }
        Ok(AlignedBuf::from_slice(&buf[(offset - start) as usize..][..len]))
    }

    /// Reads an aligned range. `locked`: the caller already holds the stripe locks (a write
    /// widening its edges), so degraded reads must not take them again.
    async fn read_aligned(&self, start: u64, len: u64, locked: bool) -> Result<AlignedBuf, VolumeError> {
        let buf = Arc::new(AlignedBuf::zeroed(len as usize));
        let extents = self.geometry.map(start, len);
        if let [ext] = &extents[..] {
            if let [p] = &ext.pieces[..] {
                // Most small reads are one piece of one member: no list of futures to join.
                self.read_piece(ext.stripe, p, &buf, locked).await?;
                return reclaim(buf);
            }
        }
        let reads = extents.iter().flat_map(|ext| ext.pieces.iter().map(|p| self.read_piece(ext.stripe, p, &buf, locked)));
        all(reads.collect::<Vec<_>>()).await?;
        reclaim(buf)
    }

    async fn read_piece(&self, stripe: u64, p: &Piece, buf: &Arc<AlignedBuf>, locked: bool) -> Result<(), VolumeError> {
        loop {
            match self.piece_source(&self.health(), stripe, p) {
                // The rare paths are boxed: inline, their state would make every read's future
                // (moved into a task per request) several times larger.
                Some(m) => match member_read(&m, self.member_pos(stripe, p.chunk_offset), buf, p.buf_offset, p.len).await {
                    Ok(()) => return Ok(()),
                    Err(f) if f.error.is_checksum() => return Box::pin(self.read_piece_healed(stripe, p, buf, locked)).await,
                    Err(f) => Box::pin(self.member_failed(&f.member, &f.error)).await,
                },
                None if matches!(self.geometry.level, Level::Raid5 | Level::Ec) => return Box::pin(self.read_piece_degraded(stripe, p, buf, locked)).await,
                None => return Err(VolumeError::Unavailable { stripe }),
            }
        }
    }

    /// A read found damage: under the stripe lock (so no write is half done), heal the piece's
    /// rows on every member, then read it again.
    async fn read_piece_healed(&self, stripe: u64, p: &Piece, buf: &Arc<AlignedBuf>, locked: bool) -> Result<(), VolumeError> {
        let _guard = if locked { None } else { Some(self.locks.lock(stripe).await) };
        let healed = self.heal_rows(stripe, p.chunk_offset, p.len).await?;
        if healed.unrepairable > 0 {
            return Err(VolumeError::Corrupt { stripe });
        }
        loop {
            let Some(m) = self.piece_source(&self.health(), stripe, p) else { return self.read_piece_degraded(stripe, p, buf, true).await };
            match member_read(&m, self.member_pos(stripe, p.chunk_offset), buf, p.buf_offset, p.len).await {
                Ok(()) => return Ok(()),
                // Healed a moment ago under this lock: damage now is damage healing cannot fix.
                Err(f) if f.error.is_checksum() => return Err(VolumeError::Corrupt { stripe }),
                Err(f) => self.member_failed(&f.member, &f.error).await,
            }
        }
    }

    /// The member a piece is read from directly: any readable mirror (raid1), else the one
    /// holding its shard, if readable.
    fn piece_source(&self, h: &Health, stripe: u64, p: &Piece) -> Option<Arc<Member>> {
        match self.geometry.level {
            Level::Raid1 => self.mirror_for(h, stripe),
            _ => h.readable(self.slot_of_shard(stripe, p.shard), stripe, &self.progress).cloned(),
        }
    }

    /// A readable mirror, spreading reads by stripe so a long read uses every copy.
    fn mirror_for(&self, h: &Health, stripe: u64) -> Option<Arc<Member>> {
        let n = self.geometry.members as u64;
        (0..n).map(|i| ((stripe + i) % n) as usize).find_map(|slot| h.readable(slot, stripe, &self.progress).cloned())
    }

    /// Rebuilds one piece from k other shards. Takes the stripe lock so data and parity are
    /// read consistently with respect to writers.
    async fn read_piece_degraded(&self, stripe: u64, p: &Piece, buf: &Arc<AlignedBuf>, locked: bool) -> Result<(), VolumeError> {
        let _guard = if locked { None } else { Some(self.locks.lock(stripe).await) };
        let n = self.geometry.shards() as usize;
        let len = p.len as usize;
        loop {
            let h = self.health();
            let sources = self.pick_sources(&h, stripe, None)?;
            let shards = Arc::new(AlignedBuf::zeroed(n * len));
            let pos = self.member_pos(stripe, p.chunk_offset);
            let faults = faults_of(sources.iter().map(|(shard, m)| member_read(m, pos, &shards, *shard as u64 * p.len, p.len))).await;
            if !faults.is_empty() {
                self.settle_faults(faults).await?;
                continue;
            }
            let mut shards = reclaim(shards)?;
            let mut present = vec![false; n];
            for (shard, _) in &sources {
                present[*shard as usize] = true;
            }
            {
                let mut slices: Vec<&mut [u8]> = shards.chunks_mut(len).collect();
                self.codec.reconstruct(&mut slices, &present).map_err(|e| VolumeError::Codec(e.to_string()))?;
            }
            fill_region(buf, p.buf_offset as usize, &shards[p.shard as usize * len..][..len]);
            return Ok(());
        }
    }

    /// Writes `data` at `offset` (any alignment); with `fua`, durable on every member before returning.
    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len > 0 {
            let start = offset / BLOCK * BLOCK;
            let end = (offset + len).div_ceil(BLOCK) * BLOCK;
            let sdb = self.geometry.stripe_data_bytes();
            let (first, last) = (start / sdb, (end - 1) / sdb);
            let aligned = start == offset && end == offset + len;
            // An unaligned write reads the blocks around it, so it holds all its stripes from
            // that read to the end. An aligned one locks each stripe only for its own part:
            // sequential writes that share a partial stripe then wait for each other only
            // there, not for the whole request (with all locks taken up front, raid5 ran
            // sequential QD8 writes one at a time).
            let _guards = if aligned { Vec::new() } else { self.locks.lock_all(first..=last).await };
            let _marked = self.intent.mark(first, last).await;
            let buf = if aligned { data } else { self.widen_to_blocks(start, end, offset, &data).await? };
            let buf = Arc::new(buf);
            let extents = self.geometry.map(start, buf.len() as u64);
            let stripes = async {
                if aligned && matches!(self.geometry.level, Level::Raid5 | Level::Ec) {
                    self.write_combining(&extents, &buf).await
                } else {
                    // Unaligned, the stripes are already locked (above).
                    all(extents.iter().map(|ext| async {
                        if aligned {
                            self.write_stripe_locked(ext, &buf).await
                        } else {
                            self.write_stripe(ext, &buf).await
                        }
                    }))
                    .await
                }
            };
            if extents.len() > 1 {
                crate::member::sharing_page_writes(stripes).await?;
            } else {
                stripes.await?;
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// An aligned parity-level write: full stripes are written directly, partial ones are offered
    /// for combining (see `combine`) and written by whoever next holds their stripe's lock.
    ///
    /// While other such writes are in progress, a partial stripe waits until the full ones are
    /// written: a neighbouring request that completes it has by then usually offered its part,
    /// and the stripe goes out once, in full, with no reads. The write whose part completes a
    /// stripe on offer writes that stripe at once, alongside its full ones: in a sequential
    /// stream every request but the first finds its head stripe completed that way, and
    /// waiting would put a second round of disk writes into its latency. A lone write has no
    /// neighbour to wait for and writes everything at once.
    async fn write_combining(&self, extents: &[StripeExtent], buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        let (full, partial): (Vec<&StripeExtent>, Vec<&StripeExtent>) = extents.iter().partition(|e| e.is_full_stripe(&self.geometry));
        let (completed, waiting): (Vec<combine::Ticket>, Vec<combine::Ticket>) =
            partial.iter().map(|ext| self.combiner.offer(ext, buf, &self.geometry)).partition(|t| t.completes_stripe);
        let _counted = CountedWrite::enter(&self.combining_writes);
        let neighbours = self.combining_writes.load(Ordering::Relaxed) > 1;
        let now = async {
            let (full_done, completed_done) =
                futures::join!(all(full.iter().map(|ext| self.write_stripe_locked(ext, buf))), all(completed.iter().map(|t| self.write_offered(t))));
            full_done.and(completed_done)
        };
        // Every offered part is seen through, whatever happens to the others: each must be
        // written by someone before its writer answers.
        let later = all(waiting.iter().map(|t| self.write_offered(t)));
        let (now_done, later_done) = if neighbours {
            let n = now.await;
            (n, later.await)
        } else {
            futures::join!(now, later)
        };
        now_done.and(later_done)
    }

    /// Takes the stripe's lock, writes every part on offer for it (this write's own, unless a
    /// previous holder already did), and returns the outcome for this write's part.
    async fn write_offered(&self, t: &combine::Ticket) -> Result<(), VolumeError> {
        let _guard = self.locks.lock(t.stripe).await;
        let offers = self.combiner.take(t.stripe);
        if !offers.is_empty() {
            let result = self.write_offers(t.stripe, &offers).await;
            combine::settle(&offers, &result);
        }
        t.outcome()
    }

    /// Writes parts of one stripe: merged into one stripe write where they fit together, else
    /// one after the other in the order offered. Caller holds the stripe lock.
    async fn write_offers(&self, stripe: u64, offers: &[combine::Offer]) -> Result<(), VolumeError> {
        if offers.len() > 1 {
            let parts: Vec<(&[u8], &[Piece])> = offers.iter().map(|o| (&o.buf[..], &o.pieces[..])).collect();
            if let Some((buf, ext)) = combine::merge(&parts, &self.geometry, stripe) {
                return self.write_stripe(&ext, &Arc::new(buf)).await;
            }
        }
        for o in offers {
            self.write_stripe(&StripeExtent { stripe, pieces: o.pieces.clone() }, &o.buf).await?;
        }
        Ok(())
    }

    /// Builds the block-aligned buffer for [start, end) holding `data` at `offset`, with the
    /// bytes around it read from the volume. Caller holds the stripe locks.
    async fn widen_to_blocks(&self, start: u64, end: u64, offset: u64, data: &[u8]) -> Result<AlignedBuf, VolumeError> {
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let data_end = offset + data.len() as u64;
        let head_partial = offset != start;
        if head_partial {
            buf[..ALIGN].copy_from_slice(&self.read_aligned(start, BLOCK, true).await?);
        }
        let tail_block = end - BLOCK;
        // The tail block was already read if it is the head block.
        if data_end != end && !(head_partial && tail_block == start) {
            let tail = self.read_aligned(tail_block, BLOCK, true).await?;
            let at = buf.len() - ALIGN;
            buf[at..].copy_from_slice(&tail);
        }
        buf[(offset - start) as usize..][..data.len()].copy_from_slice(data);
        Ok(buf)
    }

    /// Takes the stripe's lock and writes one stripe's part of a request.
    async fn write_stripe_locked(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        let _guard = self.locks.lock(ext.stripe).await;
        self.write_stripe(ext, buf).await
    }

    /// Writes one stripe's part of a request; caller holds the stripe lock.
    async fn write_stripe(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        loop {
            let h = self.health();
            if !self.serviceable(&h, ext) {
                return Err(VolumeError::Unavailable { stripe: ext.stripe });
            }
            let attempt = match self.geometry.level {
                Level::Raid0 | Level::Raid1 => self.write_direct(&h, ext, buf).await,
                Level::Raid5 | Level::Ec => self.write_parity(&h, ext, buf).await?,
            };
            match attempt {
                Attempt::ReadFailed(faults) => {
                    self.settle_faults(faults).await?;
                }
                Attempt::Written(faults) => {
                    if faults.is_empty() {
                        return Ok(());
                    }
                    // Every shard that was written holds the new, mutually consistent version;
                    // the ones that failed are taken out. The stripe is good while enough remain.
                    self.fail_all_io(faults).await;
                    return if self.serviceable(&self.health(), ext) { Ok(()) } else { Err(VolumeError::Unavailable { stripe: ext.stripe }) };
                }
            }
        }
    }

    pub(super) fn targets(&self, h: &Health, stripe: u64, shard: u32) -> Vec<Arc<Member>> {
        h.targets(self.slot_of_shard(stripe, shard), stripe, &self.progress)
    }

    /// raid0 and raid1: each piece goes to its member (raid0) or to every mirror (raid1).
    async fn write_direct(&self, h: &Health, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Attempt {
        let s = ext.stripe;
        let mut ops = Vec::new();
        for p in &ext.pieces {
            let targets: Vec<Arc<Member>> = match self.geometry.level {
                Level::Raid1 => (0..self.geometry.members as usize).flat_map(|slot| h.targets(slot, s, &self.progress)).collect(),
                _ => self.targets(h, s, p.shard),
            };
            for t in targets {
                ops.push(async move { client_write(&t, self.member_pos(s, p.chunk_offset), buf, p.buf_offset, p.len, self.page_writes).await });
            }
        }
        Attempt::Written(faults_of(ops).await)
    }

    /// A parity-level stripe write: the partial-parity record and the checksum pages of every
    /// shard write go out together, and the shards' data only once all of them are durable (each
    /// must precede the data, not each other). Issued one after the other, a small write paid
    /// three dependent disk writes; now it pays two.
    async fn write_shards_logged(
        &self,
        h: &Health,
        ext: &StripeExtent,
        lo: u64,
        partial_parity: Option<&[u8]>,
        writes: Vec<(u32, u64, &Arc<AlignedBuf>, u64, u64)>,
    ) -> Attempt {
        let stripe = ext.stripe;
        let k = self.geometry.data_shards;
        let mut ops = Vec::new();
        for &(shard, pos, src, off, len) in &writes {
            for t in self.targets(h, stripe, shard) {
                ops.push((t, pos, BufRange::new(src.clone(), off as usize, len as usize), shard));
            }
        }
        // The first parity shard is on the member that takes the stripe's record. In ordered
        // mode the record carries the checksums of that shard's new blocks, and their table page
        // waits for the next flush (a slot is reused only after a flush, which writes it): one
        // durable write fewer per stripe write (measured in the README, Integrity). Only on the
        // slot's own member, whose ring is read back after a crash; a replacement being built
        // writes its pages first.
        let ring_member = match self.page_writes {
            PageWrites::Ordered => self.record_ring(h, ext, partial_parity.is_some()).and_then(|r| {
                let m = h.readable(r, stripe, &self.progress)?;
                h.slots[r].member.as_ref().filter(|own| Arc::ptr_eq(own, m))
            }),
            PageWrites::Deferred => None,
        };
        let pieces = ext.pieces.len().min(fmt_ppl::MAX_PIECES);
        let logged_op = |t: &Arc<Member>, shard: u32, len: usize| {
            shard == k && ring_member.is_some_and(|r| Arc::ptr_eq(r, t)) && fmt_ppl::fits(pieces, [len / BLOCK as usize])
        };
        let mut block_crcs = Vec::new();
        let mut faults = Vec::new();
        for (t, pos, range, shard) in &ops {
            if logged_op(t, *shard, range.len()) {
                match t.prepare_write_logged(*pos, range) {
                    Ok(Some(crcs)) => block_crcs.push(BlockCrcs { shard: *shard, chunk_offset: *pos - self.member_pos(stripe, 0), crcs }),
                    Ok(None) => {}
                    Err(e) => faults.push(Fault::on(t)(e)),
                }
            }
        }
        let carried = !block_crcs.is_empty();
        let prepares = ops
            .iter()
            .filter(|(t, _, range, shard)| !logged_op(t, *shard, range.len()))
            .map(|(t, pos, range, _)| async move { t.prepare_write(*pos, range, self.page_writes).await.map_err(Fault::on(t)) });
        let (logged, prepared) = futures::join!(self.log_stripe_write(h, ext, lo, partial_parity, block_crcs), faults_of(prepares.collect::<Vec<_>>()));
        faults.extend(prepared);
        // A member that failed either first write is failing, and is taken out as a failed data
        // write would be; the others go on. Backing off instead would leave their checksum
        // entries naming data that never reached them. Without its record the stripe is exposed
        // to the write hole only if the daemon also crashes before the ring member is replaced.
        // The slot is held until the shard writes are done: it must not be reused before then.
        let _logged = match logged {
            Ok(Some(slot)) => Some(slot),
            Ok(None) => {
                if carried {
                    // No record after all (a flush to free a slot failed): the pages it was to
                    // stand in for go out durably first, as any other.
                    let persists = ops.iter().filter(|(t, _, range, shard)| logged_op(t, *shard, range.len()));
                    let persists = persists.map(|(t, pos, range, _)| async move { t.persist_pages_of(*pos, range.len()).await.map_err(Fault::on(t)) });
                    faults.extend(faults_of(persists.collect::<Vec<_>>()).await);
                }
                None
            }
            Err(f) => {
                faults.push(f);
                None
            }
        };
        let failed = |m: &Arc<Member>| faults.iter().any(|f| Arc::ptr_eq(&f.member, m));
        let writes: Vec<_> = ops
            .into_iter()
            .filter(|(t, _, _, _)| !failed(t))
            .map(|(t, pos, range, _)| async move { t.write_prepared(pos, range).await.map_err(Fault::on(&t)) })
            .collect();
        faults.extend(faults_of(writes).await);
        Attempt::Written(faults)
    }

    async fn write_parity(&self, h: &Health, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Result<Attempt, VolumeError> {
        let s = ext.stripe;
        let k = self.geometry.data_shards;
        let m = self.geometry.parity_shards;
        let chunk = self.geometry.chunk;
        // Whatever this write turns out to be, the stripe's cached data is either brought up
        // to date below or dropped with this.
        let cached = self.stripe_cache.take(s);
        if ext.is_full_stripe(&self.geometry) {
            // Parity from the new data alone, no reads, whatever is degraded.
            let parity = self.encode_parity(ext.pieces.iter().map(|p| &buf[p.buf_offset as usize..][..chunk as usize]).collect(), chunk as usize)?;
            let pos = self.member_pos(s, 0);
            let mut writes: Vec<_> = ext.pieces.iter().map(|p| (p.shard, pos, buf, p.buf_offset, chunk)).collect();
            writes.extend((0..m).map(|j| (k + j, pos, &parity, j as u64 * chunk, chunk)));
            return Ok(self.write_shards_logged(h, ext, 0, None, writes).await);
        }
        let lo = ext.pieces.iter().map(|p| p.chunk_offset).min().unwrap_or(0);
        let hi = ext.pieces.iter().map(|p| p.chunk_offset + p.len).max().unwrap_or(0);
        let slab = hi - lo;
        let span = ext.volume_span(&self.geometry);
        let all_readable = (0..k + m).all(|shard| h.readable(self.slot_of_shard(s, shard), s, &self.progress).is_some());
        let (parity, cached) = if all_readable {
            let cached = match cached {
                Some(c) => Some((c, false)),
                None if self.stripe_cache.comes_back(&span) => match self.load_stripe(h, s).await? {
                    Ok(c) => Some((c, true)),
                    Err(faults) => return Ok(Attempt::ReadFailed(faults)),
                },
                None => None,
            };
            match cached {
                Some((c, loaded)) => {
                    self.stripe_cache.count_use(loaded);
                    (Ok(self.parity_from_cache(&c, ext, buf, lo, slab)?), Some(c))
                }
                None => (self.read_for_parity(h, ext, buf, lo, slab).await?, None),
            }
        } else {
            (self.degraded_write_parity(h, ext, buf, lo, slab).await?, None)
        };
        self.stripe_cache.note_write(span);
        let (parity, partial_parity) = match parity {
            Ok(p) => p,
            Err(faults) => return Ok(Attempt::ReadFailed(faults)),
        };
        let mut writes: Vec<_> = ext.pieces.iter().map(|p| (p.shard, self.member_pos(s, p.chunk_offset), buf, p.buf_offset, p.len)).collect();
        writes.extend((0..m).map(|j| (k + j, self.member_pos(s, lo), &parity, j as u64 * slab, slab)));
        let attempt = self.write_shards_logged(h, ext, lo, Some(&partial_parity), writes).await;
        if let (Some(mut c), Attempt::Written(faults)) = (cached, &attempt) {
            // Only a write every shard took leaves the members holding what the entry would.
            if faults.is_empty() {
                overlay_pieces(&mut c.data, ext, buf, 0, chunk);
                self.stripe_cache.put(c);
            }
        }
        Ok(attempt)
    }

    /// Reads what a partial-stripe write on a readable stripe needs, by whichever of
    /// read-modify-write and reconstruct-write reads fewer shards.
    async fn read_for_parity(&self, h: &Health, ext: &StripeExtent, buf: &Arc<AlignedBuf>, lo: u64, slab: u64) -> ParityOutcome {
        let k = self.geometry.data_shards as usize;
        let m = self.geometry.parity_shards as usize;
        let touched = ext.pieces.len();
        let partially_covered = ext.pieces.iter().filter(|p| p.chunk_offset != lo || p.len != slab).count();
        let rmw_reads = touched + m;
        let rcw_reads = (k - touched) + partially_covered;
        if rcw_reads < rmw_reads {
            self.reconstruct_write_parity(h, ext, buf, lo, slab).await
        } else {
            self.read_modify_write_parity(h, ext, buf, lo, slab).await
        }
    }

    /// Reads every data chunk of a readable stripe, for the stripe cache.
    async fn load_stripe(&self, h: &Health, stripe: u64) -> Result<Result<CachedStripe, Vec<Fault>>, VolumeError> {
        let k = self.geometry.data_shards;
        let chunk = self.geometry.chunk;
        // Read before the data: a membership change while the reads run discards the entry.
        let generation = self.stripe_cache.generation();
        let data = Arc::new(AlignedBuf::zeroed((k as u64 * chunk) as usize));
        let reads = (0..k).map(|i| self.read_shard(h, stripe, i, (self.member_pos(stripe, 0), &data, i as u64 * chunk), chunk));
        let faults = faults_of(reads.collect::<Vec<_>>()).await;
        if !faults.is_empty() {
            return Ok(Err(faults));
        }
        Ok(Ok(CachedStripe::new(stripe, generation, reclaim(data)?)))
    }

    /// Parity for a partial-stripe write from the stripe's cached data: nothing to read.
    fn parity_from_cache(&self, c: &CachedStripe, ext: &StripeExtent, buf: &[u8], lo: u64, slab: u64) -> Result<(Arc<AlignedBuf>, Vec<u8>), VolumeError> {
        let (chunk, slab_len) = (self.geometry.chunk as usize, slab as usize);
        let mut slabs = AlignedBuf::zeroed(self.geometry.data_shards as usize * slab_len);
        for (i, dst) in slabs.chunks_mut(slab_len).enumerate() {
            dst.copy_from_slice(&c.data[i * chunk + lo as usize..][..slab_len]);
        }
        self.parity_over(slabs, ext, buf, lo, slab)
    }

    /// New parity and partial parity for a write, from the current data of every data shard's
    /// slab [lo, lo + slab) (`slabs`, shard after shard).
    fn parity_over(&self, mut slabs: AlignedBuf, ext: &StripeExtent, buf: &[u8], lo: u64, slab: u64) -> Result<(Arc<AlignedBuf>, Vec<u8>), VolumeError> {
        let data_len = self.geometry.data_shards as usize * slab as usize;
        let partial_parity = self.partial_parity(slabs[..data_len].to_vec(), ext, lo, slab)?;
        overlay_pieces(&mut slabs, ext, buf, lo, slab);
        Ok((self.encode_parity(slabs[..data_len].chunks(slab as usize).collect(), slab as usize)?, partial_parity))
    }

    /// The first parity row of the stripe's current data slabs (`data`, k slabs of `slab`
    /// bytes from row `lo`) with the write's pieces taken as zeros.
    fn partial_parity(&self, mut data: Vec<u8>, ext: &StripeExtent, lo: u64, slab: u64) -> Result<Vec<u8>, VolumeError> {
        for p in &ext.pieces {
            let at = (p.shard as u64 * slab + p.chunk_offset - lo) as usize;
            data[at..at + p.len as usize].fill(0);
        }
        let parity = self.encode_parity(data.chunks(slab as usize).collect(), slab as usize)?;
        Ok(parity[..slab as usize].to_vec())
    }

    /// Computes the m parity slabs of `slab` bytes from k data slabs.
    pub(super) fn encode_parity(&self, data: Vec<&[u8]>, slab: usize) -> Result<Arc<AlignedBuf>, VolumeError> {
        let mut parity = AlignedBuf::zeroed(self.geometry.parity_shards as usize * slab);
        let mut slabs: Vec<&mut [u8]> = parity.chunks_mut(slab).collect();
        self.codec.encode(&data, &mut slabs).map_err(|e| VolumeError::Codec(e.to_string()))?;
        Ok(Arc::new(parity))
    }

    /// Reads part of a shard that the caller saw readable in the snapshot `h`.
    async fn read_shard(&self, h: &Health, stripe: u64, shard: u32, at: (u64, &Arc<AlignedBuf>, u64), len: u64) -> Result<(), Fault> {
        let (pos, buf, off) = at;
        match h.readable(self.slot_of_shard(stripe, shard), stripe, &self.progress) {
            Some(m) => member_read(m, pos, buf, off, len).await,
            None => Ok(()),
        }
    }

    /// Reads the slab of every data shard the write does not fully cover, overlays the new data,
    /// and encodes parity from scratch.
    async fn reconstruct_write_parity(&self, h: &Health, ext: &StripeExtent, buf: &Arc<AlignedBuf>, lo: u64, slab: u64) -> ParityOutcome {
        let s = ext.stripe;
        let k = self.geometry.data_shards;
        let piece_of = |shard: u32| ext.pieces.iter().find(|p| p.shard == shard);
        let stripe = Arc::new(AlignedBuf::zeroed((k as u64 * slab) as usize));
        let reads = (0..k)
            .filter(|&i| piece_of(i).is_none_or(|p| p.chunk_offset != lo || p.len != slab))
            .map(|i| self.read_shard(h, s, i, (self.member_pos(s, lo), &stripe, i as u64 * slab), slab));
        let faults = faults_of(reads.collect::<Vec<_>>()).await;
        if !faults.is_empty() {
            return Ok(Err(faults));
        }
        Ok(Ok(self.parity_over(reclaim(stripe)?, ext, buf, lo, slab)?))
    }

    /// Reads the old bytes under each piece and the parity slab, then folds the difference
    /// between old and new data into the parity.
    async fn read_modify_write_parity(&self, h: &Health, ext: &StripeExtent, buf: &Arc<AlignedBuf>, lo: u64, slab: u64) -> ParityOutcome {
        let s = ext.stripe;
        let k = self.geometry.data_shards;
        let m = self.geometry.parity_shards as u64;
        // Old data of every piece, back to back, at the pieces' own offsets within the request.
        let first = ext.pieces.first().map(|p| p.buf_offset).unwrap_or(0);
        let total: u64 = ext.pieces.iter().map(|p| p.len).sum();
        let old = Arc::new(AlignedBuf::zeroed(total as usize));
        let parity = Arc::new(AlignedBuf::zeroed((m * slab) as usize));
        let old_reads = ext.pieces.iter().map(|p| self.read_shard(h, s, p.shard, (self.member_pos(s, p.chunk_offset), &old, p.buf_offset - first), p.len));
        let parity_reads = (0..m).map(|j| self.read_shard(h, s, k + j as u32, (self.member_pos(s, lo), &parity, j * slab), slab));
        let faults = faults_of(old_reads.chain(parity_reads).collect::<Vec<_>>()).await;
        if !faults.is_empty() {
            return Ok(Err(faults));
        }
        let (mut old, mut parity) = (reclaim(old)?, reclaim(parity)?);
        // Partial parity: the old parity with the old data of every piece taken out of it.
        let mut partial = parity.to_vec();
        for p in &ext.pieces {
            let at = (p.chunk_offset - lo) as usize;
            let mut slabs: Vec<&mut [u8]> = partial.chunks_mut(slab as usize).map(|c| &mut c[at..][..p.len as usize]).collect();
            self.codec
                .update_parity(p.shard as usize, &old[(p.buf_offset - first) as usize..][..p.len as usize], &mut slabs)
                .map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        partial.truncate(slab as usize);
        for p in &ext.pieces {
            let delta = &mut old[(p.buf_offset - first) as usize..][..p.len as usize];
            crate::codec::xor_into(delta, &buf[p.buf_offset as usize..][..p.len as usize]);
            let at = (p.chunk_offset - lo) as usize;
            let mut slabs: Vec<&mut [u8]> = parity.chunks_mut(slab as usize).map(|c| &mut c[at..][..p.len as usize]).collect();
            self.codec.update_parity(p.shard as usize, delta, &mut slabs).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        Ok(Ok((Arc::new(parity), partial)))
    }

    /// Some shard of the stripe is unreadable: read the slab from any k readable shards,
    /// reconstruct the rest, overlay the new data and encode parity afresh.
    async fn degraded_write_parity(&self, h: &Health, ext: &StripeExtent, buf: &Arc<AlignedBuf>, lo: u64, slab: u64) -> ParityOutcome {
        let s = ext.stripe;
        let n = self.geometry.shards() as usize;
        let sources = self.pick_sources(h, s, None)?;
        let shards = Arc::new(AlignedBuf::zeroed(n * slab as usize));
        let pos = self.member_pos(s, lo);
        let faults = faults_of(sources.iter().map(|(shard, m)| member_read(m, pos, &shards, *shard as u64 * slab, slab))).await;
        if !faults.is_empty() {
            return Ok(Err(faults));
        }
        let mut shards = reclaim(shards)?;
        let mut present = vec![false; n];
        for (shard, _) in &sources {
            present[*shard as usize] = true;
        }
        {
            let mut slices: Vec<&mut [u8]> = shards.chunks_mut(slab as usize).collect();
            self.codec.reconstruct(&mut slices, &present).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        Ok(Ok(self.parity_over(shards, ext, buf, lo, slab)?))
    }

    /// Writes zeros over [offset, offset + len).
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // Cut at multiples of ZERO_WRITE_MAX so the pieces stay stripe-aligned where possible.
            let n = (ZERO_WRITE_MAX - pos % ZERO_WRITE_MAX).min(end - pos);
            self.write(pos, AlignedBuf::zeroed(n as usize), false).await?;
            pos += n;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every completed write durable on every member in service. A member that cannot
    /// flush is failed: what it holds may not be durable.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.flush_members(true).await
    }

    /// Every write completed so far is durable: a barrier, not a client's flush. With deferred
    /// checksum pages the pages wait for the client's [`Volume::flush`].
    pub(super) async fn flush_writes(&self) -> Result<(), VolumeError> {
        // Ordered mode defers only the pages that write-hole records stand in for, and a record
        // may be overwritten only once its pages are on disk: this flush writes them.
        self.flush_members(self.page_writes == PageWrites::Ordered).await
    }

    async fn flush_members(&self, with_deferred_pages: bool) -> Result<(), VolumeError> {
        let number = self.ppl.as_ref().map(|log| log.flush_begins());
        let h = self.health();
        let members = h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter()));
        let syncs = members.map(|m| async move {
            let synced = if with_deferred_pages { m.sync().await } else { m.sync_writes().await };
            synced.map_err(Fault::on(m))
        });
        let faults = faults_of(syncs.collect::<Vec<_>>()).await;
        if !faults.is_empty() {
            self.fail_all_io(faults).await;
            if self.health().exhausted {
                return Err(VolumeError::Exhausted);
            }
        }
        // The members still in service hold every write completed before the flush began.
        if let (Some(log), Some(n)) = (&self.ppl, number) {
            log.flush_done(n);
        }
        Ok(())
    }
}
