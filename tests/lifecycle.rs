//! Daemon lifecycle: SIGINT and SIGTERM under load drain and exit 0 leaving every stripe
//! consistent; TCP and Unix listeners at once; the README and CI entry points.

mod common;

use common::*;
use std::process::{Command, Stdio};

#[test]
fn sigint_exits_zero() {
    let dir = TestDir::new("lc-int");
    let m = dir.members("m", 3);
    create(&["--level", "raid5", "--size", "16MiB"], &m);
    let d = Daemon::start(&dir, &m);
    qemu_io(&d.uri(), &["write -P 0x21 0 1M".into()]);
    let log = d.log.clone();
    let st = d.signal_and_wait(libc::SIGINT).expect("daemon did not exit on SIGINT");
    assert!(st.success(), "exit {st} on SIGINT\n{}", std::fs::read_to_string(log).unwrap());
    let d = Daemon::start(&dir, &m);
    qemu_io(&d.uri(), &["read -P 0x21 0 1M".into()]);
    d.stop_ok();
}

/// SIGTERM while four connections write: drain in-flight requests, flush, exit 0 — so no stripe
/// is left half-written, and everything written before the load is intact.
fn sigterm_under_load(tag: &str, args: &[&str], n: usize) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "32MiB"]);
    create(&a, &m);
    let d = Daemon::start(&dir, &m);
    let uri = d.uri();
    let keep = |uri: &str| {
        ["--name=keep", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=write", "--bs=64k", "--size=8m", "--verify=crc32c", "--verify_fatal=1"]
            .map(String::from)
            .to_vec()
    };
    fio_ctx(&keep(&uri), &|| d.context());

    let logf = std::fs::File::create(dir.join("fio-load.log")).unwrap();
    let mut load = Command::new(tool("fio"))
        .arg("--verify_state_save=0")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=512-192k",
            "--offset=8m",
            "--size=16m",
            "--numjobs=4",
            "--iodepth=32",
            "--number_ios=1000000",
            "--norandommap",
        ])
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    // wait until the load has changed the members
    let probe = |i: usize| sha256_prefix(&m[i], 64 * MIB);
    let before: Vec<String> = (0..n).map(probe).collect();
    let t = std::time::Instant::now();
    while (0..n).all(|i| probe(i) == before[i]) {
        assert!(t.elapsed() < READY_TIMEOUT, "the fio load never changed a member");
        assert!(load.try_wait().unwrap().is_none(), "fio load ended before SIGTERM");
    }
    d.stop_ok();
    let _ = load.wait();
    check_clean(&m);
    let d = Daemon::start(&dir, &m);
    let mut v = keep(&d.uri());
    v.push("--verify_only".into());
    fio_ctx(&v, &|| d.context());
    d.stop_ok();
}

#[test]
fn sigterm_under_load_raid5() {
    sigterm_under_load("lc-term-r5", &["--level", "raid5"], 4);
}

#[test]
fn sigterm_under_load_ec_4_2() {
    sigterm_under_load("lc-term-ec", &["--level", "ec", "--data", "4", "--parity", "2"], 6);
}

#[test]
fn tcp_and_unix_listeners_together() {
    let dir = TestDir::new("lc-tcp");
    let m = dir.members("m", 2);
    create(&["--level", "raid1", "--size", "16MiB", "--name", "mirror"], &m);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("tcp:127.0.0.1:{port}");
    let d = Daemon::start_with(&dir, &m, &["--listen", &listen]);
    let tcp = format!("nbd://127.0.0.1:{port}/mirror");
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < READY_TIMEOUT, "no TCP listener on {port}\n{}", d.context());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(nbdinfo_size(&tcp), d.size());
    qemu_io(&tcp, &["write -P 0x7e 65535 131073".into()]);
    qemu_io(&d.uri_named("mirror"), &["read -P 0x7e 65535 131073".into(), "read -P 0 0 65535".into()]);
    d.stop_ok();
    check_clean(&m);
}

#[test]
fn readme_quick_start_and_ci_entry_points() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let qs = &readme[readme.find("## Quick start").expect("README has no Quick start")..];
    let cmds: Vec<&str> = qs
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .flat_map(|b| b.lines())
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .take(2)
        .collect();
    assert_eq!(cmds, ["cargo run --release -- serve", "bash tools/test.sh"], "README quick start commands");
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(ci.contains("set -euo pipefail") && ci.lines().any(|l| l.trim() == "bash tools/test.sh"), ".ci/run:\n{ci}");
    for p in ["tools/test.sh", ".ci/run"] {
        let o = run(Command::new("bash").arg("-n").arg(root.join(p)));
        assert!(o.status.success(), "bash -n {p}\n{}", show(&o));
    }
}

/// After `serve` has exited (status 0, reaped), the members are free at once: `check` and a new
/// `serve` must not see them "in use by another nbraid process". Repeated, because the window is
/// short: the daemon's member lock outlives the process while the kernel tears its io_uring
/// (and mappings) down asynchronously.
#[test]
fn members_are_free_as_soon_as_serve_exits() {
    let dir = TestDir::new("lc-free");
    let m = dir.members("m", 6);
    create(&["--level", "ec", "--data", "4", "--parity", "2", "--size", "32MiB"], &m);
    let mut refused = vec![];
    for round in 0..20 {
        let d = Daemon::start(&dir, &m);
        let v = ["--name=w", "--ioengine=nbd", &format!("--uri={}", d.uri()), "--rw=randwrite", "--bs=64k", "--size=8m", "--iodepth=16"].map(String::from);
        fio_ctx(&v, &|| d.context());
        d.stop_ok();
        let o = run(nbraid().arg("check").args(&m));
        if String::from_utf8_lossy(&o.stderr).contains("in use") {
            refused.push(format!("round {round}: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
    }
    assert!(refused.is_empty(), "check right after a clean stop refused {} of 20 times:\n{}", refused.len(), refused.join("\n"));
}
