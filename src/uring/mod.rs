//! The io_uring engine: one ring shared by the runtime's threads, completions that wake futures.
//!
//! Why this shape: on a machine with few cores the expensive thing is not the syscall but the
//! thread hand-off. So there is no ring thread: a task submits its own SQE (one `io_uring_enter`,
//! no wake-up of anybody), and the ring's file descriptor is registered with tokio's reactor,
//! which reports it readable when completions are waiting. A reaper task then drains the whole
//! completion queue at once and wakes each waiting future.
//!
//! Memory safety across cancellation: every operation owns what the kernel touches (the file and
//! the buffer, via `Arc`) until the kernel reports completion, so dropping the future early never
//! frees memory the kernel is still writing to; tearing the ring down waits for in-flight
//! operations first.

use crate::buf::AlignedBuf;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify};

/// Submission queue size of the ring.
const RING_ENTRIES: u32 = 1024;
/// Operations kept in the kernel at once; the completion queue is sized so it never overflows.
const MAX_IN_FLIGHT: usize = 2 * RING_ENTRIES as usize;

/// A byte range of a shared aligned buffer, handed to the kernel for one operation.
///
/// Several ranges of one buffer may be in flight at once (e.g. the pieces of one client read,
/// each from a different member); they must not overlap, and nobody may look at the bytes of a
/// read range until its operation completed. The volume layer upholds both.
#[derive(Clone)]
pub struct BufRange {
    buf: Arc<AlignedBuf>,
    offset: usize,
    len: usize,
}

impl BufRange {
    /// Panics if the range is out of bounds: ranges are built by our own code, never from input.
    pub fn new(buf: Arc<AlignedBuf>, offset: usize, len: usize) -> Self {
        assert!(offset + len <= buf.len(), "BufRange {offset}+{len} beyond buffer of {}", buf.len());
        BufRange { buf, offset, len }
    }

