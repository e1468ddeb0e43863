//! Volume tests against a byte-array model: random unaligned writes on every level, read back,
//! offline check, reassembly in another order, and assembly refusals.

use super::*;
use crate::buf::AlignedBuf;
use crate::layout::Level;
use crate::member::Access;
use crate::uring::Engine;
use rand::{Rng, SeedableRng};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

const MEMBER_SIZE: u64 = (3 << 20) + (2 << 20); // metadata, checksums and log + 2 MiB of data
const CHUNK: u64 = 16 << 10;

fn spec(dir: &std::path::Path, tag: &str, level: Level, n: usize, ec: Option<(u32, u32)>) -> CreateSpec {
    CreateSpec {
        level,
        ec,
        chunk: CHUNK,
        member_size: Some(MEMBER_SIZE),
        name: format!("t-{tag}"),
        members: (0..n).map(|i| dir.join(format!("{tag}-m{i}"))).collect(),
        force: false,
        checksums: true,
        deferred_checksum_pages: false,
        write_hole_log: true,
    }
}

/// (tag, level, members, ec shape)
type Case = (&'static str, Level, usize, Option<(u32, u32)>);

const LEVELS: [Case; 7] = [
    ("raid0x4", Level::Raid0, 4, None),
    ("raid1x2", Level::Raid1, 2, None),
    ("raid1x3", Level::Raid1, 3, None),
    ("raid5x3", Level::Raid5, 3, None),
    ("raid5x5", Level::Raid5, 5, None),
    ("ec4+2", Level::Ec, 6, Some((4, 2))),
    ("ec3+1", Level::Ec, 4, Some((3, 1))),
];

async fn exercise(tag: &str, level: Level, n: usize, ec: Option<(u32, u32)>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let spec = spec(dir.path(), tag, level, n, ec);
    let created = create(&spec, &engine).await.unwrap();
    let vol = Arc::new(assemble(&spec.members, &engine, Access::Exclusive).await.unwrap());
    assert_eq!(vol.size(), created.geometry.volume_size());
    let size = vol.size() as usize;
    let mut model = vec![0u8; size];
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64 * 1000 + level.code() as u64);

    // Sequential random writes of every shape: sub-block, unaligned, chunk- and stripe-crossing, full stripes.
    let stripe = created.geometry.stripe_data_bytes() as usize;
    for i in 0..300 {
        let len = match i % 4 {
            0 => rng.gen_range(1..600),
            1 => rng.gen_range(1..3 * CHUNK as usize),
            2 => stripe * rng.gen_range(1..3),
            _ => rng.gen_range(1..4 * stripe),
        };
        let off = if i % 4 == 2 { rng.gen_range(0..(size - len) / stripe) * stripe } else { rng.gen_range(0..size - len) };
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        model[off..off + len].copy_from_slice(&data);
        vol.write(off as u64, AlignedBuf::from_slice(&data), i % 7 == 0).await.unwrap();
        if i % 50 == 0 {
            let got = vol.read(off as u64, len).await.unwrap();
            assert!(got[..] == data[..], "{tag}: readback of write {i} at {off}+{len}");
        }
    }
    // Concurrent writes, many to the same stripes; disjoint byte ranges so the model stays exact.
    let mut tasks = Vec::new();
    for t in 0..64usize {
        // 500 bytes in each 3000-byte slot: several writes share every stripe, none overlap.
        let off = t * 3000 + (t % 7) * 13;
        let data: Vec<u8> = (0..500).map(|j| (t * 31 + j) as u8).collect();
        model[off..off + 500].copy_from_slice(&data);
        let vol = vol.clone();
        tasks.push(tokio::spawn(async move { vol.write(off as u64, AlignedBuf::from_slice(&data), false).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    vol.write_zeroes(12345, 70000, true).await.unwrap();
    model[12345..12345 + 70000].fill(0);
    vol.flush().await.unwrap();

    let all = vol.read(0, size).await.unwrap();
    assert!(all[..] == model[..], "{tag}: whole-volume readback differs from the model");
    assert!(matches!(vol.read(size as u64 - 10, 11).await, Err(VolumeError::OutOfRange { .. })));
    drop(vol);

    // Reassemble from a reversed member list: order comes from the superblocks.
    let mut reversed = spec.members.clone();
    reversed.reverse();
    let vol = assemble(&reversed, &engine, Access::SharedReadOnly).await.unwrap();
    let all = vol.read(0, size).await.unwrap();
    assert!(all[..] == model[..], "{tag}: data differs after reassembly");
    let report = check(&vol).await.unwrap();
    assert_eq!(report.inconsistent, 0, "{tag}: fresh volume has inconsistent stripes {:?}", report.first_inconsistent);
    drop(vol);

    // One flipped byte anywhere in a used chunk must be caught, by its block's checksum, on
    // every level (raid0 too).
    let vol = assemble(&spec.members, &engine, Access::SharedReadOnly).await.unwrap();
    let data_offset = vol.data_offset;
    drop(vol);
    for (member, at) in [(0usize, data_offset), (n - 1, data_offset + 5 * CHUNK + 777)] {
        flip_byte(&spec.members[member], at);
        let vol = assemble(&spec.members, &engine, Access::SharedReadOnly).await.unwrap();
        let report = check(&vol).await.unwrap();
        assert_eq!(report.checksum_errors, 1, "{tag}: flipped byte at member {member} offset {at} not caught exactly once");
        assert_eq!(report.first_damaged, vec![(spec.members[member].clone(), at / 4096 * 4096)], "{tag}");
        drop(vol);
        flip_byte(&spec.members[member], at);
    }
}

fn flip_byte(path: &PathBuf, at: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_level_matches_the_model() {
    for (tag, level, n, ec) in LEVELS {
        exercise(tag, level, n, ec).await;
    }
}

#[tokio::test]
async fn assembly_refuses_bad_sets() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let a = spec(dir.path(), "a", Level::Raid5, 3, None);
    let b = spec(dir.path(), "b", Level::Raid5, 3, None);
    create(&a, &engine).await.unwrap();
    create(&b, &engine).await.unwrap();

    let foreign = vec![a.members[0].clone(), a.members[1].clone(), b.members[2].clone()];
    let e = assemble(&foreign, &engine, Access::SharedReadOnly).await.err().unwrap();
    assert!(matches!(&e, AssembleError::Foreign { path, .. } if path == &b.members[2]), "{e}");

    let twice = vec![a.members[0].clone(), a.members[1].clone(), a.members[1].clone()];
    let e = assemble(&twice, &engine, Access::SharedReadOnly).await.err().unwrap();
    assert!(matches!(e, AssembleError::SameMember { .. }), "{e}");

    // One member missing: raid5 assembles degraded; two: refused, naming the lost slots.
    let one_missing = vec![a.members[0].clone(), a.members[2].clone()];
    let vol = assemble(&one_missing, &engine, Access::SharedReadOnly).await.unwrap();
    assert_eq!(vol.status().state, status::VolumeState::Degraded);
    drop(vol);
    let two_missing = vec![a.members[2].clone()];
    let e = assemble(&two_missing, &engine, Access::SharedReadOnly).await.err().unwrap();
    assert!(matches!(&e, AssembleError::TooManyLost { lost, .. } if lost == &vec![0, 1]), "{e}");

    // A member already in a volume is refused by create unless forced.
    let e = create(&a, &engine).await.err().unwrap();
    assert!(matches!(e, CreateError::InVolume { .. }), "{e}");
    let mut forced = a.clone();
    forced.force = true;
    create(&forced, &engine).await.unwrap();

    // A plain file with data is not silently overwritten.
    let data_file = dir.path().join("precious");
    std::fs::write(&data_file, vec![7u8; 4 << 20]).unwrap();
    let mut s = spec(dir.path(), "c", Level::Raid1, 2, None);
    s.members[0] = data_file;
    let e = create(&s, &engine).await.err().unwrap();
    assert!(matches!(e, CreateError::HoldsData(_)), "{e}");
    // Written zeros (allocated, not holes) are blank: accepted without --force.
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 4 << 20]).unwrap();
    let mut z = spec(dir.path(), "z", Level::Raid1, 2, None);
    z.members[0] = zeros.clone();
    create(&z, &engine).await.unwrap();
    // One non-zero byte deep inside allocated zeros is still data.
    let late = dir.path().join("late");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[3 << 20] = 1;
    std::fs::write(&late, bytes).unwrap();
    z.members[0] = late;
    z.name = "z2".into();
    assert!(matches!(create(&z, &engine).await, Err(CreateError::HoldsData(_))));

    let mut small = spec(dir.path(), "d", Level::Raid0, 2, None);
    small.member_size = Some(1 << 20);
    assert!(matches!(create(&small, &engine).await, Err(CreateError::TooSmall { .. })));
    let bad = spec(dir.path(), "e", Level::Raid5, 2, None);
    assert!(matches!(create(&bad, &engine).await, Err(CreateError::Layout(_))));
}

/// A torn superblock write leaves the other copy: assembly uses it. Both copies gone: the member
/// is reported as not a member, by name.
#[tokio::test]
async fn torn_superblock_copy_falls_back_to_the_other() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let s = spec(dir.path(), "sb", Level::Raid5, 3, None);
    create(&s, &engine).await.unwrap();
    {
        // One membership change: the newer generation goes to one copy, the older stays in the other.
        let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
        vol.fail("2").await.unwrap();
    }
    let f = std::fs::OpenOptions::new().write(true).open(&s.members[0]).unwrap();
    let newest = 2u64; // event 1 at create, 2 after the fail
    f.write_all_at(&[0xee; 512], (newest % 2) * 4096 + 200).unwrap();
    let vol = assemble(&s.members[..2], &engine, Access::SharedReadOnly).await.unwrap();
    assert_eq!(vol.status().state, status::VolumeState::Degraded);
    drop(vol);
    f.write_all_at(&[0xee; 512], 200).unwrap();
    f.write_all_at(&[0xee; 512], 4096 + 200).unwrap();
    let e = assemble(&s.members[..2], &engine, Access::SharedReadOnly).await.err().unwrap().to_string();
    assert!(e.contains("sb-m0") && e.contains("checksum"), "{e}");
}

/// Member writes so far, over every slot.
fn member_writes(vol: &Volume) -> u64 {
    vol.status().slots.iter().map(|s| s.writes).sum()
}

/// Deferred checksum pages: a client write costs its data write alone (ordered: a page write
/// too); a crash before the flush leaves the table behind the data, and the resync at the next
/// start takes those blocks as found instead of failing them, so every write reads back. A
/// flushed write needs no adoption. Ordered raid5 leaves the parity block's page to the flush
/// too, its checksum being in the write-hole record: after the crash that record vouches for
/// the block, so nothing is damaged, adopted or unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_checksum_pages_cost_one_write_and_survive_a_crash() {
    let cases =
        [("def-r0", Level::Raid0, 4), ("def-r1", Level::Raid1, 2), ("def-r5", Level::Raid5, 4), ("ord-r0", Level::Raid0, 4), ("ord-r5", Level::Raid5, 4)];
    for (tag, level, n) in cases {
        let deferred = tag.starts_with("def");
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new().unwrap();
        let mut s = spec(dir.path(), tag, level, n, None);
        s.deferred_checksum_pages = deferred;
        create(&s, &engine).await.unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let blocks = 64u64;
        let mut model = std::collections::HashMap::new();
        {
            let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
            assert_eq!(vol.status().deferred_checksum_pages, deferred, "{tag}");
            // Flushed writes first: these must never need adopting.
            for b in 0..blocks / 2 {
                let data: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
                vol.write(b * 4096 * 3, AlignedBuf::from_slice(&data), false).await.unwrap();
                model.insert(b * 4096 * 3, data);
            }
            vol.flush().await.unwrap();
            let before = member_writes(&vol);
            for b in blocks / 2..blocks {
                let data: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
                vol.write(b * 4096 * 3, AlignedBuf::from_slice(&data), false).await.unwrap();
                model.insert(b * 4096 * 3, data);
            }
            let per_write = (member_writes(&vol) - before) as f64 / (blocks / 2) as f64;
            let want = match (level, deferred) {
                (Level::Raid0, true) => 1.0,
                (Level::Raid0, false) => 2.0,
                (Level::Raid1, true) => 2.0,
                // Read-modify-write: data and parity, plus the partial-parity record...
                (_, true) => 3.0,
                // ...and the data block's page (the parity's is in the record).
                (_, false) => 4.0,
            };
            assert_eq!(per_write, want, "{tag}: member writes per 4 KiB client write");
            // Dropped without a flush or close: a crash as far as the members can tell.
        }
        {
            // Offline, before the resync: the unflushed blocks of a deferred volume are told
            // apart from damage.
            let vol = assemble(&s.members, &engine, Access::SharedReadOnly).await.unwrap();
            let report = check(&vol).await.unwrap();
            assert!(report.dirty_regions > 0, "{tag}: {report:?}");
            assert_eq!(report.checksum_errors, 0, "{tag}: {report:?}");
            assert_eq!(report.unverified > 0, deferred, "{tag}: {report:?}");
        }
        let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
        let adopted = vol.status().intent.resync_adopted;
        if deferred {
            // Only the blocks written since the flush, each of which is on one member (raid0)
            // or on a data member and its parity (raid5, whose rows cannot be rebuilt).
            let most = if level == Level::Raid0 { blocks / 2 } else { blocks };
            let (least, most) = if level == Level::Raid1 { (blocks, blocks) } else { (blocks / 2, most) };
            assert!(adopted >= least && adopted <= most, "{tag}: {adopted} blocks adopted for {} unflushed writes", blocks / 2);
        } else {
            assert_eq!(adopted, 0, "{tag}");
        }
        // Ordered raid5: parity blocks written since the flush whose page no later data write on
        // that member happened to carry to disk are known to their records only.
        let vouched = vol.status().intent.resync_vouched;
        let expected = if tag == "ord-r5" { 1..=blocks / 2 } else { 0..=0 };
        assert!(expected.contains(&vouched), "{tag}: {vouched} blocks vouched for by write-hole records, expected {expected:?}");
        for (&off, data) in &model {
            let got = vol.read(off, 4096).await.unwrap_or_else(|e| panic!("{tag}: read at {off} after the crash: {e}"));
            assert!(got[..] == data[..], "{tag}: block at {off} differs after the crash");
        }
        vol.close().await;
        drop(vol);
        let vol = assemble(&s.members, &engine, Access::SharedReadOnly).await.unwrap();
        let report = check(&vol).await.unwrap();
        assert_eq!((report.dirty_regions, report.checksum_errors, report.unverified, report.inconsistent), (0, 0, 0, 0), "{tag}: {report:?}");
    }
}

