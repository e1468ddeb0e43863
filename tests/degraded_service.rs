//! Surviving member failures, driven through the control socket: members failed by injected
//! I/O errors under fio load, rebuilt onto blank members under load, and the rebuilt bytes
//! proven by failing another member; members lost while the daemon is stopped; stale members;
//! one failure more than the level tolerates; refusals of the admin CLI.
//!
//! Every check compares bytes (fio crc32c verify, qemu-io patterns, sha256 of the whole volume);
//! waits are hang guards only.

mod common;

use common::admin::*;
use common::*;
use std::path::{Path, PathBuf};

const REGION_A: [&str; 7] = ["--rw=randwrite", "--bsrange=4k-64k", "--offset=0", "--size=16m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1"];
const REGION_B: [&str; 7] = ["--rw=randwrite", "--bsrange=4k-64k", "--offset=16m", "--size=16m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1"];

/// The job that writes (and verifies as it goes, so degraded reads are checked mid-run).
fn writing(uri: &str, region: &[&str]) -> Vec<String> {
    let mut v = fio_nbd(uri, region);
    v.push("--verify_backlog=64".into());
    v
}

/// The same job, re-reading and checking only.
fn verifying(uri: &str, region: &[&str]) -> Vec<String> {
    verify_only(&fio_nbd(uri, region))
}

fn canon(p: &str) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p))
}

fn same_path(a: &str, b: &Path) -> bool {
    canon(a) == std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf())
}

/// Scenario 1: fault `faulted` slots mid-fio, keep serving, rebuild onto blank members under
/// a second fio load, check offline, then restart, fail `later` and verify everything.
fn fail_and_rebuild(tag: &str, args: &[&str], n: usize, member_size: u64, faulted: &[usize], later: usize) {
    let dir = TestDir::new(tag);
    let mut m = dir.members("m", n);
    let size_s = format!("{member_size}");
    let mut a = args.to_vec();
    a.extend(["--size", &size_s, "--name", "vol"]);
    create(&a, &m);
    let (d, ctl) = start_admin(&dir, &m);
    let uri = d.uri();
    let all_active: Vec<&str> = vec!["active"; n];
    assert_status(&status(&ctl), "optimal", &all_active, "freshly created");

    // 1. fio writes region A; the faulted members start failing part-way through it
    let load = BgFio::spawn(&dir, &writing(&uri, &REGION_A));
    for &s in faulted {
        admin_ok(&ctl, &["fault", &s.to_string(), "--read-errors", "--write-errors", "--after", "40"]);
    }
    load.finish(&|| d.context());
    let v = status(&ctl);
    let want: Vec<&str> = (0..n).map(|i| if faulted.contains(&i) { "failed" } else { "active" }).collect();
    assert_status(&v, "degraded", &want, "after injected member errors during fio");
    for &s in faulted {
        let e = &slots(&v)[s];
        let errors = e["read_errors"].as_u64().unwrap_or(0) + e["write_errors"].as_u64().unwrap_or(0);
        assert!(errors >= 1, "slot {s} was failed but shows no I/O error: {e:#}");
        assert!(same_path(e["path"].as_str().unwrap_or(""), &m[s]), "failed slot {s} should still name {}: {e:#}", m[s].display());
    }
    // still serving region A from redundancy
    fio_ctx(&verifying(&uri, &REGION_A), &|| d.context());

    // 2. blank members fill the failed slots; the rebuild (throttled so it overlaps) runs while
    //    a second fio writes and verifies region B
    admin_ok(&ctl, &["rebuild", "--max-rate", "16MiB/s"]);
    let fresh: Vec<PathBuf> = faulted.iter().map(|s| dir.join(format!("new{s}"))).collect();
    for p in &fresh {
        blank_member(p, member_size);
    }
    let load = BgFio::spawn(&dir, &writing(&uri, &REGION_B));
    for p in &fresh {
        let out = admin_ok(&ctl, &["add", p.to_str().unwrap()]);
        assert!(!out.to_lowercase().contains("spare"), "add of a blank member to a degraded volume became a spare: {out}");
    }
    let v = status(&ctl);
    assert!(vol_state(&v) == "rebuilding" || vol_state(&v) == "optimal", "after `add` the volume should be rebuilding: {v:#}");
    load.finish(&|| d.context());
    let out = admin_ok(&ctl, &["rebuild", "--max-rate", "0", "--wait"]);
    assert!(out.contains("optimal"), "`rebuild --wait` should report an optimal volume: {out}");
    let v = wait_optimal(&ctl);
    assert_status(&v, "optimal", &all_active, "after the rebuild");
    for (s, p) in faulted.iter().zip(&fresh) {
        m[*s] = p.clone();
        assert!(same_path(&slot_paths(&v)[*s], p), "slot {s} should now be {}: {v:#}", p.display());
    }
    fio_ctx(&verifying(&uri, &REGION_A), &|| d.context());
    fio_ctx(&verifying(&uri, &REGION_B), &|| d.context());
    let before = volume_sha(&dir, &uri);
    d.stop_ok();

    // 3. offline: parity/mirrors agree with the data everywhere
    check_clean(&m);

    // 4. restart, lose a member that was never rebuilt: the rebuilt members now carry it
    let (d, ctl) = start_admin(&dir, &shuffled(&m, 3));
    assert_status(&status(&ctl), "optimal", &all_active, "after restart");
    admin_ok(&ctl, &["fail", &later.to_string()]);
    let want: Vec<&str> = (0..n).map(|i| if i == later { "failed" } else { "active" }).collect();
    assert_status(&status(&ctl), "degraded", &want, "after `nbraid fail` of another member");
    let uri = d.uri();
    fio_ctx(&verifying(&uri, &REGION_A), &|| d.context());
    fio_ctx(&verifying(&uri, &REGION_B), &|| d.context());
    assert_eq!(volume_sha(&dir, &uri), before, "the volume read with slot {later} failed differs from the volume before");
    d.stop_ok();
}

