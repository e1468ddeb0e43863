//! Faults: kill -9 of the daemon (idle and under load), and members that fail with EIO
//! (nbdkit's error filter behind nbdfuse).

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fio_args(uri: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--name=v".to_string(), "--ioengine=nbd".into(), format!("--uri={uri}")];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

const REGION_A: [&str; 6] = ["--rw=randwrite", "--bsrange=512-128k", "--offset=0", "--size=16m", "--verify=crc32c", "--verify_fatal=1"];

fn patterns(size: u64) -> Shadow {
    let base = size - 4 * MIB;
    let mut s = Shadow::new(base, 4 * MIB);
    s.write(base + 1, 65537, 0x31);
    s.write(base + 200_000, 12345, 0x32);
    s.write_fua(base + MIB - 3, 2 * MIB, 0x33);
    s.write(base + 4 * MIB - 4095, 4095, 0x34);
    s
}

/// Everything acknowledged before a kill -9 of an idle daemon is on the members: readable after
/// restart, and every stripe consistent (nothing was in flight).
fn kill9_idle(tag: &str, args: &[&str], n: usize) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "32MiB"]);
    create(&a, &m);
    let d = Daemon::start(&dir, &m);
    let uri = d.uri();
    let mut write_a: Vec<&str> = REGION_A.to_vec();
    write_a.extend(["--do_verify=0", "--iodepth=16"]);
    fio_ctx(&fio_args(&uri, &write_a), &|| d.context());
    let size = d.size();
    let s = patterns(size);
    s.apply(&uri);
    d.kill9();
    check_clean(&m);
    let d = Daemon::start_after_crash(&dir, &shuffled(&m, 5));
    let mut verify_a: Vec<&str> = REGION_A.to_vec();
    verify_a.push("--verify_only");
    fio_ctx(&fio_args(&d.uri(), &verify_a), &|| d.context());
    s.verify(&d.uri());
    d.stop_ok();
}

#[test]
fn kill9_idle_raid5() {
    kill9_idle("k9-raid5", &["--level", "raid5"], 3);
}

#[test]
fn kill9_idle_ec_4_2() {
    kill9_idle("k9-ec42", &["--level", "ec", "--data", "4", "--parity", "2"], 6);
}

#[test]
fn kill9_idle_raid1() {
    kill9_idle("k9-raid1", &["--level", "raid1"], 2);
}

