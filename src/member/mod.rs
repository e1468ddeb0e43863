//! One member disk or file: opening it (O_DIRECT where it works), locking it against other
//! nbraid processes, whole-length reads and writes through the io_uring engine, superblock I/O.
//!
//! Knows nothing of RAID levels: offsets here are raw byte offsets on the member.

mod checksums;
mod faults;

pub use checksums::{sharing_page_writes, ChecksumLayout, PageWrites};
pub use faults::FaultPlan;

use crate::buf::{AlignedBuf, ALIGN};
use crate::meta::checksums as csum_fmt;
use crate::meta::superblock::{Superblock, SuperblockError, SUPERBLOCK_OFFSETS, SUPERBLOCK_SIZE};
use crate::uring::{BufRange, Engine, RingFile};
use faults::Faults;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// The kinds of data transfer a member does through the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Read,
    Write,
    /// Completes only once on stable storage (see [`Member::write_durable_at`]).
    DurableWrite,
}

impl Transfer {
    /// How errors name it.
    fn name(self) -> &'static str {
        match self {
            Transfer::Read => "read",
            Transfer::Write => "write",
            Transfer::DurableWrite => "durable write",
        }
    }

    fn is_write(self) -> bool {
        self != Transfer::Read
    }
}

#[derive(Debug, Error)]
pub enum MemberError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: in use by another nbraid process (a running `nbraid serve`?)")]
    InUse { path: PathBuf },
    #[error("{path}: not a regular file or block device")]
    NotStorage { path: PathBuf },
    #[error("{path}: {op} of {len} bytes at offset {offset} failed: {source}")]
    Io { path: PathBuf, op: &'static str, offset: u64, len: usize, source: io::Error },
    #[error("{path}: {op} at offset {offset} stopped after {done} of {len} bytes")]
    Short { path: PathBuf, op: &'static str, offset: u64, done: usize, len: usize },
    #[error("{path}: {source}")]
    Superblock { path: PathBuf, source: SuperblockError },
    /// The read completed, but these blocks (member offsets) do not match their checksums.
    #[error("{path}: {} block(s) fail their checksum, first at offset {}", bad.len(), bad.first().copied().unwrap_or(0))]
    Checksum { path: PathBuf, bad: Vec<u64> },
    #[error("{path}: {op} at offset {offset} of {len} bytes is not block-aligned in the checksummed data area")]
    Unaligned { path: PathBuf, op: &'static str, offset: u64, len: usize },
}

impl MemberError {
    /// Damage found by checksums: the member itself still works.
    pub fn is_checksum(&self) -> bool {
        matches!(self, MemberError::Checksum { .. })
    }
}

/// How a member is opened: `serve` and `create` need it to themselves, `check` only reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Exclusive,
    SharedReadOnly,
}

/// (device, inode) for files, (0, rdev) for block devices: two paths naming one disk compare equal.
pub type Identity = (u64, u64);

pub struct Member {
    path: PathBuf,
    file: Arc<RingFile>,
    engine: Arc<Engine>,
    direct: bool,
    size: u64,
    identity: Identity,
    stats: Counters,
    faults: Faults,
    /// This disk's own identity from its superblock, kept when the volume rewrites it.
    uuid: std::sync::Mutex<[u8; 16]>,
    /// Per-block checksums of the data area, once the volume's layout is known.
    checksums: std::sync::OnceLock<checksums::ChecksumTable>,
    /// Holds the flock (see `open`).
    _lock: File,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    checksum_errors: AtomicU64,
    repaired: AtomicU64,
}

/// I/O counts of one member since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberStats {
    pub reads: u64,
    pub writes: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    /// Blocks found not to match their checksum (confirmed by the volume, not counted twice
    /// for one read).
    pub checksum_errors: u64,
    /// Blocks rewritten from redundancy after a checksum error.
    pub repaired: u64,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Member {
    /// Opens `path`, preferring O_DIRECT; falls back to buffered I/O (with a logged notice) where the
    /// filesystem refuses it, e.g. tmpfs or a FUSE mount without direct_io.
    pub async fn open(path: &Path, engine: Arc<Engine>, access: Access) -> Result<Member, MemberError> {
        let open_err = |source| MemberError::Open { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(MemberError::NotStorage { path: path.to_path_buf() });
        }
        let identity = if ft.is_block_device() { (0, meta.rdev()) } else { (meta.dev(), meta.ino()) };

        // The lock lives on a descriptor of its own, used for nothing else: the I/O descriptor is
        // also held by io_uring and the bitmap mapping, which the kernel may release only after
        // the process has gone, and the member must be free the moment the daemon exits.
        let lock = File::open(path).map_err(open_err)?;
        lock_file(&lock, access).map_err(|e| match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => MemberError::InUse { path: path.to_path_buf() },
            _ => open_err(e),
        })?;
        let (file, mut direct) = match open_file(path, access, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open_file(path, access, false).map_err(open_err)?, false),
            Err(e) => return Err(open_err(e)),
        };
        let size = if ft.is_block_device() { block_device_size(&file).map_err(open_err)? } else { meta.len() };

        let mut member = Member {
            path: path.to_path_buf(),
            file: engine.open_file(file),
            engine,
            direct,
            size,
            identity,
            stats: Counters::default(),
            faults: Faults::default(),
            uuid: std::sync::Mutex::new([0; 16]),
            checksums: std::sync::OnceLock::new(),
            _lock: lock,
        };
        if direct {
            // Some filesystems accept O_DIRECT at open and refuse it at I/O time.
            let probe = Arc::new(AlignedBuf::zeroed(ALIGN));
            if let Err(e) = member.engine.read(member.file.clone(), 0, BufRange::whole(probe)).await {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(MemberError::Io { path: path.to_path_buf(), op: "read", offset: 0, len: ALIGN, source: e });
                }
                direct = false;
            }
        }
        if !direct {
            tracing::info!("{}: O_DIRECT not supported here, using buffered I/O", path.display());
            if member.direct {
                member.file = member.engine.open_file(open_file(path, access, false).map_err(open_err)?);
                member.direct = false;
            }
        }
        Ok(member)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Size of the file or device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The member UUID last read from or written to this member's superblock.
    pub fn uuid(&self) -> [u8; 16] {
        *self.uuid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the member a new identity, written with its next superblock (a disk joining a volume).
    pub fn assign_uuid(&self, uuid: [u8; 16]) {
        *self.uuid.lock().unwrap_or_else(|p| p.into_inner()) = uuid;
    }

    fn remember_uuid(&self, sb: &Superblock) {
        *self.uuid.lock().unwrap_or_else(|p| p.into_inner()) = sb.member_uuid;
    }

    pub fn stats(&self) -> MemberStats {
        let c = &self.stats;
        MemberStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            read_errors: c.read_errors.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            checksum_errors: c.checksum_errors.load(Ordering::Relaxed),
            repaired: c.repaired.load(Ordering::Relaxed),
        }
    }

    /// Counts blocks the volume confirmed damaged, and blocks it rewrote.
    pub fn note_checksum_errors(&self, blocks: u64) {
        self.stats.checksum_errors.fetch_add(blocks, Ordering::Relaxed);
    }

    pub fn note_repaired(&self, blocks: u64) {
        self.stats.repaired.fetch_add(blocks, Ordering::Relaxed);
    }

    /// Test hook: from now on, fail or delay this member's I/O as `plan` says.
    pub fn inject_faults(&self, plan: FaultPlan) {
        self.faults.set(plan);
    }

    /// Reads exactly `buf.len()` bytes at `offset`. In the checksummed data area every block is
    /// verified: damaged ones are reported as [`MemberError::Checksum`], with the bytes read
    /// left in `buf`.
    pub async fn read_at(&self, offset: u64, buf: BufRange) -> Result<(), MemberError> {
        let blocks = self.checksummed("read", offset, buf.len())?;
        self.transfer(Transfer::Read, offset, buf.clone()).await?;
        let (Some(t), Some((first, _))) = (self.checksums.get(), blocks) else { return Ok(()) };
        let bad = t.judge(first, buf.bytes());
        if bad.is_empty() {
            return Ok(());
        }
        let bad = bad.into_iter().map(|i| offset + i * csum_fmt::BLOCK).collect();
        Err(MemberError::Checksum { path: self.path.clone(), bad })
    }

    /// Writes exactly `buf.len()` bytes at `offset`. In the checksummed data area the blocks'
    /// new checksums are made durable in the table first.
    pub async fn write_at(&self, offset: u64, buf: BufRange) -> Result<(), MemberError> {
        self.write_with_pages(offset, buf, PageWrites::Ordered).await
    }

    /// [`Member::write_at`] with the checksum pages written as `pages` says.
    pub async fn write_with_pages(&self, offset: u64, buf: BufRange, pages: PageWrites) -> Result<(), MemberError> {
        self.prepare_write(offset, &buf, pages).await?;
        self.write_prepared(offset, buf).await
    }

    /// The first half of [`Member::write_at`]: records the checksums of the data about to be
    /// written and makes their table pages durable (or, `Deferred`, queues them for the next
    /// [`Member::sync`]). Split out so a caller can overlap it with other writes that must also
    /// precede the data (the stripe's partial-parity record).
    pub async fn prepare_write(&self, offset: u64, buf: &BufRange, pages: PageWrites) -> Result<(), MemberError> {
        if let (Some(t), Some((first, _))) = (self.checksums.get(), self.checksummed("write", offset, buf.len())?) {
            let crcs: Vec<u32> = buf.bytes().chunks(csum_fmt::BLOCK as usize).map(csum_fmt::block_crc).collect();
            if pages == PageWrites::Deferred {
                t.record_deferred(first, &crcs);
                return Ok(());
            }
            let pages = t.record(first, &crcs);
            let persists = pages.iter().map(|p| t.persist(p, |pos, bytes| self.write_raw(pos, bytes)));
            futures::future::join_all(persists).await.into_iter().collect::<Result<(), _>>()?;
        }
        Ok(())
    }

    /// [`Member::prepare_write`] with the page left to the next flush because a durable record
    /// elsewhere on this member (the write-hole log) will carry the blocks' checksums instead:
    /// returns them (`None` outside the checksummed area). If that record is not written after
    /// all, [`Member::persist_pages_of`] must run before the data write.
    pub fn prepare_write_logged(&self, offset: u64, buf: &BufRange) -> Result<Option<Vec<u32>>, MemberError> {
        let (Some(t), Some((first, _))) = (self.checksums.get(), self.checksummed("write", offset, buf.len())?) else { return Ok(None) };
        let crcs: Vec<u32> = buf.bytes().chunks(csum_fmt::BLOCK as usize).map(csum_fmt::block_crc).collect();
        t.record_deferred(first, &crcs);
        Ok(Some(crcs))
    }

    /// Makes the table pages of `len` bytes at `offset` durable now, covering every entry
    /// recorded so far.
    pub async fn persist_pages_of(&self, offset: u64, len: usize) -> Result<(), MemberError> {
        let (Some(t), Some((first, count))) = (self.checksums.get(), self.checksummed("write", offset, len)?) else { return Ok(()) };
        for p in t.pages_of(first, count) {
            t.persist(&p, |pos, bytes| self.write_raw(pos, bytes)).await?;
        }
        Ok(())
    }

    /// Blocks found holding what a write-hole record (not their table entry) said, since the
    /// last call.
    pub fn take_checksums_vouched_by_log(&self) -> u64 {
        self.checksums.get().map_or(0, |t| t.take_vouched())
    }

    /// While in crash recovery, the blocks from member offset `pos` may also hold data with
    /// `crcs` (named by a write-hole log record).
    pub fn also_accept_after_crash(&self, pos: u64, crcs: &[u32]) {
        let Some(t) = self.checksums.get() else { return };
        if let Some(Ok((first, _))) = t.blocks_of(pos, crcs.len() * csum_fmt::BLOCK as usize) {
            for (i, &crc) in crcs.iter().enumerate() {
                t.also_accept(first + i as u64, crc);
            }
        }
    }

    /// The second half of [`Member::write_at`], only after [`Member::prepare_write`] of the
    /// same bytes succeeded.
    pub async fn write_prepared(&self, offset: u64, buf: BufRange) -> Result<(), MemberError> {
        self.transfer(Transfer::Write, offset, buf).await
    }

    /// The blocks an I/O covers, if checksums apply to it.
    fn checksummed(&self, op: &'static str, offset: u64, len: usize) -> Result<Option<(u64, u64)>, MemberError> {
        match self.checksums.get().and_then(|t| t.blocks_of(offset, len)) {
            None => Ok(None),
            Some(Ok(range)) => Ok(Some(range)),
            Some(Err(())) => Err(MemberError::Unaligned { path: self.path.clone(), op, offset, len }),
        }
    }

    /// Writes a checksum table page. Durable, not just completed: the data write it precedes
    /// may otherwise reach stable storage first out of a volatile write cache, and a power cut
    /// would then leave the block with new data and an entry that knows neither crc.
    async fn write_raw(&self, pos: u64, bytes: AlignedBuf) -> Result<(), MemberError> {
        self.transfer(Transfer::DurableWrite, pos, BufRange::whole(Arc::new(bytes))).await
    }

    /// Writes metadata outside the checksummed data area that later writes rely on, and returns
    /// once it is on stable storage (the write-hole log's records).
    pub async fn write_durable_at(&self, offset: u64, buf: BufRange) -> Result<(), MemberError> {
        debug_assert!(self.checksums.get().and_then(|t| t.blocks_of(offset, buf.len())).is_none(), "write_durable_at in the checksummed data area");
        self.transfer(Transfer::DurableWrite, offset, buf).await
    }

    /// Reads this member's checksum table (newest valid copy of each page). Pages with no valid
    /// copy leave their blocks unknown; returns how many there were.
    pub async fn load_checksums(&self, layout: ChecksumLayout) -> Result<u64, MemberError> {
        const PAGES_PER_READ: u64 = 1024;
        let blocks = layout.blocks() as usize;
        let pages = layout.pages();
        let mut entries = Vec::with_capacity(blocks);
        let mut generations = Vec::with_capacity(pages as usize);
        let mut lost = 0;
        let mut page = 0;
        while page < pages {
            let n = PAGES_PER_READ.min(pages - page);
            let buf = Arc::new(AlignedBuf::zeroed(n as usize * 2 * csum_fmt::PAGE));
            self.transfer(Transfer::Read, layout.page_pos(page, 0), BufRange::whole(buf.clone())).await?;
            for (i, pair) in buf.chunks(2 * csum_fmt::PAGE).enumerate() {
                let p = page + i as u64;
                let (a, b) = pair.split_at(csum_fmt::PAGE);
                let want = ((p + 1) * csum_fmt::ENTRIES_PER_PAGE).min(blocks as u64) - p * csum_fmt::ENTRIES_PER_PAGE;
                match csum_fmt::newest_page([a, b], &layout.volume_uuid, p) {
                    Some(d) => {
                        entries.extend_from_slice(&d.entries[..want as usize]);
                        generations.push(d.generation);
                    }
                    None => {
                        lost += 1;
                        entries.extend(std::iter::repeat_n(csum_fmt::UNKNOWN, want as usize));
                        generations.push(0);
                    }
                }
            }
            page += n;
        }
        if lost > 0 {
            tracing::warn!("{}: {lost} checksum page(s) have no valid copy; their blocks will be healed from redundancy", self.path.display());
        }
        let _ = self.checksums.set(checksums::ChecksumTable::new(layout, entries, generations));
        Ok(lost)
    }

    /// Starts a table of unknown blocks (a member joining the volume, to be rebuilt).
    pub fn fresh_checksums(&self, layout: ChecksumLayout) {
        let entries = vec![csum_fmt::UNKNOWN; layout.blocks() as usize];
        let _ = self.checksums.set(checksums::ChecksumTable::new(layout, entries, vec![0; layout.pages() as usize]));
    }

    /// While on, a block holding the data from before its last write is accepted (crash recovery).
    pub fn set_checksum_recovery(&self, on: bool) {
        if let Some(t) = self.checksums.get() {
            t.set_recovering(on);
        }
    }

    /// Whether crash recovery (see [`Member::set_checksum_recovery`]) is on.
    pub fn in_checksum_recovery(&self) -> bool {
        self.checksums.get().is_some_and(|t| t.is_recovering())
    }

    /// Writes table pages changed by reads (entries settled during crash recovery).
    pub async fn persist_checksums(&self) -> Result<(), MemberError> {
        let Some(t) = self.checksums.get() else { return Ok(()) };
        for p in t.unpersisted_pages() {
            t.persist(&p, |pos, bytes| self.write_raw(pos, bytes)).await?;
        }
        Ok(())
    }

    /// Takes the blocks at member offset `pos` (block-aligned, in the data area) as holding
    /// `bytes`, whatever their entries said: after a crash, the blocks of a deferred write
    /// whose entries never reached the disk. Written by [`Member::persist_checksums`].
    pub fn adopt_checksums(&self, pos: u64, bytes: &[u8]) {
        let Some(t) = self.checksums.get() else { return };
        if let Some(Ok((first, _))) = t.blocks_of(pos, bytes.len()) {
            let crcs: Vec<u32> = bytes.chunks(csum_fmt::BLOCK as usize).map(csum_fmt::block_crc).collect();
            t.adopt(first, &crcs);
        }
    }

    /// Writes the table pages deferred writes changed. Plain writes: the fdatasync that
    /// follows makes them durable together with the data they describe.
    async fn write_deferred_pages(&self) -> Result<(), MemberError> {
        let Some(t) = self.checksums.get() else { return Ok(()) };
        use futures::stream::{self, StreamExt};
        // Bounded: between two flushes a large volume can change many thousands of pages, and
        // each write holds a page-sized buffer. Every write runs to completion, even after one
        // failed: none is left half done.
        const PAGE_WRITES_IN_FLIGHT: usize = 64;
        let _flushing = t.flush_guard().await;
        let writes = t
            .take_pending()
            .into_iter()
            .map(|p| async move { t.persist(&p, |pos, bytes| self.transfer(Transfer::Write, pos, BufRange::whole(Arc::new(bytes)))).await });
        let results: Vec<Result<(), MemberError>> = stream::iter(writes).buffer_unordered(PAGE_WRITES_IN_FLIGHT).collect().await;
        results.into_iter().collect()
    }

    /// Whether `block` (4096 bytes at member offset `pos`) is what the checksum table says is
    /// there; true without checksums or for a block of unknown content.
    pub fn checksum_accepts(&self, pos: u64, block: &[u8]) -> bool {
        let Some(t) = self.checksums.get() else { return true };
        match t.blocks_of(pos, block.len()) {
            Some(Ok((first, _))) => t.accepts(first, csum_fmt::block_crc(block)),
            _ => true,
        }
    }

    async fn transfer(&self, kind: Transfer, offset: u64, buf: BufRange) -> Result<(), MemberError> {
        let (count, errors) = if kind.is_write() { (&self.stats.writes, &self.stats.write_errors) } else { (&self.stats.reads, &self.stats.read_errors) };
        count.fetch_add(1, Ordering::Relaxed);
        let result = self.transfer_once(kind, offset, buf).await;
        if result.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn transfer_once(&self, kind: Transfer, offset: u64, buf: BufRange) -> Result<(), MemberError> {
        let len = buf.len();
        let op = kind.name();
        if self.faults.is_armed() {
            // Boxed: fault injection is for tests, and inline its state would weigh on every I/O.
            let is_write = kind.is_write();
            match Box::pin(self.faults.apply(is_write, is_write.then_some(len))).await {
                Some(faults::Injected::Error(source)) => return Err(MemberError::Io { path: self.path.clone(), op, offset, len, source }),
                Some(faults::Injected::Tear(keep)) => self.tear_and_die(offset, &buf.bytes()[..keep]),
                None => {}
            }
        }
        let mut attempts = 0;
        loop {
            let result = match kind {
                Transfer::Read => self.engine.read(self.file.clone(), offset, buf.clone()).await,
                Transfer::Write => self.engine.write(self.file.clone(), offset, buf.clone()).await,
                Transfer::DurableWrite => self.engine.write_durable(self.file.clone(), offset, buf.clone()).await,
            };
            match result {
                Ok(n) if n == len => return Ok(()),
                // A short transfer on a file means end of file or a full disk: the member is unusable
                // at this offset, and retrying the remainder would only hide that.
                Ok(done) => return Err(MemberError::Short { path: self.path.clone(), op, offset, done, len }),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) && attempts < 8 => {
                    attempts += 1;
                }
                Err(source) => return Err(MemberError::Io { path: self.path.clone(), op, offset, len, source }),
            }
        }
    }

    /// Fault injection: persists `prefix` at `offset` (buffered, then synced) and ends the
    /// process at once, as a power cut in the middle of a write would.
    fn tear_and_die(&self, offset: u64, prefix: &[u8]) -> ! {
        use std::os::unix::fs::FileExt;
        tracing::error!("{}: fault injection: tearing a write at offset {offset} after {} bytes and stopping dead", self.path.display(), prefix.len());
        if let Ok(f) = OpenOptions::new().write(true).open(&self.path) {
            let _ = f.write_all_at(prefix, offset);
            let _ = f.sync_data();
        }
        std::process::abort()
    }

    /// Makes completed writes durable (fdatasync through the ring), with the checksum pages
    /// deferred writes changed.
    pub async fn sync(&self) -> Result<(), MemberError> {
        self.write_deferred_pages().await?;
        self.sync_writes().await
    }

    /// Makes completed writes durable but leaves deferred checksum pages queued for the next
    /// [`Member::sync`]: for barriers that need the data on stable storage but are not a
    /// client's flush (the write-hole log reusing a slot), which would otherwise write a page
    /// for nearly every random write since the last one.
    pub async fn sync_writes(&self) -> Result<(), MemberError> {
        let injected = match self.faults.is_armed() {
            true => match self.faults.apply(true, None).await {
                Some(faults::Injected::Error(e)) => Some(e),
                _ => None,
            },
            false => None,
        };
        let result = match injected {
            Some(e) => Err(e),
            None => self.engine.fsync(self.file.clone(), true).await,
        };
        // A flush that fails means written data may be lost: it counts as a write error.
        if result.is_err() {
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        result.map_err(|source| MemberError::Io { path: self.path.clone(), op: "fdatasync", offset: 0, len: 0, source })
    }

    /// Reads both superblock copies and returns the newest valid one.
    pub async fn read_superblock(&self) -> Result<Superblock, MemberError> {
        if self.size < SUPERBLOCK_OFFSETS[1] + SUPERBLOCK_SIZE as u64 {
            return Err(MemberError::Superblock { path: self.path.clone(), source: SuperblockError::NoMagic });
        }
        let buf = Arc::new(AlignedBuf::zeroed(2 * SUPERBLOCK_SIZE));
        self.read_at(0, BufRange::whole(buf.clone())).await?;
        let (a, b) = buf.split_at(SUPERBLOCK_SIZE);
        let sb = Superblock::newest([a, b]).map_err(|source| MemberError::Superblock { path: self.path.clone(), source })?;
        self.remember_uuid(&sb);
        Ok(sb)
    }

    /// Writes the copy of the superblock its event counter selects, then syncs it.
    pub async fn write_superblock(&self, sb: &Superblock) -> Result<(), MemberError> {
        let buf = Arc::new(AlignedBuf::from_slice(&sb.encode()));
        self.write_at(SUPERBLOCK_OFFSETS[sb.copy_index()], BufRange::whole(buf)).await?;
        self.sync().await?;
        self.remember_uuid(sb);
        Ok(())
    }

    /// Memory-maps `len` bytes at `offset` (page-aligned) for reading and writing.
    pub fn map_range(&self, offset: u64, len: usize) -> io::Result<memmap2::MmapMut> {
        // SAFETY: the mapped range is metadata that only this process touches, and only
        // through this mapping (the member is locked against other nbraid processes).
        unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map_mut(self.file.file()) }
    }

    /// Zeroes both superblock copies, so the disk is no longer a member of anything.
    pub async fn wipe_superblocks(&self) -> Result<(), MemberError> {
        let buf = Arc::new(AlignedBuf::zeroed(2 * SUPERBLOCK_SIZE));
        self.write_at(0, BufRange::whole(buf)).await?;
        self.sync().await
    }

    /// Writes both copies (used at creation, so no stale copy of an older volume survives).
    pub async fn write_superblock_both(&self, sb: &Superblock) -> Result<(), MemberError> {
        let mut bytes = AlignedBuf::zeroed(2 * SUPERBLOCK_SIZE);
        let enc = sb.encode();
        bytes[..SUPERBLOCK_SIZE].copy_from_slice(&enc);
        bytes[SUPERBLOCK_SIZE..].copy_from_slice(&enc);
        self.write_at(0, BufRange::whole(Arc::new(bytes))).await?;
        self.sync().await?;
        self.remember_uuid(sb);
        Ok(())
    }
}

