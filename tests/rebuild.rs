//! Rebuilds driven through the control socket: `replace` under load keeps redundancy when
//! another member fails mid-copy; rebuild progress survives a restart; a hot spare takes over a
//! failed member by itself. Bytes are compared everywhere (fio crc32c verify, sha256 of the
//! whole volume); waits are hang guards only.

mod common;

use common::admin::*;
use common::*;
use std::path::{Path, PathBuf};

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn same_path(a: &str, b: &Path) -> bool {
    canon(Path::new(a)) == canon(b)
}

const REGION_A: [&str; 7] = ["--rw=randwrite", "--bsrange=4k-64k", "--offset=0", "--size=16m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1"];
const REGION_B: [&str; 8] =
    ["--rw=randwrite", "--bsrange=4k-128k", "--offset=16m", "--size=24m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--verify_backlog=64"];

/// Scenario 5: raid5 ×4, throttled `replace 0 NEW` under fio; slot 2 fails mid-replace; the
/// old slot-0 member keeps serving, so nothing is lost; afterwards slot 0 is NEW.
#[test]
fn raid5_replace_under_load_survives_another_failure() {
    let dir = TestDir::new("rb-replace");
    let mut m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let (d, ctl) = start_admin(&dir, &m);
    let uri = d.uri();
    fio_ctx(&fio_nbd(&uri, &REGION_A), &|| d.context());

    admin_ok(&ctl, &["rebuild", "--max-rate", "4MiB"]);
    assert_eq!(status(&ctl)["max_rebuild_rate"].as_u64(), Some(4 * MIB), "throttle not shown in status");
    let new = dir.join("new0");
    blank_member(&new, 32 * MIB);
    let load = BgFio::spawn(&dir, &fio_nbd(&uri, &REGION_B));
    admin_ok(&ctl, &["replace", "0", new.to_str().unwrap()]);
    let v = status(&ctl);
    let s0 = &slots(&v)[0];
    assert_eq!(s0["state"], "replacing", "slot 0 after `replace 0 NEW`: {v:#}");
    assert!(same_path(s0["replacement"].as_str().unwrap_or(""), &new), "slot 0 replacement should be {}: {v:#}", new.display());
    assert!(same_path(s0["path"].as_str().unwrap_or(""), &m[0]), "slot 0 keeps serving from the old member: {v:#}");

    // the copy is under way: then slot 2 fails
    wait_status(&ctl, "replace progress", |v| rebuild_of(v, 0).is_some_and(|r| r["done_bytes"].as_u64().unwrap_or(0) > 0));
    admin_ok(&ctl, &["fault", "2", "--read-errors", "--write-errors"]);
    load.finish(&|| d.context());
    let v = status(&ctl);
    let st = slot_states(&v);
    assert_eq!(st[2], "failed", "slot 2 should have failed under fio: {v:#}");
    assert_eq!(st[1], "active");
    assert_eq!(st[3], "active");
    assert!(st[0] == "replacing" || (st[0] == "active" && same_path(&slot_paths(&v)[0], &new)), "slot 0 should still be replacing (or done): {v:#}");
    fio_ctx(&verify_only(&fio_nbd(&uri, &REGION_A)), &|| d.context());

    // let the copy finish
    admin_ok(&ctl, &["rebuild", "--max-rate", "0"]);
    let v = wait_status(&ctl, "replace of slot 0 to finish", |v| rebuild_of(v, 0).is_none() && slot_states(v)[0] == "active");
    assert!(same_path(&slot_paths(&v)[0], &new), "after the replace slot 0 should be {}: {v:#}", new.display());
    assert_status(&v, "degraded", &["active", "active", "failed", "active"], "replace done, slot 2 still failed");
    let sb = read_at(&m[0], 0, 8192);
    assert!(sb.iter().all(|&b| b == 0), "the retired member {} still has a superblock", m[0].display());
    m[0] = new.clone();
    fio_ctx(&verify_only(&fio_nbd(&uri, &REGION_A)), &|| d.context());
    fio_ctx(&verify_only(&fio_nbd(&uri, &REGION_B)), &|| d.context());

    // fill slot 2 again
    let new2 = dir.join("new2");
    blank_member(&new2, 32 * MIB);
    let out = admin_ok(&ctl, &["add", new2.to_str().unwrap(), "--wait"]);
    assert!(out.contains("optimal"), "`add --wait`: {out}");
    m[2] = new2;
    let before = volume_sha(&dir, &uri);
    d.stop_ok();
    check_clean(&m);

    // NEW holds the right bytes: serve with slot 1 failed
    let (d, ctl) = start_admin(&dir, &shuffled(&m, 4));
    admin_ok(&ctl, &["fail", "1"]);
    fio_ctx(&verify_only(&fio_nbd(&d.uri(), &REGION_A)), &|| d.context());
    fio_ctx(&verify_only(&fio_nbd(&d.uri(), &REGION_B)), &|| d.context());
    assert_eq!(volume_sha(&dir, &d.uri()), before, "the volume with slot 1 failed differs");
    d.stop_ok();
}