    pub fn whole(buf: Arc<AlignedBuf>) -> Self {
        let len = buf.len();
        BufRange { buf, offset: 0, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of the range. Only for a range no read is filling: the bytes a write is about
    /// to send, or those of a read that has completed.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: in bounds (checked at construction); the caller's contract above means no
        // operation is writing these bytes while they are looked at.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + len <= buf.len() was checked at construction.
        unsafe { self.buf.as_ptr_mut_shared().add(self.offset) }
    }
}

/// Descriptor-table slots each ring reserves for registered files.
const FILE_SLOTS: u32 = 256;

/// A file opened for I/O through one engine. Where the ring has room, the file is registered
/// with it ("fixed file"), which spares the kernel a descriptor lookup and reference count on
/// every operation. The registration is dropped with the last handle, which is also the moment
/// no operation on it can still be in flight (each operation holds a handle).
pub struct RingFile {
    file: File,
    slot: Option<u32>,
    ring: std::sync::Weak<Shared>,
}

impl RingFile {
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The descriptor an SQE names the file by, and the flag saying it is a registered slot.
    fn sqe_fd(&self) -> (types::Fd, squeue::Flags) {
        match self.slot {
            Some(i) => (types::Fd(i as RawFd), squeue::Flags::FIXED_FILE),
            None => (types::Fd(self.file.as_raw_fd()), squeue::Flags::empty()),
        }
    }
}

impl Drop for RingFile {
    fn drop(&mut self) {
        let (Some(slot), Some(shared)) = (self.slot, self.ring.upgrade()) else { return };
        let mut ring = shared.lock();
        // -1 empties the slot. If that failed, the slot keeps a reference to this file; it is
        // then not handed out again, so no later file can be mistaken for this one.
        if ring.ring.submitter().register_files_update(slot, &[-1]).is_ok() {
            ring.free_file_slots.push(slot);
        }
    }
}

enum OpKind {
    Read {
        offset: u64,
        buf: BufRange,
    },
    /// `durable`: RWF_DSYNC, so the write is on stable storage when it completes (FUA, or a
    /// cache flush after it on a device without FUA), not merely in the device's write cache.
    Write {
        offset: u64,
        buf: BufRange,
        durable: bool,
    },
    Fsync {
        datasync: bool,
    },
}

struct Op {
    file: Arc<RingFile>,
    kind: OpKind,
    done: oneshot::Sender<i32>,
}

impl Op {
    fn entry(&self, user_data: u64) -> squeue::Entry {
        let (fd, flags) = self.file.sqe_fd();
        let entry = match &self.kind {
            OpKind::Read { offset, buf } => opcode::Read::new(fd, buf.ptr(), buf.len as u32).offset(*offset).build(),
            OpKind::Write { offset, buf, durable } => {
                let rw_flags = if *durable { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, buf.ptr() as *const u8, buf.len as u32).offset(*offset).rw_flags(rw_flags).build()
            }
            OpKind::Fsync { datasync } => {
                let flags = if *datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
                opcode::Fsync::new(fd).flags(flags).build()
            }
        };
        entry.flags(flags).user_data(user_data)
    }
}

/// Slots for operations the kernel owns; the slot index is the SQE's `user_data`.
struct InFlight {
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    count: usize,
}

impl InFlight {
    fn insert(&mut self, op: Op) -> usize {
        self.count += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(op);
                i
            }
            None => {
                self.slots.push(Some(op));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<Op> {
        let op = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        self.count -= 1;
        Some(op)
    }
}

/// A finished operation: its waiter, its result, and the handle on its file.
struct Completed {
    tx: oneshot::Sender<i32>,
    result: i32,
    _file: Arc<RingFile>,
}

struct Ring {
    ring: IoUring,
    inflight: InFlight,
    /// Operations waiting for room in the kernel (more than MAX_IN_FLIGHT submitted at once).
    backlog: VecDeque<Op>,
    /// SQEs are queued and the deferred submitter has been told to push them to the kernel.
    submit_scheduled: bool,
    /// Registered-file slots not in use (empty if the kernel refused the file table).
    free_file_slots: Vec<u32>,
}

impl Ring {
    /// Moves an operation into the submission queue, or into the backlog when the kernel is full.
    /// Returns whether an SQE was queued (and so a submit is due).
    fn enqueue(&mut self, op: Op) -> bool {
        if self.inflight.count >= MAX_IN_FLIGHT {
            self.backlog.push_back(op);
            return false;
        }
        let slot = self.inflight.insert(op);
        let Some(entry) = self.inflight.slots[slot].as_ref().map(|op| op.entry(slot as u64)) else {
            return false;
        };
        // SAFETY: the op (and so its buffer and file) stays in `inflight` until its completion.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.submit();
        }
        true
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
    }

    /// Takes every completion off the queue, refills from the backlog, and returns the waiters
    /// to wake (woken by the caller, outside the lock).
    /// The file handles come back too, to be dropped outside the ring's lock: dropping the
    /// last handle of a registered file takes that lock.
    fn reap(&mut self) -> Vec<Completed> {
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            if let Some(Op { file, kind, done: tx }) = self.inflight.remove(cqe.user_data() as usize) {
                // Release the buffer before waking the waiter, so it can reclaim sole ownership.
                drop(kind);
                done.push(Completed { tx, result: cqe.result(), _file: file });
            }
        }
        let mut queued = false;
        while self.inflight.count < MAX_IN_FLIGHT {
            let Some(op) = self.backlog.pop_front() else { break };
            queued |= self.enqueue(op);
        }
        if queued {
            self.submit();
        }
        done
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers we own: wait for every operation to finish.
        while self.inflight.count > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            drop(self.reap());
        }
    }
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

