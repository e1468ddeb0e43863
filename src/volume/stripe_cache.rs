//! Parity stripes that a stream of small writes is working through, kept whole in memory, so
//! each of those writes computes its parity without reading anything.
//!
//! Why: a partial-stripe write on raid5 or ec must know the stripe's current data, for the new
//! parity and for the write-hole log's partial parity. Read-modify-write reads it under the
//! write: two dependent reads ahead of every small write. A sequential stream of small writes
//! (a filesystem journal, a database log) writes every block of a stripe in turn; once the
//! stream's first write into a stripe has loaded the stripe's data, the others there read none.
//!
//! Only a write that comes back to where recent partial writes were loads a stripe: one that
//! starts where a recent one ended (a stream), or that rewrites exactly the same bytes (a hot
//! block, such as a log's head or a superblock). For a random write, reading a whole stripe to
//! save two blocks would be a loss, and random writes rarely come back while it is cached.
//!
//! Coherence: an entry holds the stripe's data exactly as its members do. A writer takes it out
//! while it writes the stripe (under the stripe lock) and puts it back, updated, only once
//! every shard took the write; every other writer of the stripe either finds nothing or drops
//! it (heal, scrub, resync and rebuild invalidate what they lock, full-stripe and degraded
//! writes take the entry and do not return it), and a membership change empties the cache.
//! Parity is not cached: it is encoded from the cached data every time, so nothing that
//! repairs parity can leave an entry stale.

use super::status::StripeCacheStatus;
use crate::buf::AlignedBuf;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Memory the cache may hold, in stripe data. A stream needs one stripe at a time; the rest
/// lets several streams (or a stream and its filesystem's metadata writes) keep theirs.
const BUDGET: u64 = 8 << 20;

/// Recent partial writes remembered for recognising streams and rewrites.
const STREAMS: usize = 16;

/// One stripe's data: data shard `i`'s chunk at `i * chunk`.
pub(super) struct CachedStripe {
    pub stripe: u64,
    /// The cache's generation when the data was read; an entry from an older one is not kept.
    generation: u64,
    pub data: AlignedBuf,
}

impl CachedStripe {
    /// `data` must hold the stripe as its members held it at `generation`.
    pub fn new(stripe: u64, generation: u64, data: AlignedBuf) -> Self {
        CachedStripe { stripe, generation, data }
    }
}

struct Inner {
    /// Least recently used first.
    entries: VecDeque<CachedStripe>,
    generation: u64,
    /// What recent partial writes covered (volume bytes); a slot is reused round robin.
    recent: [Option<Range<u64>>; STREAMS],
    next_stream: usize,
}

pub(super) struct StripeCache {
    inner: Mutex<Inner>,
    capacity: usize,
    hits: AtomicU64,
    loads: AtomicU64,
}

