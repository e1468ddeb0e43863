//! The in-memory copy of a member's checksum table (format in `meta::checksums`) and the rules
//! for keeping it true: a write updates the entries and completes the page write before the
//! data write is issued; a read is judged against the entries.
//!
//! Pages are written with group commit: writers that update entries of one page while a write
//! of it is in flight are all covered by the next single write of that page.
//!
//! A durable record elsewhere on the member may stand in for a page write
//! (`Member::prepare_write_logged`: the write-hole log carries the blocks' checksums). The page
//! is then queued as a deferred one is, and after a crash the record's checksums are accepted
//! too ([`ChecksumTable::also_accept`]).
//!
//! A volume created with deferred checksum pages lets client writes skip the page write: their
//! entries change in memory and the page is queued, to be written by the member's next flush
//! just before its fdatasync. A write acknowledged and then flushed is as safe as in ordered
//! mode; a write cut off by a crash before a flush leaves an entry that knows neither the old
//! nor the new data, and the crash resync takes such blocks in dirty regions as they are
//! (`ChecksumTable::adopt`) instead of calling them damaged.

use crate::buf::AlignedBuf;
use crate::meta::checksums::{self as fmt, Entry, Verdict, BLOCK, ENTRIES_PER_PAGE, PAGE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Where a member's table and data area are, and whose volume it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumLayout {
    pub volume_uuid: [u8; 16],
    pub table_offset: u64,
    pub data_offset: u64,
    pub data_bytes: u64,
}

impl ChecksumLayout {
    pub fn blocks(&self) -> u64 {
        self.data_bytes.div_ceil(BLOCK)
    }

    pub fn pages(&self) -> u64 {
        fmt::pages_for(self.data_bytes)
    }

    /// Member offset of copy `copy` of page `page`.
    pub fn page_pos(&self, page: u64, copy: u32) -> u64 {
        self.table_offset + fmt::page_offset(page, copy)
    }
}

struct PageDisk {
    /// Generation of the newest copy on disk; the next write goes to the other copy.
    generation: u32,
    /// The `updated` count the on-disk page includes.
    persisted: u64,
}

struct PageSlot {
    /// Bumped on every change of one of the page's entries.
    updated: AtomicU64,
    disk: tokio::sync::Mutex<PageDisk>,
}

/// When the table pages a data write changes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageWrites {
    /// Durably, before the data write is issued.
    Ordered,
    /// At the member's next flush.
    Deferred,
}

/// Pages changed by deferred writes and not yet written, each listed once.
#[derive(Default)]
struct Pending {
    pages: Vec<u64>,
    queued: Vec<bool>,
}

pub(super) struct ChecksumTable {
    pub layout: ChecksumLayout,
    entries: Mutex<Vec<Entry>>,
    pages: Vec<PageSlot>,
    pending: Mutex<Pending>,
    /// Held while a flush writes the pending pages, so that a second flush waits for those
    /// writes to complete before its fdatasync (it would otherwise not cover them).
    flushing: tokio::sync::Mutex<()>,
    /// Right after a crash: a block holding its `previous` data is accepted (and the entry
    /// settled to it), since its write may have been cut off. Never while serving.
    recovering: AtomicBool,
    /// Right after a crash, per block: further contents to accept, named by write-hole log
    /// records that stood in for the block's page write (see [`ChecksumTable::also_accept`]).
    logged: Mutex<std::collections::HashMap<u64, Vec<u32>>>,
    /// Blocks judged good on a record's word since last taken ([`ChecksumTable::take_vouched`]).
    vouched: AtomicU64,
}

tokio::task_local! {
    /// Set while the member writes of one request's several stripes run (see
    /// [`sharing_page_writes`]).
    static SHARED_PAGE_WRITES: ();
}