struct Shared {
    /// The ring's descriptor in tokio's reactor: readable while completions wait. Declared before
    /// `ring` so it is deregistered before the ring closes the descriptor.
    fd: AsyncFd<RingFd>,
    ring: Mutex<Ring>,
    stopping: AtomicBool,
    stop: Notify,
    /// Wakes [`submit_deferred`].
    submit_due: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An io_uring instance served by the current tokio runtime. Cheap to share behind an `Arc`.
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Must be called from within a tokio runtime, which then drives the ring's completions.
    pub fn new() -> io::Result<Arc<Engine>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| io::Error::other("the io_uring engine needs a tokio runtime"))?;
        let ring = IoUring::builder().setup_clamp().setup_cqsize(2 * RING_ENTRIES).build(RING_ENTRIES)?;
        // Without a file table the engine still works, on plain descriptors.
        let free_file_slots = match ring.submitter().register_files_sparse(FILE_SLOTS) {
            Ok(()) => (0..FILE_SLOTS).rev().collect(),
            Err(e) => {
                tracing::debug!("io_uring: no registered files ({e}); using plain descriptors");
                Vec::new()
            }
        };
        let fd = {
            let _enter = runtime.enter();
            // SAFETY: the descriptor belongs to `ring`, which lives in the same `Shared` and is
            // dropped after this registration (field order).
            unsafe { AsyncFd::register_with_interest(RingFd(ring.as_raw_fd()), tokio::io::Interest::READABLE) }.map_err(io::Error::from)?
        };
        let shared = Arc::new(Shared {
            fd,
            ring: Mutex::new(Ring {
                ring,
                inflight: InFlight { slots: Vec::new(), free: Vec::new(), count: 0 },
                backlog: VecDeque::new(),
                submit_scheduled: false,
                free_file_slots,
            }),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            submit_due: Notify::new(),
        });
        runtime.spawn(reap_completions(shared.clone()));
        runtime.spawn(submit_deferred(shared.clone()));
        Ok(Arc::new(Engine { shared }))
    }

    /// Takes `file` for I/O through this engine, registered with the ring where there is room.
    pub fn open_file(&self, file: File) -> Arc<RingFile> {
        let mut ring = self.shared.lock();
        let slot = ring.free_file_slots.pop().and_then(|slot| match ring.ring.submitter().register_files_update(slot, &[file.as_raw_fd()]) {
            Ok(_) => Some(slot),
            Err(e) => {
                tracing::debug!("io_uring: cannot register a file ({e}); using its descriptor");
                ring.free_file_slots.push(slot);
                None
            }
        });
        Arc::new(RingFile { file, slot, ring: Arc::downgrade(&self.shared) })
    }

    /// Queues one operation. With nothing else in flight it goes to the kernel at once (the
    /// latency of a lone request); otherwise the SQE waits for [`submit_deferred`], which runs
    /// after the tasks that are ready now, so a burst of requests shares one `io_uring_enter`.
    /// `perf` showed one `io_uring_enter` per 4 KiB read at queue depth 32 before this.
    fn submit(&self, file: Arc<RingFile>, kind: OpKind) -> oneshot::Receiver<i32> {
        let (done, rx) = oneshot::channel();
        let mut ring = self.shared.lock();
        let idle = ring.inflight.count == 0;
        if ring.enqueue(Op { file, kind, done }) {
            if idle {
                ring.submit();
            } else if !ring.submit_scheduled {
                ring.submit_scheduled = true;
                drop(ring);
                self.shared.submit_due.notify_one();
            }
        }
        rx
    }

    async fn wait(rx: oneshot::Receiver<i32>) -> io::Result<usize> {
        let res = rx.await.map_err(|_| io::Error::other("io_uring engine stopped"))?;
        if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        }
    }

    /// Reads into `buf` at `offset`; returns the bytes read (may be short at end of file).
    pub async fn read(&self, file: Arc<RingFile>, offset: u64, buf: BufRange) -> io::Result<usize> {
        Self::wait(self.submit(file, OpKind::Read { offset, buf })).await
    }

    /// Writes `buf` at `offset`; returns the bytes written (may be short).
    pub async fn write(&self, file: Arc<RingFile>, offset: u64, buf: BufRange) -> io::Result<usize> {
        Self::wait(self.submit(file, OpKind::Write { offset, buf, durable: false })).await
    }

    /// Writes `buf` at `offset` and completes only once it is on stable storage (RWF_DSYNC):
    /// for metadata that later writes rely on surviving a power cut.
    pub async fn write_durable(&self, file: Arc<RingFile>, offset: u64, buf: BufRange) -> io::Result<usize> {
        Self::wait(self.submit(file, OpKind::Write { offset, buf, durable: true })).await
    }

    /// fsync (or fdatasync) through the ring.
    pub async fn fsync(&self, file: Arc<RingFile>, datasync: bool) -> io::Result<()> {
        Self::wait(self.submit(file, OpKind::Fsync { datasync })).await.map(|_| ())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.notify_one();
        self.shared.submit_due.notify_one();
    }
}

