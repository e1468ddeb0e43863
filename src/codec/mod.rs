//! Pure parity math and checksums: XOR (raid5), copies (raid1), Reed-Solomon over GF(2^8) (ec).
//!
//! Shards are passed as borrowed slices of equal length; any length works (the volume layer
//! encodes sub-ranges of a stripe on partial writes). Nothing here allocates per call on the
//! paths the volume layer runs for every write or degraded read, as long as a stripe has at
//! most [`INLINE_SHARDS`] shards; wider stripes fall back to one small `Vec` of slice refs.

#[cfg(test)]
mod tests;

use crate::layout::{Geometry, Level};
use reed_solomon_erasure::galois_8;
use std::fmt;

/// Stripes up to this many shards (k+m) keep their slice-ref tables on the stack.
pub const INLINE_SHARDS: usize = 32;

/// Bytes of scratch the stack-only verify uses; small enough for any thread's stack.
const VERIFY_SCRATCH: usize = 16 * 1024;

/// Parity arithmetic for one geometry. `Send + Sync`; share it behind an `Arc`.
#[derive(Clone)]
pub enum Codec {
    /// raid0: no redundancy.
    None { data: usize },
    /// raid1: one data shard, `copies` parity shards that are byte-identical to it.
    Mirror { copies: usize },
    /// raid5: one parity shard, the XOR of `data` data shards.
    Xor { data: usize },
    /// ec: systematic Reed-Solomon from `reed-solomon-erasure` (galois_8).
    ReedSolomon(Box<RsCodec>),
}

/// Reed-Solomon state: the crate's codec plus the parity coefficients, which the crate does
/// not expose but which read-modify-write needs (RS is linear, parity_j ^= coef(j,i)*delta).
#[derive(Clone)]
pub struct RsCodec {
    rs: galois_8::ReedSolomon,
    /// Row-major `m x k`: coef[j*k + i] multiplies data shard i into parity shard j.
    coef: Box<[u8]>,
}

impl RsCodec {
    pub fn new(data: usize, parity: usize) -> Result<RsCodec, CodecError> {
        let rs = galois_8::ReedSolomon::new(data, parity).map_err(CodecError::ReedSolomon)?;
        // Encoding a unit vector yields one column of the parity matrix.
        let mut coef = vec![0u8; data * parity].into_boxed_slice();
        let mut unit = vec![[0u8; 1]; data];
        let mut out = vec![[0u8; 1]; parity];
        for i in 0..data {
            unit[i][0] = 1;
            rs.encode_sep(&unit, &mut out).map_err(CodecError::ReedSolomon)?;
            unit[i][0] = 0;
            for (j, o) in out.iter().enumerate() {
                coef[j * data + i] = o[0];
            }
        }
        Ok(RsCodec { rs, coef })
    }

