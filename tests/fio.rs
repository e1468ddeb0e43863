//! fio through its nbd engine: crc32c-verified random writes (fixed and mixed block sizes) on
//! the parity levels, and several connections hammering the same stripes followed by an offline
//! `nbraid check` that must find every stripe consistent — and must notice a flipped byte in any
//! member, data or parity.

mod common;

use common::*;
use std::path::PathBuf;

fn fio_args(uri: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--name=v".to_string(), "--ioengine=nbd".into(), format!("--uri={uri}")];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn volume(dir: &TestDir, args: &[&str], n: usize, member_size: &str) -> Vec<PathBuf> {
    let members = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", member_size, "--name", "fiovol"]);
    create(&a, &members);
    members
}

/// Random 4k writes with crc32c verification, then a mixed block size pass.
fn verify_run(tag: &str, args: &[&str], n: usize) {
    let dir = TestDir::new(tag);
    let members = volume(&dir, args, n, "64MiB");
    let d = Daemon::start(&dir, &members);
    let uri = d.uri();

    let v = fio_ctx(&fio_args(&uri, &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32m", "--verify=crc32c", "--verify_fatal=1"]), &|| d.context());
    assert_eq!(fio_bytes(&v, "write"), 32 * MIB, "fio wrote less than asked");
    assert!(fio_bytes(&v, "read") >= 32 * MIB, "fio verified less than it wrote");

    let mixed = ["--rw=randwrite", "--bsrange=512-128k", "--iodepth=16", "--offset=32m", "--size=24m", "--verify=crc32c", "--verify_fatal=1"];
    let v = fio_ctx(&fio_args(&uri, &mixed), &|| d.context());
    assert_eq!(fio_bytes(&v, "write"), 24 * MIB, "fio (mixed bs) wrote less than asked");

    // sequential, large, unaligned-to-stripe blocks across the whole first region, verified
    let seq = ["--rw=write", "--bs=96k", "--iodepth=8", "--size=30m", "--verify=crc32c", "--verify_fatal=1"];
    let v = fio_ctx(&fio_args(&uri, &seq), &|| d.context());
    assert!(fio_bytes(&v, "write") > 0);
    d.stop_ok();
    check_clean(&members);

    // the same data after a restart with the members in another order
    let d = Daemon::start(&dir, &shuffled(&members, 11));
    for job in [&mixed[..], &seq[..]] {
        let mut a = job.to_vec();
        a.push("--verify_only");
        let v = fio_ctx(&fio_args(&d.uri(), &a), &|| d.context());
        assert!(fio_bytes(&v, "read") > 0);
    }
    d.stop_ok();
    check_clean(&members);
}

#[test]
fn fio_verify_raid5() {
    verify_run("fio-raid5", &["--level", "raid5"], 4);
}

/// Sequential 1 MiB writes at queue depth 8 on raid5 ×4: 1 MiB is never a whole number of
/// 192 KiB stripes, so each request ends in a stripe its neighbour completes. Those halves are
/// combined into one full-stripe write, which needs no reads: the members see next to no
/// reads while the stream is written (separately, each half would read old data and parity).
/// The data must read back verified, and every stripe's parity must agree.
#[test]
fn sequential_writes_combine_partial_stripes_raid5() {
    let dir = TestDir::new("fio-combine");
    let members = volume(&dir, &["--level", "raid5"], 4, "40MiB");
    let (d, ctl) = Daemon::start_controlled(&dir, &members);
    let member_reads = || -> u64 { status_json(&ctl)["slots"].as_array().unwrap().iter().map(|s| s["reads"].as_u64().unwrap()).sum() };
    let job = ["--rw=write", "--bs=1m", "--iodepth=8", "--size=96m", "--verify=crc32c", "--do_verify=0"];
    let before = member_reads();
    let v = fio_ctx(&fio_args(&d.uri(), &job), &|| d.context());
    assert_eq!(fio_bytes(&v, "write"), 96 * MIB, "fio wrote less than asked");
    let reads = member_reads() - before;
    // 96 requests, 95 stripes shared by two of them: about 4 member reads for each if written
    // apart. The bound leaves room for neighbours that did not meet (the stream's ends, a
    // request that arrived late).
    assert!(reads < 96, "{reads} member reads while writing 96 sequential 1 MiB requests: partial stripes were not combined\n{}", d.context());
    let verify = ["--rw=write", "--bs=1m", "--iodepth=8", "--size=96m", "--verify=crc32c", "--verify_only"];
    let v = fio_ctx(&fio_args(&d.uri(), &verify), &|| d.context());
    assert_eq!(fio_bytes(&v, "read"), 96 * MIB, "fio verified less than was written");
    d.stop_ok();
    check_clean(&members);
}

/// Small sequential writes at queue depth 1 on raid5 ×4 (a journal's pattern): none of them has
/// a neighbour to combine with, so each would read old data and parity before writing (2 member
/// reads per 4 KiB). The stripe cache reads each stripe's data once when the stream reaches it
/// instead: about 3 reads per 48 writes. Then the parity it computed is put to the test: with a
/// member failed, every block must still read back verified, part of them rebuilt from parity.
#[test]
fn small_sequential_writes_read_each_stripe_once_raid5() {
    let dir = TestDir::new("fio-stream");
    let members = volume(&dir, &["--level", "raid5"], 4, "16MiB");
    let ctl = common::admin::ctl_path(&dir);
    let d = Daemon::start_with(&dir, &members, &["--control", ctl.to_str().unwrap()]);
    let member_reads = || -> u64 { status_json(&ctl)["slots"].as_array().unwrap().iter().map(|s| s["reads"].as_u64().unwrap()).sum() };
    let streams: [&[&str]; 2] = [&["--rw=write", "--bs=4k", "--iodepth=1", "--size=6m"], &["--rw=write", "--bs=8k", "--iodepth=4", "--offset=6m", "--size=6m"]];
    for job in streams {
        let before = member_reads();
        let mut a = job.to_vec();
        a.extend(["--verify=crc32c", "--do_verify=0"]);
        let v = fio_ctx(&fio_args(&d.uri(), &a), &|| d.context());
        assert_eq!(fio_bytes(&v, "write"), 6 * MIB, "fio wrote less than asked");
        let reads = member_reads() - before;
        // 32 stripes of 192 KiB: 96 reads to load them, and some room for a stream start or
        // two. Without the cache, 1536 writes of 4 KiB would read 3072 times.
        assert!(reads < 200, "{reads} member reads for 6 MiB of sequential writes ({job:?}): the stripe cache did not serve them\n{}", d.context());
    }
    // `status` tells the same story: the 1536 writes of 4 KiB took their parity from the
    // cache but for one load per stripe (64 stripes in all) and the stream's very first write.
    let cache = &status_json(&ctl)["stripe_cache"];
    let (hits, loads) = (cache["hits"].as_u64().unwrap(), cache["loads"].as_u64().unwrap());
    assert!(hits >= 1500 && (64..=96).contains(&loads), "stripe cache status: {cache}\n{}", d.context());
    common::admin::admin_ok(&ctl, &["fail", "2"]);
    for job in streams {
        let mut a = job.to_vec();
        a.extend(["--verify=crc32c", "--verify_only"]);
        let v = fio_ctx(&fio_args(&d.uri(), &a), &|| d.context());
        assert_eq!(fio_bytes(&v, "read"), 6 * MIB, "fio verified less than was written, with slot 2 failed");
    }
    d.stop_ok();
}

#[test]
fn fio_verify_ec_4_2() {
    verify_run("fio-ec42", &["--level", "ec", "--data", "4", "--parity", "2"], 6);
}

/// Four connections writing random blocks to the same 1 MiB (the same few stripes) for a fixed
/// number of I/Os; afterwards every stripe's redundancy must be consistent. Then a flipped byte
/// in each member in turn (so data and parity positions, or each mirror) must be detected: with
/// block checksums as one block failing its checksum, with `--checksums off` as one
/// inconsistent stripe (parity or mirrors disagreeing).
fn concurrent_same_stripes(tag: &str, args: &[&str], n: usize, checksums: bool) {
    let dir = TestDir::new(tag);
    let mut args = args.to_vec();
    if !checksums {
        args.extend(["--checksums", "off"]);
    }
    let members = volume(&dir, &args, n, "32MiB");
    let d = Daemon::start(&dir, &members);
    let uri = d.uri();
    let v = fio_ctx(
        &fio_args(
            &uri,
            &[
                "--rw=randwrite",
                "--bsrange=512-64k",
                "--iodepth=16",
                "--numjobs=4",
                "--offset=0",
                "--size=1m",
                "--number_ios=400",
                "--norandommap",
                "--randrepeat=0",
            ],
        ),
        &|| d.context(),
    );
    assert_eq!(v["jobs"].as_array().unwrap().len(), 4, "expected four fio jobs (connections)");
    // and a concurrent read/write mix over the same region, with flushes
    fio_ctx(
        &fio_args(
            &uri,
            &[
                "--rw=randrw",
                "--rwmixread=30",
                "--bsrange=512-32k",
                "--iodepth=8",
                "--numjobs=4",
                "--offset=0",
                "--size=1m",
                "--number_ios=300",
                "--fsync=16",
                "--norandommap",
            ],
        ),
        &|| d.context(),
    );
    d.stop_ok();
    check_clean(&members);

    // The written region is volume [0, 1 MiB): on every member it is the start of the data
    // area. Flip a byte there in each member in turn.
    let found = |c: &CheckCounts| if checksums { (c.failing(), c.inconsistent) } else { (c.inconsistent, c.failing()) };
    for (i, m) in members.iter().enumerate() {
        let data = data_offset(m);
        let around = read_at(m, data, 4096);
        assert!(
            around.iter().any(|&b| b != 0),
            "member {i} ({}) holds only zeros at the start of its data area [{data}, {data} + 4 KiB) after writes to volume [0, 1 MiB): \
             is its data area not where its superblock says?",
            m.display()
        );
        let off = data + 100;
        let old = flip_byte(m, off, 0xff);
        let c = check_dirty(&members, &format!("flipping byte {off} of member {i} ({})", m.display()));
        assert_eq!(found(&c), (1, 0), "flipping byte {off} of member {i}: one damaged block / inconsistent stripe expected\n{}", show(&c.output));
        flip_byte(m, off, 0xff);
        assert_eq!(read_at(m, off, 1)[0], old);
    }
    check_clean(&members);

    // two members damaged at once (different stripes) is still reported, and counted twice
    flip_byte(&members[0], data_offset(&members[0]) + 7, 0x01);
    flip_byte(&members[n - 1], data_offset(&members[n - 1]) + 200 * KIB, 0x80);
    let c = check_counts(&members);
    assert!(!c.ok && found(&c) == (2, 0), "two flipped bytes (stripes 0 and 3) not both detected\n{}", show(&c.output));
}

#[test]
fn concurrent_writers_raid5() {
    concurrent_same_stripes("conc-raid5", &["--level", "raid5"], 3, true);
}

#[test]
fn concurrent_writers_ec_4_2() {
    concurrent_same_stripes("conc-ec42", &["--level", "ec", "--data", "4", "--parity", "2"], 6, true);
}

#[test]
fn concurrent_writers_raid1() {
    concurrent_same_stripes("conc-raid1", &["--level", "raid1"], 2, true);
}

#[test]
fn concurrent_writers_raid5_without_checksums() {
    concurrent_same_stripes("conc-raid5-nocs", &["--level", "raid5"], 3, false);
}

#[test]
fn concurrent_writers_ec_4_2_without_checksums() {
    concurrent_same_stripes("conc-ec42-nocs", &["--level", "ec", "--data", "4", "--parity", "2"], 6, false);
}

#[test]
fn concurrent_writers_raid1_without_checksums() {
    concurrent_same_stripes("conc-raid1-nocs", &["--level", "raid1"], 2, false);
}

/// Four connections write interleaved, disjoint blocks of the same chunks at the same time
/// (job j writes block j of every 4): a read-modify-write of a member block or a stripe that
/// is not serialised loses a neighbour's update. Every job verifies its own blocks, and a final
/// verify-only pass re-reads all of them once every writer is done.
fn interleaved_writers(tag: &str, args: &[&str], n: usize, redundant: bool) {
    let dir = TestDir::new(tag);
    let members = volume(&dir, args, n, "32MiB");
    let d = Daemon::start(&dir, &members);
    let uri = d.uri();
    for (bs, region) in [(512u64, "0"), (4096, "4m")] {
        let rw = format!("--rw=write:{}", 3 * bs);
        let bs_arg = format!("--bs={bs}");
        let inc = format!("--offset_increment={bs}");
        let off = format!("--offset={region}");
        let common =
            [rw.as_str(), bs_arg.as_str(), inc.as_str(), off.as_str(), "--numjobs=4", "--iodepth=16", "--size=2m", "--verify=crc32c", "--verify_fatal=1"];
        let v = fio_ctx(&fio_args(&uri, &common), &|| d.context());
        assert_eq!(v["jobs"].as_array().unwrap().len(), 4);
        let mut again: Vec<&str> = common.to_vec();
        again.push("--verify_only");
        let v = fio_ctx(&fio_args(&uri, &again), &|| d.context());
        assert!(fio_bytes(&v, "read") > 0, "verify-only pass read nothing");
    }
    d.stop_ok();
    if redundant {
        check_clean(&members);
    }
}

#[test]
fn interleaved_writers_raid5() {
    interleaved_writers("ilv-raid5", &["--level", "raid5"], 3, true);
}

#[test]
fn interleaved_writers_ec_4_2() {
    interleaved_writers("ilv-ec42", &["--level", "ec", "--data", "4", "--parity", "2"], 6, true);
}

#[test]
fn interleaved_writers_raid1() {
    interleaved_writers("ilv-raid1", &["--level", "raid1"], 3, true);
}

#[test]
fn interleaved_writers_raid0() {
    interleaved_writers("ilv-raid0", &["--level", "raid0"], 2, false);
}
