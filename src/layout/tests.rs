use super::*;
use proptest::prelude::*;

/// Small geometries so byte-exhaustive checks stay fast.
fn small_geometry() -> impl Strategy<Value = Geometry> {
    let level = prop_oneof![Just(Level::Raid0), Just(Level::Raid1), Just(Level::Raid5), Just(Level::Ec)];
    (level, 2u32..7, 1u32..4, 1u64..3, 1u64..5, 0u64..4096).prop_filter_map("invalid shape", |(level, n, m, chunk_pages, stripes, slack)| {
        let ec = (level == Level::Ec).then_some((n, m));
        let members = if level == Level::Ec { n + m } else { n };
        let chunk = chunk_pages * 4096;
        Geometry::new(level, members, ec, chunk, stripes * chunk + slack).ok()
    })
}

fn geometry_and_extent() -> impl Strategy<Value = (Geometry, u64, u64)> {
    small_geometry().prop_flat_map(|g| {
        let size = g.volume_size();
        (Just(g), 0..=size).prop_flat_map(move |(g, off)| (Just(g), Just(off), 0..=size - off))
    })
}

/// (member, member offset) of a data byte.
fn place(g: &Geometry, offset: u64) -> (u32, u64) {
    let ext = g.map(offset, 1);
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].pieces.len(), 1);
    let p = ext[0].pieces[0];
    assert_eq!(p.len, 1);
    assert_eq!(p.buf_offset, 0);
    (g.shard_member(ext[0].stripe, p.shard), g.member_offset(ext[0].stripe) + p.chunk_offset)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_byte_has_one_home(g in small_geometry()) {
        let member_bytes = g.stripes * g.chunk;
        let mut seen = vec![false; (g.members as u64 * member_bytes) as usize];
        for off in 0..g.volume_size() {
            let (member, moff) = place(&g, off);
            prop_assert!(member < g.members);
            prop_assert!(moff < member_bytes);
            let slot = &mut seen[(member as u64 * member_bytes + moff) as usize];
            prop_assert!(!*slot, "byte {} collides at member {} offset {}", off, member, moff);
            *slot = true;
            // locate() agrees with map()
            let loc = g.locate(off);
            prop_assert_eq!(g.shard_member(loc.stripe, loc.shard), member);
        }
        // Whatever data does not cover is parity: exactly m chunks per stripe, on parity shards.
        let free = seen.iter().filter(|b| !**b).count() as u64;
        prop_assert_eq!(free, g.parity_shards as u64 * member_bytes);
        for s in 0..g.stripes {
            for shard in g.data_shards..g.shards() {
                let m = g.shard_member(s, shard) as u64;
                let base = (m * member_bytes + g.member_offset(s)) as usize;
                prop_assert!(seen[base..base + g.chunk as usize].iter().all(|b| !*b));
            }
        }
    }

    #[test]
    fn map_tiles_the_extent((g, off, len) in geometry_and_extent()) {
        let ext = g.map(off, len);
        if len == 0 {
            prop_assert!(ext.is_empty());
        }
        let mut next_buf = 0u64;
        let mut prev_stripe = None;
        for se in &ext {
            prop_assert!(se.stripe < g.stripes);
            prop_assert!(!se.pieces.is_empty());
            if let Some(p) = prev_stripe {
                prop_assert_eq!(se.stripe, p + 1, "stripes must be consecutive and ascending");
            }
            prev_stripe = Some(se.stripe);
            let mut prev_shard = None;
            for p in &se.pieces {
                prop_assert_eq!(p.buf_offset, next_buf);
                prop_assert!(p.len > 0);
                prop_assert!(p.shard < g.data_shards);
                prop_assert!(p.chunk_offset + p.len <= g.chunk);
                if let Some(ps) = prev_shard {
                    prop_assert_eq!(p.shard, ps + 1);
                    prop_assert_eq!(p.chunk_offset, 0);
                }
                prev_shard = Some(p.shard);
                // The piece starts where the volume byte at its buf_offset lives.
                let want = g.locate(off + p.buf_offset);
                prop_assert_eq!((want.stripe, want.shard, want.chunk_offset),
                                (se.stripe, p.shard, p.chunk_offset));
                // ...and stripe_data_offset is locate's inverse.
                prop_assert_eq!(se.stripe * g.stripe_data_bytes() + p.stripe_data_offset(&g), off + p.buf_offset);
                next_buf += p.len;
            }
            let first = se.pieces[0].buf_offset;
            prop_assert_eq!(se.volume_span(&g), off + first..off + next_buf);
            prop_assert_eq!(
                se.is_full_stripe(&g),
                se.pieces.iter().map(|p| p.len).sum::<u64>() == g.stripe_data_bytes()
            );
        }
        prop_assert_eq!(next_buf, len);
    }

    #[test]
    fn shard_member_is_a_bijection(g in small_geometry(), stripe in any::<u64>()) {
        let mut members = vec![false; g.members as usize];
        for shard in 0..g.shards() {
            let m = g.shard_member(stripe, shard);
            prop_assert!(m < g.members);
            prop_assert!(!members[m as usize], "member {} holds two shards", m);
            members[m as usize] = true;
            prop_assert_eq!(g.member_shard(stripe, m), shard);
        }
        for m in 0..g.members {
            prop_assert_eq!(g.shard_member(stripe, g.member_shard(stripe, m)), m);
        }
    }

    #[test]
    fn parity_rotates_evenly(g in small_geometry(), start in any::<u64>()) {
        let n = g.members as u64;
        let start = start.saturating_sub(n);
        let mut parity_count = vec![0u64; g.members as usize];
        for s in start..start + n {
            for shard in g.data_shards..g.shards() {
                parity_count[g.shard_member(s, shard) as usize] += 1;
            }
        }
        match g.level {
            Level::Raid5 | Level::Ec => {
                // Over n stripes each member holds parity exactly m times: frequency m/n.
                prop_assert!(parity_count.iter().all(|&c| c == g.parity_shards as u64));
            }
            Level::Raid0 => prop_assert!(parity_count.iter().all(|&c| c == 0)),
            Level::Raid1 => {
                prop_assert_eq!(parity_count[0], 0);
                prop_assert!(parity_count[1..].iter().all(|&c| c == n));
            }
        }
    }
}

