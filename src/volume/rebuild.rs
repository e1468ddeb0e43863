//! Online rebuild and replace: a background task that fills a slot's new member stripe batch
//! by stripe batch, while clients keep reading and writing.
//!
//! Ordering against writers: a batch is rebuilt under the stripe locks of its stripes, and the
//! slot's checkpoint moves past the batch before the locks are released. A writer therefore
//! either runs before the batch (the new member is not yet valid there and gets nothing; the
//! rebuild then reads the writer's data from the others) or after it (the new member is valid
//! and gets the write like any other member). The checkpoint is recorded in the superblocks
//! every few seconds, so a restarted daemon resumes where it was.

use super::health::Health;
use super::io::{faults_of, member_read, member_write, reclaim, Fault};
use super::locks::StripeGuard;
use super::{Volume, VolumeError};
use crate::buf::{AlignedBuf, BufPool};
use crate::layout::Level;
use crate::member::Member;
use crate::meta::SlotState;
use futures::future::join_all;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Bytes of each member one rebuild I/O covers.
const PART_BYTES: u64 = 1 << 20;
/// Parts in flight at once; together they are one batch (one stripe-lock hold). Several keep
/// the disks busy while one part waits for its reads and another for its write.
const PARALLEL: usize = 4;
/// How often the checkpoint is written to the superblocks.
const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// Shared between the volume and its rebuild task.
#[derive(Default)]
pub(super) struct RebuildControl {
    wake: Notify,
    stopping: AtomicBool,
    /// Wakes a rebuild that is pausing for the throttle, so shutdown need not wait for it.
    stop: Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Bytes per second written to the new member; 0 = unlimited.
    max_rate: AtomicU64,
    /// Per slot being rebuilt: when this run started and its checkpoint then (for rate and ETA).
    runs: Mutex<HashMap<usize, (Instant, u64)>>,
}

impl RebuildControl {
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn max_rate(&self) -> Option<u64> {
        Some(self.max_rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    pub fn set_max_rate(&self, rate: Option<u64>) {
        self.max_rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    /// Rebuild rate of `slot` in stripes per second since its run started, if running.
    pub fn rate(&self, slot: usize, done: u64) -> Option<f64> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let (started, from) = runs.get(&slot)?;
        let secs = started.elapsed().as_secs_f64();
        (secs > 0.0).then(|| done.saturating_sub(*from) as f64 / secs)
    }

    fn start_run(&self, slot: usize, from: u64) {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).insert(slot, (Instant::now(), from));
    }

    fn end_run(&self, slot: usize) {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).remove(&slot);
    }
}

#[derive(Clone)]
enum Source {
    /// Reconstruct from the other members.
    Redundancy,
    /// Copy from the member being replaced.
    Copy(Arc<Member>),
}

enum BatchError {
    /// A member failed; fail it and try the batch again with what is left.
    Faults(Vec<Fault>),
    Volume(VolumeError),
}

impl From<VolumeError> for BatchError {
    fn from(e: VolumeError) -> Self {
        BatchError::Volume(e)
    }
}

/// The values of parts run together, or what went wrong: a volume error if any, else the
/// faults of every part that failed (the parts that succeeded are dropped, to be redone).
fn gather<T>(results: Vec<Result<T, BatchError>>) -> Result<Vec<T>, BatchError> {
    let mut values = Vec::with_capacity(results.len());
    let mut faults = Vec::new();
    for r in results {
        match r {
            Ok(v) => values.push(v),
            Err(BatchError::Faults(f)) => faults.extend(f),
            Err(e @ BatchError::Volume(_)) => return Err(e),
        }
    }
    if faults.is_empty() {
        Ok(values)
    } else {
        Err(BatchError::Faults(faults))
    }
}

/// A batch read for the new member, waiting for its write; it keeps its stripes locked.
struct ReadBatch<'a> {
    first: u64,
    end: u64,
    target: Arc<Member>,
    guards: Vec<StripeGuard<'a>>,
    /// Per part: its first stripe and the new member's data.
    bufs: Vec<(u64, AlignedBuf)>,
}