#[test]
fn raid1_fault_under_fio_then_rebuild_under_fio() {
    fail_and_rebuild("dsv-raid1", &["--level", "raid1"], 2, 48 * MIB, &[1], 0);
}

#[test]
fn raid5_fault_under_fio_then_rebuild_under_fio() {
    fail_and_rebuild("dsv-raid5", &["--level", "raid5"], 4, 32 * MIB, &[1], 3);
}

#[test]
fn ec_4_2_two_faults_under_fio_then_rebuild_under_fio() {
    fail_and_rebuild("dsv-ec42", &["--level", "ec", "--data", "4", "--parity", "2"], 6, 32 * MIB, &[1, 4], 0);
}

/// Fill the start of the volume with seeded random bytes and a few unaligned patterns.
fn fill(dir: &TestDir, uri: &str, seed: u64) -> Shadow {
    let random = dir.join(format!("random{seed}.bin"));
    random_file(&random, 16 * MIB, seed);
    nbdcopy(&random, uri);
    std::fs::remove_file(&random).unwrap();
    let mut s = Shadow::new(16 * MIB, 4 * MIB);
    s.write(16 * MIB + 7, 70_000, (seed as u8) | 1);
    s.write(17 * MIB - 5, MIB + 11, (seed as u8) ^ 0x5a);
    s.apply(uri);
    s
}

/// Scenario 2: members deleted while the daemon is stopped; the volume assembles degraded with
/// the same bytes.
fn offline_loss(tag: &str, args: &[&str], n: usize, lost: &[usize]) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "32MiB"]);
    create(&a, &m);
    let (d, _ctl) = start_admin(&dir, &m);
    let s = fill(&dir, &d.uri(), 21);
    let before = volume_sha(&dir, &d.uri());
    d.stop_ok();

    for &i in lost {
        std::fs::remove_file(&m[i]).unwrap();
    }
    let rest: Vec<PathBuf> = (0..n).filter(|i| !lost.contains(i)).map(|i| m[i].clone()).collect();
    let (d, ctl) = start_admin(&dir, &rest);
    let want: Vec<&str> = (0..n).map(|i| if lost.contains(&i) { "missing" } else { "active" }).collect();
    assert_status(&status(&ctl), "degraded", &want, "after deleting members offline");
    s.verify(&d.uri());
    assert_eq!(volume_sha(&dir, &d.uri()), before, "the volume assembled without {lost:?} differs from before");
    d.stop_ok();
}

#[test]
fn raid5_member_deleted_offline() {
    offline_loss("dsv-off5", &["--level", "raid5"], 4, &[2]);
}

#[test]
fn ec_4_2_two_members_deleted_offline() {
    offline_loss("dsv-off42", &["--level", "ec", "--data", "4", "--parity", "2"], 6, &[0, 5]);
}