fn open_file(path: &Path, access: Access, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new().read(true).write(access == Access::Exclusive).custom_flags(flags).open(path)
}

/// Advisory lock so two daemons (or a daemon and an offline `check`) never share a member.
fn lock_file(file: &File, access: Access) -> io::Result<()> {
    let op = match access {
        Access::Exclusive => libc::LOCK_EX,
        Access::SharedReadOnly => libc::LOCK_SH,
    } | libc::LOCK_NB;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::superblock::{SlotState, METADATA_RESERVED};

    fn sb(event: u64) -> Superblock {
        Superblock {
            volume_uuid: [9; 16],
            member_uuid: [3; 16],
            created: 0,
            event,
            level_code: 0,
            members: 2,
            data_shards: 2,
            parity_shards: 0,
            chunk: 65536,
            data_offset: METADATA_RESERVED,
            member_data_bytes: 1 << 20,
            volume_size: 2 << 20,
            member_index: 1,
            name: "t".into(),
            slots: vec![SlotState::Active; 2],
            checkpoints: vec![0; 2],
            slot_ids: vec![0; 2],
            replacement_ids: vec![0; 2],
            spare: false,
            replacement: false,
            checksum_offset: 0,
            deferred_checksum_pages: false,
            ppl_offset: 0,
            ppl_slots: 0,
        }
    }

    #[tokio::test]
    async fn superblock_roundtrip_and_exclusive_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m0");
        File::create(&path).unwrap().set_len(4 << 20).unwrap();
        let engine = Engine::new().unwrap();
        let m = Member::open(&path, engine.clone(), Access::Exclusive).await.unwrap();
        assert_eq!(m.size(), 4 << 20);
        assert!(matches!(m.read_superblock().await, Err(MemberError::Superblock { source: SuperblockError::NoMagic, .. })));
        m.write_superblock_both(&sb(4)).await.unwrap();
        m.write_superblock(&sb(5)).await.unwrap();
        assert_eq!(m.read_superblock().await.unwrap().event, 5);
        assert!(matches!(Member::open(&path, engine.clone(), Access::SharedReadOnly).await, Err(MemberError::InUse { .. })));
        drop(m);
        Member::open(&path, engine, Access::SharedReadOnly).await.unwrap();
    }

    #[tokio::test]
    async fn short_read_past_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m0");
        File::create(&path).unwrap().set_len(8192).unwrap();
        let m = Member::open(&path, Engine::new().unwrap(), Access::Exclusive).await.unwrap();
        let buf = Arc::new(AlignedBuf::zeroed(8192));
        let err = m.read_at(4096, BufRange::whole(buf)).await.unwrap_err();
        assert!(matches!(err, MemberError::Short { done: 4096, .. }), "{err}");
    }
}