/// Pushes queued SQEs to the kernel once the tasks that are ready have had their turn.
async fn submit_deferred(shared: Arc<Shared>) {
    loop {
        shared.submit_due.notified().await;
        // yield_now runs after every task that is ready now: their SQEs join this submit.
        tokio::task::yield_now().await;
        let mut ring = shared.lock();
        ring.submit_scheduled = false;
        ring.submit();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Wakes waiters as completions arrive, until the engine is dropped and nothing is in flight.
async fn reap_completions(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            ready = shared.fd.readable() => {
                let Ok(mut guard) = ready else {
                    tracing::error!("io_uring descriptor left the reactor; completions stop");
                    return;
                };
                let done = shared.lock().reap();
                guard.clear_ready();
                for c in done {
                    let _ = c.tx.send(c.result);
                }
            }
            _ = shared.stop.notified() => {}
        }
        if shared.stopping.load(Ordering::SeqCst) {
            let mut ring = shared.lock();
            let idle = ring.inflight.count == 0 && ring.backlog.is_empty();
            if idle {
                return;
            }
            // Completions still pending: keep reaping until they are in.
            let done = ring.reap();
            drop(ring);
            drop(done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_read_fsync_roundtrip() {
        let engine = Engine::new().unwrap();
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&vec![0u8; 1 << 20]).unwrap();
        let file = engine.open_file(tmp);
        let mut futs = Vec::new();
        for i in 0..256u64 {
            let data = Arc::new(AlignedBuf::from_slice(&[i as u8; 4096]));
            let e = engine.clone();
            let f = file.clone();
            futs.push(tokio::spawn(async move { e.write(f, i * 4096, BufRange::whole(data)).await }));
        }
        for f in futs {
            assert_eq!(f.await.unwrap().unwrap(), 4096);
        }
        engine.fsync(file.clone(), true).await.unwrap();
        let buf = Arc::new(AlignedBuf::zeroed(1 << 20));
        let mut reads = Vec::new();
        for i in 0..16usize {
            let r = BufRange::new(buf.clone(), i * 65536, 65536);
            reads.push(engine.read(file.clone(), i as u64 * 65536, r));
        }
        for r in futures::future::join_all(reads).await {
            assert_eq!(r.unwrap(), 65536);
        }
        let buf = Arc::try_unwrap(buf).expect("engine released the buffer");
        for i in 0..256usize {
            assert!(buf[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8), "block {i}");
        }
    }

    #[tokio::test]
    async fn registered_file_slots_are_reused_after_the_last_handle() {
        let engine = Engine::new().unwrap();
        let a = engine.open_file(tempfile::tempfile().unwrap());
        let slot = a.slot.expect("this kernel takes a file table");
        let b = engine.open_file(tempfile::tempfile().unwrap());
        assert_ne!(b.slot, Some(slot), "a slot in use is not handed out twice");
        // An operation in flight holds a handle: the slot stays taken until it completes.
        let buf = Arc::new(AlignedBuf::from_slice(&[7u8; 4096]));
        assert_eq!(engine.write(a.clone(), 0, BufRange::whole(buf)).await.unwrap(), 4096);
        drop(a);
        let c = engine.open_file(tempfile::tempfile().unwrap());
        assert_eq!(c.slot, Some(slot), "the freed slot is handed out again");
        let buf = Arc::new(AlignedBuf::zeroed(4096));
        assert_eq!(engine.read(c, 0, BufRange::whole(buf)).await.unwrap(), 0, "the new file, not the old one, is behind the slot");
    }

    #[tokio::test]
    async fn errors_are_reported() {
        let engine = Engine::new().unwrap();
        let file = engine.open_file(File::open("/dev/null").unwrap()); // read-only: a write must fail
        let buf = Arc::new(AlignedBuf::zeroed(4096));
        let err = engine.write(file, 0, BufRange::whole(buf)).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
