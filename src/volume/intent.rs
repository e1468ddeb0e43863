//! The write-intent bitmap in use: marking regions dirty before writing them, cleaning idle
//! regions once their writes are durable, and resyncing dirty regions after a crash.
//!
//! Every member carries a copy (memory-mapped), so the bitmap survives the loss of members;
//! after a crash the union of all copies is resynced. Setting a bit is made durable (msync)
//! before the write it covers is issued; only the first write to a clean region pays for it.

use super::health::Health;
use super::scrub::Resynced;
use super::status::IntentStatus;
use super::Volume;
use crate::member::{Identity, Member};
use crate::meta::bitmap::{self, BITMAP_OFFSET, PAGE};
use memmap2::MmapMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Smallest region, in bytes of each member: small enough that a resync is quick, large
/// enough that random writes do not pay an msync for every new region.
const MIN_REGION_BYTES: u64 = 4 << 20;
/// How often the cleaner looks. A region is cleaned once a whole period has passed without a
/// write to it, so 2–4 s after its last write.
const CLEAN_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Which dirty regions the cleaner may clear.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Clean {
    /// Only those not written since the cleaner's last look: the periodic cleaning. Regions in
    /// use stay dirty; clearing them meant a bitmap msync (a cache flush per member) for the
    /// next write to each, ~16 rounds a second under 4k random writes.
    Idle,
    /// Every region with no write in flight: a clean stop, the end of the crash resync.
    All,
}

/// (stripes per region, regions) for a volume of `stripes` stripes of `chunk` bytes.
pub(super) fn intent_geometry(stripes: u64, chunk: u64) -> (u64, u64) {
    let region_stripes = (MIN_REGION_BYTES / chunk).max(1).max(stripes.div_ceil(bitmap::MAX_REGIONS));
    (region_stripes, bitmap::regions_for(stripes, region_stripes))
}

struct Regions {
    /// Per region: the generation at which its bit was set, 0 when clean.
    set_gen: Vec<u64>,
    /// Per region: writes in flight.
    inflight: Vec<u32>,
    /// Per region: written since the cleaner last looked.
    touched: Vec<bool>,
    /// The bits as they should be on disk.
    bits: Vec<u8>,
    gen: u64,
}

impl Regions {
    /// Marks region `i` dirty (a no-op if it is) and returns the generation its bit was set at.
    fn set_dirty(&mut self, i: usize) -> u64 {
        if self.set_gen[i] == 0 {
            self.gen += 1;
            self.set_gen[i] = self.gen;
            self.bits[i / 8] |= 1 << (i % 8);
        }
        self.set_gen[i]
    }
}

/// What the crash resync at start came to: the dirty regions, and what resyncing them did.
#[derive(Debug, Default, Clone, Copy)]
struct ResyncSummary {
    regions: u64,
    done: Resynced,
    /// Blocks whose checksum only a write-hole record knew.
    vouched: u64,
}

pub(super) struct Intent {
    pub region_stripes: u64,
    pub regions: u64,
    state: Mutex<Regions>,
    /// Every bit set at a generation up to this one is durable on every member's copy.
    durable_gen: AtomicU64,
    /// One msync round at a time.
    persisting: tokio::sync::Mutex<()>,
    maps: Mutex<Vec<(Identity, MmapMut)>>,
    /// What the resync after the last start found and did.
    resync: Mutex<ResyncSummary>,
}

/// Keeps a region counted as being written until dropped.
pub(super) struct Marked<'a> {
    intent: &'a Intent,
    regions: std::ops::RangeInclusive<u64>,
}

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        let mut st = self.intent.lock();
        for r in self.regions.clone() {
            st.inflight[r as usize] = st.inflight[r as usize].saturating_sub(1);
        }
    }
}

