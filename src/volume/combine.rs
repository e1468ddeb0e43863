//! Combining concurrent partial-stripe writes of one stripe into one stripe write.
//!
//! Why: a stream of large sequential writes rarely lines up with parity stripes (raid5 ×4 has
//! three data chunks per stripe; 1 MiB is never a multiple of that), so every request begins
//! and ends in a partial stripe that its neighbour completes. Written separately, each half
//! pays a read-modify-write (reads, a partial-parity record, the parity written twice) and the
//! second waits for the first under the stripe lock. Combined, the stripe is written once, and
//! usually in full, with parity from the new data alone.
//!
//! How: a write *offers* each of its partial-stripe parts before doing anything else. Whoever
//! next holds the stripe's lock takes every part on offer for that stripe and writes them as
//! one; each offering write then finds its part's outcome set when it gets the lock in turn.
//! The write whose part makes the offers cover the whole stripe is told so, and writes the
//! stripe at once rather than waiting for its turn (see `Volume::write_combining`).
//! Parts are merged in the order they were offered, a later one winning where two overlap
//! (concurrent overlapping writes have no defined order in NBD either).

use super::VolumeError;
use crate::buf::AlignedBuf;
use crate::layout::{Geometry, Piece, StripeExtent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One write's part of one stripe, waiting for whoever writes the stripe next.
pub(super) struct Offer {
    pub buf: Arc<AlignedBuf>,
    pub pieces: Vec<Piece>,
    outcome: Arc<Outcome>,
}

/// The result of the stripe write that took an offer; set before that writer releases the lock.
#[derive(Default)]
struct Outcome(Mutex<Option<Result<(), String>>>);

/// What an offering write keeps: where to find its part's outcome.
pub(super) struct Ticket {
    pub stripe: u64,
    /// With this part, the parts on offer for the stripe covered all of its data: the stripe
    /// has nothing more to wait for and can be written in full at once.
    pub completes_stripe: bool,
    outcome: Arc<Outcome>,
}

impl Ticket {
    /// The outcome of the write that took this part. Only called with the stripe lock held,
    /// after [`Combiner::take`]: by then some holder of the lock has written the part.
    pub fn outcome(&self) -> Result<(), VolumeError> {
        match &*self.outcome.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Ok(())) => Ok(()),
            Some(Err(msg)) => Err(VolumeError::CombinedWrite(msg.clone())),
            None => Err(VolumeError::Internal("a stripe part on offer was never written")),
        }
    }
}

/// Parts on offer, by stripe.
#[derive(Default)]
pub(super) struct Combiner {
    offers: Mutex<HashMap<u64, Vec<Offer>>>,
}

impl Combiner {
    /// Puts a write's part of a stripe on offer.
    pub fn offer(&self, ext: &StripeExtent, buf: &Arc<AlignedBuf>, g: &Geometry) -> Ticket {
        let outcome = Arc::new(Outcome::default());
        let offer = Offer { buf: buf.clone(), pieces: ext.pieces.clone(), outcome: outcome.clone() };
        let mut offers = self.offers.lock().unwrap_or_else(|p| p.into_inner());
        let on_offer = offers.entry(ext.stripe).or_default();
        on_offer.push(offer);
        let completes_stripe = coverage(on_offer.iter().map(|o| &o.pieces[..]), g).iter().all(|&c| c);
        Ticket { stripe: ext.stripe, completes_stripe, outcome }
    }

    /// Every part on offer for `stripe`, oldest first. Caller holds the stripe lock and must
    /// [`settle`] them.
    pub fn take(&self, stripe: u64) -> Vec<Offer> {
        self.offers.lock().unwrap_or_else(|p| p.into_inner()).remove(&stripe).unwrap_or_default()
    }
}

/// Records the result of writing `offers` for each of their writers.
pub(super) fn settle(offers: &[Offer], result: &Result<(), VolumeError>) {
    let shared = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
    for o in offers {
        *o.outcome.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(shared.clone());
    }
}

const B: u64 = crate::buf::ALIGN as u64;

