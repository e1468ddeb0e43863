//! The command line contract: documented `create` errors, `serve` refusing wrong member sets,
//! bad size strings, `--help`, and the no-argument built-in demo.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn assert_mentions(text: &str, any_of: &[&str], what: &str) {
    let t = text.to_lowercase();
    assert!(any_of.iter().any(|k| t.contains(&k.to_lowercase())), "{what}: message should mention one of {any_of:?}, got:\n{text}");
}

fn hashes(members: &[PathBuf]) -> Vec<String> {
    members.iter().map(|m| sha256_file(m)).collect()
}

#[test]
fn help_works() {
    let o = run_ok(nbraid().arg("--help"));
    let out = String::from_utf8_lossy(&o.stdout);
    for sub in ["create", "serve", "check"] {
        assert!(out.contains(sub), "`nbraid --help` does not list `{sub}`:\n{out}");
    }
    for sub in ["create", "serve", "check"] {
        let o = run_ok(nbraid().arg(sub).arg("--help"));
        assert!(!o.stdout.is_empty(), "`nbraid {sub} --help` printed nothing");
    }
    let o = run_ok(nbraid().args(["create", "--help"]));
    let out = String::from_utf8_lossy(&o.stdout);
    for opt in ["--level", "--chunk", "--size", "--name", "--force", "--data", "--parity"] {
        assert!(out.contains(opt), "`nbraid create --help` does not mention {opt}:\n{out}");
    }
}

#[test]
fn create_prints_a_summary_and_sizes_members() {
    let dir = TestDir::new("cli-sum");
    let m = dir.members("m", 3);
    let o = create(&["--level", "raid5", "--size", "8MiB", "--name", "summ"], &m);
    assert!(!o.stdout.is_empty() || !o.stderr.is_empty(), "create printed no summary");
    for p in &m {
        assert_eq!(std::fs::metadata(p).unwrap().len(), 8 * MIB);
    }
    check_clean(&m);
}

#[test]
fn create_too_few_members() {
    let dir = TestDir::new("cli-few");
    for (level, n) in [("raid5", 2), ("raid1", 1), ("raid0", 1), ("raid6", 2)] {
        let m = dir.members(&format!("{level}-"), n);
        let o = create_fails(&["--level", level, "--size", "8MiB"], &m);
        assert_mentions(&stderr_of(&o), &["member", "at least", "need"], &format!("{level} with {n} members"));
    }
}

#[test]
fn create_data_plus_parity_must_match_members() {
    let dir = TestDir::new("cli-km");
    let m = dir.members("m", 5);
    let o = create_fails(&["--level", "ec", "--data", "4", "--parity", "2", "--size", "8MiB"], &m);
    assert_mentions(&stderr_of(&o), &["6", "data", "parity", "member"], "ec 4+2 on 5 members");
    let m = dir.members("x", 7);
    let o = create_fails(&["--level", "ec", "--data", "4", "--parity", "2", "--size", "8MiB"], &m);
    assert_mentions(&stderr_of(&o), &["6", "data", "parity", "member"], "ec 4+2 on 7 members");
}

/// `--checksum-pages deferred` needs checksums; given them, `status` and `check` tell the mode.
#[test]
fn checksum_pages_mode_is_checked_and_shown() {
    let dir = TestDir::new("cli-pages");
    let m = dir.members("m", 3);
    let o = create_fails(&["--level", "raid5", "--size", "8MiB", "--checksums", "off", "--checksum-pages", "deferred"], &m);
    assert_mentions(&stderr_of(&o), &["--checksum-pages deferred needs --checksums on"], "deferred pages without checksums");
    assert!(m.iter().all(|p| !p.exists()), "a refused create left member files behind");
    let o = create_fails(&["--level", "raid5", "--size", "8MiB", "--checksum-pages", "lazy"], &m);
    assert_mentions(&stderr_of(&o), &["ordered", "deferred"], "an unknown page mode");
    for (mode, shown) in [("deferred", "block checksums: on, pages written at flushes;"), ("ordered", "block checksums: on;")] {
        let m = dir.members(mode, 3);
        create(&["--level", "raid5", "--size", "8MiB", "--checksum-pages", mode], &m);
        let (d, ctl) = admin::start_admin(&dir, &m);
        qemu_io(&d.uri(), &["write -P 0x3c 0 1M".into(), "flush".into()]);
        let text = admin::admin_ok(&ctl, &["status"]);
        assert!(text.contains(shown), "{mode}: status should say {shown:?}\n{text}");
        let json: serde_json::Value = serde_json::from_str(&admin::admin_ok(&ctl, &["status", "--json"])).unwrap();
        assert_eq!(json["deferred_checksum_pages"].as_bool(), Some(mode == "deferred"), "{mode}: {json}");
        qemu_io(&d.uri(), &["read -P 0x3c 0 1M".into()]);
        d.stop_ok();
        check_clean(&m);
    }
}

