//! The admin API on a running daemon: fail a member, keep serving degraded, add a replacement
//! that is rebuilt (while clients write), hot spares, replace; every byte checked throughout
//! and the result consistent offline and after a restart with the new member set.

mod common;

use common::*;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MEMBER: u64 = 32 * MIB;

fn fio_args(uri: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--name=v".to_string(), "--ioengine=nbd".into(), format!("--uri={uri}")];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

const REGION_A: [&str; 6] = ["--rw=randwrite", "--bsrange=512-128k", "--offset=0", "--size=12m", "--verify=crc32c", "--verify_fatal=1"];

fn verify_a(d: &Daemon) {
    let mut a: Vec<&str> = REGION_A.to_vec();
    a.push("--verify_only");
    fio_ctx(&fio_args(&d.uri(), &a), &|| d.context());
}

fn new_member(dir: &TestDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(MEMBER).unwrap();
    p
}

fn state(ctl: &Path) -> String {
    status_json(ctl)["state"].as_str().unwrap_or("?").to_string()
}

fn slot_states(ctl: &Path) -> Vec<String> {
    status_json(ctl)["slots"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap_or("?").to_string()).collect()
}

fn os(p: &Path) -> &OsStr {
    p.as_os_str()
}

/// A background fio writer on [16 MiB, 24 MiB) for a fixed number of I/Os, verified at the end.
fn background_writer(d: &Daemon, dir: &TestDir) -> std::process::Child {
    let log = std::fs::File::create(dir.join("bg-fio.log")).unwrap();
    Command::new(tool("fio"))
        .arg("--verify_state_save=0")
        .args(fio_args(&d.uri(), &["--rw=randwrite", "--bsrange=4k-64k", "--offset=16m", "--size=8m", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1"]))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn fail_and_rebuild(tag: &str, args: &[&str], n: usize, fail: &[usize]) {
    let dir = TestDir::new(tag);
    let mut m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "32MiB"]);
    create(&a, &m);
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    let mut w = REGION_A.to_vec();
    w.push("--do_verify=0");
    fio_ctx(&fio_args(&d.uri(), &w), &|| d.context());
    let size = d.size();
    let mut s = Shadow::new(size - 3 * MIB, 3 * MIB);
    let b = s.base;
    s.write(b + 3, 70_000, 0x51);
    s.write(b + MIB - 1, MIB + 2, 0x52);
    s.apply(&d.uri());
    assert_eq!(state(&ctl), "optimal");

    for &i in fail {
        ctl_cmd("fail", &ctl, &[os(&m[i])]);
    }
    assert_eq!(state(&ctl), "degraded", "after `nbraid fail`");
    let st = slot_states(&ctl);
    for &i in fail {
        assert_eq!(st[i], "failed", "slot {i} after `nbraid fail`: {st:?}");
    }
    verify_a(&d);
    s.verify(&d.uri());
    // writes while degraded
    s.write(b + 5000, 200_000, 0x53);
    s.write(b + 2 * MIB + 7, 4096, 0x54);
    s.apply(&d.uri());
    s.verify(&d.uri());

    // replacements, rebuilt while a client writes elsewhere (throttled so the two overlap)
    ctl_cmd("rebuild", &ctl, &[OsStr::new("--max-rate"), OsStr::new("20MiB/s")]);
    let mut bg = background_writer(&d, &dir);
    for &i in fail {
        let new = new_member(&dir, &format!("new{i}"));
        ctl_cmd("add", &ctl, &[os(&new)]);
        m[i] = new;
    }
    // more writes while the rebuild runs, over the region being rebuilt
    s.write(b + 100_000, 300_000, 0x55);
    s.apply(&d.uri());
    let o = run(nbraid().arg("rebuild").arg("--control").arg(&ctl).arg("--max-rate").arg("unlimited").arg("--wait"));
    assert!(o.status.success(), "rebuild --wait did not end optimal\n{}\n{}", show(&o), d.context());
    let st = bg.wait().unwrap();
    assert!(st.success(), "background fio during rebuild failed\n{}", std::fs::read_to_string(dir.join("bg-fio.log")).unwrap());
    assert_eq!(state(&ctl), "optimal");
    assert!(slot_states(&ctl).iter().all(|s| s == "active"), "{:?}", slot_states(&ctl));
    verify_a(&d);
    s.verify(&d.uri());
    d.stop_ok();
    check_clean(&m);

    let d = Daemon::start(&dir, &shuffled(&m, 9));
    verify_a(&d);
    s.verify(&d.uri());
    d.stop_ok();
}

#[test]
fn fail_add_rebuild_raid5() {
    fail_and_rebuild("adm-r5", &["--level", "raid5"], 4, &[2]);
}

#[test]
fn fail_add_rebuild_ec_4_2_two_members() {
    fail_and_rebuild("adm-ec", &["--level", "ec", "--data", "4", "--parity", "2"], 6, &[0, 4]);
}

#[test]
fn fail_add_rebuild_raid1() {
    fail_and_rebuild("adm-r1", &["--level", "raid1"], 3, &[1]);
}

#[test]
fn hot_spare_takes_over_a_failed_member() {
    let dir = TestDir::new("adm-spare");
    let m = dir.members("m", 3);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    let mut w = REGION_A.to_vec();
    w.push("--do_verify=0");
    fio_ctx(&fio_args(&d.uri(), &w), &|| d.context());
    let spare = new_member(&dir, "spare");
    ctl_cmd("add", &ctl, &[os(&spare)]);
    assert_eq!(state(&ctl), "optimal");
    assert_eq!(status_json(&ctl)["spares"].as_array().map(|a| a.len()), Some(1), "the added member is not a spare");
    ctl_cmd("fail", &ctl, &[os(&m[1])]);
    let o = run(nbraid().arg("rebuild").arg("--control").arg(&ctl).arg("--wait"));
    assert!(o.status.success(), "rebuild onto the spare did not end optimal\n{}\n{}", show(&o), d.context());
    assert_eq!(state(&ctl), "optimal");
    verify_a(&d);
    d.stop_ok();
    let set = vec![m[0].clone(), spare.clone(), m[2].clone()];
    check_clean(&set);
    let d = Daemon::start(&dir, &set);
    verify_a(&d);
    d.stop_ok();
}

#[test]
fn replace_a_member_while_serving() {
    let dir = TestDir::new("adm-repl");
    let mut m = dir.members("m", 4);
    create(&["--level", "raid5", "--size", "32MiB"], &m);
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    let mut w = REGION_A.to_vec();
    w.push("--do_verify=0");
    fio_ctx(&fio_args(&d.uri(), &w), &|| d.context());
    let new = new_member(&dir, "new3");
    let mut bg = background_writer(&d, &dir);
    let o = run(nbraid().arg("replace").arg("--control").arg(&ctl).arg("--wait").arg(&m[3]).arg(&new));
    assert!(o.status.success(), "replace --wait\n{}\n{}", show(&o), d.context());
    assert!(bg.wait().unwrap().success(), "{}", std::fs::read_to_string(dir.join("bg-fio.log")).unwrap());
    assert_eq!(state(&ctl), "optimal");
    verify_a(&d);
    d.stop_ok();
    m[3] = new;
    check_clean(&m);
    let d = Daemon::start(&dir, &shuffled(&m, 2));
    verify_a(&d);
    d.stop_ok();
}

/// stdout is a pipe whose reader is already gone (as in `nbraid status | head -1`): the CLI
/// must not panic ("failed printing to stdout: Broken pipe").
#[test]
fn cli_output_to_a_closed_pipe_does_not_panic() {
    use std::os::fd::{FromRawFd, OwnedFd};
    fn closed_pipe() -> Stdio {
        let mut fds = [0 as libc::c_int; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        unsafe { libc::close(fds[0]) };
        Stdio::from(unsafe { OwnedFd::from_raw_fd(fds[1]) })
    }
    let dir = TestDir::new("adm-pipe");
    let m = dir.members("m", 3);
    create(&["--level", "raid5", "--size", "16MiB"], &m);
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    let mut failures = vec![];
    let mut probe = |what: &str, c: &mut Command| {
        let o = c.stdout(closed_pipe()).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if err.contains("panicked") || o.status.code() == Some(101) {
            failures.push(format!("`{what}` with stdout closed: {}\n{}", o.status, err.lines().take(3).collect::<Vec<_>>().join("\n")));
        }
    };
    probe("nbraid status --json", nbraid().arg("status").arg("--control").arg(&ctl).arg("--json"));
    probe("nbraid status", nbraid().arg("status").arg("--control").arg(&ctl));
    probe("nbraid --help", nbraid().arg("--help"));
    d.stop_ok();
    probe("nbraid check", nbraid().arg("check").args(&m));
    let m2 = dir.members("x", 3);
    probe("nbraid create", nbraid().args(["create", "--level", "raid5", "--size", "16MiB"]).args(&m2));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Online scrub: a byte changed behind the daemon's back is found while serving; --repair puts
/// the original byte back and makes every stripe consistent again (offline check agrees), and
/// data written through the volume is unharmed.
///
/// With block checksums (the default) the flipped byte is found as a block failing its
/// checksum, on the flipped member, and rebuilt from redundancy; with `--checksums off` it is
/// found as an inconsistent stripe (parity or mirror copies disagreeing with the data) and the
/// repair recomputes parity from the data (raid1: copies slot 0's copy). Either way the flipped
/// byte must be in a parity chunk or a mirror copy other than slot 0 (see the callers), since
/// that is what a repair without checksums may overwrite.
fn scrub_finds_and_repairs(tag: &str, args: &[&str], n: usize, flip_member: usize, checksums: bool) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "16MiB"]);
    if !checksums {
        a.extend(["--checksums", "off"]);
    }
    create(&a, &m);
    let layout = member_layout(&m[flip_member]);
    assert_eq!(layout.checksum_table != 0, checksums, "superblock checksum table offset for checksums {checksums}: {layout:?}");
    let (d, ctl) = Daemon::start_controlled(&dir, &m);
    let mut s = Shadow::new(0, 2 * MIB);
    s.write(0, 2 * MIB, 0x6b);
    s.apply(&d.uri());
    // (checksum errors, inconsistent stripes, repaired) of the last scrub, also in its summary
    let scrub = |repair: bool| {
        let mut c = nbraid();
        c.arg("scrub").arg("--control").arg(&ctl).arg("--wait");
        if repair {
            c.arg("--repair");
        }
        let o = run(&mut c);
        let v = status_json(&ctl);
        let sc = &v["scrub"];
        let num = |k: &str| sc[k].as_u64().unwrap_or_else(|| panic!("scrub status without {k}: {v:#}\n{}", show(&o)));
        assert_eq!(sc["running"].as_bool(), Some(false), "scrub still running after --wait: {v:#}");
        assert_eq!(num("stripes_done"), num("stripes_total"), "scrub did not cover every stripe: {v:#}");
        assert_eq!((num("unrepairable"), num("skipped")), (0, 0), "scrub on an optimal volume: {v:#}");
        let (ce, mm, rep) = (num("checksum_errors"), num("mismatches"), num("repaired"));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains(&format!("{ce} checksum errors, {mm} inconsistent stripes, {rep} repaired")),
            "the summary of `scrub --wait` does not show the counts of `status`: {v:#}\n{}",
            show(&o)
        );
        (o, v, (ce, mm, rep))
    };
    let (o, v, counts) = scrub(false);
    assert!(o.status.success() && counts == (0, 0, 0), "scrub of a clean volume\n{v:#}\n{}", show(&o));

    // corrupt one byte of one member's data area (a parity chunk or a mirror copy)
    let off = layout.data_offset + 1000;
    let old = flip_byte(&m[flip_member], off, 0x10);
    let (o, v, counts) = scrub(false);
    assert!(!o.status.success(), "scrub --wait missed a flipped byte in member {flip_member}\n{}", show(&o));
    let slot_errors: Vec<u64> = (0..n).map(|i| v["slots"][i]["checksum_errors"].as_u64().unwrap_or(0)).collect();
    if checksums {
        assert_eq!(counts, (1, 0, 0), "a flipped byte is one block failing its checksum (nothing repaired without --repair)\n{v:#}");
        let mut want = vec![0; n];
        want[flip_member] = 1;
        assert_eq!(slot_errors, want, "checksum errors per slot: the flipped member is member {flip_member}\n{v:#}");
        assert_eq!(v["checksum_errors"].as_u64(), Some(1), "volume checksum_errors\n{v:#}");
    } else {
        assert_eq!(counts, (0, 1, 0), "without checksums a flipped byte is one inconsistent stripe\n{v:#}");
        assert_eq!(slot_errors, vec![0; n], "no checksum errors without checksums\n{v:#}");
    }

    let (o, v, counts) = scrub(true);
    assert!(o.status.success(), "scrub --repair --wait\n{v:#}\n{}", show(&o));
    if checksums {
        assert_eq!(counts, (1, 0, 1), "scrub --repair: the damaged block found and rebuilt\n{v:#}");
        let repaired = v["slots"][flip_member]["repaired_blocks"].as_u64().unwrap_or(0);
        assert!(repaired >= 1, "slot {flip_member} counts no repaired block after scrub --repair\n{v:#}");
        assert!(v["repaired_blocks"].as_u64().unwrap_or(0) >= 1, "volume repaired_blocks\n{v:#}");
    } else {
        assert_eq!(counts, (0, 1, 1), "scrub --repair: the inconsistent stripe found and rewritten\n{v:#}");
    }
    assert_eq!(read_at(&m[flip_member], off, 1)[0], old, "scrub --repair did not put back the original byte at {off} of member {flip_member}");

    let (o, v, counts) = scrub(false);
    assert!(o.status.success() && counts == (0, 0, 0), "scrub after repair still finds damage\n{v:#}\n{}", show(&o));
    s.verify(&d.uri());
    d.stop_ok();
    check_clean(&m);
}