/// Paces writes to a rate.
struct Pacer {
    next: Instant,
}

impl Pacer {
    async fn pace(&mut self, bytes: u64, control: &RebuildControl) {
        let now = Instant::now();
        let Some(rate) = control.max_rate() else {
            self.next = now;
            return;
        };
        self.next = self.next.max(now) + Duration::from_secs_f64(bytes as f64 / rate as f64);
        let stopped = control.stop.notified();
        if control.stopping.load(Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(self.next.into()) => {}
            _ = stopped => {}
        }
    }
}

impl Volume {
    /// Starts the background rebuild task. It holds the volume weakly, so dropping the last
    /// `Arc<Volume>` ends it.
    pub fn start_background(self: &Arc<Self>) {
        let weak: Weak<Volume> = Arc::downgrade(self);
        let control = self.rebuild.clone();
        let task = tokio::spawn(async move {
            loop {
                let Some(volume) = weak.upgrade() else { return };
                if control.stopping.load(Ordering::SeqCst) {
                    return;
                }
                volume.run_rebuilds().await;
                drop(volume);
                control.wake.notified().await;
            }
        });
        *self.rebuild.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        self.rebuild.wake();
        self.start_intent_cleaner();
    }

    /// Rebuilds every slot that needs it, one after the other.
    async fn run_rebuilds(&self) {
        loop {
            let h = self.health();
            let Some(slot) = h.slots.iter().position(|e| matches!(e.state, SlotState::Rebuilding | SlotState::Replacing)) else {
                return;
            };
            if h.exhausted || self.rebuild.stopping.load(Ordering::SeqCst) {
                return;
            }
            if !self.rebuild_slot(slot).await {
                return;
            }
        }
    }