/// Which blocks of a stripe's data the given parts' pieces write.
fn coverage<'a>(parts: impl Iterator<Item = &'a [Piece]>, g: &Geometry) -> Vec<bool> {
    let mut covered = vec![false; (g.stripe_data_bytes() / B) as usize];
    for pieces in parts {
        for p in pieces {
            covered[(p.stripe_data_offset(g) / B) as usize..][..(p.len / B) as usize].iter_mut().for_each(|c| *c = true);
        }
    }
    covered
}

/// Merges parts of one stripe into one buffer and the extent that describes it, as the layout
/// maps a request over the range they cover: they must cover one contiguous range of the
/// stripe's data. `None` when the parts leave a gap: those are written one by one.
pub(super) fn merge(parts: &[(&[u8], &[Piece])], g: &Geometry, stripe: u64) -> Option<(AlignedBuf, StripeExtent)> {
    let covered = coverage(parts.iter().map(|(_, pieces)| *pieces), g);
    let first = covered.iter().position(|&c| c)? as u64;
    let blocks = covered[first as usize..].iter().take_while(|&&c| c).count() as u64;
    if covered[(first + blocks) as usize..].iter().any(|&c| c) {
        return None;
    }
    let start = first * B;
    let at = |p: &Piece| p.stripe_data_offset(g);
    let mut out = AlignedBuf::zeroed((blocks * B) as usize);
    for (buf, pieces) in parts {
        for p in *pieces {
            let to = (at(p) - start) as usize;
            out[to..to + p.len as usize].copy_from_slice(&buf[p.buf_offset as usize..][..p.len as usize]);
        }
    }
    let mut extents = g.map(stripe * g.stripe_data_bytes() + start, blocks * B);
    let ext = extents.pop().filter(|_| extents.is_empty())?;
    Some((out, ext))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::layout::Level;

    const CHUNK: u64 = 16 * 1024;
    const K: u32 = 3;
    const STRIPE: u64 = 5;

    /// raid5 with K data shards of CHUNK bytes.
    fn geometry() -> Geometry {
        Geometry::new(Level::Raid5, K + 1, None, CHUNK, 64 * CHUNK).unwrap()
    }

    fn piece(shard: u32, chunk_offset: u64, len: u64, buf_offset: u64) -> Piece {
        Piece { shard, chunk_offset, len, buf_offset }
    }

    #[test]
    fn a_tail_and_the_next_head_make_a_full_stripe() {
        // Request A ends with shard 0 and the first 8 KiB of shard 1; request B begins there.
        let a: Vec<u8> = vec![0xaa; (CHUNK + 8192) as usize];
        let b: Vec<u8> = vec![0xbb; (CHUNK - 8192 + CHUNK) as usize];
        let pa = [piece(0, 0, CHUNK, 0), piece(1, 0, 8192, CHUNK)];
        let pb = [piece(1, 8192, CHUNK - 8192, 0), piece(2, 0, CHUNK, CHUNK - 8192)];
        let (buf, ext) = merge(&[(&a, &pa), (&b, &pb)], &geometry(), STRIPE).unwrap();
        assert_eq!(ext.stripe, STRIPE);
        let pieces = ext.pieces;
        assert_eq!(pieces, vec![piece(0, 0, CHUNK, 0), piece(1, 0, CHUNK, CHUNK), piece(2, 0, CHUNK, 2 * CHUNK)]);
        assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), K as u64 * CHUNK, "a full stripe");
        let c = CHUNK as usize;
        assert!(buf[..c + 8192].iter().all(|&x| x == 0xaa));
        assert!(buf[c + 8192..].iter().all(|&x| x == 0xbb));
    }

    #[test]
    fn the_part_that_completes_a_stripe_on_offer_is_told_so() {
        let g = geometry();
        let c = Combiner::default();
        let buf = Arc::new(AlignedBuf::zeroed((2 * CHUNK) as usize));
        let ext = |pieces: Vec<Piece>| StripeExtent { stripe: STRIPE, pieces };
        // The tail of one request, then the next request's head, with a block missing between.
        let full = c.offer(&ext(vec![piece(0, 0, CHUNK, 0), piece(1, 0, 8192, CHUNK)]), &buf, &g).completes_stripe;
        assert!(!full, "a third of the stripe is not all of it");
        let full = c.offer(&ext(vec![piece(1, 12288, CHUNK - 12288, 0), piece(2, 0, CHUNK, CHUNK - 12288)]), &buf, &g).completes_stripe;
        assert!(!full, "block 2 of shard 1 is on offer from nobody");
        let full = c.offer(&ext(vec![piece(1, 8192, 4096, 0)]), &buf, &g).completes_stripe;
        assert!(full, "every block of the stripe is now on offer");
        // Another stripe's offers do not count towards this one.
        let full = c.offer(&StripeExtent { stripe: STRIPE + 1, pieces: vec![piece(0, 0, CHUNK, 0)] }, &buf, &g).completes_stripe;
        assert!(!full);
        assert_eq!(c.take(STRIPE).len(), 3);
    }

    #[test]
    fn parts_with_a_gap_are_not_merged() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        assert!(merge(&[(&a, &[piece(0, 0, 4096, 0)]), (&b, &[piece(0, 8192, 4096, 0)])], &geometry(), STRIPE).is_none());
        assert!(merge(&[(&a, &[piece(0, 0, 4096, 0)]), (&b, &[piece(1, 0, 4096, 0)])], &geometry(), STRIPE).is_none());
    }

    #[test]
    fn parts_meeting_across_a_chunk_boundary_merge_into_a_partial_stripe() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 8192];
        let (buf, ext) = merge(&[(&a, &[piece(0, CHUNK - 4096, 4096, 0)]), (&b, &[piece(1, 0, 8192, 0)])], &geometry(), STRIPE).unwrap();
        assert_eq!(ext.pieces, vec![piece(0, CHUNK - 4096, 4096, 0), piece(1, 0, 8192, 4096)]);
        assert_eq!(buf.len(), 12288);
        assert!(buf[..4096].iter().all(|&x| x == 1) && buf[4096..].iter().all(|&x| x == 2));
    }

    proptest! {
        /// Whatever parts are merged, the result holds, block by block, the last part written
        /// there; its pieces are back to back, in shard order, and cover exactly the blocks the
        /// parts covered, which must be one contiguous range.
        #[test]
        fn merged_bytes_are_the_last_writer_of_each_block(parts in proptest::collection::vec((0..K, 0u64..4, 1u64..=4), 1..5)) {
            let bpc = CHUNK / 4096;
            let mut bufs = Vec::new();
            let mut pieces = Vec::new();
            for (i, &(shard, first, count)) in parts.iter().enumerate() {
                let first = first.min(bpc - 1);
                let count = count.min(bpc - first);
                bufs.push(vec![i as u8 + 1; (count * 4096) as usize]);
                pieces.push([piece(shard, first * 4096, count * 4096, 0)]);
            }
            let input: Vec<(&[u8], &[Piece])> = bufs.iter().zip(&pieces).map(|(b, p)| (&b[..], &p[..])).collect();
            // The expected stripe data, one byte per block: who wrote it last (0: nobody).
            let mut expect = vec![0u8; (K as u64 * bpc) as usize];
            for (i, p) in pieces.iter().enumerate() {
                let at = (p[0].shard as u64 * bpc + p[0].chunk_offset / 4096) as usize;
                expect[at..at + (p[0].len / 4096) as usize].iter_mut().for_each(|e| *e = i as u8 + 1);
            }
            let first = expect.iter().position(|&e| e != 0).unwrap();
            let last = expect.iter().rposition(|&e| e != 0).unwrap();
            let contiguous = expect[first..=last].iter().all(|&e| e != 0);
            match merge(&input, &geometry(), STRIPE) {
                None => prop_assert!(!contiguous),
                Some((buf, ext)) => {
                    prop_assert_eq!(ext.stripe, STRIPE);
                    let merged = ext.pieces;
                    prop_assert!(contiguous);
                    prop_assert_eq!(buf.len(), (last - first + 1) * 4096);
                    let mut next = 0;
                    for p in &merged {
                        prop_assert_eq!(p.buf_offset, next, "pieces back to back");
                        next += p.len;
                        for b in 0..p.len / 4096 {
                            let block = (p.shard as u64 * bpc + p.chunk_offset / 4096 + b) as usize;
                            let bytes = &buf[(p.buf_offset + b * 4096) as usize..][..4096];
                            prop_assert!(bytes.iter().all(|&x| x == expect[block]), "block {}", block);
                        }
                    }
                    prop_assert_eq!(next, buf.len() as u64);
                }
            }
        }
    }
}
