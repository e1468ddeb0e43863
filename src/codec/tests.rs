use super::*;
use proptest::prelude::*;
use std::time::Instant;

fn codec(level: Level, k: u32, m: u32) -> Codec {
    let (members, ec) = match level {
        Level::Raid0 => (k, None),
        Level::Raid1 => (m + 1, None),
        Level::Raid5 => (k + 1, None),
        Level::Ec => (k + m, Some((k, m))),
    };
    let g = Geometry::new(level, members, ec, 4096, 4096).unwrap();
    let c = Codec::for_geometry(&g).unwrap();
    assert_eq!(c.data_shards(), g.data_shards as usize);
    assert_eq!(c.parity_shards(), g.parity_shards as usize);
    c
}

/// Redundant codecs with random shape: RS k 2..8, m 1..4, plus XOR and mirrors.
fn any_redundant_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![
        3 => (2u32..8, 1u32..4).prop_map(|(k, m)| codec(Level::Ec, k, m)),
        1 => (2u32..8).prop_map(|k| codec(Level::Raid5, k, 1)),
        1 => (1u32..4).prop_map(|m| codec(Level::Raid1, 1, m)),
    ]
}

/// A codec, random data shards of one random length, and their parity.
fn encoded() -> impl Strategy<Value = (Codec, Vec<Vec<u8>>)> {
    (any_redundant_codec(), 1usize..1500).prop_flat_map(|(c, len)| {
        let k = c.data_shards();
        (Just(c), proptest::collection::vec(proptest::collection::vec(any::<u8>(), len), k)).prop_map(|(c, data)| {
            let shards = encode_all(&c, data);
            (c, shards)
        })
    })
}

fn encode_all(c: &Codec, mut data: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let len = data[0].len();
    let mut parity = vec![vec![0u8; len]; c.parity_shards()];
    {
        let d: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
        let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[..]).collect();
        c.encode(&d, &mut p).unwrap();
    }
    data.extend(parity);
    data
}

/// `count` distinct indices below `n`, chosen by a seeded partial Fisher-Yates shuffle.
fn pick_distinct(n: usize, count: usize, mut seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..count {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = i + (seed >> 33) as usize % (n - i);
        idx.swap(i, j);
    }
    idx.truncate(count);
    idx
}

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|s| &s[..]).collect()
}