/// Scenario 6: a throttled rebuild stopped with SIGTERM resumes from its checkpoint.
#[test]
fn raid5_rebuild_progress_survives_restart() {
    let dir = TestDir::new("rb-resume");
    let mut m = dir.members("m", 4);
    let member = 64 * MIB;
    create(&["--level", "raid5", "--size", "64MiB"], &m);
    let (d, ctl) = start_admin(&dir, &m);
    let random = dir.join("random.bin");
    random_file(&random, 48 * MIB, 61);
    nbdcopy(&random, d.uri());
    std::fs::remove_file(&random).unwrap();
    admin_ok(&ctl, &["fail", "1"]);
    let before = volume_sha(&dir, &d.uri());

    admin_ok(&ctl, &["rebuild", "--max-rate", "16MiB/s"]);
    let new = dir.join("new1");
    blank_member(&new, member);
    admin_ok(&ctl, &["add", new.to_str().unwrap()]);
    // Well past half of the member's data area (about 56 MiB), so that the writes of the rest
    // are clearly fewer than those of a rebuild from the start (see the bound below).
    let v = wait_status(&ctl, "36 MiB of the rebuild done", |v| rebuild_of(v, 1).is_some_and(|r| r["done_bytes"].as_u64().unwrap_or(0) >= 36 * MIB));
    let r = rebuild_of(&v, 1).unwrap();
    let total = r["total_bytes"].as_u64().unwrap();
    assert!(same_path(r["target"].as_str().unwrap_or(""), &new), "rebuild target: {v:#}");
    d.stop_ok();
    // what the daemon reported last, after it stopped: at least what we saw
    m[1] = new.clone();
    let seen = r["done_bytes"].as_u64().unwrap();
    assert!(seen < total, "rebuild finished before the stop; the throttle did not hold: {v:#}");

    // restart: the rebuild goes on from the checkpoint, not from zero
    let (d, ctl) = start_admin(&dir, &m);
    admin_ok(&ctl, &["rebuild", "--max-rate", "16MiB/s"]);
    let v = status(&ctl);
    match rebuild_of(&v, 1) {
        Some(r) => {
            assert_eq!(slot_states(&v)[1], "rebuilding", "{v:#}");
            let done = r["done_bytes"].as_u64().unwrap();
            assert!(done >= seen, "after restart the rebuild is at {done} bytes, but {seen} were done before the clean stop: {v:#}");
        }
        None => eprintln!("the rebuild finished before the first status after restart; relying on the write count"),
    }
    admin_ok(&ctl, &["rebuild", "--max-rate", "0"]);
    let v = wait_optimal(&ctl);
    // The new member was written only for what remained: the rebuild writes it in parts of
    // 1 MiB of member data, and before each part's data write the checksum-table pages
    // covering the part (a page covers 511 blocks, so a part of 256 blocks touches one or two
    // pages; concurrent parts on one page may share its write). Plus a few superblock and
    // bitmap writes. A rebuild from the start would write every part of the data area, and
    // every page of the table at least once.
    let writes = slots(&v)[1]["writes"].as_u64().unwrap();
    let layout = member_layout(&m[1]);
    assert_eq!(layout.member_data_bytes, total, "rebuild total_bytes vs the member's data area: {layout:?}");
    let blocks_per_part = MIB / 4096;
    let pages_of_part = |p: u64| (p * blocks_per_part + blocks_per_part - 1) / 511 - p * blocks_per_part / 511 + 1;
    let parts = total.div_ceil(MIB);
    let first_left = seen / MIB; // the checkpoint on disk is at least `seen`
    let left_bound: u64 = (first_left..parts).map(|p| 1 + pages_of_part(p)).sum::<u64>() + 8;
    let from_scratch_min = parts + total.div_ceil(511 * 4096);
    assert!(
        left_bound < from_scratch_min,
        "the test cannot tell a resumed rebuild ({left_bound} writes at most) from one started over (at least {from_scratch_min})"
    );
    eprintln!(
        "rebuild resumed at {seen} of {total} bytes: {writes} writes to the new member (at most {left_bound}; from the start at least {from_scratch_min})"
    );
    assert!(
        writes <= left_bound,
        "after restart the rebuild wrote {writes} times to the new member, but only {} of {total} bytes were left \
         (at most {left_bound} writes; a rebuild from the start needs at least {from_scratch_min}): it started over\n{v:#}",
        total - seen
    );
    assert_eq!(volume_sha(&dir, &d.uri()), before, "volume after the resumed rebuild differs");
    d.stop_ok();
    check_clean(&m);
    // the rebuilt member's bytes: serve with slot 3 failed
    let (d, ctl) = start_admin(&dir, &m);
    admin_ok(&ctl, &["fail", "3"]);
    assert_eq!(volume_sha(&dir, &d.uri()), before, "volume with slot 3 failed after the resumed rebuild differs");
    d.stop_ok();
}

