//! The io_uring engine: one ring driven by a dedicated thread, completions that wake futures.
//!
//! Why a thread of its own: the NBD side runs on tokio, whose reactor is epoll-based. Rather than
//! teach tokio about a second event source, submitters push operations onto a queue and the ring
//! thread moves them into the submission queue in batches, submits them with one syscall, and
//! reaps completions — so a burst of requests from many connections costs one `io_uring_enter`
//! instead of one syscall per member I/O. While idle the thread sleeps inside the kernel waiting
//! for a completion; an eventfd read kept armed in the ring lets submitters wake it.
//!
//! Memory safety across cancellation: every operation owns what the kernel touches (the file and
//! the buffer, via `Arc`) until the kernel reports completion, so dropping the future early never
//! frees memory the kernel is still writing to.

use crate::buf::AlignedBuf;
use io_uring::{opcode, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Submission queue size of each ring.
const RING_ENTRIES: u32 = 1024;
/// Operations the thread keeps in the kernel at once; bounded so completions never overflow.
const MAX_IN_FLIGHT: usize = 2 * RING_ENTRIES as usize;
/// `user_data` of the eventfd read that wakes the ring thread.
const WAKE_TOKEN: u64 = u64::MAX;

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

    fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + len <= buf.len() was checked at construction.
        unsafe { self.buf.as_ptr_mut_shared().add(self.offset) }
    }
}

enum OpKind {
    Read { offset: u64, buf: BufRange },
    Write { offset: u64, buf: BufRange },
    Fsync { datasync: bool },
}

struct Op {
    file: Arc<File>,
    kind: OpKind,
    done: oneshot::Sender<i32>,
}

impl Op {
    fn entry(&self, user_data: u64) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match &self.kind {
            OpKind::Read { offset, buf } => opcode::Read::new(fd, buf.ptr(), buf.len as u32).offset(*offset).build(),
            OpKind::Write { offset, buf } => {
                opcode::Write::new(fd, buf.ptr() as *const u8, buf.len as u32).offset(*offset).build()
            }
            OpKind::Fsync { datasync } => {
                let flags = if *datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
                opcode::Fsync::new(fd).flags(flags).build()
            }
        };
        entry.user_data(user_data)
    }
}

struct Shared {
    queue: Mutex<Vec<Op>>,
    wake_fd: OwnedFd,
    /// Set by the ring thread just before it blocks in the kernel; submitters then write the eventfd.
    sleeping: AtomicBool,
    stopping: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // A failed eventfd write can only mean the counter is saturated, i.e. a wake-up is pending.
        unsafe { libc::write(self.wake_fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// An io_uring instance with its driving thread. Cheap to share behind an `Arc`.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    pub fn new() -> io::Result<Arc<Engine>> {
        let ring = IoUring::builder().setup_clamp().build(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let wake_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            wake_fd,
            sleeping: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nbraid-uring".into())
            .spawn(move || run_ring(ring, thread_shared))?;
        Ok(Arc::new(Engine { shared, thread: Mutex::new(Some(thread)) }))
    }

    fn submit(&self, file: Arc<File>, kind: OpKind) -> oneshot::Receiver<i32> {
        let (done, rx) = oneshot::channel();
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).push(Op { file, kind, done });
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.wake();
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
    pub async fn read(&self, file: Arc<File>, offset: u64, buf: BufRange) -> io::Result<usize> {
        Self::wait(self.submit(file, OpKind::Read { offset, buf })).await
    }

    /// Writes `buf` at `offset`; returns the bytes written (may be short).
    pub async fn write(&self, file: Arc<File>, offset: u64, buf: BufRange) -> io::Result<usize> {
        Self::wait(self.submit(file, OpKind::Write { offset, buf })).await
    }

    /// fsync (or fdatasync) through the ring.
    pub async fn fsync(&self, file: Arc<File>, datasync: bool) -> io::Result<()> {
        Self::wait(self.submit(file, OpKind::Fsync { datasync })).await.map(|_| ())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
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

fn run_ring(mut ring: IoUring, shared: Arc<Shared>) {
    let mut inflight = InFlight { slots: Vec::new(), free: Vec::new(), count: 0 };
    let mut backlog: Vec<Op> = Vec::new();
    let mut wake_buf = Box::new(0u64);
    let wake_fd = shared.wake_fd.as_raw_fd();
    let mut wake_armed = false;
    loop {
        if !wake_armed {
            wake_armed = push_wake_read(&mut ring, wake_fd, &mut wake_buf);
        }
        // Move queued operations into the submission queue, as many as the in-flight bound allows.
        if backlog.is_empty() {
            std::mem::swap(&mut backlog, &mut *shared.queue.lock().unwrap_or_else(|p| p.into_inner()));
            backlog.reverse(); // popped from the back below, so keep submission order
        }
        while inflight.count < MAX_IN_FLIGHT {
            let Some(op) = backlog.pop() else { break };
            let slot = inflight.insert(op);
            let entry = inflight.slots[slot].as_ref().map(|op| op.entry(slot as u64));
            let Some(entry) = entry else { break };
            // SAFETY: the op (and so its buffer and file) lives in `inflight` until its completion.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                if let Err(e) = ring.submit() {
                    tracing::error!("io_uring submit failed: {e}");
                }
            }
        }

        let stopping = shared.stopping.load(Ordering::SeqCst);
        let idle = backlog.is_empty() && shared.queue.lock().map(|q| q.is_empty()).unwrap_or(true);
        if stopping && idle && inflight.count == 0 {
            return;
        }
        let submitted = if idle {
            // Announce sleep, then re-check the queue so a submitter cannot slip in unnoticed.
            shared.sleeping.store(true, Ordering::SeqCst);
            let still_idle = shared.queue.lock().map(|q| q.is_empty()).unwrap_or(true);
            let r = if still_idle && !stopping { ring.submit_and_wait(1) } else { ring.submit() };
            shared.sleeping.store(false, Ordering::SeqCst);
            r
        } else if inflight.count >= MAX_IN_FLIGHT {
            ring.submit_and_wait(1)
        } else {
            ring.submit()
        };
        if let Err(e) = submitted {
            if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                tracing::error!("io_uring_enter failed: {e}");
            }
        }

        for cqe in ring.completion() {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            if let Some(Op { file, kind, done }) = inflight.remove(token as usize) {
                // Release the buffer before waking the waiter, so it can reclaim sole ownership.
                drop(kind);
                drop(file);
                let _ = done.send(cqe.result());
            }
        }
    }
}

/// Keeps one read of the wake eventfd armed in the ring; returns whether it was queued.
fn push_wake_read(ring: &mut IoUring, fd: RawFd, buf: &mut Box<u64>) -> bool {
    let entry = opcode::Read::new(types::Fd(fd), (&mut **buf) as *mut u64 as *mut u8, 8)
        .build()
        .user_data(WAKE_TOKEN);
    // SAFETY: the boxed counter outlives the ring thread's loop, which owns it.
    unsafe { ring.submission().push(&entry) }.is_ok()
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
        let file = Arc::new(tmp);
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
    async fn errors_are_reported() {
        let engine = Engine::new().unwrap();
        let file = Arc::new(File::open("/dev/null").unwrap()); // read-only: a write must fail
        let buf = Arc::new(AlignedBuf::zeroed(4096));
        let err = engine.write(file, 0, BufRange::whole(buf)).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