fn muts(v: &mut [Vec<u8>]) -> Vec<&mut [u8]> {
    v.iter_mut().map(|s| &mut s[..]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn reconstruct_restores_any_m_losses(
        (c, shards) in encoded(),
        pick in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let n = c.total_shards();
        let count = pick.index(c.parity_shards() + 1);
        let lost = pick_distinct(n, count, seed);
        prop_assert!(c.verify(&refs(&shards)).unwrap());
        let mut work = shards.clone();
        let mut present = vec![true; n];
        for &i in &lost {
            present[i] = false;
            work[i].iter_mut().for_each(|b| *b = b.wrapping_mul(7).wrapping_add(0x5a));
        }
        c.reconstruct(&mut muts(&mut work), &present).unwrap();
        prop_assert_eq!(work, shards);
    }

    #[test]
    fn too_many_losses_fail_without_touching(
        (c, shards) in encoded(),
        seed in any::<u64>(),
    ) {
        let n = c.total_shards();
        let m = c.parity_shards();
        let lost = pick_distinct(n, m + 1, seed);
        let mut present = vec![true; n];
        for &i in &lost {
            present[i] = false;
        }
        let mut work = shards.clone();
        let err = c.reconstruct(&mut muts(&mut work), &present).unwrap_err();
        prop_assert_eq!(err, CodecError::TooManyMissing { missing: m + 1, parity: m });
        prop_assert_eq!(work, shards);
    }

    #[test]
    fn update_parity_matches_fresh_encode(
        (c, shards) in encoded(),
        changes in proptest::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(),
             any::<prop::sample::Index>(), any::<u64>()), 1..6),
    ) {
        let k = c.data_shards();
        let len = shards[0].len();
        let mut work = shards.clone();
        for (shard, start, span, seed) in changes {
            let shard = shard.index(k);
            let start = start.index(len);
            let end = start + 1 + span.index(len - start);
            let mut delta = vec![0u8; end - start];
            for (i, d) in delta.iter_mut().enumerate() {
                let new = (seed.wrapping_mul(i as u64 + 1) >> 13) as u8;
                *d = work[shard][start + i] ^ new;
                work[shard][start + i] = new;
            }
            // Parity of a sub-range depends only on that sub-range: update just it.
            let (_, parity) = work.split_at_mut(k);
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(|v| &mut v[start..end]).collect();
            c.update_parity(shard, &delta, &mut p).unwrap();
        }
        let fresh = encode_all(&c, work[..k].to_vec());
        prop_assert_eq!(work, fresh);
    }

    #[test]
    fn verify_catches_any_flipped_byte(
        (c, shards) in encoded(),
        which in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let mut bad = shards.clone();
        let s = which.index(bad.len());
        let i = at.index(bad[s].len());
        bad[s][i] ^= mask;
        prop_assert!(!c.verify(&refs(&bad)).unwrap());
    }

    #[test]
    fn xor_into_matches_naive(
        a in proptest::collection::vec(any::<u8>(), 0..600),
        seed in any::<u64>(),
        skew in 0usize..64,
    ) {
        // Offsets into a larger buffer make the slices misaligned, like sub-chunk ranges.
        let skew = skew.min(a.len());
        let a = &a[skew..];
        let b: Vec<u8> = (0..a.len() as u64).map(|i| (seed.rotate_left(i as u32 % 64) ^ i) as u8).collect();
        let mut got = a.to_vec();
        xor_into(&mut got, &b);
        let want: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
        prop_assert_eq!(&got, &want);
        xor_kernel(&mut got, &b);
        prop_assert_eq!(&got[..], a);
    }
}

#[test]
fn raid0_has_nothing_to_do() {
    let c = codec(Level::Raid0, 3, 0);
    let data = [vec![1u8; 10], vec![2; 10], vec![3; 10]];
    c.encode(&refs(&data), &mut []).unwrap();
    c.update_parity(2, &[9; 10], &mut []).unwrap();
    assert!(c.verify(&refs(&data)).unwrap());
    let mut work = data.to_vec();
    c.reconstruct(&mut muts(&mut work), &[true; 3]).unwrap();
    assert_eq!(c.reconstruct(&mut muts(&mut work), &[true, false, true]), Err(CodecError::TooManyMissing { missing: 1, parity: 0 }));
}

#[test]
fn empty_ranges_are_fine() {
    for c in [codec(Level::Ec, 4, 2), codec(Level::Raid5, 3, 1), codec(Level::Raid1, 1, 2)] {
        let mut shards = vec![Vec::new(); c.total_shards()];
        let k = c.data_shards();
        let (d, p) = shards.split_at_mut(k);
        c.encode(&refs(d), &mut muts(p)).unwrap();
        c.update_parity(0, &[], &mut muts(p)).unwrap();
        assert!(c.verify(&refs(&shards)).unwrap());
        let mut present = vec![true; c.total_shards()];
        present[0] = false;
        c.reconstruct(&mut muts(&mut shards), &present).unwrap();
    }
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let c = codec(Level::Ec, 4, 2);
    let d = vec![vec![0u8; 8]; 4];
    let mut p = vec![vec![0u8; 8]; 2];
    let e = c.encode(&refs(&d[..3]), &mut muts(&mut p)).unwrap_err();
    assert_eq!(e.to_string(), "expected 4 data shards, got 3");
    let e = c.encode(&refs(&d), &mut muts(&mut p[..1])).unwrap_err();
    assert_eq!(e.to_string(), "expected 2 parity shards, got 1");
    let mut short = vec![vec![0u8; 8], vec![0u8; 7]];
    let e = c.encode(&refs(&d), &mut muts(&mut short)).unwrap_err();
    assert_eq!(e, CodecError::LengthMismatch { index: 5, expected: 8, got: 7 });
    let e = c.update_parity(4, &[0; 8], &mut muts(&mut p)).unwrap_err();
    assert_eq!(e.to_string(), "data shard index 4 out of range: the codec has 4 data shards");
    let e = c.update_parity(0, &[0; 9], &mut muts(&mut p)).unwrap_err();
    assert!(matches!(e, CodecError::LengthMismatch { .. }));
    let mut all = vec![vec![0u8; 8]; 6];
    let e = c.reconstruct(&mut muts(&mut all), &[true; 5]).unwrap_err();
    assert_eq!(e.to_string(), "expected 6 present flags, got 5");
    assert!(c.verify(&refs(&all[..5])).is_err());
    let mirror = codec(Level::Raid1, 1, 1);
    assert!(mirror.update_parity(1, &[0; 8], &mut muts(&mut p[..1])).is_err());
}

