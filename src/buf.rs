//! Page-aligned byte buffers.
//!
//! Members may be opened with `O_DIRECT`, which needs the buffer address, the file offset and the
//! length all aligned to the logical block size. Every buffer that can reach a member is therefore
//! allocated here, aligned to [`ALIGN`], so no layer has to wonder whether a copy is needed.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer, and the unit of member I/O (the largest common logical block size).
pub const ALIGN: usize = 4096;

/// An owned, zero-initialised, [`ALIGN`]-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// The buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; capacity is rounded up to a whole number of [`ALIGN`] blocks.
    pub fn zeroed(len: usize) -> Self {
        Self::allocate(len, true)
    }

    /// The one place buffers are allocated; `zeroed: false` only for [`UninitBuf`].
    fn allocate(len: usize, zeroed: bool) -> Self {
        let cap = len.div_ceil(ALIGN).max(1) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows Layout");
        // SAFETY: layout has non-zero size. Unzeroed memory is only ever exposed as MaybeUninit
        // (by UninitBuf) until it has been written.
        let raw = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (a multiple of [`ALIGN`]); `len` may grow up to this without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shrinks the visible length; the allocation is kept.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Changes the visible length within the capacity. Bytes that become visible hold whatever
    /// the buffer held before (zeros, or earlier contents): callers overwrite them.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "set_len {len} beyond capacity {}", self.cap);
        self.len = len;
    }

    /// Raw pointer for handing a region to the kernel. Writing through it while any `&[u8]` to the
    /// same bytes is alive is undefined behaviour; the I/O layer guarantees exclusive regions.
    pub fn as_ptr_mut_shared(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// An [`ALIGN`]-aligned allocation not yet initialised, to be filled completely (by a socket read)
/// and then turned into an [`AlignedBuf`]. Skips the zeroing that a buffer about to be
/// overwritten does not need: for 1 MiB writes it was the largest single cost in `perf` (16 %).
pub struct UninitBuf(AlignedBuf);

impl UninitBuf {
    pub fn new(len: usize) -> Self {
        UninitBuf(AlignedBuf::allocate(len, false))
    }

    pub fn as_uninit_mut(&mut self) -> &mut [std::mem::MaybeUninit<u8>] {
        // SAFETY: valid for len bytes, exclusively borrowed; MaybeUninit needs no initialisation.
        unsafe { std::slice::from_raw_parts_mut(self.0.ptr.as_ptr().cast(), self.0.len) }
    }

    /// # Safety
    /// Every one of the `len` bytes must have been written.
    pub unsafe fn assume_init(self) -> AlignedBuf {
        self.0
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("layout was valid at allocation");
        // SAFETY: allocated in `allocate` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Buffers kept for reuse by a long-running loop (rebuild, scrub), so that it does not map and
/// fault in fresh memory for every batch.
#[derive(Default)]
pub struct BufPool(Vec<AlignedBuf>);

impl BufPool {
    /// A buffer of `len` bytes with unspecified contents.
    pub fn take(&mut self, len: usize) -> AlignedBuf {
        match self.0.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.0.swap_remove(i);
                b.set_len(len);
                b
            }
            None => AlignedBuf::zeroed(len),
        }
    }

    pub fn give(&mut self, buf: AlignedBuf) {
        self.0.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity().is_multiple_of(ALIGN));
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn pool_reuses_allocations() {
        let mut pool = BufPool::default();
        let a = pool.take(8192);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(4096);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 4096));
        assert_eq!(pool.take(4096).len(), 4096); // pool empty: a fresh one
    }

    #[test]
    fn from_slice_copies() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        assert_eq!(&AlignedBuf::from_slice(&data)[..], &data[..]);
    }
}