    /// GF(2^8) coefficient of data shard `data_shard` in parity shard `parity_shard`.
    pub fn coefficient(&self, parity_shard: usize, data_shard: usize) -> u8 {
        self.coef[parity_shard * self.rs.data_shard_count() + data_shard]
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("expected {expected} {what}, got {got}")]
    ShardCount { what: &'static str, expected: usize, got: usize },
    #[error("shard {index} is {got} bytes but shard 0 is {expected}; all shards must be equal length")]
    LengthMismatch { index: usize, expected: usize, got: usize },
    #[error("data shard index {shard} out of range: the codec has {data} data shards")]
    BadShard { shard: usize, data: usize },
    #[error("{missing} shards are missing but only {parity} can be rebuilt")]
    TooManyMissing { missing: usize, parity: usize },
    #[error("{0} has no codec with these shard counts")]
    Unsupported(Level),
    #[error("reed-solomon: {0}")]
    ReedSolomon(reed_solomon_erasure::Error),
}

fn check_count(what: &'static str, expected: usize, got: usize) -> Result<(), CodecError> {
    if expected == got {
        Ok(())
    } else {
        Err(CodecError::ShardCount { what, expected, got })
    }
}

/// Checks that every length equals `first` and returns it. Callers list data then parity, so
/// the index in the error is the caller's shard number.
fn common_len(first: usize, lens: impl IntoIterator<Item = usize>) -> Result<usize, CodecError> {
    for (index, got) in lens.into_iter().enumerate() {
        if got != first {
            return Err(CodecError::LengthMismatch { index, expected: first, got });
        }
    }
    Ok(first)
}

impl Codec {
    pub fn for_geometry(g: &Geometry) -> Result<Codec, CodecError> {
        let (k, m) = (g.data_shards as usize, g.parity_shards as usize);
        match g.level {
            Level::Raid0 if m == 0 && k >= 1 => Ok(Codec::None { data: k }),
            Level::Raid1 if k == 1 && m >= 1 => Ok(Codec::Mirror { copies: m }),
            Level::Raid5 if m == 1 && k >= 1 => Ok(Codec::Xor { data: k }),
            Level::Ec if k >= 1 && m >= 1 => Ok(Codec::ReedSolomon(Box::new(RsCodec::new(k, m)?))),
            level => Err(CodecError::Unsupported(level)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Codec::None { .. } => "none",
            Codec::Mirror { .. } => "mirror",
            Codec::Xor { .. } => "xor",
            Codec::ReedSolomon(_) => "reed-solomon",
        }
    }

    pub fn data_shards(&self) -> usize {
        match self {
            Codec::None { data } | Codec::Xor { data } => *data,
            Codec::Mirror { .. } => 1,
            Codec::ReedSolomon(rs) => rs.rs.data_shard_count(),
        }
    }

    pub fn parity_shards(&self) -> usize {
        match self {
            Codec::None { .. } => 0,
            Codec::Mirror { copies } => *copies,
            Codec::Xor { .. } => 1,
            Codec::ReedSolomon(rs) => rs.rs.parity_shard_count(),
        }
    }

    pub fn total_shards(&self) -> usize {
        self.data_shards() + self.parity_shards()
    }

    /// Computes all parity shards from the data shards; all slices have equal length (any
    /// length, including sub-ranges of a chunk).
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), CodecError> {
        check_count("data shards", self.data_shards(), data.len())?;
        check_count("parity shards", self.parity_shards(), parity.len())?;
        let len = common_len(data[0].len(), data.iter().map(|d| d.len()).chain(parity.iter().map(|p| p.len())))?;
        // The RS crate rejects empty shards; an empty range has trivially correct parity.
        if len == 0 {
            return Ok(());
        }
        match self {
            Codec::None { .. } => {}
            Codec::Mirror { .. } => {
                for p in parity.iter_mut() {
                    p.copy_from_slice(data[0]);
                }
            }
            Codec::Xor { .. } => xor_sum(parity[0], data.iter().copied()),
            Codec::ReedSolomon(rs) => rs.rs.encode_sep(data, parity).map_err(CodecError::ReedSolomon)?,
        }
        Ok(())
    }

    /// Read-modify-write: `delta` = old_data XOR new_data of data shard `shard`; updates every
    /// parity slice in place so it matches the new data. Cost is m passes over `delta`,
    /// independent of k, which is why partial writes prefer it when few shards change.
    pub fn update_parity(&self, shard: usize, delta: &[u8], parity: &mut [&mut [u8]]) -> Result<(), CodecError> {
        let k = self.data_shards();
        if shard >= k {
            return Err(CodecError::BadShard { shard, data: k });
        }
        check_count("parity shards", self.parity_shards(), parity.len())?;
        common_len(delta.len(), parity.iter().map(|p| p.len()))?;
        // The crate's SIMD multiply indexes element 0 unconditionally.
        if delta.is_empty() {
            return Ok(());
        }
        match self {
            Codec::None { .. } => {}
            // A copy equals the data, so it changes by exactly the data's delta.
            Codec::Mirror { .. } | Codec::Xor { .. } => {
                for p in parity.iter_mut() {
                    xor_into(p, delta);
                }
            }
            Codec::ReedSolomon(rs) => {
                for (j, p) in parity.iter_mut().enumerate() {
                    galois_8::mul_slice_xor(rs.coefficient(j, shard), delta, p);
                }
            }
        }
        Ok(())
    }