impl StripeCache {
    /// A cache for stripes of `stripe_data_bytes`; stripes too large for the budget are never
    /// cached.
    pub fn new(stripe_data_bytes: u64) -> Self {
        let capacity = (BUDGET / stripe_data_bytes.max(1)) as usize;
        let inner = Inner { entries: VecDeque::with_capacity(capacity), generation: 0, recent: [const { None }; STREAMS], next_stream: 0 };
        StripeCache { inner: Mutex::new(inner), capacity, hits: AtomicU64::new(0), loads: AtomicU64::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes and returns the stripe's entry. Caller holds the stripe lock.
    pub fn take(&self, stripe: u64) -> Option<CachedStripe> {
        let mut inner = self.lock();
        let i = inner.entries.iter().position(|e| e.stripe == stripe)?;
        inner.entries.remove(i)
    }

    /// The generation to build a [`CachedStripe`] with, read before its data is.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps `entry` as the most recently used, evicting the least recently used beyond the
    /// budget. An entry from before the last [`StripeCache::clear`] is dropped instead.
    /// Caller holds the stripe lock, and the members hold exactly `entry.data`.
    pub fn put(&self, entry: CachedStripe) {
        let mut inner = self.lock();
        if entry.generation != inner.generation || self.capacity == 0 {
            return;
        }
        inner.entries.retain(|e| e.stripe != entry.stripe);
        while inner.entries.len() >= self.capacity {
            inner.entries.pop_front();
        }
        inner.entries.push_back(entry);
    }

    /// Counts a write whose parity came from an entry it took: a hit, or a stripe it loaded.
    pub fn count_use(&self, loaded: bool) {
        let counter = if loaded { &self.loads } else { &self.hits };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn status(&self) -> StripeCacheStatus {
        StripeCacheStatus {
            stripes: self.lock().entries.len() as u64,
            capacity: self.capacity as u64,
            hits: self.hits.load(Ordering::Relaxed),
            loads: self.loads.load(Ordering::Relaxed),
        }
    }

    /// Drops the entries of `stripes`, which the caller holds locked and is about to write.
    pub fn invalidate(&self, stripes: Range<u64>) {
        self.lock().entries.retain(|e| !stripes.contains(&e.stripe));
    }

    /// Drops every entry, and any taken out now when it comes back.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.generation += 1;
    }

    /// Whether a stripe is worth loading for a partial write of `span` (volume bytes): it
    /// continues or repeats a recent write, and stripes fit in the budget.
    pub fn comes_back(&self, span: &Range<u64>) -> bool {
        self.capacity > 0 && Self::recent_slot(&self.lock(), span).is_some()
    }

    fn recent_slot(inner: &Inner, span: &Range<u64>) -> Option<usize> {
        inner.recent.iter().position(|r| r.as_ref().is_some_and(|r| r.end == span.start || r == span))
    }

    /// Records a partial write of `span`: it takes the place of the write it continues or
    /// repeats, else the oldest slot.
    pub fn note_write(&self, span: Range<u64>) {
        let mut inner = self.lock();
        let slot = Self::recent_slot(&inner, &span).unwrap_or_else(|| {
            let i = inner.next_stream;
            inner.next_stream = (i + 1) % STREAMS;
            i
        });
        inner.recent[slot] = Some(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SDB: u64 = 192 << 10;

    fn entry(cache: &StripeCache, stripe: u64) -> CachedStripe {
        CachedStripe::new(stripe, cache.generation(), AlignedBuf::from_slice(&stripe.to_le_bytes()))
    }

    #[test]
    fn streams_and_rewrites_are_recognised_and_random_writes_are_not() {
        let c = StripeCache::new(SDB);
        assert!(!c.comes_back(&(0..4096)), "nothing written yet");
        c.note_write(0..4096);
        assert!(c.comes_back(&(4096..8192)), "continues");
        assert!(c.comes_back(&(0..4096)), "repeats");
        assert!(!c.comes_back(&(8192..12288)), "skips a block");
        assert!(!c.comes_back(&(0..8192)), "overlaps without repeating");
        c.note_write(4096..8192);
        assert!(c.comes_back(&(8192..12288)));
        assert!(!c.comes_back(&(4096..4096 + 512)), "the stream moved on instead of taking a second slot");
        // Unrelated writes take the other slots first, then the oldest: the stream survives
        // STREAMS - 1 of them.
        for i in 0..STREAMS as u64 - 1 {
            let at = 1 << 30 | i << 20;
            c.note_write(at..at + 4096);
        }
        assert!(c.comes_back(&(8192..12288)));
        c.note_write(1 << 40..(1 << 40) + 4096);
        assert!(!c.comes_back(&(8192..12288)), "the oldest stream gives way");
    }

    #[test]
    fn taking_an_entry_removes_it_until_it_is_put_back() {
        let c = StripeCache::new(SDB);
        c.put(entry(&c, 7));
        let e = c.take(7).expect("cached");
        assert!(c.take(7).is_none(), "a writer owns the entry while it writes the stripe");
        c.put(e);
        assert_eq!(c.take(7).map(|e| e.data.to_vec()), Some(7u64.to_le_bytes().to_vec()));
    }

    #[test]
    fn an_entry_taken_before_a_clear_is_not_kept() {
        let c = StripeCache::new(SDB);
        c.put(entry(&c, 1));
        let e = c.take(1).unwrap();
        c.clear();
        c.put(e);
        assert!(c.take(1).is_none());
        c.put(entry(&c, 1));
        assert!(c.take(1).is_some(), "entries of the new generation are kept");
    }

    #[test]
    fn invalidate_drops_only_the_stripes_named() {
        let c = StripeCache::new(SDB);
        for s in 0..5 {
            c.put(entry(&c, s));
        }
        c.invalidate(1..3);
        let left: Vec<u64> = (0..5).filter(|&s| c.take(s).is_some()).collect();
        assert_eq!(left, vec![0, 3, 4]);
    }

    #[test]
    fn stripes_beyond_the_budget_are_never_cached_or_loaded() {
        let c = StripeCache::new(BUDGET + 1);
        c.note_write(0..4096);
        assert!(!c.comes_back(&(4096..8192)));
        c.put(entry(&c, 0));
        assert!(c.take(0).is_none());
    }

    proptest! {
        /// Against a model: at most `capacity` entries, the least recently put evicted first,
        /// never two entries for one stripe.
        #[test]
        fn eviction_keeps_the_most_recently_used(ops in proptest::collection::vec((0u64..60, any::<bool>()), 1..400)) {
            let c = StripeCache::new(SDB);
            let mut model: VecDeque<u64> = VecDeque::new();
            for (stripe, take) in ops {
                if take {
                    let got = c.take(stripe).map(|e| e.stripe);
                    let want = model.iter().position(|&s| s == stripe).map(|i| model.remove(i).unwrap());
                    prop_assert_eq!(got, want);
                } else {
                    c.put(entry(&c, stripe));
                    model.retain(|&s| s != stripe);
                    if model.len() == c.capacity {
                        model.pop_front();
                    }
                    model.push_back(stripe);
                }
            }
            let inner = c.lock();
            prop_assert!(inner.entries.len() <= c.capacity);
            prop_assert_eq!(inner.entries.iter().map(|e| e.stripe).collect::<Vec<_>>(), Vec::from(model));
        }
    }
}