#[test]
fn raid5_is_left_symmetric() {
    let g = Geometry::new(Level::Raid5, 4, None, 4096, 4 * 4096).unwrap();
    // Rows are stripes, columns are members, entries are shards (3 = parity), as md draws it.
    let want = [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]];
    for (s, row) in want.iter().enumerate() {
        for (m, &shard) in row.iter().enumerate() {
            assert_eq!(g.member_shard(s as u64, m as u32), shard, "stripe {s} member {m}");
        }
    }
    // Parity walks left: members 3, 2, 1, 0, 3, ...
    let parity: Vec<u32> = (0..5).map(|s| g.shard_member(s, 3)).collect();
    assert_eq!(parity, [3, 2, 1, 0, 3]);
}

#[test]
fn shapes_per_level() {
    let mib = 1 << 20;
    let g = Geometry::new(Level::Raid0, 3, None, 65536, mib).unwrap();
    assert_eq!((g.data_shards, g.parity_shards, g.stripes), (3, 0, 16));
    assert_eq!(g.volume_size(), 3 * mib);
    let g = Geometry::new(Level::Raid1, 3, None, 65536, mib).unwrap();
    assert_eq!((g.data_shards, g.parity_shards), (1, 2));
    assert_eq!(g.volume_size(), mib);
    let g = Geometry::new(Level::Raid5, 4, None, 65536, mib + 100).unwrap();
    assert_eq!((g.data_shards, g.parity_shards, g.stripes), (3, 1, 16));
    let g = Geometry::new(Level::Ec, 6, Some((4, 2)), 12288, mib).unwrap();
    assert_eq!((g.data_shards, g.parity_shards, g.stripes), (4, 2, 85));
    assert_eq!(g.stripe_data_bytes(), 4 * 12288);
    assert_eq!(g.shards(), 6);
}