    /// Rebuilds the missing shards in place: `shards` holds k+m equal-length slices (data then
    /// parity), `present[i]` says which are valid. Fails, touching nothing, if more than m are
    /// missing.
    pub fn reconstruct(&self, shards: &mut [&mut [u8]], present: &[bool]) -> Result<(), CodecError> {
        let n = self.total_shards();
        check_count("shards", n, shards.len())?;
        check_count("present flags", n, present.len())?;
        let len = common_len(shards[0].len(), shards.iter().map(|s| s.len()))?;
        let missing = present.iter().filter(|p| !**p).count();
        if missing > self.parity_shards() {
            return Err(CodecError::TooManyMissing { missing, parity: self.parity_shards() });
        }
        if missing == 0 || len == 0 {
            return Ok(());
        }
        match self {
            // Unreachable: m == 0 so any missing shard was rejected above.
            Codec::None { .. } => {}
            Codec::Mirror { .. } => {
                // At most m = n-1 missing, so some copy survives.
                let src = present.iter().position(|p| *p).unwrap_or(0);
                for dst in (0..n).filter(|&i| !present[i]) {
                    let (s, d) = pair_mut(shards, src, dst);
                    d.copy_from_slice(s);
                }
            }
            Codec::Xor { .. } => {
                // Exactly one missing: it is the XOR of all the others, data or parity alike.
                let lost = present.iter().position(|p| !*p).unwrap_or(0);
                let (before, rest) = shards.split_at_mut(lost);
                let (target, after) = rest.split_at_mut(1);
                xor_sum(target[0], before.iter().chain(after.iter()).map(|s| &s[..]));
            }
            Codec::ReedSolomon(rs) => if n <= INLINE_SHARDS {
                let mut it = shards.iter_mut().zip(present);
                let mut tab: [(&mut [u8], bool); INLINE_SHARDS] = std::array::from_fn(|_| match it.next() {
                    Some((s, &p)) => (&mut **s, p),
                    None => (Default::default(), false),
                });
                rs.rs.reconstruct(&mut tab[..n])
            } else {
                let mut tab: Vec<(&mut [u8], bool)> = shards.iter_mut().zip(present).map(|(s, &p)| (&mut **s, p)).collect();
                rs.rs.reconstruct(&mut tab)
            }
            .map_err(CodecError::ReedSolomon)?,
        }
        Ok(())
    }

    /// True if the parity shards match the data shards (k+m slices, data then parity).
    pub fn verify(&self, shards: &[&[u8]]) -> Result<bool, CodecError> {
        let (k, m) = (self.data_shards(), self.parity_shards());
        check_count("shards", k + m, shards.len())?;
        let len = common_len(shards[0].len(), shards.iter().map(|s| s.len()))?;
        if len == 0 {
            return Ok(true);
        }
        let (data, parity) = shards.split_at(k);
        Ok(match self {
            Codec::None { .. } => true,
            Codec::Mirror { .. } => parity.iter().all(|p| *p == data[0]),
            Codec::Xor { .. } => {
                let mut scratch = [0u8; VERIFY_SCRATCH];
                (0..len).step_by(VERIFY_SCRATCH).all(|off| {
                    let end = (off + VERIFY_SCRATCH).min(len);
                    let buf = &mut scratch[..end - off];
                    xor_sum(buf, data.iter().map(|d| &d[off..end]));
                    *buf == parity[0][off..end]
                })
            }
            Codec::ReedSolomon(rs) if k <= INLINE_SHARDS && m <= INLINE_SHARDS => {
                // Re-encode in slices that fit the stack scratch, compare, stop at the first
                // mismatch; avoids allocating m shard-sized buffers for a scrub pass.
                let mut scratch = [0u8; VERIFY_SCRATCH];
                let seg = (VERIFY_SCRATCH / m) & !63;
                for off in (0..len).step_by(seg) {
                    let end = (off + seg).min(len);
                    let mut d = data.iter();
                    let dtab: [&[u8]; INLINE_SHARDS] = std::array::from_fn(|_| match d.next() {
                        Some(s) => &s[off..end],
                        None => &[],
                    });
                    let mut bufs = scratch.chunks_mut(seg).take(m);
                    let mut ptab: [&mut [u8]; INLINE_SHARDS] = std::array::from_fn(|_| match bufs.next() {
                        Some(b) => &mut b[..end - off],
                        None => Default::default(),
                    });
                    rs.rs.encode_sep(&dtab[..k], &mut ptab[..m]).map_err(CodecError::ReedSolomon)?;
                    if ptab[..m].iter().zip(parity).any(|(want, have)| **want != have[off..end]) {
                        return Ok(false);
                    }
                }
                true
            }
            Codec::ReedSolomon(rs) => rs.rs.verify(shards).map_err(CodecError::ReedSolomon)?,
        })
    }
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Codec::{}({}+{})", self.name(), self.data_shards(), self.parity_shards())
    }
}