/// Runs `f`, the member writes of one request's several stripes side by side (one join).
/// Within it a checksum page write waits one scheduler turn before it takes its snapshot of
/// the page: the stripes polled after it record their entries meanwhile, and one durable page
/// write covers them all. Without the wait the first stripe's write went out alone and the
/// rest needed a second one, each a cache flush on a disk without FUA (1 MiB raid0 writes: 1.4
/// instead of 1.0 flushes per request). Only around such joins: a lone write would pay the
/// turn for nothing (raid5 4k random writes lost 7 % with it everywhere).
pub fn sharing_page_writes<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
    SHARED_PAGE_WRITES.scope((), f)
}

/// A page write a writer must see completed before its data write: page `page` up to `want`.
pub(super) struct PagePersist {
    pub page: u64,
    pub want: u64,
}

impl ChecksumTable {
    /// A table with `entries` (one per block) and, per page, the generation of its newest copy.
    pub fn new(layout: ChecksumLayout, entries: Vec<Entry>, generations: Vec<u32>) -> ChecksumTable {
        let pages =
            generations.into_iter().map(|g| PageSlot { updated: AtomicU64::new(0), disk: tokio::sync::Mutex::new(PageDisk { generation: g, persisted: 0 }) });
        let pages: Vec<PageSlot> = pages.collect();
        let pending = Pending { pages: Vec::new(), queued: vec![false; pages.len()] };
        ChecksumTable {
            layout,
            entries: Mutex::new(entries),
            pages,
            pending: Mutex::new(pending),
            flushing: tokio::sync::Mutex::new(()),
            recovering: AtomicBool::new(false),
            logged: Mutex::new(std::collections::HashMap::new()),
            vouched: AtomicU64::new(0),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_recovering(&self, on: bool) {
        self.recovering.store(on, Ordering::SeqCst);
        if !on {
            self.logged.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// While recovering, `block` may also hold data with `crc`: a write whose page was left to
    /// the next flush because its write-hole log record carried the checksum instead.
    pub fn also_accept(&self, block: u64, crc: u32) {
        if block < self.layout.blocks() {
            self.logged.lock().unwrap_or_else(|p| p.into_inner()).entry(block).or_default().push(crc);
        }
    }

    /// How many blocks matched only a record's checksum since the last call.
    pub fn take_vouched(&self) -> u64 {
        self.vouched.swap(0, Ordering::Relaxed)
    }

    fn logged_accepts(&self, block: u64, crc: u32) -> bool {
        self.logged.lock().unwrap_or_else(|p| p.into_inner()).get(&block).is_some_and(|c| c.contains(&crc))
    }

    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::SeqCst)
    }

    /// The blocks [first, first + count) that `len` bytes at member offset `pos` cover, if the
    /// range lies in the data area; `Err` if it does but is not block-aligned.
    pub fn blocks_of(&self, pos: u64, len: usize) -> Option<Result<(u64, u64), ()>> {
        let l = &self.layout;
        if pos < l.data_offset || pos >= l.data_offset + l.blocks() * BLOCK {
            return None;
        }
        let rel = pos - l.data_offset;
        if !rel.is_multiple_of(BLOCK) || !(len as u64).is_multiple_of(BLOCK) || rel / BLOCK + len as u64 / BLOCK > l.blocks() {
            return Some(Err(()));
        }
        Some(Ok((rel / BLOCK, len as u64 / BLOCK)))
    }

    /// Records that blocks from `first` now hold data with `crcs`; returns the page writes that
    /// must complete before the data write is issued.
    pub fn record(&self, first: u64, crcs: &[u32]) -> Vec<PagePersist> {
        let mut out: Vec<PagePersist> = Vec::new();
        let mut entries = self.entries();
        for (i, &crc) in crcs.iter().enumerate() {
            let b = first + i as u64;
            let e = &mut entries[b as usize];
            // A block of unknown content has no previous version worth accepting. Recording the
            // current content again (a write retried after a member failed) keeps the previous
            // version: the block may still hold it.
            let previous = if *e == fmt::UNKNOWN {
                crc
            } else if e.current == crc {
                e.previous
            } else {
                e.current
            };
            *e = Entry { current: crc, previous };
            let page = b / ENTRIES_PER_PAGE;
            if out.last().is_none_or(|p| p.page != page) {
                out.push(PagePersist { page, want: 0 });
            }
        }
        for p in &mut out {
            p.want = self.pages[p.page as usize].updated.fetch_add(1, Ordering::AcqRel) + 1;
        }
        out
    }

    /// [`ChecksumTable::record`] for a deferred write: the pages are queued for the next flush.
    pub fn record_deferred(&self, first: u64, crcs: &[u32]) {
        let pages = self.record(first, crcs);
        let mut pending = self.pending();
        for p in pages {
            if !std::mem::replace(&mut pending.queued[p.page as usize], true) {
                pending.pages.push(p.page);
            }
        }
    }

    /// The pages of blocks [first, first + count), each to be written up to the updates made
    /// so far.
    pub fn pages_of(&self, first: u64, count: u64) -> Vec<PagePersist> {
        let pages = first / ENTRIES_PER_PAGE..(first + count).div_ceil(ENTRIES_PER_PAGE);
        pages.map(|page| PagePersist { page, want: self.pages[page as usize].updated.load(Ordering::Acquire) }).collect()
    }

    /// Takes the queued pages, each to be written up to the updates made so far. The caller
    /// holds [`ChecksumTable::flush_guard`] until they are written.
    pub fn take_pending(&self) -> Vec<PagePersist> {
        let pages = {
            let mut pending = self.pending();
            let pages = std::mem::take(&mut pending.pages);
            for &p in &pages {
                pending.queued[p as usize] = false;
            }
            pages
        };
        pages.into_iter().map(|page| PagePersist { page, want: self.pages[page as usize].updated.load(Ordering::Acquire) }).collect()
    }

    pub async fn flush_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flushing.lock().await
    }

    /// Takes the blocks from `first` as holding data with `crcs`, with no other version
    /// accepted: a deferred write's blocks found after a crash with an entry that predates
    /// them. Persisted like settled entries (see [`ChecksumTable::unpersisted_pages`]).
    pub fn adopt(&self, first: u64, crcs: &[u32]) {
        let mut pages = Vec::new();
        {
            let mut entries = self.entries();
            for (i, &crc) in crcs.iter().enumerate() {
                let b = first + i as u64;
                entries[b as usize] = Entry { current: crc, previous: crc };
                pages.push(b / ENTRIES_PER_PAGE);
            }
        }
        self.note_changed(pages);
    }

    /// Counts a change of entries on each of `pages` (ascending), so that the next
    /// [`ChecksumTable::unpersisted_pages`] writes them.
    fn note_changed(&self, mut pages: Vec<u64>) {
        pages.dedup();
        for p in pages {
            self.pages[p as usize].updated.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Judges the blocks from `first` held in `bytes`; returns the indexes (relative to `first`)
    /// of those that are damaged or of unknown content. While recovering, a block holding its
    /// previous data settles its entry to it (persisted by [`ChecksumTable::settled_pages`]).
    pub fn judge(&self, first: u64, bytes: &[u8]) -> Vec<u64> {
        // Computed before taking the lock, which must not be held for the length of a large read.
        // A small read's checksums stay on the stack (a heap list each showed up in `perf`).
        let mut few = [0u32; 16];
        let many: Vec<u32>;
        let count = bytes.len().div_ceil(BLOCK as usize);
        let crcs: &[u32] = if count <= few.len() {
            for (c, block) in few.iter_mut().zip(bytes.chunks(BLOCK as usize)) {
                *c = fmt::block_crc(block);
            }
            &few[..count]
        } else {
            many = bytes.chunks(BLOCK as usize).map(fmt::block_crc).collect();
            &many
        };
        let recovering = self.recovering.load(Ordering::Relaxed);
        let mut bad = Vec::new();
        let mut settled_pages = Vec::new();
        {
            let mut entries = self.entries();
            for (i, &crc) in crcs.iter().enumerate() {
                let e = &mut entries[(first + i as u64) as usize];
                let block = first + i as u64;
                match e.judge(crc) {
                    Verdict::Current => {}
                    Verdict::Previous if recovering => {
                        *e = Entry { current: crc, previous: crc };
                        settled_pages.push(block / ENTRIES_PER_PAGE);
                    }
                    Verdict::Bad | Verdict::Unknown if recovering && self.logged_accepts(block, crc) => {
                        *e = Entry { current: crc, previous: crc };
                        settled_pages.push(block / ENTRIES_PER_PAGE);
                        self.vouched.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Previous | Verdict::Bad | Verdict::Unknown => bad.push(i as u64),
                }
            }
        }
        self.note_changed(settled_pages);
        bad
    }

    /// Whether the entry of `block` accepts `crc` as its content (an unknown entry accepts any).
    pub fn accepts(&self, block: u64, crc: u32) -> bool {
        let e = self.entries()[block as usize];
        let recovering = self.recovering.load(Ordering::Relaxed);
        match e.judge(crc) {
            Verdict::Current | Verdict::Unknown => true,
            Verdict::Previous => recovering,
            Verdict::Bad => recovering && self.logged_accepts(block, crc),
        }
    }

    /// Pages changed since last written (e.g. settled during recovery).
    pub fn unpersisted_pages(&self) -> Vec<PagePersist> {
        let mut out = Vec::new();
        for (i, p) in self.pages.iter().enumerate() {
            let want = p.updated.load(Ordering::Acquire);
            if let Ok(d) = p.disk.try_lock() {
                if d.persisted >= want {
                    continue;
                }
            }
            out.push(PagePersist { page: i as u64, want });
        }
        out
    }

    /// Makes the page on disk cover update `p.want`, writing it (through `write(pos, bytes)`)
    /// unless a write since has already covered it. Writes of one page are serialized.
    pub async fn persist<F, Fut, E>(&self, p: &PagePersist, write: F) -> Result<(), E>
    where
        F: FnOnce(u64, AlignedBuf) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let slot = &self.pages[p.page as usize];
        let mut disk = slot.disk.lock().await;
        if disk.persisted >= p.want {
            return Ok(());
        }
        if SHARED_PAGE_WRITES.try_with(|_| ()).is_ok() {
            tokio::task::yield_now().await;
        }
        let updated = slot.updated.load(Ordering::Acquire);
        let start = (p.page * ENTRIES_PER_PAGE) as usize;
        let end = ((p.page + 1) * ENTRIES_PER_PAGE).min(self.layout.blocks()) as usize;
        let snapshot: Vec<Entry> = self.entries()[start..end].to_vec();
        let generation = disk.generation.wrapping_add(1);
        let mut bytes = AlignedBuf::zeroed(PAGE);
        fmt::encode_page(&mut bytes, &self.layout.volume_uuid, p.page, generation, &snapshot);
        write(self.layout.page_pos(p.page, generation % 2), bytes).await?;
        disk.generation = generation;
        disk.persisted = updated;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn table(blocks: u64) -> ChecksumTable {
        let layout = ChecksumLayout { volume_uuid: [7; 16], table_offset: 4096, data_offset: 1 << 20, data_bytes: blocks * BLOCK };
        ChecksumTable::new(layout, vec![fmt::UNKNOWN; blocks as usize], vec![0; layout.pages() as usize])
    }

    /// Records a new crc for `block` and waits for its page to be durable, counting page writes.
    async fn write_block(t: &ChecksumTable, block: u64, page_writes: &AtomicUsize) {
        for p in t.record(block, &[block as u32 + 1]) {
            let written = t.persist(&p, |_, _| async {
                page_writes.fetch_add(1, Ordering::SeqCst);
                // A real page write takes a while: long enough for the others to queue up.
                tokio::task::yield_now().await;
                Ok::<(), ()>(())
            });
            written.await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_stripes_of_one_request_share_their_page_write() {
        let t = table(64);
        let writes = AtomicUsize::new(0);
        // Blocks 0..4 share page 0: four stripe writes of one request.
        sharing_page_writes(futures::future::join_all((0..4).map(|b| write_block(&t, b, &writes)))).await;
        assert_eq!(writes.load(Ordering::SeqCst), 1, "one page write for the whole request");
        // Outside such a request the first writer goes out alone and the rest share a second.
        futures::future::join_all((4..8).map(|b| write_block(&t, b, &writes))).await;
        assert_eq!(writes.load(Ordering::SeqCst), 3);
        // Every entry recorded is in what was persisted last.
        assert!(t.unpersisted_pages().is_empty());
    }

    /// What a member's flush does with the queue: writes each queued page once.
    async fn flush_pending(t: &ChecksumTable, written: &Mutex<Vec<Vec<Entry>>>) {
        let _guard = t.flush_guard().await;
        for p in t.take_pending() {
            t.persist(&p, |_, bytes| async move {
                let page = fmt::decode_page(&bytes, &[7; 16], p.page).expect("a valid page");
                written.lock().unwrap().push(page.entries);
                Ok::<(), ()>(())
            })
            .await
            .unwrap();
        }
    }

    #[tokio::test]
    async fn deferred_writes_reach_the_disk_at_the_next_flush_once_per_page() {
        let t = table(2 * ENTRIES_PER_PAGE);
        let written = Mutex::new(Vec::new());
        // Three writes to page 0, one to page 1: nothing is written until the flush.
        for (block, crc) in [(0, 10), (1, 11), (0, 12), (ENTRIES_PER_PAGE, 13)] {
            t.record_deferred(block, &[crc]);
        }
        assert!(written.lock().unwrap().is_empty());
        assert_eq!(t.unpersisted_pages().len(), 2);
        flush_pending(&t, &written).await;
        {
            let w = written.lock().unwrap();
            assert_eq!(w.len(), 2, "one write per page changed");
            assert_eq!(w[0][0], Entry { current: 12, previous: 10 });
            assert_eq!(w[0][1].current, 11);
            assert_eq!(w[1][0].current, 13);
        }
        assert!(t.unpersisted_pages().is_empty(), "the flush covered every deferred update");
        // Nothing queued: a second flush writes nothing.
        flush_pending(&t, &written).await;
        assert_eq!(written.lock().unwrap().len(), 2);
    }

    #[test]
    fn logged_contents_are_accepted_only_while_recovering() {
        let t = table(8);
        t.record(2, &[5]);
        t.also_accept(2, 77);
        t.also_accept(100, 1); // beyond the table: ignored
        assert!(!t.accepts(2, 77), "serving: only the current content");
        t.set_recovering(true);
        assert!(t.accepts(2, 77) && t.accepts(2, 5) && !t.accepts(2, 78));
        // Judged while recovering, the logged content settles the entry...
        let block = [0u8; BLOCK as usize];
        let crc = fmt::block_crc(&block);
        t.also_accept(3, crc);
        assert!(t.judge(3, &block).is_empty());
        assert_eq!((t.take_vouched(), t.take_vouched()), (1, 0));
        t.set_recovering(false);
        assert!(t.accepts(3, crc), "settled");
        // ...and the end of recovery forgets the rest.
        t.set_recovering(true);
        assert!(!t.accepts(2, 77), "forgotten at the end of the recovery");
    }

    #[test]
    fn adopted_blocks_accept_only_their_data() {
        let t = table(8);
        t.record(3, &[5]);
        t.adopt(3, &[99]);
        assert!(t.accepts(3, 99));
        assert!(!t.accepts(3, 5));
        assert_eq!(t.unpersisted_pages().len(), 1);
    }
}
