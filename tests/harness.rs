//! Tests of the test harness itself, against nbdkit as a reference server: each check the
//! nbraid tests rely on must be able to fail, and teardown must happen even on failure.

mod common;

use common::*;

#[test]
fn qemu_io_wrapper_fails_on_pattern_mismatch() {
    let dir = TestDir::new("h-qio");
    let k = Nbdkit::start(&dir, &["memory", "16M"]);
    qemu_io(&k.uri(), &["write -P 0x5a 4095 12345".into(), "read -P 0x5a 4095 12345".into()]);
    let uri = k.uri();
    assert!(panics(move || {
        qemu_io(&uri, &["read -P 0x5b 4095 12345".into()]);
    }));
    let uri = k.uri();
    assert!(panics(move || {
        qemu_io(&uri, &["read -P 0x00 4000 200".into()]);
    }));
    // a command qemu-io rejects is an error too
    let uri = k.uri();
    assert!(panics(move || {
        qemu_io(&uri, &["read -P 0x00 -5 200".into()]);
    }));
}

#[test]
fn shadow_model_catches_a_stray_byte() {
    let dir = TestDir::new("h-shadow");
    let k = Nbdkit::start(&dir, &["memory", "16M"]);
    let mut s = Shadow::new(MIB, 512 * KIB);
    s.write(MIB + 1, 1, 0x11);
    s.write(MIB + 65535, 65537, 0x22);
    s.write(MIB + 3000, 100, 0x33);
    s.apply(&k.uri());
    s.verify(&k.uri());
    // one byte written next to a pattern, where the model expects zero
    qemu_io(&k.uri(), &[format!("write -P 0x01 {} 1", MIB + 65535 + 65537)]);
    let uri = k.uri();
    assert!(panics(move || s.verify(&uri)));
}

#[test]
fn nbdcopy_and_sha256_roundtrip() {
    let dir = TestDir::new("h-copy");
    let k = Nbdkit::start(&dir, &["memory", "8M"]);
    let src = dir.join("src.bin");
    random_file(&src, 8 * MIB, 1);
    nbdcopy(&src, k.uri());
    let out = dir.join("out.bin");
    nbdcopy(k.uri(), &out);
    assert_same_file(&out, &src, "nbdkit roundtrip");
    flip_byte(&out, 12345, 0x01);
    assert_eq!(first_diff(&out, &src), Some(12345));
    let (o, s) = (out.clone(), src.clone());
    assert!(panics(move || assert_same_file(&o, &s, "flipped")));
}

#[test]
fn fio_wrapper_passes_verify_and_fails_on_io_errors() {
    let dir = TestDir::new("h-fio");
    let k = Nbdkit::start(&dir, &["memory", "32M"]);
    let v = fio(&[
        "--name=v".into(),
        "--ioengine=nbd".into(),
        format!("--uri={}", k.uri()),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=8".into(),
        "--size=4m".into(),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
    ]);
    assert_eq!(fio_bytes(&v, "write"), 4 * MIB);
    let bad = Nbdkit::start(&dir, &["--filter=error", "memory", "32M", "error=EIO", "error-rate=20%"]);
    let uri = bad.uri();
    assert!(panics(move || {
        fio(&[
            "--name=v".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--size=4m".into(),
            "--verify=crc32c".into(),
        ]);
    }));
}

#[test]
fn mount_stack_works_and_tears_down_on_panic() {
    let dir = TestDir::new("h-mnt");
    let k = Nbdkit::start(&dir, &["memory", "64M"]);
    let mv = MountedVolume::new(&dir, &k.sock, "a", true);
    std::fs::write(mv.path().join("f"), b"hello").unwrap();
    let mnt = mv.path().to_path_buf();
    mv.unmount();
    assert!(!is_mounted(&mnt));
    let mv = MountedVolume::new(&dir, &k.sock, "a", false);
    assert_eq!(std::fs::read(mv.path().join("f")).unwrap(), b"hello");
    mv.unmount();

    // a panic while mounted: the guards must umount, detach the loop device and stop nbdfuse
    let sock = k.sock.clone();
    let path = dir.path.clone();
    let r = std::panic::catch_unwind(move || {
        let d = TestDir::at(path);
        let mv = MountedVolume::new(&d, &sock, "b", false);
        assert!(is_mounted(mv.path()));
        panic!("deliberate");
    });
    assert!(r.is_err());
    let mnt = dir.join("mnt-b");
    let fuse_file = dir.join("fuse-b").join("nbd");
    assert!(!is_mounted(&mnt), "mount left behind");
    assert!(!is_mounted(&dir.join("fuse-b")), "nbdfuse mount left behind");
    assert_eq!(loops_for(&fuse_file), "", "loop device left behind");
}

#[test]
fn daemon_guard_reports_an_early_exit_with_its_stderr() {
    let dir = TestDir::new("h-early");
    let missing = dir.join("no-such-member");
    let r = std::panic::catch_unwind(|| {
        let _d = Daemon::start(&dir, std::slice::from_ref(&missing));
    });
    let err = r.expect_err("Daemon::start on a missing member should fail the test");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("exited early"), "unexpected panic message: {msg}");
    assert!(msg.contains("no-such-member"), "the daemon's stderr is not in the message: {msg}");
}