/// The write-hole log reuses a ring slot only after a flush, but that barrier needs the stripe
/// writes durable, not the deferred checksum pages: it must not write them. Otherwise random
/// writes on a deferred raid5 volume pay a page write for nearly every block written since the
/// last barrier, which is what deferring was for (measured: 5.7 device writes per 4 KiB write
/// against 4.3 without). One block rewritten many times wraps its parity member's ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_a_write_hole_log_slot_leaves_deferred_checksum_pages_to_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let mut s = spec(dir.path(), "wrap", Level::Raid5, 4, None);
    s.deferred_checksum_pages = true;
    create(&s, &engine).await.unwrap();
    let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
    let slots = crate::meta::ppl::slots_for(CHUNK) as u64;
    let writes = 4 * slots + 7;
    let before = member_writes(&vol);
    let mut last = Vec::new();
    for i in 0..writes {
        last = (0..4096u64).map(|b| (b * 31 + i * 7) as u8).collect();
        vol.write(8192, AlignedBuf::from_slice(&last), false).await.unwrap();
    }
    // Each write: its record, data and parity; the ring wrapped four times meanwhile.
    assert_eq!(member_writes(&vol) - before, 3 * writes, "member writes for {writes} rewrites of one block ({slots}-slot ring)");
    // The client's flush writes the two pages the block changed: its own and its parity's.
    let before = member_writes(&vol);
    vol.flush().await.unwrap();
    assert_eq!(member_writes(&vol) - before, 2, "page writes at the flush");
    assert!(vol.read(8192, 4096).await.unwrap()[..] == last[..]);
    vol.close().await;
    drop(vol);
    let vol = assemble(&s.members, &engine, Access::SharedReadOnly).await.unwrap();
    let report = check(&vol).await.unwrap();
    assert_eq!((report.checksum_errors, report.unverified, report.inconsistent), (0, 0, 0), "{report:?}");
}