/// Scenario 3: a member that missed writes comes back: not trusted, re-added, rebuilt.
#[test]
fn raid5_stale_member_is_not_trusted_and_can_be_re_added() {
    let dir = TestDir::new("dsv-stale");
    let m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let (d, ctl) = start_admin(&dir, &m);
    let uri = d.uri();
    let old = fill(&dir, &uri, 31);
    admin_ok(&ctl, &["fail", "2"]);
    // new data over the old, written while slot 2 is out
    let new = fill(&dir, &uri, 32);
    assert_ne!(old.bytes, new.bytes);
    let after = volume_sha(&dir, &uri);
    d.stop_ok();

    // all four back: slot 2 missed the writes and must not be used
    let (d, ctl) = start_admin(&dir, &shuffled(&m, 9));
    let uri = d.uri();
    let v = status(&ctl);
    assert_status(&v, "degraded", &["active", "active", "failed", "active"], "restart with the stale member present");
    assert!(same_path(&slot_paths(&v)[2], &m[2]), "the stale slot should name {}: {v:#}", m[2].display());
    new.verify(&uri);
    assert_eq!(volume_sha(&dir, &uri), after, "restart with a stale member: volume differs from the data last written");

    let out = admin_ok(&ctl, &["add", m[2].to_str().unwrap(), "--wait"]);
    assert!(out.contains("optimal"), "`add --wait` should end optimal: {out}");
    assert_status(&status(&ctl), "optimal", &["active"; 4], "after re-adding the stale member");
    new.verify(&uri);
    assert_eq!(volume_sha(&dir, &uri), after, "after re-adding the stale member the volume differs");
    d.stop_ok();
    check_clean(&m);

    // the re-added member holds the right bytes: serve with another one failed
    let (d, ctl) = start_admin(&dir, &m);
    admin_ok(&ctl, &["fail", "0"]);
    assert_eq!(volume_sha(&dir, &d.uri()), after, "with slot 0 failed (slot 2 rebuilt) the volume differs");
    d.stop_ok();
}