/// `(&shards[src], &mut shards[dst])` for `src != dst`.
fn pair_mut<'a>(shards: &'a mut [&mut [u8]], src: usize, dst: usize) -> (&'a [u8], &'a mut [u8]) {
    if src < dst {
        let (a, b) = shards.split_at_mut(dst);
        (&*a[src], &mut *b[0])
    } else {
        let (a, b) = shards.split_at_mut(src);
        (&*b[0], &mut *a[dst])
    }
}

/// `dst = XOR of srcs`, in cache-sized blocks so `dst` stays in L1 while each source streams
/// through once. `srcs` must be non-empty and each as long as `dst`.
fn xor_sum<'a, I>(dst: &mut [u8], srcs: I)
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    const BLOCK: usize = 4096;
    for off in (0..dst.len()).step_by(BLOCK) {
        let end = (off + BLOCK).min(dst.len());
        let d = &mut dst[off..end];
        let mut it = srcs.clone();
        match it.next() {
            Some(first) => d.copy_from_slice(&first[off..end]),
            None => d.fill(0),
        }
        for s in it {
            xor_into(d, &s[off..end]);
        }
    }
}

/// `dst ^= src`.
///
/// # Panics
/// If the lengths differ, like `copy_from_slice`: that is a caller bug, not input.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "xor_into: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { xor_into_avx2(dst, src) };
            return;
        }
    }
    xor_kernel(dst, src);
}

/// The same kernel compiled for AVX2, so release builds without `-C target-cpu` still get
/// 32-byte lanes on machines that have them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_into_avx2(dst: &mut [u8], src: &[u8]) {
    xor_kernel(dst, src)
}

/// Fixed 64-byte blocks of u64 lanes: a shape LLVM reliably turns into full-width vector XORs.
#[inline(always)]
fn xor_kernel(dst: &mut [u8], src: &[u8]) {
    const LANES: usize = 8;
    const BLOCK: usize = LANES * 8;
    let mut d = dst.chunks_exact_mut(BLOCK);
    let mut s = src.chunks_exact(BLOCK);
    for (db, sb) in (&mut d).zip(&mut s) {
        let mut x = [0u64; LANES];
        for (i, lane) in x.iter_mut().enumerate() {
            let a = u64::from_ne_bytes(db[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            let b = u64::from_ne_bytes(sb[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            *lane = a ^ b;
        }
        for (i, lane) in x.iter().enumerate() {
            db[i * 8..i * 8 + 8].copy_from_slice(&lane.to_ne_bytes());
        }
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= b;
    }
}

/// CRC-32C (Castagnoli), hardware-accelerated where the CPU has it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// Continues a CRC-32C over more bytes: `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // The running state of CRC-32C is the finished value with its final inversion undone.
    let mut digest = crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    digest.update(data);
    digest.finalize() as u32
}
