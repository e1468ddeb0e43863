//! Failure lifecycle tests: degraded service, rebuild under load, replace, stale members,
//! exhausted redundancy and rebuild resume — all against a byte-array model.

use super::status::VolumeState;
use super::*;
use crate::buf::AlignedBuf;
use crate::layout::Level;
use crate::member::{Access, FaultPlan};
use crate::uring::Engine;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MEMBER_SIZE: u64 = (3 << 20) + (2 << 20); // metadata, checksums and log + 2 MiB of data
const CHUNK: u64 = 16 << 10;

fn spec(dir: &Path, level: Level, n: usize, ec: Option<(u32, u32)>) -> CreateSpec {
    CreateSpec {
        level,
        ec,
        chunk: CHUNK,
        member_size: Some(MEMBER_SIZE),
        name: "f".into(),
        members: (0..n).map(|i| dir.join(format!("m{i}"))).collect(),
        force: false,
        checksums: true,
        deferred_checksum_pages: false,
        write_hole_log: true,
    }
}

fn blank(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(MEMBER_SIZE).unwrap();
    p
}

fn errors() -> FaultPlan {
    FaultPlan { read_errors: true, write_errors: true, ..Default::default() }
}

/// Writes applied to both the volume and the model: random ones, interleaved with a stream of
/// small aligned ones (which the stripe cache serves, so it too sees failures and rebuilds).
async fn scribble(vol: &Volume, model: &Mutex<Vec<u8>>, seed: u64, count: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = vol.size() as usize;
    let mut stream = rng.gen_range(0..size / 2) / 4096 * 4096;
    for i in 0..count {
        let (off, len) = if i % 2 == 0 {
            let len = 4096 * rng.gen_range(1..3);
            if stream + len > size {
                stream = 0;
            }
            stream += len;
            (stream - len, len)
        } else {
            let len = rng.gen_range(1..3 * CHUNK as usize);
            (rng.gen_range(0..size - len), len)
        };
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // The model is updated under the same ordering as the volume: one writer at a time.
        vol.write(off as u64, AlignedBuf::from_slice(&data), false).await.unwrap();
        model.lock().unwrap()[off..off + len].copy_from_slice(&data);
    }
}

async fn assert_matches(vol: &Volume, model: &Mutex<Vec<u8>>, what: &str) {
    let got = vol.read(0, vol.size() as usize).await.unwrap();
    let want = model.lock().unwrap().clone();
    let first_diff = got.iter().zip(want.iter()).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "{what}: volume differs from the model at byte {first_diff:?}");
}