#[test]
fn wide_stripes_use_the_heap_fallback() {
    // 30+4 exceeds INLINE_SHARDS, exercising the Vec paths of reconstruct and verify.
    let c = codec(Level::Ec, 30, 4);
    let data: Vec<Vec<u8>> = (0..30).map(|i| (0..777).map(|j| (i * 31 + j) as u8).collect()).collect();
    let shards = encode_all(&c, data);
    assert!(c.verify(&refs(&shards)).unwrap());
    let mut bad = shards.clone();
    bad[33][5] ^= 1;
    assert!(!c.verify(&refs(&bad)).unwrap());
    let mut work = shards.clone();
    let mut present = vec![true; 34];
    for i in [0, 7, 29, 31] {
        present[i] = false;
        work[i].fill(0xee);
    }
    c.reconstruct(&mut muts(&mut work), &present).unwrap();
    assert_eq!(work, shards);
}

#[test]
fn verify_spans_many_scratch_segments() {
    // Longer than VERIFY_SCRATCH so a flip in the last segment must still be found.
    for c in [codec(Level::Ec, 3, 3), codec(Level::Raid5, 4, 1)] {
        let len = VERIFY_SCRATCH * 2 + 100;
        let data: Vec<Vec<u8>> = (0..c.data_shards()).map(|i| vec![i as u8 + 1; len]).collect();
        let mut shards = encode_all(&c, data);
        assert!(c.verify(&refs(&shards)).unwrap());
        let last = shards.len() - 1;
        shards[last][len - 1] ^= 0x80;
        assert!(!c.verify(&refs(&shards)).unwrap());
    }
}

#[test]
fn rs_coefficients_are_nonzero() {
    // An MDS code has no zero in its parity matrix; a zero would mean extraction went wrong.
    let c = codec(Level::Ec, 4, 2);
    let Codec::ReedSolomon(rs) = &c else { panic!("not RS") };
    for j in 0..2 {
        for i in 0..4 {
            assert_ne!(rs.coefficient(j, i), 0);
        }
    }
}

#[test]
fn codec_is_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Codec>();
    assert_send_sync::<std::sync::Arc<Codec>>();
}

#[test]
fn crc32c_known_answer() {
    // RFC 3720 B.4 test vector: 32 bytes of zeros.
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), crc32c(b"123456789"));
}

/// The alternative RMW the brief mentions: encode a zero stripe with `delta` at `shard`
/// into scratch parity, then XOR that into the real parity.
fn update_parity_by_zero_encode(c: &Codec, shard: usize, delta: &[u8], parity: &mut [&mut [u8]]) {
    let k = c.data_shards();
    let zeros = vec![0u8; delta.len()];
    let mut scratch = vec![vec![0u8; delta.len()]; c.parity_shards()];
    let data: Vec<&[u8]> = (0..k).map(|i| if i == shard { delta } else { &zeros[..] }).collect();
    c.encode(&data, &mut muts(&mut scratch)).unwrap();
    for (p, s) in parity.iter_mut().zip(&scratch) {
        xor_into(p, s);
    }
}