impl Intent {
    pub fn new(stripes: u64, chunk: u64) -> Intent {
        let (region_stripes, regions) = intent_geometry(stripes, chunk);
        let n = regions as usize;
        Intent {
            region_stripes,
            regions,
            state: Mutex::new(Regions {
                set_gen: vec![0; n],
                inflight: vec![0; n],
                touched: vec![false; n],
                bits: vec![0; bitmap::pages(regions) * PAGE],
                gen: 0,
            }),
            durable_gen: AtomicU64::new(0),
            persisting: tokio::sync::Mutex::new(()),
            maps: Mutex::new(Vec::new()),
            resync: Mutex::new(ResyncSummary::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Regions> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn area_len(&self) -> usize {
        bitmap::bitmap_len(self.regions)
    }

    /// Marks stripes [first, last] as being written; returns once the marks are durable.
    pub async fn mark(&self, first: u64, last: u64) -> Marked<'_> {
        let regions = first / self.region_stripes..=last / self.region_stripes;
        let need = {
            let mut st = self.lock();
            let mut need = 0;
            for r in regions.clone() {
                let i = r as usize;
                st.inflight[i] += 1;
                st.touched[i] = true;
                need = need.max(st.set_dirty(i));
            }
            need
        };
        let marked = Marked { intent: self, regions };
        if need > self.durable_gen.load(Ordering::Acquire) {
            let _one = self.persisting.lock().await;
            if need > self.durable_gen.load(Ordering::Acquire) {
                self.persist();
            }
        }
        marked
    }

    /// Writes the in-memory bits to every member's copy and msyncs them.
    fn persist(&self) {
        let (bits, gen) = {
            let st = self.lock();
            (st.bits.clone(), st.gen)
        };
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let mut msync_all = || {
            for (_, map) in maps.iter_mut() {
                write_bits(map, &bits);
                if let Err(e) = map.flush() {
                    // The member's data writes will fail the same way and fail the member.
                    tracing::error!("write-intent bitmap msync failed: {e}");
                }
            }
        };
        // msync blocks; on the multi-threaded runtime let other tasks move off this thread.
        let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(msync_all);
        } else {
            msync_all();
        }
        self.durable_gen.store(gen, Ordering::Release);
    }

    /// Dirty regions `which` allows clearing, with no write in flight. Every dirty region's
    /// `touched` starts over, so [`Intent::clean`] can tell which were written meanwhile and the
    /// next look which were written in the period to come.
    fn clean_candidates(&self, which: Clean) -> Vec<u64> {
        let mut st = self.lock();
        let mut out = Vec::new();
        for i in 0..st.set_gen.len() {
            if st.set_gen[i] == 0 {
                continue;
            }
            let idle = !st.touched[i];
            st.touched[i] = false;
            if st.inflight[i] == 0 && (idle || which == Clean::All) {
                out.push(i as u64);
            }
        }
        out
    }

    /// Clears the candidates that stayed untouched; caller made their writes durable since
    /// [`Intent::clean_candidates`].
    async fn clean(&self, candidates: &[u64]) {
        {
            let mut st = self.lock();
            for &r in candidates {
                let i = r as usize;
                if st.inflight[i] == 0 && !st.touched[i] {
                    st.set_gen[i] = 0;
                    st.bits[i / 8] &= !(1 << (i % 8));
                }
            }
        }
        let _one = self.persisting.lock().await;
        self.persist();
    }

    pub fn dirty_count(&self) -> u64 {
        self.lock().set_gen.iter().filter(|&&g| g != 0).count() as u64
    }

    pub fn status(&self, region_bytes: u64) -> IntentStatus {
        let r = *self.resync.lock().unwrap_or_else(|p| p.into_inner());
        IntentStatus {
            region_bytes,
            regions: self.regions,
            dirty_regions: self.dirty_count(),
            resync_regions: r.regions,
            resync_repaired: r.done.repaired,
            resync_skipped: r.done.skipped,
            resync_adopted: r.done.adopted,
            resync_vouched: r.vouched,
        }
    }
}

fn write_bits(map: &mut MmapMut, bits: &[u8]) {
    let (header, body) = map.split_at_mut(PAGE);
    for (i, (page, new)) in body.chunks_mut(PAGE).zip(bits.chunks(PAGE)).enumerate() {
        if page != new {
            page.copy_from_slice(new);
            bitmap::reseal_page_crc(header, i, page);
        }
    }
    bitmap::reseal_header(header);
}

impl Volume {
    /// Maps the bitmap area of every member in `h` that has no mapping yet (sealing a fresh
    /// copy of the current bits on it) and drops mappings of members that left.
    pub(super) fn map_intent(&self, h: &Health) {
        let members: Vec<&Arc<Member>> = h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter())).chain(h.spares.iter()).collect();
        let bits = self.intent.lock().bits.clone();
        let mut maps = self.intent.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.retain(|(id, _)| members.iter().any(|m| m.identity() == *id));
        for m in members {
            if maps.iter().any(|(id, _)| *id == m.identity()) {
                continue;
            }
            match m.map_range(BITMAP_OFFSET, self.intent.area_len()) {
                Ok(mut map) => {
                    if bitmap::dirty_regions(&map, &self.uuid, self.intent.region_stripes, self.intent.regions).is_err() {
                        bitmap::seal(&mut map, &self.uuid, self.intent.region_stripes, self.intent.regions);
                    }
                    write_bits(&mut map, &bits);
                    if let Err(e) = map.flush() {
                        tracing::error!("{}: cannot write the write-intent bitmap: {e}", m.path().display());
                    }
                    maps.push((m.identity(), map));
                }
                Err(e) => tracing::error!("{}: cannot map the write-intent bitmap: {e}", m.path().display()),
            }
        }
    }

    /// After assembly: read the members' bitmaps and bring every dirty region's stripes back to
    /// consistency (parity recomputed from data) before serving.
    pub(super) async fn resync_dirty(&self) {
        // Read the on-disk bits before mapping writes the (clean) in-memory bits over them.
        let h = self.health();
        // Read at every start, not only after a crash: new records must number above old ones.
        let log = self.read_partial_parity_log(&h).await;
        let dirty: Vec<u64> = match self.dirty_regions_on_disk(&h).await {
            Some(d) => d.into_iter().collect(),
            None => {
                tracing::warn!("no readable write-intent bitmap on any member: resyncing the whole volume");
                (0..self.intent.regions).collect()
            }
        };
        // Keep those regions marked while resyncing, so a crash now resyncs them again.
        {
            let mut st = self.intent.lock();
            for &r in &dirty {
                st.set_dirty(r as usize);
            }
        }
        self.map_intent(&h);
        // raid0 without checksums has nothing that could disagree: nothing to resync.
        if dirty.is_empty() || (self.geometry.level == crate::layout::Level::Raid0 && self.checksums.is_none()) {
            let candidates = self.intent.clean_candidates(Clean::All);
            self.intent.clean(&candidates).await;
            return;
        }
        tracing::info!("resyncing {} dirty region(s) of {} after an unclean stop", dirty.len(), self.intent.regions);
        // A block in a dirty region may hold the data from before its last write (cut off by
        // the crash): accepted while resyncing, and its checksum entry settled to it.
        let members: Vec<Arc<Member>> = h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter())).cloned().collect();
        self.accept_logged_blocks(&h, &log);
        members.iter().for_each(|m| m.set_checksum_recovery(true));
        let mut summary = ResyncSummary { regions: dirty.len() as u64, ..Default::default() };
        for &r in &dirty {
            let first = r * self.intent.region_stripes;
            let last = (first + self.intent.region_stripes).min(self.geometry.stripes);
            summary.done.add(self.resync_range(first, last, &log.newest).await);
        }
        for m in &members {
            summary.vouched += m.take_checksums_vouched_by_log();
            m.set_checksum_recovery(false);
            if let Err(e) = m.persist_checksums().await {
                self.member_failed(m, &e).await;
            }
        }
        if summary.done.skipped > 0 {
            tracing::warn!("{} dirty stripe(s) could not be resynced: a member is lost (their parity may not match)", summary.done.skipped);
        }
        if summary.done.adopted > 0 {
            tracing::info!("{} block(s) of writes not flushed before the unclean stop were taken as found (deferred checksum pages)", summary.done.adopted);
        }
        *self.intent.resync.lock().unwrap_or_else(|p| p.into_inner()) = summary;
        self.clean_intent(Clean::All).await;
    }

    /// The union of the dirty regions in every member's bitmap; `None` if no member has a
    /// readable bitmap (then everything must be taken as dirty). Plain reads, so it works on
    /// members opened read-only (`check`).
    pub(super) async fn dirty_regions_on_disk(&self, h: &Health) -> Option<std::collections::BTreeSet<u64>> {
        let mut on_disk = std::collections::BTreeSet::new();
        let mut valid = 0;
        let len = self.intent.area_len();
        for m in h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter())) {
            let buf = Arc::new(crate::buf::AlignedBuf::zeroed(len));
            if m.read_at(BITMAP_OFFSET, crate::uring::BufRange::whole(buf.clone())).await.is_err() {
                continue;
            }
            if let Ok(d) = bitmap::dirty_regions(&buf, &self.uuid, self.intent.region_stripes, self.intent.regions) {
                valid += 1;
                on_disk.extend(d);
            }
        }
        (valid > 0).then_some(on_disk)
    }

    /// At a clean stop, once requests are drained: flush and clear every bit, so the next start
    /// is not taken for crash recovery.
    pub async fn close(&self) {
        self.clean_intent(Clean::All).await;
    }

    /// Clears the bits of the regions `which` names, after making their writes durable.
    pub(super) async fn clean_intent(&self, which: Clean) {
        // Past its tolerance the volume records no failure, so the members that dropped out are
        // trusted again at the next start, although they may have missed their last writes and
        // the checksum pages left to a flush they never got. Their dirty bits make that start
        // resync those regions (and read the write-hole records vouching for such blocks).
        if self.health().exhausted {
            return;
        }
        let candidates = self.intent.clean_candidates(which);
        // Deferred checksum pages are also written by this flush: while writes go on, they go
        // out every period even when no region is idle, as they always have.
        let deferred_pending = self.page_writes == crate::member::PageWrites::Deferred && self.intent.dirty_count() > 0;
        if candidates.is_empty() && !deferred_pending {
            return;
        }
        if self.flush().await.is_ok() && !candidates.is_empty() {
            self.intent.clean(&candidates).await;
        }
    }

    pub(super) fn intent_status(&self) -> IntentStatus {
        self.intent.status(self.intent.region_stripes * self.geometry.chunk)
    }

    /// Starts the task that cleans idle regions every few seconds; it holds the volume weakly.
    pub(super) fn start_intent_cleaner(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLEAN_EVERY).await;
                let Some(volume) = weak.upgrade() else { return };
                if volume.rebuild_stopping() {
                    return;
                }
                volume.clean_intent(Clean::Idle).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The periodic cleaning clears a region only after a whole period without a write to it;
    /// a clean stop clears it at once. Clearing regions in use made the next write to each pay
    /// a bitmap msync.
    #[tokio::test]
    async fn periodic_cleaning_skips_regions_written_since_the_last_look() {
        let intent = Intent::new(1024, 64 << 10);
        assert!(intent.regions >= 2, "{} regions", intent.regions);
        drop(intent.mark(0, 0).await);
        assert_eq!(intent.clean_candidates(Clean::Idle), Vec::<u64>::new(), "written in the period just ended");
        assert_eq!(intent.clean_candidates(Clean::Idle), vec![0], "a whole period without a write");

        // Written again between the looks: it stays dirty for another period.
        drop(intent.mark(0, 0).await);
        assert_eq!(intent.clean_candidates(Clean::Idle), Vec::<u64>::new());
        drop(intent.mark(0, 0).await);
        assert_eq!(intent.clean_candidates(Clean::Idle), Vec::<u64>::new(), "written in every period");

        // A clean stop takes every region without a write in flight, idle or not.
        let held = intent.mark(intent.region_stripes, intent.region_stripes).await;
        drop(intent.mark(0, 0).await);
        assert_eq!(intent.clean_candidates(Clean::All), vec![0], "region 1 has a write in flight");
        drop(held);
        assert_eq!(intent.clean_candidates(Clean::All), vec![0, 1]);

        // Clearing: a candidate written after the look stays dirty.
        let candidates = intent.clean_candidates(Clean::All);
        drop(intent.mark(0, 0).await);
        intent.clean(&candidates).await;
        assert_eq!(intent.dirty_count(), 1, "region 0 was written after the look");
        assert_eq!(intent.lock().set_gen[1], 0, "region 1 is clean");
    }
}