#[test]
fn rejects_bad_shapes_with_clear_messages() {
    let err = |l, n, ec, chunk, bytes| Geometry::new(l, n, ec, chunk, bytes).unwrap_err().to_string();
    assert_eq!(err(Level::Raid5, 2, None, 4096, 1 << 20), "raid5 needs at least 3 members, got 2");
    assert_eq!(err(Level::Raid0, 1, None, 4096, 1 << 20), "raid0 needs at least 2 members, got 1");
    assert_eq!(err(Level::Raid1, 1, None, 4096, 1 << 20), "raid1 needs at least 2 members, got 1");
    assert!(err(Level::Raid5, 129, None, 4096, 1 << 20).contains("at most 128"));
    assert!(err(Level::Ec, 6, None, 4096, 1 << 20).contains("--data"));
    assert!(err(Level::Raid5, 4, Some((3, 1)), 4096, 1 << 20).contains("only apply to level ec"));
    assert!(err(Level::Ec, 3, Some((1, 2)), 4096, 1 << 20).contains("at least 2 data"));
    assert!(err(Level::Ec, 3, Some((3, 0)), 4096, 1 << 20).contains("at least 1 parity"));
    assert_eq!(err(Level::Ec, 5, Some((4, 2)), 4096, 1 << 20), "ec with 4 data + 2 parity shards needs 6 members, got 5");
    assert!(err(Level::Ec, 200, Some((150, 150)), 4096, 1 << 20).contains("needs 300"));
    assert!(err(Level::Raid0, 2, None, 5000, 1 << 20).contains("multiple of 4096"));
    assert!(err(Level::Raid0, 2, None, 0, 1 << 20).contains("outside"));
    assert!(err(Level::Raid0, 2, None, 128 << 20, 1 << 30).contains("outside"));
    assert!(err(Level::Raid0, 2, None, 65536, 65535).contains("smaller than one chunk"));
    assert!(err(Level::Raid0, 128, None, 4096, u64::MAX).contains("overflows"));
    // 128 members is allowed; chunk need not be a power of two.
    Geometry::new(Level::Ec, 128, Some((123, 5)), 3 * 4096, 1 << 20).unwrap();
    Geometry::new(Level::Raid0, 2, None, 64 << 20, 64 << 20).unwrap();
}

#[test]
fn level_codes_are_stable() {
    let codes: Vec<u32> = Level::ALL.iter().map(|l| l.code()).collect();
    assert_eq!(codes, [0, 1, 5, 100]);
    for l in Level::ALL {
        assert_eq!(Level::from_code(l.code()), Some(l));
        assert_eq!(l.name().parse::<Level>().unwrap(), l);
    }
    assert_eq!(Level::from_code(6), None);
    assert!("raid6".parse::<Level>().is_err());
}

#[test]
fn map_examples() {
    let g = Geometry::new(Level::Raid5, 3, None, 4096, 4 * 4096).unwrap();
    assert!(g.map(0, 0).is_empty());
    // Straddles shard 1 of stripe 0 into shards 0 and 1 of stripe 1.
    let ext = g.map(4096 + 100, 8192);
    assert_eq!(
        ext,
        vec![
            StripeExtent { stripe: 0, pieces: vec![Piece { shard: 1, chunk_offset: 100, len: 3996, buf_offset: 0 }] },
            StripeExtent {
                stripe: 1,
                pieces: vec![Piece { shard: 0, chunk_offset: 0, len: 4096, buf_offset: 3996 }, Piece { shard: 1, chunk_offset: 0, len: 100, buf_offset: 8092 },],
            },
        ]
    );
    let full = g.map(8192, 8192);
    assert_eq!(full.len(), 1);
    assert!(full[0].is_full_stripe(&g));
    // Whole volume in one call.
    let all = g.map(0, g.volume_size());
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|se| se.is_full_stripe(&g)));
}