#[test]
fn create_refuses_member_of_a_volume_without_force() {
    let dir = TestDir::new("cli-inuse");
    let a = dir.members("a", 3);
    create(&["--level", "raid5", "--size", "8MiB", "--name", "first"], &a);
    let before = hashes(&a);
    let b = vec![a[1].clone(), dir.join("b1"), dir.join("b2")];
    let o = create_fails(&["--level", "raid5", "--size", "8MiB", "--name", "second"], &b);
    let msg = stderr_of(&o);
    assert!(msg.contains(&a[1].display().to_string()), "message should name {}:\n{msg}", a[1].display());
    assert_mentions(&msg, &["force", "volume", "member", "in use", "already"], "member in use");
    assert_eq!(hashes(&a), before, "a refused create modified the existing volume's members");
    check_clean(&a);
    // --force takes it
    create(&["--level", "raid5", "--size", "8MiB", "--name", "second", "--force"], &b);
    check_clean(&b);
}

#[test]
fn create_member_too_small() {
    let dir = TestDir::new("cli-small");
    let m = dir.members("m", 3);
    let o = create_fails(&["--level", "raid5", "--size", "1MiB"], &m);
    assert_mentions(&stderr_of(&o), &["small", "size", "at least"], "1 MiB members");
    // existing files that are too small, no --size
    let m = dir.members("f", 3);
    for p in &m {
        std::fs::write(p, vec![0u8; 512 * 1024]).unwrap();
    }
    let o = create_fails(&["--level", "raid5"], &m);
    assert_mentions(&stderr_of(&o), &["small", "size", "at least"], "512 KiB member files");
}

#[test]
fn bad_size_strings_are_rejected() {
    let dir = TestDir::new("cli-sizes");
    let m = dir.members("m", 3);
    for bad in ["12XB", "abc", "-5MiB", "1.5.5GiB", "", "MiB", "99999999999999999999GiB"] {
        let o = create_fails(&["--level", "raid5", "--size", bad], &m);
        let _ = o;
    }
    for bad in ["0", "banana", "-64KiB", "3KiB"] {
        create_fails(&["--level", "raid5", "--size", "8MiB", "--chunk", bad], &m);
    }
    let o = create_fails(&["--level", "raid7", "--size", "8MiB"], &m);
    assert_mentions(&stderr_of(&o), &["raid7", "level", "invalid"], "unknown level");
    // none of the refused attempts may leave a volume behind that serve would accept
    for p in &m {
        if p.exists() {
            let (st, _) = serve_refusal(&dir, &m);
            assert!(!st.success());
            break;
        }
    }
    // and the good spellings work
    for good in ["8MiB", "8192KiB", "8388608"] {
        let d2 = TestDir::new("cli-sizes-ok");
        let m2 = d2.members("m", 3);
        create(&["--level", "raid5", "--size", good, "--chunk", "64KiB"], &m2);
        assert_eq!(std::fs::metadata(&m2[0]).unwrap().len(), 8 * MIB, "--size {good}");
    }
}

/// Start serve on a member set it must refuse; returns its exit status and stderr.
fn serve_refusal(dir: &TestDir, members: &[PathBuf]) -> (std::process::ExitStatus, String) {
    let n = members.len();
    let sock = dir.join(format!("refuse{n}-{}.sock", std::process::id()));
    let log = dir.join(format!("refuse-{}.log", sha256_bytes(format!("{members:?}").as_bytes())));
    let d = Daemon::spawn(dir, members, &[], &sock, &log);
    d.wait_exit()
}

fn assert_refused(dir: &TestDir, members: &[PathBuf], culprit: &Path, what: &str) {
    let (st, err) = serve_refusal(dir, members);
    assert!(!st.success(), "serve should refuse {what}, but exited {st}\n{err}");
    assert!(err.contains(&culprit.display().to_string()), "serve refusing {what}: the message should name {}:\n{err}", culprit.display());
}

#[test]
fn serve_refuses_a_member_of_another_volume() {
    let dir = TestDir::new("cli-foreign");
    let a = dir.members("a", 3);
    let b = dir.members("b", 3);
    create(&["--level", "raid5", "--size", "8MiB", "--name", "va"], &a);
    create(&["--level", "raid5", "--size", "8MiB", "--name", "vb"], &b);
    assert_refused(&dir, &[a[0].clone(), a[1].clone(), b[2].clone()], &b[2], "a member of another volume");
    // and the right set is fine afterwards
    let d = Daemon::start(&dir, &a);
    assert!(d.size() > 0);
    d.stop_ok();
}