/// kill -9 while four connections are writing: the daemon must reassemble, and data outside the
/// region being written is intact.
#[test]
fn kill9_under_load_raid5() {
    let dir = TestDir::new("k9-load");
    let m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let d = Daemon::start(&dir, &m);
    let uri = d.uri();
    fio_ctx(&fio_args(&uri, &REGION_A), &|| d.context());
    let s = patterns(d.size());
    s.apply(&uri);

    // region B = [32 MiB, 64 MiB): random writes from four connections, killed part-way
    let log = std::fs::File::create(dir.join("fio-load.log")).unwrap();
    let mut load = Command::new(tool("fio"))
        .arg("--verify_state_save=0")
        .args(fio_args(
            &uri,
            &["--rw=randwrite", "--bsrange=4k-256k", "--offset=32m", "--size=32m", "--numjobs=4", "--iodepth=16", "--number_ios=100000", "--norandommap"],
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // wait until the load is really running: the members' data change under it
    let probe = |i: usize| sha256_prefix(&m[i], 64 * MIB);
    let before: Vec<String> = (0..m.len()).map(probe).collect();
    let t = std::time::Instant::now();
    while (0..m.len()).all(|i| probe(i) == before[i]) {
        assert!(t.elapsed() < READY_TIMEOUT, "the fio load never changed a member");
        if let Some(st) = load.try_wait().unwrap() {
            panic!("fio load ended ({st}) before the kill\n{}", std::fs::read_to_string(dir.join("fio-load.log")).unwrap());
        }
    }
    d.kill9();
    let st = load.wait().unwrap();
    assert!(!st.success(), "the fio load should have been cut off by the kill");

    let d = Daemon::start_after_crash(&dir, &m);
    let mut verify_a: Vec<&str> = REGION_A.to_vec();
    verify_a.push("--verify_only");
    fio_ctx(&fio_args(&d.uri(), &verify_a), &|| d.context());
    s.verify(&d.uri());
    // region B is writable and verifiable again
    fio_ctx(&fio_args(&d.uri(), &["--rw=randwrite", "--bs=64k", "--offset=32m", "--size=8m", "--verify=crc32c", "--verify_fatal=1"]), &|| d.context());
    d.stop_ok();
    let (_, n, _) = check(&m);
    eprintln!("after kill -9 under load and restart: inconsistent stripes: {n}");
}

/// A member failing with EIO: reads and writes go on (degraded), with every byte right.
fn degraded(tag: &str, args: &[&str], good: usize, faulty: usize) {
    let dir = TestDir::new(tag);
    let bad: Vec<FaultyMember> = (0..faulty).map(|i| FaultyMember::new(&dir, &format!("bad{i}"), 32 * MIB)).collect();
    let mut m: Vec<PathBuf> = dir.members("m", good);
    for p in &m {
        std::fs::File::create(p).unwrap().set_len(32 * MIB).unwrap();
    }
    m.extend(bad.iter().map(|b| b.path()));
    let a = args.to_vec();
    // No --force: the nbdfuse files report no holes, but create reads their zeros and sees they are blank.
    create(&a, &m);
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    let uri = d.uri();
    let mut write_a: Vec<&str> = REGION_A.to_vec();
    write_a.push("--do_verify=0");
    fio_ctx(&fio_args(&uri, &write_a), &|| d.context());
    let mut s = patterns(d.size());
    s.apply(&uri);

    for b in &bad {
        b.fail();
    }
    let mut verify_a: Vec<&str> = REGION_A.to_vec();
    verify_a.push("--verify_only");
    fio_ctx(&fio_args(&uri, &verify_a), &|| d.context());
    s.verify(&uri);
    let st = status_json(&ctl);
    assert_eq!(st["state"].as_str(), Some("degraded"), "status after member EIO:\n{st:#}");
    let slots = st["slots"].as_array().unwrap();
    for (k, slot) in slots.iter().enumerate().skip(good).take(faulty) {
        assert_eq!(slot["state"].as_str(), Some("failed"), "slot {k} returned EIO but is not failed:\n{st:#}");
    }
    // writes while degraded, then read back
    let base = s.base;
    s.write(base + 100, 300_000, 0x41);
    s.write(base + 3 * MIB + 5, 65536, 0x42);
    s.apply(&uri);
    s.verify(&uri);
    fio_ctx(&fio_args(&uri, &["--rw=randwrite", "--bsrange=512-64k", "--offset=16m", "--size=8m", "--verify=crc32c", "--verify_fatal=1"]), &|| d.context());
    d.stop_ok();
    for b in &bad {
        b.heal();
    }
    // the failed members are recorded as failed: the volume assembles (degraded) and the data
    // written while they were failing is there
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    s.verify(&d.uri());
    let st = status_json(&ctl);
    assert_eq!(st["state"].as_str(), Some("degraded"), "a restart forgot the failed members:\n{st:#}");
    d.stop_ok();
}

#[test]
fn degraded_raid5_one_failing_member() {
    degraded("deg-raid5", &["--level", "raid5"], 2, 1);
}

#[test]
fn degraded_ec_4_2_two_failing_members() {
    degraded("deg-ec42", &["--level", "ec", "--data", "4", "--parity", "2"], 4, 2);
}

#[test]
fn degraded_raid1_one_failing_member() {
    degraded("deg-raid1", &["--level", "raid1"], 1, 1);
}

/// Silent corruption of a member (bytes changed behind the daemon's back) is found by check:
/// with block checksums as exactly the one 4 KiB block overwritten, without (`--checksums off`)
/// as an inconsistent stripe.
fn silent_corruption(tag: &str, checksums: bool) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", 4);
    let mut a = vec!["--level", "raid5", "--size", "32MiB"];
    if !checksums {
        a.extend(["--checksums", "off"]);
    }
    create(&a, &m);
    let d = Daemon::start(&dir, &m);
    let mut s = Shadow::new(0, 2 * MIB);
    s.write(0, 2 * MIB, 0x77);
    s.apply(&d.uri());
    d.stop_ok();
    check_clean(&m);
    // overwrite one 4 KiB block of member 2's data area (written above: volume [0, 2 MiB) is
    // member bytes [0, 704 KiB) of each data area) with other bytes
    let f = std::fs::OpenOptions::new().write(true).open(&m[2]).unwrap();
    use std::os::unix::fs::FileExt;
    let off = data_offset(&m[2]) + 128 * KIB;
    f.write_all_at(&[0x12u8; 4096], off).unwrap();
    f.sync_all().unwrap();
    let c = check_dirty(&m, "overwriting 4 KiB of member 2");
    if checksums {
        assert_eq!((c.failing, c.inconsistent), (Some(1), 0), "one overwritten block should be one block failing its checksum\n{}", show(&c.output));
        let out = String::from_utf8_lossy(&c.output.stdout);
        let named = format!("damaged block: {} at offset {off}", m[2].display());
        assert!(out.contains(&named), "check should name the damaged block ({named})\n{}", show(&c.output));
    } else {
        assert_eq!((c.failing, c.inconsistent), (None, 1), "one overwritten block should be one inconsistent stripe\n{}", show(&c.output));
    }
}

#[test]
fn silent_corruption_in_a_member_is_found_by_check() {
    silent_corruption("corrupt", true);
}

#[test]
fn silent_corruption_in_a_member_is_found_by_check_without_checksums() {
    silent_corruption("corrupt-nocs", false);
}