/// Ordered raid5: the write-hole record that vouches for a parity block whose page was left to
/// the next flush may be overwritten only once that page is on disk. A parity block is written
/// once, then its ring wraps twice under rewrites of another stripe; a crash then must leave
/// nothing failing its checksum, though no record for the first write remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_hole_record_is_overwritten_only_after_the_page_it_stands_in_for() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let s = spec(dir.path(), "wrap-ord", Level::Raid5, 4, None);
    create(&s, &engine).await.unwrap();
    let first = (0..4096u64).map(|b| (b * 13) as u8).collect::<Vec<u8>>();
    let mut last = Vec::new();
    let other;
    {
        let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
        let g = vol.geometry;
        // Another stripe whose first parity shard is on the same member: the same ring.
        other = (1..g.stripes).find(|&t| g.shard_member(t, g.data_shards) == g.shard_member(0, g.data_shards)).unwrap();
        let stripe_bytes = g.data_shards as u64 * g.chunk;
        vol.write(0, AlignedBuf::from_slice(&first), false).await.unwrap();
        let slots = crate::meta::ppl::slots_for(g.chunk) as u64;
        for i in 0..2 * slots + 3 {
            last = (0..4096u64).map(|b| (b * 31 + i * 7) as u8).collect();
            vol.write(other * stripe_bytes, AlignedBuf::from_slice(&last), false).await.unwrap();
        }
        // Dropped without a flush or close: a crash as far as the members can tell.
    }
    let vol = assemble(&s.members, &engine, Access::SharedReadOnly).await.unwrap();
    let report = check(&vol).await.unwrap();
    assert!(report.dirty_regions > 0, "{report:?}");
    assert_eq!((report.checksum_errors, report.unverified, report.inconsistent), (0, 0, 0), "{report:?}");
    drop(vol);
    let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
    assert_eq!(vol.status().intent.resync_adopted, 0);
    // The last rewrite's parity block is known to its record only; the first write's page was
    // written when its record's slot was reused.
    assert_eq!(vol.status().intent.resync_vouched, 1);
    let stripe_bytes = vol.geometry.data_shards as u64 * vol.geometry.chunk;
    assert!(vol.read(0, 4096).await.unwrap()[..] == first[..]);
    assert!(vol.read(other * stripe_bytes, 4096).await.unwrap()[..] == last[..]);
    vol.close().await;
}