#[test]
fn serve_refuses_a_duplicated_member() {
    let dir = TestDir::new("cli-dup");
    let a = dir.members("a", 3);
    create(&["--level", "raid5", "--size", "8MiB"], &a);
    assert_refused(&dir, &[a[0].clone(), a[1].clone(), a[1].clone()], &a[1], "a duplicated member");
    assert_refused(&dir, &[a[0].clone(), a[1].clone(), a[2].clone(), a[0].clone()], &a[0], "a member given twice");
}

#[test]
fn serve_refuses_mixed_geometry() {
    let dir = TestDir::new("cli-geom");
    let a = dir.members("a", 3);
    let c = dir.members("c", 3);
    let z = dir.members("z", 2);
    create(&["--level", "raid5", "--size", "8MiB", "--chunk", "64KiB"], &a);
    create(&["--level", "raid5", "--size", "8MiB", "--chunk", "128KiB"], &c);
    create(&["--level", "raid0", "--size", "8MiB"], &z);
    let (st, err) = serve_refusal(&dir, &[a[0].clone(), a[1].clone(), c[2].clone()]);
    assert!(!st.success(), "serve accepted members with different chunk sizes\n{err}");
    let (st, err) = serve_refusal(&dir, &[a[0].clone(), z[0].clone(), z[1].clone()]);
    assert!(!st.success(), "serve accepted raid5 and raid0 members together\n{err}");
}

#[test]
fn serve_refuses_non_members() {
    let dir = TestDir::new("cli-nonmem");
    let a = dir.members("a", 3);
    create(&["--level", "raid5", "--size", "8MiB"], &a);
    let junk = dir.join("junk");
    random_file(&junk, 8 * MIB, 9);
    assert_refused(&dir, &[a[0].clone(), a[1].clone(), junk.clone()], &junk, "a file that is no member");
    let missing = dir.join("does-not-exist");
    assert_refused(&dir, &[a[0].clone(), a[1].clone(), missing.clone()], &missing, "a missing file");
}

#[test]
fn check_on_a_fresh_volume_is_clean_and_refuses_junk() {
    let dir = TestDir::new("cli-check");
    let a = dir.members("a", 4);
    create(&["--level", "ec", "--data", "2", "--parity", "2", "--size", "8MiB"], &a);
    check_clean(&a);
    let junk = dir.join("junk");
    random_file(&junk, 8 * MIB, 9);
    let o = run(nbraid().arg("check").arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&junk));
    assert!(!o.status.success(), "check accepted a non-member\n{}", show(&o));
}