    /// Runs one slot's rebuild to its end (done, aborted or impossible). Returns false when
    /// rebuilding cannot go on at all (too few members left, or stopping).
    ///
    /// Two batches are in flight at once: while batch N is written to the new member, batch
    /// N+1 is read (and reconstructed) from the others, each under its own stripe locks. Done
    /// one after the other, reads and writes left each disk idle half the time (the rebuild ran
    /// at ~0.2x the raw write speed). The checkpoint only ever moves past a batch that has been
    /// written, in order.
    async fn rebuild_slot(&self, slot: usize) -> bool {
        let stripes = self.geometry.stripes;
        let part_stripes = self.rebuild_part_stripes();
        self.rebuild.start_run(slot, self.progress.get(slot));
        let mut pacer = Pacer { next: Instant::now() };
        // Two sets of buffers: one for the batch being written, one for the batch being read.
        let mut pools: [Vec<BufPool>; 2] = [(0..PARALLEL).map(|_| BufPool::default()).collect(), (0..PARALLEL).map(|_| BufPool::default()).collect()];
        let mut persisted = Instant::now();
        // The batch that has been read and awaits its write.
        let mut ready: Option<ReadBatch<'_>> = None;
        let outcome = loop {
            if self.rebuild.stopping.load(Ordering::SeqCst) {
                break false;
            }
            let committed = self.progress.get(slot);
            let Some((target, _)) = self.rebuild_target(&self.health(), slot) else { break true };
            if ready.as_ref().is_some_and(|r| r.first != committed || !Arc::ptr_eq(&r.target, &target)) {
                // The checkpoint or the member moved under us (a re-add): start again from it.
                ready = None;
                continue;
            }
            let next = ready.as_ref().map_or(committed, |r| r.end);
            let batch = (part_stripes * PARALLEL as u64).min(stripes - next);
            let [read_pools, write_pools] = &mut pools;
            let read = async {
                if batch == 0 {
                    return Ok(None);
                }
                self.read_batch(slot, &target, next, next + batch, read_pools).await
            };
            let write = async {
                match ready.take() {
                    None => Ok(None),
                    Some(r) => self.write_batch(r, write_pools).await.map(Some),
                }
            };
            // Throttled, the next batch is read only after the pause, so no stripes stay locked
            // while the rebuild sleeps; unthrottled, it is read while the last one is written.
            let throttled = self.rebuild.max_rate().is_some();
            let mut reading = Box::pin(read);
            let (written, early) = if throttled {
                (write.await, None)
            } else {
                let (w, r) = futures::join!(write, reading.as_mut());
                (w, Some(r))
            };
            // Commit the written batch first: the checkpoint follows the write order.
            let mut faults = Vec::new();
            match written {
                Ok(Some((first, end, guards))) => {
                    if self.progress.get(slot) == first {
                        self.progress.set(slot, end);
                    }
                    drop(guards);
                    pacer.pace((end - first) * self.geometry.chunk, &self.rebuild).await;
                }
                Ok(None) => {}
                Err(BatchError::Faults(f)) => faults.extend(f),
                Err(BatchError::Volume(e)) => {
                    tracing::error!("rebuild of slot {slot} stopped: {e}");
                    break false;
                }
            }
            if self.rebuild.stopping.load(Ordering::SeqCst) {
                // Shutdown cut the pause short: leave the rest to the next start.
                break false;
            }
            let read = match early {
                Some(r) => r,
                None if faults.is_empty() => reading.as_mut().await,
                None => Ok(None),
            };
            drop(reading);
            // The buffers just written are the next read's.
            pools.swap(0, 1);
            match read {
                Ok(Some(r)) if faults.is_empty() => ready = Some(r),
                // The write failed: its batch is redone, so the one read after it goes too.
                Ok(Some(r)) => drop(r),
                Ok(None) => {
                    if batch == 0 && faults.is_empty() && self.progress.get(slot) >= stripes {
                        self.finish_rebuild(slot, &target).await;
                        break true;
                    }
                }
                Err(BatchError::Faults(f)) => faults.extend(f),
                Err(BatchError::Volume(e)) => {
                    tracing::error!("rebuild of slot {slot} stopped: {e}");
                    break false;
                }
            }
            if !faults.is_empty() {
                // Damaged source blocks are healed (a failed member is failed), then the rebuild
                // goes on from the checkpoint, reading again what it had read.
                ready = None;
                if let Err(e) = self.settle_faults(faults).await {
                    tracing::error!("rebuild of slot {slot} stopped: {e}");
                    break false;
                }
                continue;
            }
            if persisted.elapsed() >= PERSIST_EVERY {
                self.persist_progress().await;
                persisted = Instant::now();
            }
        };
        self.rebuild.end_run(slot);
        outcome
    }

    /// The member `slot`'s rebuild writes to, and where its data comes from.
    fn rebuild_target(&self, h: &Health, slot: usize) -> Option<(Arc<Member>, Source)> {
        let e = &h.slots[slot];
        match e.state {
            SlotState::Rebuilding => Some((e.member.clone()?, Source::Redundancy)),
            SlotState::Replacing => Some((e.replacement.clone()?, Source::Copy(e.member.clone()?))),
            _ => None,
        }
    }

    /// Stripes one rebuild I/O covers on each member.
    fn rebuild_part_stripes(&self) -> u64 {
        (PART_BYTES / self.geometry.chunk).max(1)
    }