/// raid5 over 3 members: stripe 0's parity lives on one member; flipping every member's byte
/// in turn would need three volumes, so flip the parity: the member whose first data block is
/// not volume data [0, 64 KiB) or [64 KiB, 128 KiB).
fn scrub_raid5_parity(tag: &str, checksums: bool) {
    let probe = TestDir::new("scrub-probe");
    let m = probe.members("m", 3);
    let mut a = vec!["--level", "raid5", "--size", "16MiB"];
    if !checksums {
        a.extend(["--checksums", "off"]);
    }
    create(&a, &m);
    let d = Daemon::start(&probe, &m);
    qemu_io(&d.uri(), &["write -P 0x01 0 64k".into(), "write -P 0x02 64k 64k".into()]);
    d.stop_ok();
    let parity = (0..3)
        .find(|&i| {
            let b = read_at(&m[i], data_offset(&m[i]), 1)[0];
            b != 0x01 && b != 0x02
        })
        .expect("no member holds stripe 0's parity at the start of its data area");
    scrub_finds_and_repairs(tag, &["--level", "raid5"], 3, parity, checksums);
}

#[test]
fn scrub_raid5_parity_byte() {
    scrub_raid5_parity("scrub-r5", true);
}

#[test]
fn scrub_raid5_parity_byte_without_checksums() {
    scrub_raid5_parity("scrub-r5-nocs", false);
}

#[test]
fn scrub_raid1_second_copy() {
    scrub_finds_and_repairs("scrub-r1", &["--level", "raid1"], 2, 1, true);
}

#[test]
fn scrub_raid1_second_copy_without_checksums() {
    scrub_finds_and_repairs("scrub-r1-nocs", &["--level", "raid1"], 2, 1, false);
}