/// `nbraid serve` with no arguments: RAID-5 of four sparse 1 GiB files under ./nbraid-data,
/// on tcp 127.0.0.1:10809; a second start reuses the same data.
#[test]
fn no_argument_demo() {
    use std::net::TcpStream;
    let dir = TestDir::new("cli-demo");
    let addr = "127.0.0.1:10809";
    assert!(TcpStream::connect(addr).is_err(), "something already listens on {addr}; the demo test needs that port");
    let uri = "nbd://127.0.0.1:10809";
    let start = |tag: &str| {
        let log = std::fs::File::create(dir.join(format!("demo-{tag}.log"))).unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .current_dir(&dir.path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut g = ChildGuard(Some(child));
        let t = std::time::Instant::now();
        while TcpStream::connect(addr).is_err() {
            if let Some(st) = g.0.as_mut().unwrap().try_wait().unwrap() {
                panic!("demo exited early: {st}\n{}", std::fs::read_to_string(dir.join(format!("demo-{tag}.log"))).unwrap());
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(60), "demo never listened on {addr}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        g
    };
    let g = start("1");
    let size = nbdinfo_size(uri);
    let data = dir.join("nbraid-data");
    // 3 data members' data areas (each member: 1 GiB less its metadata, whole stripes)
    let l = member_layout(&data.join("m0"));
    let bound = 3 * (1024 * MIB - l.data_offset);
    assert!(
        size == 3 * l.member_data_bytes && size <= bound && size > bound - 4 * MIB,
        "demo volume size {size}, expected about 3 GiB: 3 x the {} data bytes of a member ({l:?})",
        l.member_data_bytes
    );
    assert!(l.data_offset <= 16 * MIB, "the demo's members spend {} bytes on metadata: {l:?}", l.data_offset);
    let files: Vec<_> = std::fs::read_dir(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display())).collect();
    assert_eq!(files.len(), 4, "demo should create four member files in ./nbraid-data");
    for f in files {
        let f = f.unwrap().path();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 1024 * MIB, "{}", f.display());
    }
    let log = dir.join("demo-1.log");
    let banner = std::fs::read_to_string(&log).unwrap();
    assert!(banner.contains("10809"), "demo should print how to attach (mentioning port 10809):\n{banner}");
    qemu_io(uri, &["write -P 0x42 123457 70000".into()]);
    let st = g.stop();
    assert!(st.success(), "demo exited {st} on SIGTERM");
    let g = start("2");
    qemu_io(uri, &["read -P 0x42 123457 70000".into(), "read -P 0 0 123457".into()]);
    assert!(g.stop().success());
}

struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    fn stop(mut self) -> std::process::ExitStatus {
        let mut c = self.0.take().unwrap();
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let t = std::time::Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > EXIT_TIMEOUT {
                let _ = c.kill();
                let _ = c.wait();
                panic!("process did not exit after SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// While `serve` has the members open, nothing else may touch them: check, create --force and
/// a second serve all refuse, naming the member, and the served data is unharmed.
#[test]
fn members_in_use_by_a_running_daemon_are_refused() {
    let dir = TestDir::new("cli-busy");
    let a = dir.members("a", 3);
    create(&["--level", "raid5", "--size", "8MiB"], &a);
    let d = Daemon::start(&dir, &a);
    qemu_io(&d.uri(), &["write -P 0x5c 4097 100000".into()]);
    let o = run(nbraid().arg("check").args(&a));
    assert!(!o.status.success(), "check ran on members of a running daemon\n{}", show(&o));
    let o = create_fails(&["--level", "raid0", "--size", "8MiB", "--force"], &a[..2]);
    assert!(stderr_of(&o).contains(&a[0].display().to_string()), "{}", show(&o));
    let (st, err) = serve_refusal(&dir, &a);
    assert!(!st.success(), "a second serve started on the same members\n{err}");
    qemu_io(&d.uri(), &["read -P 0x5c 4097 100000".into(), "read -P 0 0 4097".into()]);
    d.stop_ok();
    check_clean(&a);
}

/// Corrupt one byte of member 1's data, then check the volume with the last member left out.
/// With every member present the flip must be found: as a block failing its checksum, or
/// (`--checksums off`) as an inconsistent stripe.
fn check_with_a_member_missing(tag: &str, args: &[&str], n: usize, checksums: bool) -> CheckCounts {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "16MiB"]);
    if !checksums {
        a.extend(["--checksums", "off"]);
    }
    create(&a, &m);
    let d = Daemon::start(&dir, &m);
    qemu_io(&d.uri(), &["write -P 0x11 0 4M".into()]);
    d.stop_ok();
    flip_byte(&m[1], data_offset(&m[1]) + 10, 0xff);
    let c = check_dirty(&m, "a flipped byte with every member present");
    if checksums {
        assert_eq!((c.failing, c.inconsistent), (Some(1), 0), "one flipped byte is one block failing its checksum\n{}", show(&c.output));
    } else {
        assert_eq!((c.failing, c.inconsistent), (None, 1), "without checksums one flipped byte is one inconsistent stripe\n{}", show(&c.output));
    }
    check_counts(&m[..n - 1])
}

/// ec 4+2 with one member missing still has one parity: check must still find the flip (by
/// parity: an inconsistent stripe).
#[test]
fn check_with_a_member_missing_ec_4_2_without_checksums_still_finds_corruption() {
    let c = check_with_a_member_missing("cli-chk-ec-nocs", &["--level", "ec", "--data", "4", "--parity", "2"], 6, false);
    assert!(!c.ok && c.inconsistent > 0, "ec 4+2 minus one member: a flipped byte went unnoticed\n{}", show(&c.output));
}

/// The same with block checksums: the flipped byte fails its checksum (its stripe is then not
/// cross-checked for parity).
#[test]
fn check_with_a_member_missing_ec_4_2_still_finds_corruption() {
    let c = check_with_a_member_missing("cli-chk-ec", &["--level", "ec", "--data", "4", "--parity", "2"], 6, true);
    assert!(!c.ok && c.failing() == 1, "ec 4+2 minus one member: a flipped byte went unnoticed\n{}", show(&c.output));
}

/// raid5 with a member missing has no redundancy left: without checksums check cannot verify
/// anything and must not claim "inconsistent stripes: 0" with exit 0.
#[test]
fn check_with_a_member_missing_raid5_does_not_claim_consistency() {
    let c = check_with_a_member_missing("cli-chk-r5-nocs", &["--level", "raid5"], 4, false);
    assert!(!c.ok, "raid5 minus one member: check exited 0 although nothing could be verified\n{}", show(&c.output));
}

/// With block checksums the blocks can still be verified one by one: check must find the
/// flipped byte even with no parity left (and still exit non-zero).
#[test]
fn check_with_a_member_missing_raid5_still_finds_a_checksum_failure() {
    let c = check_with_a_member_missing("cli-chk-r5", &["--level", "raid5"], 4, true);
    assert!(!c.ok && c.failing() == 1, "raid5 minus one member: the flipped byte should fail its checksum\n{}", show(&c.output));
}
