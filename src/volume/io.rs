//! The data path: reads, writes, zeroing and flushes, split by stripe.
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
//!   whichever reads fewer member blocks.

use super::{Volume, VolumeError};
use crate::buf::{AlignedBuf, ALIGN};
use crate::layout::{Level, Piece, StripeExtent};
use crate::member::Member;
use crate::uring::BufRange;
use futures::future::join_all;
use std::future::Future;
use std::sync::Arc;

const BLOCK: u64 = ALIGN as u64;

/// Zeroing writes are issued in pieces of at most this many bytes, to bound memory.
const ZERO_WRITE_MAX: u64 = 8 << 20;

/// Waits for every operation (none may be left running: they hold stripe locks and buffers),
/// then reports the first error.
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

impl Volume {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(VolumeError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Byte position of `chunk_offset` within `stripe`'s chunk on any member.
    fn member_pos(&self, stripe: u64, chunk_offset: u64) -> u64 {
        self.data_offset + self.geometry.member_offset(stripe) + chunk_offset
    }

    fn shard_member(&self, stripe: u64, shard: u32) -> &Member {
        &self.members[self.geometry.shard_member(stripe, shard) as usize]
    }

    pub(super) async fn read_into(&self, member: &Member, pos: u64, buf: &Arc<AlignedBuf>, off: u64, len: u64) -> Result<(), VolumeError> {
        Ok(member.read_at(pos, BufRange::new(buf.clone(), off as usize, len as usize)).await?)
    }

    async fn write_from(&self, member: &Member, pos: u64, buf: &Arc<AlignedBuf>, off: u64, len: u64) -> Result<(), VolumeError> {
        Ok(member.write_at(pos, BufRange::new(buf.clone(), off as usize, len as usize)).await?)
    }

    /// Reads `len` bytes at `offset` (any alignment).
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, VolumeError> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(AlignedBuf::zeroed(0));
        }
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len as u64).div_ceil(BLOCK) * BLOCK;
        let buf = self.read_aligned(start, end - start).await?;
        if start == offset && end - start == len as u64 {
            return Ok(buf);
        }
        Ok(AlignedBuf::from_slice(&buf[(offset - start) as usize..][..len]))
    }

    async fn read_aligned(&self, start: u64, len: u64) -> Result<AlignedBuf, VolumeError> {
        let buf = Arc::new(AlignedBuf::zeroed(len as usize));
        let mut ops = Vec::new();
        for ext in self.geometry.map(start, len) {
            for p in &ext.pieces {
                let member = match self.geometry.level {
                    // Spread mirror reads by stripe, so a long read uses every copy.
                    Level::Raid1 => &self.members[(ext.stripe % self.members.len() as u64) as usize],
                    _ => self.shard_member(ext.stripe, p.shard),
                };
                ops.push(self.read_into(member, self.member_pos(ext.stripe, p.chunk_offset), &buf, p.buf_offset, p.len));
            }
        }
        all(ops).await?;
        reclaim(buf)
    }

    /// Writes `data` at `offset` (any alignment); with `fua`, durable on every member before returning.
    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len > 0 {
            let start = offset / BLOCK * BLOCK;
            let end = (offset + len).div_ceil(BLOCK) * BLOCK;
            let sdb = self.geometry.stripe_data_bytes();
            let _guards = self.locks.lock_all(start / sdb..=(end - 1) / sdb).await;
            let buf = if start == offset && end == offset + len {
                data
            } else {
                self.widen_to_blocks(start, end, offset, &data).await?
            };
            self.write_locked(start, &Arc::new(buf)).await?;
        }
        if fua {
            self.flush().await?;
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
            buf[..ALIGN].copy_from_slice(&self.read_aligned(start, BLOCK).await?);
        }
        let tail_block = end - BLOCK;
        // The tail block was already read if it is the head block.
        if data_end != end && !(head_partial && tail_block == start) {
            let tail = self.read_aligned(tail_block, BLOCK).await?;
            let at = buf.len() - ALIGN;
            buf[at..].copy_from_slice(&tail);
        }
        buf[(offset - start) as usize..][..data.len()].copy_from_slice(data);
        Ok(buf)
    }

    /// Writes an aligned buffer at aligned `start`; caller holds the stripe locks.
    async fn write_locked(&self, start: u64, buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        let extents = self.geometry.map(start, buf.len() as u64);
        all(extents.iter().map(|ext| self.write_stripe(ext, buf))).await
    }

    async fn write_stripe(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        let s = ext.stripe;
        match self.geometry.level {
            Level::Raid0 => {
                all(ext.pieces.iter().map(|p| {
                    self.write_from(self.shard_member(s, p.shard), self.member_pos(s, p.chunk_offset), buf, p.buf_offset, p.len)
                }))
                .await
            }
            Level::Raid1 => {
                let mut ops = Vec::new();
                for p in &ext.pieces {
                    for m in &self.members {
                        ops.push(self.write_from(m, self.member_pos(s, p.chunk_offset), buf, p.buf_offset, p.len));
                    }
                }
                all(ops).await
            }
            Level::Raid5 | Level::Ec => {
                if ext.is_full_stripe(&self.geometry) {
                    self.write_full_stripe(ext, buf).await
                } else {
                    self.write_partial_stripe(ext, buf).await
                }
            }
        }
    }

    /// Encodes parity from the new data alone; writes all k + m chunks.
    async fn write_full_stripe(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        let (s, chunk) = (ext.stripe, self.geometry.chunk);
        let k = self.geometry.data_shards;
        let parity = self.encode_parity(
            ext.pieces.iter().map(|p| &buf[p.buf_offset as usize..][..chunk as usize]).collect(),
            chunk as usize,
        )?;
        let pos = self.member_pos(s, 0);
        let data_writes = ext.pieces.iter().map(|p| self.write_from(self.shard_member(s, p.shard), pos, buf, p.buf_offset, chunk));
        let parity_writes = (0..self.geometry.parity_shards)
            .map(|j| self.write_from(self.shard_member(s, k + j), pos, &parity, j as u64 * chunk, chunk));
        all(data_writes.chain(parity_writes).collect::<Vec<_>>()).await
    }

    /// Computes the m parity slabs of `slab` bytes from k data slabs.
    fn encode_parity(&self, data: Vec<&[u8]>, slab: usize) -> Result<Arc<AlignedBuf>, VolumeError> {
        let mut parity = AlignedBuf::zeroed(self.geometry.parity_shards as usize * slab);
        let mut slabs: Vec<&mut [u8]> = parity.chunks_mut(slab).collect();
        self.codec.encode(&data, &mut slabs).map_err(|e| VolumeError::Codec(e.to_string()))?;
        Ok(Arc::new(parity))
    }

    /// A write covering part of a stripe. Only the byte range [lo, hi) of the chunks, the union of
    /// the pieces' in-chunk ranges, can change, so parity is read and written for that slab only.
    async fn write_partial_stripe(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>) -> Result<(), VolumeError> {
        let lo = ext.pieces.iter().map(|p| p.chunk_offset).min().unwrap_or(0);
        let hi = ext.pieces.iter().map(|p| p.chunk_offset + p.len).max().unwrap_or(0);
        let slab = hi - lo;
        let k = self.geometry.data_shards as usize;
        let m = self.geometry.parity_shards as usize;
        let touched = ext.pieces.len();
        let partially_covered = ext.pieces.iter().filter(|p| p.chunk_offset != lo || p.len != slab).count();
        let rmw_reads = touched + m;
        let rcw_reads = (k - touched) + partially_covered;
        let parity = if rcw_reads < rmw_reads {
            self.reconstruct_write_parity(ext, buf, lo, slab).await?
        } else {
            self.read_modify_write_parity(ext, buf, lo, slab).await?
        };
        let s = ext.stripe;
        let data_writes = ext
            .pieces
            .iter()
            .map(|p| self.write_from(self.shard_member(s, p.shard), self.member_pos(s, p.chunk_offset), buf, p.buf_offset, p.len));
        let parity_writes = (0..m as u32).map(|j| {
            let member = self.shard_member(s, self.geometry.data_shards + j);
            self.write_from(member, self.member_pos(s, lo), &parity, j as u64 * slab, slab)
        });
        all(data_writes.chain(parity_writes).collect::<Vec<_>>()).await
    }

    /// Reads the slab of every data shard the write does not fully cover, overlays the new data,
    /// and encodes parity from scratch.
    async fn reconstruct_write_parity(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>, lo: u64, slab: u64) -> Result<Arc<AlignedBuf>, VolumeError> {
        let s = ext.stripe;
        let k = self.geometry.data_shards;
        let piece_of = |shard: u32| ext.pieces.iter().find(|p| p.shard == shard);
        let stripe = Arc::new(AlignedBuf::zeroed((k as u64 * slab) as usize));
        let reads = (0..k).filter(|&i| piece_of(i).is_none_or(|p| p.chunk_offset != lo || p.len != slab)).map(|i| {
            self.read_into(self.shard_member(s, i), self.member_pos(s, lo), &stripe, i as u64 * slab, slab)
        });
        all(reads.collect::<Vec<_>>()).await?;
        let mut stripe = reclaim(stripe)?;
        for p in &ext.pieces {
            let at = (p.shard as u64 * slab + p.chunk_offset - lo) as usize;
            stripe[at..][..p.len as usize].copy_from_slice(&buf[p.buf_offset as usize..][..p.len as usize]);
        }
        self.encode_parity(stripe.chunks(slab as usize).collect(), slab as usize)
    }

    /// Reads the old bytes under each piece and the parity slab, then folds the difference
    /// between old and new data into the parity.
    async fn read_modify_write_parity(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>, lo: u64, slab: u64) -> Result<Arc<AlignedBuf>, VolumeError> {
        let s = ext.stripe;
        let k = self.geometry.data_shards;
        let m = self.geometry.parity_shards as u64;
        // Old data of every piece, back to back, at the pieces' own offsets within the request.
        let first = ext.pieces.first().map(|p| p.buf_offset).unwrap_or(0);
        let total: u64 = ext.pieces.iter().map(|p| p.len).sum();
        let old = Arc::new(AlignedBuf::zeroed(total as usize));
        let parity = Arc::new(AlignedBuf::zeroed((m * slab) as usize));
        let old_reads = ext.pieces.iter().map(|p: &Piece| {
            self.read_into(self.shard_member(s, p.shard), self.member_pos(s, p.chunk_offset), &old, p.buf_offset - first, p.len)
        });
        let parity_reads =
            (0..m).map(|j| self.read_into(self.shard_member(s, k + j as u32), self.member_pos(s, lo), &parity, j * slab, slab));
        all(old_reads.chain(parity_reads).collect::<Vec<_>>()).await?;
        let (mut old, mut parity) = (reclaim(old)?, reclaim(parity)?);
        for p in &ext.pieces {
            let delta = &mut old[(p.buf_offset - first) as usize..][..p.len as usize];
            crate::codec::xor_into(delta, &buf[p.buf_offset as usize..][..p.len as usize]);
            let at = (p.chunk_offset - lo) as usize;
            let mut slabs: Vec<&mut [u8]> = parity.chunks_mut(slab as usize).map(|c| &mut c[at..][..p.len as usize]).collect();
            self.codec.update_parity(p.shard as usize, delta, &mut slabs).map_err(|e| VolumeError::Codec(e.to_string()))?;
        }
        Ok(Arc::new(parity))
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

    /// Makes every completed write durable on every member.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        all(self.members.iter().map(|m| async move { Ok(m.sync().await?) })).await
    }
}