/// Scenario 7: a hot spare replaces a faulted member on its own.
#[test]
fn raid5_hot_spare_takes_over() {
    let dir = TestDir::new("rb-spare");
    let mut m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let (d, ctl) = start_admin(&dir, &m);
    let uri = d.uri();
    fio_ctx(&fio_nbd(&uri, &REGION_A), &|| d.context());
    let spare = dir.join("spare");
    blank_member(&spare, 32 * MIB);
    let out = admin_ok(&ctl, &["add", spare.to_str().unwrap()]);
    assert!(out.contains("spare"), "`add` on an optimal volume should say hot spare: {out}");
    let v = status(&ctl);
    assert_status(&v, "optimal", &["active"; 4], "with a hot spare");
    let sp = spares(&v);
    assert!(sp.len() == 1 && same_path(&sp[0], &spare), "spares should list {}: {v:#}", spare.display());
    let before = volume_sha(&dir, &uri);

    admin_ok(&ctl, &["fault", "2", "--read-errors", "--write-errors"]);
    // reads touch every member; the first error on slot 2 brings the spare in
    assert_eq!(volume_sha(&dir, &uri), before, "volume read while slot 2 fails differs");
    let load = BgFio::spawn(&dir, &fio_nbd(&uri, &REGION_B));
    let v = wait_optimal(&ctl);
    load.finish(&|| d.context());
    assert!(same_path(&slot_paths(&v)[2], &spare), "slot 2 should now be the spare {}: {v:#}", spare.display());
    assert!(spares(&v).is_empty(), "the spare is still listed as spare: {v:#}");
    let e = &slots(&v)[2];
    assert_eq!(e["state"], "active", "{v:#}");
    m[2] = spare;
    fio_ctx(&verify_only(&fio_nbd(&uri, &REGION_A)), &|| d.context());
    let before = volume_sha(&dir, &uri);
    d.stop_ok();
    check_clean(&m);

    let (d, ctl) = start_admin(&dir, &m);
    admin_ok(&ctl, &["fail", "0"]);
    assert_eq!(volume_sha(&dir, &d.uri()), before, "volume with slot 0 failed (slot 2 rebuilt from the spare) differs");
    fio_ctx(&verify_only(&fio_nbd(&d.uri(), &REGION_A)), &|| d.context());
    d.stop_ok();
}