#[test]
fn rmw_strategies_agree() {
    let c = codec(Level::Ec, 5, 3);
    let delta: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut a = vec![vec![0x11u8; 1000]; 3];
    let mut b = a.clone();
    c.update_parity(3, &delta, &mut muts(&mut a)).unwrap();
    update_parity_by_zero_encode(&c, 3, &delta, &mut muts(&mut b));
    assert_eq!(a, b);
}

/// Prints throughput; run with
/// `cargo test --release --lib codec_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn codec_throughput() {
    const SHARD: usize = 64 * 1024;
    // Enough passes for ~0.3 s per line on a slow core; GB/s counts data bytes in.
    const ITERS: usize = 1000;
    fn report(what: &str, bytes_per_iter: usize, iters: usize, f: &mut dyn FnMut()) {
        f();
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        let s = t.elapsed().as_secs_f64();
        println!("{what:<44} {:>7.2} GB/s", (bytes_per_iter * iters) as f64 / s / 1e9);
    }
    let data: Vec<Vec<u8>> = (0..4).map(|i| (0..SHARD).map(|j| (i * 131 + j * 7) as u8).collect()).collect();
    let d = refs(&data);
    let mut p1 = vec![vec![0u8; SHARD]; 1];
    let mut p2 = vec![vec![0u8; SHARD]; 2];

    let mut dst = vec![0u8; SHARD];
    report("xor_into (dst ^= src), 64 KiB", SHARD, ITERS * 4, &mut || xor_into(&mut dst, &data[0]));
    report("xor_kernel without AVX2 dispatch, 64 KiB", SHARD, ITERS * 4, &mut || xor_kernel(&mut dst, &data[0]));
    let xor = codec(Level::Raid5, 4, 1);
    report("XOR 4+1 encode, 64 KiB shards", 4 * SHARD, ITERS, &mut || xor.encode(&d, &mut muts(&mut p1)).unwrap());
    let rs = codec(Level::Ec, 4, 2);
    report("RS 4+2 encode, 64 KiB shards", 4 * SHARD, ITERS, &mut || rs.encode(&d, &mut muts(&mut p2)).unwrap());
    rs.encode(&d, &mut muts(&mut p2)).unwrap();
    let all: Vec<Vec<u8>> = data.iter().chain(&p2).cloned().collect();
    report("RS 4+2 verify, 64 KiB shards", 4 * SHARD, ITERS, &mut || assert!(rs.verify(&refs(&all)).unwrap()));
    let mut work = all.clone();
    let present = [false, true, true, false, true, true];
    report("RS 4+2 reconstruct 2 lost, 64 KiB shards", 2 * SHARD, ITERS, &mut || rs.reconstruct(&mut muts(&mut work), &present).unwrap());
    // RMW of one data shard: delta bytes processed per second.
    report("RS 4+2 update_parity (coefficient), 64 KiB", SHARD, ITERS, &mut || rs.update_parity(1, &data[3], &mut muts(&mut p2)).unwrap());
    report("RS 4+2 update_parity (zero-stripe encode)", SHARD, ITERS, &mut || update_parity_by_zero_encode(&rs, 1, &data[3], &mut muts(&mut p2)));
    let rs8 = codec(Level::Ec, 8, 3);
    let mut p3 = vec![vec![0u8; SHARD]; 3];
    report("RS 8+3 update_parity (coefficient), 64 KiB", SHARD, ITERS, &mut || rs8.update_parity(1, &data[3], &mut muts(&mut p3)).unwrap());
    report("RS 8+3 update_parity (zero-stripe encode)", SHARD, ITERS / 4, &mut || update_parity_by_zero_encode(&rs8, 1, &data[3], &mut muts(&mut p3)));
    let big = vec![0xa5u8; 1 << 20];
    report("crc32c, 1 MiB", big.len(), ITERS / 4, &mut || {
        std::hint::black_box(crc32c(&big));
    });
    report("crc32c, 4 KiB", 4096, ITERS * 16, &mut || {
        std::hint::black_box(crc32c(&big[..4096]));
    });
}