/// Scenario 4: two members of a raid5 fail: clients get errors, the daemon stays up and says
/// `failed`, and after a restart (faults are in memory) every byte is what it was, except where
/// a write was attempted meanwhile: an acknowledged write reads back, a refused one may have
/// left its own range undefined but nothing around it.
#[test]
fn raid5_two_failures_fail_requests_but_not_the_data() {
    const COVERED: u64 = 48 * MIB;
    let dir = TestDir::new("dsv-over");
    let m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let (mut d, ctl) = start_admin(&dir, &m);
    let uri = d.uri();
    let random = dir.join("random.bin");
    random_file(&random, COVERED, 41);
    nbdcopy(&random, &uri);
    let mut expected = std::fs::read(&random).unwrap();

    for slot in ["1", "2"] {
        admin_ok(&ctl, &["fault", slot, "--read-errors", "--write-errors"]);
    }
    // a read across all members must fail
    let o = qemu_io_raw(&uri, &["read 0 16M".to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).to_lowercase();
    assert!(
        !o.status.success() || text.contains("error") || text.contains("failed"),
        "qemu-io read with two raid5 members failing should report an error\n{}",
        show(&o)
    );
    let v = status(&ctl);
    assert_eq!(vol_state(&v), "failed", "status after two members failed: {v:#}");

    // single-chunk and unaligned writes in [40m, 48m) while failed: some stripes need only
    // surviving members and may succeed, others must fail
    let writes: Vec<(u64, u64)> = (0..12u64).map(|i| (40 * MIB + i * 3 * 64 * KIB + (i % 3) * 64 * KIB + (i % 2) * 4096, 64 * KIB - (i % 2) * 8192)).collect();
    let cmds: Vec<String> = writes.iter().map(|(off, len)| format!("write -P 0xee {off} {len}")).collect();
    let o = qemu_io_raw(&uri, &cmds);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let acked: Vec<u64> = out.lines().filter(|l| l.starts_with("wrote ")).filter_map(|l| l.rsplit("at offset ").next()?.trim().parse().ok()).collect();
    eprintln!("writes acknowledged while failed: {} of {}", acked.len(), writes.len());
    assert!(acked.len() < writes.len(), "every write succeeded on a raid5 with two members failing\n{}", show(&o));
    let mut undefined: Vec<(u64, u64)> = vec![];
    for &(off, len) in &writes {
        if acked.contains(&off) {
            expected[off as usize..(off + len) as usize].fill(0xee);
        } else {
            undefined.push((off, len));
        }
    }
    // fio against the failed volume fails (region [56m, 64m), never compared)
    let (st, out) = fio_expect_failure(&fio_nbd(&uri, &["--rw=randwrite", "--bs=64k", "--offset=56m", "--size=8m", "--iodepth=4"]));
    let failed_job = out.contains("\"error\" : 5") || out.to_lowercase().contains("input/output error");
    assert!(!st.success() || failed_job, "fio writing to a raid5 with two failed members should fail\n{out}");

    assert!(d.is_running(), "the daemon exited after losing two members\n{}", d.context());
    assert_eq!(vol_state(&status(&ctl)), "failed");
    let log = d.log.clone();
    let st = d.stop();
    assert!(st.success(), "daemon exit status after SIGTERM on a failed volume: {st} (expected 0)\n{}", std::fs::read_to_string(log).unwrap_or_default());

    // faults are gone after a restart; the failure beyond tolerance was not recorded
    let compare = |uri: &str, what: &str| {
        let img = dir.join("now.img");
        volume_to(uri, &img);
        let mut got = std::fs::read(&img).unwrap();
        std::fs::remove_file(&img).unwrap();
        got.truncate(COVERED as usize);
        let mut want = expected.clone();
        for &(off, len) in &undefined {
            got[off as usize..(off + len) as usize].fill(0);
            want[off as usize..(off + len) as usize].fill(0);
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!("{what}: volume byte {i} is {:#04x}, expected {:#04x} (refused writes: {undefined:?}; acknowledged: {acked:?})", got[i], want[i]);
        }
    };
    let (d, ctl) = start_admin(&dir, &m);
    let v = status(&ctl);
    eprintln!("restart after two failures: state {} slots {:?}", vol_state(&v), slot_states(&v));
    assert!(vol_state(&v) != "failed", "after restart with healthy members the volume is still failed: {v:#}\n{}", d.context());
    compare(&d.uri(), "after restart");
    // whatever the restart found failed (the first failure may have been recorded): re-add it
    for (i, st) in slot_states(&v).iter().enumerate() {
        if st != "active" {
            admin_ok(&ctl, &["add", m[i].to_str().unwrap(), "--wait"]);
        }
    }
    assert_status(&status(&ctl), "optimal", &["active"; 4], "after re-adding");
    compare(&d.uri(), "after re-adding");
    d.stop_ok();
    check_clean(&m);
    // and each member's share once more: serve without slot 0
    let (d, ctl) = start_admin(&dir, &m);
    admin_ok(&ctl, &["fail", "0"]);
    compare(&d.uri(), "with slot 0 failed");
    d.stop_ok();
}

/// Scenario 8: refusals.
#[test]
fn admin_cli_refusals() {
    let dir = TestDir::new("dsv-cli");
    let m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB", "--name", "one"], &m);
    let other = dir.members("o", 2);
    create(&["--level", "raid1", "--size", "32MiB", "--name", "two"], &other);

    let (d, ctl) = start_admin(&dir, &m);
    let s = fill(&dir, &d.uri(), 51);
    admin_ok(&ctl, &["fail", "1"]);
    let msg = admin_refused(&ctl, &["fail", "2"]);
    eprintln!("second raid5 fail refused: {msg}");
    let msg = admin_refused(&ctl, &["fail", m[3].to_str().unwrap()]);
    eprintln!("second raid5 fail by path refused: {msg}");
    assert_status(&status(&ctl), "degraded", &["active", "failed", "active", "active"], "after refused second fail");

    let msg = admin_refused(&ctl, &["add", other[0].to_str().unwrap()]);
    assert!(msg.contains("belongs to") || msg.contains("two"), "refusal of a foreign member should say why: {msg}");
    let v = status(&ctl);
    assert_status(&v, "degraded", &["active", "failed", "active", "active"], "after refused add of a foreign member");
    assert!(spares(&v).is_empty(), "a refused member became a spare: {v:#}");

    // a file with data that is no member is refused too
    let junk = dir.join("junk");
    random_file(&junk, 32 * MIB, 3);
    admin_refused(&ctl, &["add", junk.to_str().unwrap()]);
    // a member that is too small
    let small = dir.join("small");
    blank_member(&small, 4 * MIB);
    admin_refused(&ctl, &["add", small.to_str().unwrap()]);
    // not a slot
    admin_refused(&ctl, &["fail", "9"]);

    // bad --max-rate strings: clap errors (exit 2), nothing sent
    for bad in ["fast", "12XB/s", "-5"] {
        let o = admin(&ctl, &["rebuild", &format!("--max-rate={bad}")]);
        assert_eq!(o.status.code(), Some(2), "--max-rate {bad:?} should be a usage error (exit 2)\n{}", show(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("max-rate"), "clap error should name --max-rate\n{}", show(&o));
    }
    assert!(status(&ctl)["max_rebuild_rate"].is_null(), "a refused --max-rate changed the throttle");
    s.verify(&d.uri());
    d.stop_ok();

    // fault injection is refused unless the daemon was started with it
    let (d, ctl) = start_admin_with(&dir, &other, false);
    let msg = admin_refused(&ctl, &["fault", "0", "--read-errors"]);
    eprintln!("fault without --allow-fault-injection refused: {msg}");
    assert_status(&status(&ctl), "optimal", &["active"; 2], "after refused fault");
    qemu_io(&d.uri(), &["write -P 0x11 0 1M".to_string(), "read -P 0x11 0 1M".to_string()]);
    d.stop_ok();
}