/// Member reads so far, over every slot.
fn member_reads(vol: &Volume) -> u64 {
    vol.status().slots.iter().map(|s| s.reads).sum()
}

/// A stream of small writes on a parity level reads each stripe's data once, when the stream
/// reaches it, instead of old data and parity under every write; and what it leaves on the
/// members is what they would hold without the cache: the data reads back and parity checks
/// out offline. A block damaged on disk under a cached stripe is healed from parity, which the
/// cache's (correct) copy of it went into, on the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_small_writes_reads_each_stripe_once() {
    for (tag, level, n, ec) in [("st-r5", Level::Raid5, 4, None), ("st-ec", Level::Ec, 6, Some((4, 2)))] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new().unwrap();
        let s = spec(dir.path(), tag, level, n, ec);
        let g = create(&s, &engine).await.unwrap().geometry;
        let vol = assemble(&s.members, &engine, Access::Exclusive).await.unwrap();
        let (k, m, sdb) = (g.data_shards as u64, g.parity_shards as u64, g.stripe_data_bytes());
        let mut model = vec![0u8; vol.size() as usize];
        let block = |i: u64| -> Vec<u8> { (0..4096u64).map(|b| (b * 7 + i * 13) as u8).collect() };

        // From one block into stripe 2 to the end of stripe 4, one 4 KiB block at a time.
        let (start, end) = (2 * sdb + 4096, 5 * sdb);
        let before = member_reads(&vol);
        for (i, at) in (start..end).step_by(4096).enumerate() {
            let data = block(i as u64);
            vol.write(at, AlignedBuf::from_slice(&data), false).await.unwrap();
            model[at as usize..][..4096].copy_from_slice(&data);
        }
        let writes = (end - start) / 4096;
        // The first write reads old data and parity (it continues nothing); the second loads
        // stripe 2's data, and the stream's first write into stripes 3 and 4 loads theirs.
        assert_eq!(member_reads(&vol) - before, (1 + m) + 3 * k, "{tag}: member reads for {writes} sequential 4 KiB writes");
        // Rewriting the stream's last block again and again reads nothing.
        let before = member_reads(&vol);
        for i in 0..5 {
            let data = block(1000 + i);
            vol.write(end - 4096, AlignedBuf::from_slice(&data), false).await.unwrap();
            model[(end - 4096) as usize..][..4096].copy_from_slice(&data);
        }
        assert_eq!(member_reads(&vol) - before, 0, "{tag}: rewrites of a cached block");

        // Damage stripe 4's first block on its member, then write elsewhere in stripe 4 from
        // the cache: the parity written must still cover the block's true content.
        let victim = g.shard_member(4, 0) as usize;
        flip_byte(&s.members[victim], vol.member_pos(4, 0) + 100);
        let data = block(2000);
        vol.write(end - 8192, AlignedBuf::from_slice(&data), false).await.unwrap();
        model[(end - 8192) as usize..][..4096].copy_from_slice(&data);
        let got = vol.read(0, model.len()).await.unwrap();
        assert!(got[..] == model[..], "{tag}: volume differs from the model");
        vol.close().await;
        drop(vol);

        let vol = assemble(&s.members, &engine, Access::SharedReadOnly).await.unwrap();
        let report = check(&vol).await.unwrap();
        assert_eq!((report.checksum_errors, report.unverified, report.inconsistent), (0, 0, 0), "{tag}: {report:?}");
        let got = vol.read(0, model.len()).await.unwrap();
        assert!(got[..] == model[..], "{tag}: volume differs from the model after reassembly");
    }
}