    /// Reads (or reconstructs) the new member's data for stripes [first, end) under their
    /// locks; `None` when the slot's target changed while waiting for them.
    async fn read_batch(&self, slot: usize, target: &Arc<Member>, first: u64, end: u64, pools: &mut [BufPool]) -> Result<Option<ReadBatch<'_>>, BatchError> {
        let part_stripes = self.rebuild_part_stripes();
        let guards = self.locks.lock_all(first..end).await;
        // The new member gets the data a cached stripe already holds; dropping the entries
        // keeps the rule that only a client write fills the cache.
        self.stripe_cache.invalidate(first..end);
        // Membership may have changed while waiting for the locks.
        let h = self.health();
        let Some((now_target, source)) = self.rebuild_target(&h, slot) else { return Ok(None) };
        if !Arc::ptr_eq(&now_target, target) {
            return Ok(None);
        }
        let parts: Vec<(u64, u64)> = (first..end).step_by(part_stripes as usize).map(|s| (s, part_stripes.min(end - s))).collect();
        let runs = parts.iter().zip(pools.iter_mut()).map(|(&part, pool)| self.read_part(&h, slot, source.clone(), part, pool));
        let bufs = gather(join_all(runs).await)?;
        Ok(Some(ReadBatch { first, end, target: target.clone(), guards, bufs: parts.iter().map(|p| p.0).zip(bufs).collect() }))
    }

    /// Writes a batch read by [`Volume::read_batch`]; returns its stripe range and its locks,
    /// to be released once the checkpoint has moved past it.
    async fn write_batch<'a>(&self, r: ReadBatch<'a>, pools: &mut [BufPool]) -> Result<(u64, u64, Vec<StripeGuard<'a>>), BatchError> {
        let writes = r.bufs.into_iter().zip(pools.iter_mut()).map(|((first, buf), pool)| self.write_part(&r.target, first, buf, pool));
        gather(join_all(writes).await)?;
        Ok((r.first, r.end, r.guards))
    }

    /// The new member's data for stripes [first, first + count): copied from the member being
    /// replaced, or reconstructed from the others.
    async fn read_part(&self, h: &Health, slot: usize, source: Source, part: (u64, u64), pool: &mut BufPool) -> Result<AlignedBuf, BatchError> {
        let (first, count) = part;
        match source {
            Source::Copy(old) => {
                let len = count * self.geometry.chunk;
                let buf = Arc::new(pool.take(len as usize));
                let read = member_read(&old, self.member_pos(first, 0), &buf, 0, len).await;
                let buf = reclaim(buf)?;
                if let Err(f) = read {
                    pool.give(buf);
                    return Err(BatchError::Faults(vec![f]));
                }
                Ok(buf)
            }
            Source::Redundancy => self.reconstruct_batch(h, slot, first, count, pool).await,
        }
    }

    /// Writes one part of a batch to the new member; the buffer goes back to `pool`.
    async fn write_part(&self, target: &Arc<Member>, first: u64, data: AlignedBuf, pool: &mut BufPool) -> Result<(), BatchError> {
        let len = data.len() as u64;
        let data = Arc::new(data);
        let written = member_write(target, self.member_pos(first, 0), &data, 0, len).await;
        pool.give(reclaim(data)?);
        written.map_err(|f| BatchError::Faults(vec![f]))
    }

    /// Computes `slot`'s chunks of stripes [first, first + batch) from k other members, reading
    /// each source member's whole region in one I/O.
    async fn reconstruct_batch(&self, h: &Health, slot: usize, first: u64, batch: u64, pool: &mut BufPool) -> Result<AlignedBuf, BatchError> {
        let g = self.geometry;
        let chunk = g.chunk as usize;
        let last = first + batch - 1;
        let n = g.members as usize;
        let k = match g.level {
            Level::Raid1 => 1,
            _ => g.data_shards as usize,
        };
        // Readable at the batch's last stripe means readable for the whole batch.
        let sources: Vec<(usize, Arc<Member>)> =
            (0..n).filter(|&j| j != slot).filter_map(|j| h.readable(j, last, &self.progress).map(|m| (j, m.clone()))).take(k).collect();
        if sources.len() < k || g.level == Level::Raid0 {
            return Err(VolumeError::Unavailable { stripe: first }.into());
        }
        let len = batch * g.chunk;
        let pos = self.member_pos(first, 0);
        let bufs: Vec<Arc<AlignedBuf>> = sources.iter().map(|_| Arc::new(pool.take(len as usize))).collect();
        let faults = faults_of(sources.iter().zip(&bufs).map(|((_, m), b)| member_read(m, pos, b, 0, len))).await;
        let mut bufs: Vec<AlignedBuf> = bufs.into_iter().map(reclaim).collect::<Result<_, _>>()?;
        if !faults.is_empty() {
            bufs.into_iter().for_each(|b| pool.give(b));
            return Err(BatchError::Faults(faults));
        }
        if g.level == Level::Raid1 {
            let copy = bufs.swap_remove(0);
            bufs.into_iter().for_each(|b| pool.give(b));
            return Ok(copy);
        }
        let mut out = pool.take(len as usize);
        let mut scratch: Vec<AlignedBuf> = (0..n - k - 1).map(|_| pool.take(chunk)).collect();
        for s in first..=last {
            let at = (s - first) as usize * chunk;
            let mut shards: Vec<Option<&mut [u8]>> = (0..n).map(|_| None).collect();
            let mut present = vec![false; n];
            for ((j, _), b) in sources.iter().zip(bufs.iter_mut()) {
                let shard = g.member_shard(s, *j as u32) as usize;
                shards[shard] = Some(&mut b[at..at + chunk]);
                present[shard] = true;
            }
            shards[g.member_shard(s, slot as u32) as usize] = Some(&mut out[at..at + chunk]);
            let mut spare = scratch.iter_mut();
            for sh in shards.iter_mut().filter(|sh| sh.is_none()) {
                *sh = spare.next().map(|b| &mut b[..]);
            }
            let mut slices: Vec<&mut [u8]> = shards.into_iter().map(|s| s.ok_or(VolumeError::Internal("rebuild shard missing"))).collect::<Result<_, _>>()?;
            self.codec.reconstruct(&mut slices, &present).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        bufs.into_iter().chain(scratch).for_each(|b| pool.give(b));
        Ok(out)
    }

    /// The rebuild of `slot` reached the end: the new member takes full service.
    async fn finish_rebuild(&self, slot: usize, target: &Arc<Member>) {
        let mut sb = self.meta.lock().await;
        let h = self.health();
        let Some((now_target, source)) = self.rebuild_target(&h, slot) else { return };
        if !Arc::ptr_eq(&now_target, target) {
            return;
        }
        let mut next = (*h).clone();
        let e = &mut next.slots[slot];
        let retired = match source {
            Source::Copy(old) => {
                e.member = e.replacement.take();
                Some(old)
            }
            Source::Redundancy => None,
        };
        e.state = SlotState::Active;
        e.stale = None;
        self.commit(&mut sb, next).await;
        drop(sb);
        tracing::info!("slot {slot}: rebuild complete onto {}", target.path().display());
        if let Some(old) = retired {
            // Wiped so the old disk is not mistaken for a member later.
            match old.wipe_superblocks().await {
                Ok(()) => tracing::info!("slot {slot}: {} retired and its superblock wiped", old.path().display()),
                Err(e) => tracing::warn!("slot {slot}: {} retired, but wiping its superblock failed: {e}", old.path().display()),
            }
        }
    }

    /// Records the current checkpoints on disk.
    pub(super) async fn persist_progress(&self) {
        let mut sb = self.meta.lock().await;
        let h = (*self.health()).clone();
        self.commit(&mut sb, h).await;
    }

    /// Whether background work should stop (the daemon is shutting down).
    pub(super) fn rebuild_stopping(&self) -> bool {
        self.rebuild.stopping.load(Ordering::SeqCst)
    }

    /// Stops the rebuild task at the next batch.
    pub fn stop_background(&self) {
        self.rebuild.stopping.store(true, Ordering::SeqCst);
        self.rebuild.stop.notify_waiters();
        self.rebuild.wake();
    }

    /// Clean shutdown: stop rebuilding, wait for the rebuild task to let go of the volume, and
    /// record how far it got, so a restart resumes there.
    pub async fn shutdown(&self) {
        self.stop_background();
        let task = self.rebuild.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        if self.health().rebuilding() {
            self.persist_progress().await;
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.stop_background();
    }
}