async fn wait_optimal(vol: &Volume) {
    for _ in 0..3000 {
        if vol.status().state == VolumeState::Optimal {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("volume never became optimal: {:?}", vol.status());
}

/// Fail `fail` members by injected errors, keep writing, add blanks and rebuild under load,
/// check consistency, then fail other members to prove the rebuilt ones hold the right bytes.
async fn lifecycle(level: Level, n: usize, ec: Option<(u32, u32)>, fail: &[usize], then_fail: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let spec = spec(dir.path(), level, n, ec);
    create(&spec, &engine).await.unwrap();
    let vol = Arc::new(assemble(&spec.members, &engine, Access::Exclusive).await.unwrap());
    vol.start_background();
    let model = Arc::new(Mutex::new(vec![0u8; vol.size() as usize]));
    scribble(&vol, &model, 1, 60).await;

    for &slot in fail {
        vol.inject_faults(&slot.to_string(), errors()).unwrap();
    }
    scribble(&vol, &model, 2, 60).await;
    assert_matches(&vol, &model, "degraded").await;
    let st = vol.status();
    assert_eq!(st.state, VolumeState::Degraded, "{st:?}");
    for &slot in fail {
        assert_eq!(st.slots[slot].state, "failed");
    }

    // Rebuild onto blank members while a writer keeps going.
    vol.set_max_rebuild_rate(Some(4 << 20));
    for (i, _) in fail.iter().enumerate() {
        let msg = vol.add(&blank(dir.path(), &format!("new{i}"))).await.unwrap();
        assert!(msg.contains("rebuilding"), "{msg}");
    }
    assert_eq!(vol.status().state, VolumeState::Rebuilding);
    let writer = {
        let (vol, model) = (vol.clone(), model.clone());
        tokio::spawn(async move { scribble(&vol, &model, 3, 150).await })
    };
    writer.await.unwrap();
    vol.set_max_rebuild_rate(None);
    wait_optimal(&vol).await;
    assert_matches(&vol, &model, "after rebuild").await;
    let report = check(&vol).await.unwrap();
    assert_eq!((report.inconsistent, report.skipped), (0, 0), "after rebuild: {:?}", report.first_inconsistent);

    for &slot in then_fail {
        vol.fail(&slot.to_string()).await.unwrap();
    }
    assert_matches(&vol, &model, "rebuilt members serving degraded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid1_lifecycle() {
    lifecycle(Level::Raid1, 2, None, &[0], &[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_lifecycle() {
    lifecycle(Level::Raid5, 4, None, &[1], &[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_lifecycle() {
    lifecycle(Level::Ec, 6, Some((4, 2)), &[0, 4], &[1, 5]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_member_is_not_trusted_and_exhaustion_is_eio() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let spec = spec(dir.path(), Level::Raid5, 3, None);
    create(&spec, &engine).await.unwrap();
    let model = Mutex::new(vec![0u8; 0]);
    {
        let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
        *model.lock().unwrap() = vec![0u8; vol.size() as usize];
        scribble(&vol, &model, 4, 40).await;
        vol.fail("0").await.unwrap();
        // A second failure of a degraded raid5 is refused by the administrator path.
        let refused = vol.fail("1").await.unwrap_err().to_string();
        assert!(refused.contains("unable to serve"), "{refused}");
        scribble(&vol, &model, 5, 40).await;
    }
    // The failed member comes back: it missed writes, so it must not be read.
    let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
    let st = vol.status();
    assert_eq!(st.state, VolumeState::Degraded);
    assert_eq!(st.slots[0].state, "failed");
    assert_matches(&vol, &model, "with a stale member present").await;

    // Losing one more than raid5 tolerates: EIO, status failed, nothing recorded on disk.
    vol.inject_faults("1", errors()).unwrap();
    assert!(vol.read(0, vol.size() as usize).await.is_err());
    assert!(vol.write(0, AlignedBuf::from_slice(&[1u8; 8192]), false).await.is_err());
    assert_eq!(vol.status().state, VolumeState::Failed);
    drop(vol);
    // Once the member is healthy again, everything written before is intact.
    let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
    assert_eq!(vol.status().state, VolumeState::Degraded);
    assert_matches(&vol, &model, "after the lost member came back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_resumes_after_restart_and_replace_keeps_redundancy() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let spec = spec(dir.path(), Level::Raid5, 4, None);
    create(&spec, &engine).await.unwrap();
    let model = Mutex::new(vec![0u8; 0]);
    let new0 = blank(dir.path(), "new0");
    let mut members = spec.members.clone();
    {
        let vol = Arc::new(assemble(&members, &engine, Access::Exclusive).await.unwrap());
        vol.start_background();
        *model.lock().unwrap() = vec![0u8; vol.size() as usize];
        scribble(&vol, &model, 6, 40).await;
        vol.fail("3").await.unwrap();
        vol.set_max_rebuild_rate(Some(256 << 10));
        vol.add(&new0).await.unwrap();
        while vol.status().rebuilds.first().is_none_or(|r| r.done_bytes < (512 << 10)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        vol.shutdown().await;
    }
    members.push(new0);
    let vol = Arc::new(assemble(&members, &engine, Access::Exclusive).await.unwrap());
    let st = vol.status();
    assert_eq!(st.state, VolumeState::Rebuilding);
    assert!(st.rebuilds[0].done_bytes >= 512 << 10, "rebuild started over: {:?}", st.rebuilds);
    vol.start_background();
    wait_optimal(&vol).await;
    assert_matches(&vol, &model, "after resumed rebuild").await;

    // Replace slot 0 under load; fail a different member mid-replace: data stays correct.
    vol.set_max_rebuild_rate(Some(1 << 20));
    vol.replace("0", &blank(dir.path(), "new1")).await.unwrap();
    assert_eq!(vol.status().slots[0].state, "replacing");
    scribble(&vol, &model, 7, 30).await;
    vol.fail("2").await.unwrap();
    scribble(&vol, &model, 8, 30).await;
    assert_matches(&vol, &model, "mid-replace with another member failed").await;
    vol.set_max_rebuild_rate(None);
    while vol.status().slots[0].state == "replacing" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(vol.status().slots[0].path.as_deref().is_some_and(|p| p.ends_with("new1")));
    assert_matches(&vol, &model, "after replace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid0_member_loss_fails_only_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let spec = spec(dir.path(), Level::Raid0, 4, None);
    create(&spec, &engine).await.unwrap();
    let model = Mutex::new(vec![0u8; 0]);
    {
        let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
        *model.lock().unwrap() = vec![0u8; vol.size() as usize];
        scribble(&vol, &model, 9, 40).await;
        vol.inject_faults("2", errors()).unwrap();
        // Stripe 0: chunk 0 on member 0 is fine, chunk 2 on member 2 is lost.
        let on_member0 = vol.read(0, CHUNK as usize).await.unwrap();
        assert!(on_member0[..] == model.lock().unwrap()[..CHUNK as usize]);
        assert!(matches!(vol.read(2 * CHUNK, 4096).await, Err(VolumeError::Unavailable { .. })));
        vol.write(CHUNK, AlignedBuf::from_slice(&[7u8; 4096]), false).await.unwrap();
        model.lock().unwrap()[CHUNK as usize..CHUNK as usize + 4096].fill(7);
        assert!(vol.write(2 * CHUNK, AlignedBuf::from_slice(&[7u8; 4096]), false).await.is_err());
        assert_eq!(vol.status().state, VolumeState::Failed);
    }
    let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
    assert_eq!(vol.status().state, VolumeState::Optimal);
    assert_matches(&vol, &model, "raid0 after the member came back").await;
}

async fn wait_scrub(vol: &Volume) -> super::status::ScrubStatus {
    for _ in 0..3000 {
        if let Some(s) = vol.scrub_status().filter(|s| !s.running) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("scrub never finished");
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_and_repairs_parity_mismatches() {
    scrub_finds_and_repairs(false).await;
}

/// With checksums the same flips are damaged blocks: found by their checksums, healed from
/// the other shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_and_heals_damaged_blocks() {
    scrub_finds_and_repairs(true).await;
}

async fn scrub_finds_and_repairs(checksums: bool) {
    for (level, n, ec) in [(Level::Raid5, 4, None), (Level::Ec, 6, Some((4, 2))), (Level::Raid1, 3, None)] {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new().unwrap();
        let mut spec = spec(dir.path(), level, n, ec);
        spec.checksums = checksums;
        // (inconsistent stripes, damaged blocks) each flip shows up as.
        let found = |count: u64| if checksums { (0, count) } else { (count, 0) };
        let g = create(&spec, &engine).await.unwrap().geometry;
        let vol = Arc::new(assemble(&spec.members, &engine, Access::Exclusive).await.unwrap());
        let model = Mutex::new(vec![0u8; vol.size() as usize]);
        scribble(&vol, &model, 10, 60).await;
        // Corrupt the redundancy of three stripes (for raid1: a non-primary copy).
        let corrupt = [3u64, 40, 77];
        for &s in &corrupt {
            let slot = g.shard_member(s, g.data_shards) as usize;
            flip(&spec.members[slot], vol.member_pos(s, 100));
        }
        vol.start_scrub(false, None).unwrap();
        let report = wait_scrub(&vol).await;
        assert_eq!(((report.mismatches, report.checksum_errors), report.repaired, report.stripes_done), (found(3), 0, g.stripes), "{level:?}: {report:?}");
        vol.start_scrub(true, Some(64 << 20)).unwrap();
        assert!(vol.start_scrub(true, None).is_err(), "a second concurrent scrub must be refused");
        let report = wait_scrub(&vol).await;
        assert_eq!(((report.mismatches, report.checksum_errors), report.repaired, report.unrepairable), (found(3), 3, 0), "{level:?}: {report:?}");
        vol.start_scrub(false, None).unwrap();
        let again = wait_scrub(&vol).await;
        assert_eq!((again.mismatches, again.checksum_errors), (0, 0), "{level:?}: second scrub still finds something: {again:?}");
        assert_matches(&vol, &model, "after scrub repair").await;
        // Prove the repaired redundancy is right: lose a data member, read everything back.
        vol.fail(&g.shard_member(0, 0).to_string()).await.unwrap();
        assert_matches(&vol, &model, "degraded after scrub repair").await;
    }
}

/// A disk replaced in its slot must never be trusted again, even when its successor is absent
/// and its own superblock still calls it active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_disk_is_stale_even_without_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let spec = spec(dir.path(), Level::Raid5, 4, None);
    create(&spec, &engine).await.unwrap();
    let model = Mutex::new(vec![0u8; 0]);
    {
        let vol = Arc::new(assemble(&spec.members, &engine, Access::Exclusive).await.unwrap());
        vol.start_background();
        *model.lock().unwrap() = vec![0u8; vol.size() as usize];
        scribble(&vol, &model, 11, 30).await;
        vol.fail("1").await.unwrap();
        vol.add(&blank(dir.path(), "e")).await.unwrap();
        wait_optimal(&vol).await;
        scribble(&vol, &model, 12, 30).await;
        vol.shutdown().await;
    }
    // The old slot-1 disk comes back instead of its successor.
    let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
    let st = vol.status();
    assert_eq!((st.state, st.slots[1].state.as_str()), (VolumeState::Degraded, "failed"), "{st:?}");
    assert_matches(&vol, &model, "old disk present, successor absent").await;
}

/// After an unclean stop only the regions marked in the write-intent bitmap are resynced: a
/// parity mismatch inside one is repaired at start, one outside is left for scrub to find.
#[tokio::test]
async fn restart_resyncs_only_dirty_regions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    let mut spec = spec(dir.path(), Level::Raid5, 3, None);
    spec.member_size = Some((1 << 20) + (16 << 20)); // several bitmap regions
    spec.checksums = false; // parity mismatches, not damaged blocks
    let g = create(&spec, &engine).await.unwrap().geometry;
    let (dirty_stripe, clean_stripe);
    {
        // No background cleaner: the bits set by this write stay set, as after a crash.
        let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
        assert!(vol.intent_status().regions >= 3, "{:?}", vol.intent_status());
        vol.write(0, AlignedBuf::from_slice(&[9u8; 8192]), false).await.unwrap();
        assert_eq!(vol.intent_status().dirty_regions, 1);
        dirty_stripe = 0;
        clean_stripe = g.stripes - 1;
        for s in [dirty_stripe, clean_stripe] {
            let parity_slot = g.shard_member(s, g.data_shards) as usize;
            flip(&spec.members[parity_slot], vol.member_pos(s, 0));
        }
    }
    let vol = Arc::new(assemble(&spec.members, &engine, Access::Exclusive).await.unwrap());
    let st = vol.intent_status();
    assert_eq!((st.resync_regions, st.resync_repaired, st.dirty_regions), (1, 1, 0), "{st:?}");
    vol.start_scrub(false, None).unwrap();
    let report = wait_scrub(&vol).await;
    assert_eq!(report.mismatches, 1, "the clean region's mismatch should be left for scrub: {report:?}");
}

fn read_member(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    b
}

fn write_member(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

/// The RAID-5 write hole: a crash leaves a partial-stripe write half done (only the data, or
/// only the parity, reached the disk), then a member holding *other* data of the stripe is
/// lost. Reconstructing it from the stripe's now-inconsistent shards would return garbage for
/// data acknowledged long before; the partial-parity log must give it back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_hole_is_closed_by_the_partial_parity_log() {
    for (level, n, ec) in [(Level::Raid5, 4, None), (Level::Ec, 6, Some((4, 2)))] {
        for landed in ["data only", "parity only"] {
            let what = format!("{level:?}, {landed} landed");
            let dir = tempfile::tempdir().unwrap();
            let engine = Engine::new().unwrap();
            let spec = spec(dir.path(), level, n, ec);
            let g = create(&spec, &engine).await.unwrap().geometry;
            let stripe = 5;
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let model: Vec<u8>;
            {
                // No background cleaner runs here: the write's bitmap bit stays set, as after a crash.
                let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
                let mut m: Vec<u8> = (0..vol.size()).map(|_| rng.gen()).collect();
                vol.write(0, AlignedBuf::from_slice(&m), false).await.unwrap();
                vol.flush().await.unwrap();
                // One block of data shard 0 of the stripe is rewritten...
                let data_slot = g.shard_member(stripe, 0) as usize;
                let parity_slot = g.shard_member(stripe, g.data_shards) as usize;
                let pos = vol.member_pos(stripe, 0);
                let old_data = read_member(&spec.members[data_slot], pos, 4096);
                let old_parity = read_member(&spec.members[parity_slot], pos, 4096);
                let at = (stripe * g.stripe_data_bytes()) as usize;
                let new: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
                vol.write(at as u64, AlignedBuf::from_slice(&new), false).await.unwrap();
                // ...and the crash undoes one half of it on disk.
                match landed {
                    "data only" => {
                        write_member(&spec.members[parity_slot], pos, &old_parity);
                        m[at..at + 4096].copy_from_slice(&new);
                    }
                    _ => write_member(&spec.members[data_slot], pos, &old_data),
                }
                model = m;
            }
            // Then the member holding data shard 1 of that stripe is gone.
            let lost = g.shard_member(stripe, 1) as usize;
            let survivors: Vec<PathBuf> = spec.members.iter().enumerate().filter(|(i, _)| *i != lost).map(|(_, p)| p.clone()).collect();
            let vol = assemble(&survivors, &engine, Access::Exclusive).await.unwrap();
            let st = vol.intent_status();
            assert!(st.resync_regions >= 1 && st.resync_skipped == 0, "{what}: {st:?}");
            let model = Mutex::new(model);
            assert_matches(&vol, &model, &what).await;
        }
    }
}

/// A full-stripe write needs no record of its own (recovery reads its stripe as whatever the
/// survivors encode) unless an older partial record of that stripe is still in the ring: that
/// record's partial parity is stale once the stripe is rewritten, and would rebuild the lost
/// member's rows from it rather than from the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stripe_write_outranks_an_older_partial_record_of_its_stripe() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new().unwrap();
    // Without checksums, so the rows the interrupted write left inconsistent read back as they
    // are rebuilt instead of failing verification.
    let spec = CreateSpec { checksums: false, ..spec(dir.path(), Level::Raid5, 4, None) };
    let g = create(&spec, &engine).await.unwrap().geometry;
    let (stripe, other) = (5, 9);
    let chunk = g.chunk as usize;
    let stripe_bytes = g.stripe_data_bytes() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut noise = |len: usize| AlignedBuf::from_slice(&(0..len).map(|_| rng.gen()).collect::<Vec<u8>>());
    let parity_slot = g.shard_member(stripe, g.data_shards) as usize;
    let pos = {
        let vol = assemble(&spec.members, &engine, Access::Exclusive).await.unwrap();
        vol.write(0, noise(vol.size() as usize), false).await.unwrap();
        vol.flush().await.unwrap();
        let log = vol.ppl.as_ref().unwrap();
        let other_ring = g.shard_member(other, g.data_shards) as usize;
        vol.write(other * stripe_bytes as u64, noise(stripe_bytes), false).await.unwrap();
        assert!(!log.holds_record_for(other_ring, other), "a full-stripe write to a stripe without a record logs nothing");
        // A partial write to the stripe, completed and flushed: its record stays in the ring.
        vol.write(stripe * stripe_bytes as u64, noise(4096), false).await.unwrap();
        vol.flush().await.unwrap();
        let pos = vol.member_pos(stripe, 0);
        let old_parity = read_member(&spec.members[parity_slot], pos, chunk);
        // Then the whole stripe is rewritten, and the crash undoes its parity.
        vol.write(stripe * stripe_bytes as u64, noise(stripe_bytes), false).await.unwrap();
        assert!(log.holds_record_for(parity_slot, stripe));
        write_member(&spec.members[parity_slot], pos, &old_parity);
        pos
    };
    let lost = g.shard_member(stripe, 1) as usize;
    // What the survivors encode for the lost shard: the XOR of the other three.
    let mut encoded = vec![0u8; chunk];
    for slot in (0..4).filter(|&s| s != lost) {
        let shard = read_member(&spec.members[slot], pos, chunk);
        encoded.iter_mut().zip(shard).for_each(|(e, b)| *e ^= b);
    }
    let survivors: Vec<PathBuf> = spec.members.iter().enumerate().filter(|(i, _)| *i != lost).map(|(_, p)| p.clone()).collect();
    let vol = assemble(&survivors, &engine, Access::Exclusive).await.unwrap();
    let got = vol.read(stripe * stripe_bytes as u64 + chunk as u64, chunk).await.unwrap();
    let first_diff = got.iter().zip(&encoded).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "the lost shard was rebuilt from a stale record (differs at byte {first_diff:?})");
}
