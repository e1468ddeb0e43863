//! Offsets past 4 GiB (32-bit overflow in offset arithmetic) on sparse members, for a striped
//! and a parity level; also `check` over a multi-GiB volume.

mod common;

use common::*;

fn large(tag: &str, args: &[&str], n: usize) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "3GiB"]);
    create(&a, &m);
    let d = Daemon::start(&dir, &m);
    let size = d.size();
    assert!(size > 5 * 1024 * MIB, "volume of {size} bytes");
    let g4 = 4u64 << 30;
    let mut s1 = Shadow::new(g4 - 256 * KIB, 512 * KIB);
    s1.write(g4 - 4095, 8190, 0x4a); // across 2^32
    s1.write(g4 + 65535, 70000, 0x4b);
    s1.write(g4 - 100_000, 1, 0x4c);
    let mut s2 = Shadow::new(size - 512 * KIB, 512 * KIB);
    s2.write(size - 300_001, 300_001, 0x4d);
    let mut s3 = Shadow::new((2u64 << 30) - 64 * KIB, 128 * KIB); // across 2^31
    s3.write((2u64 << 30) - 3, 6, 0x4e);
    for s in [&s1, &s2, &s3] {
        s.apply(&d.uri());
        s.verify(&d.uri());
    }
    // the bytes must not have wrapped around to low offsets
    qemu_io(&d.uri(), &["read -P 0 0 1M".into()]);
    d.stop_ok();
    check_clean(&m);
    let d = Daemon::start(&dir, &shuffled(&m, 4));
    for s in [&s1, &s2, &s3] {
        s.verify(&d.uri());
    }
    qemu_io(&d.uri(), &["read -P 0 0 1M".into()]);
    d.stop_ok();
}

#[test]
fn past_4gib_raid0() {
    large("big-r0", &["--level", "raid0"], 2);
}

#[test]
fn past_4gib_raid5() {
    large("big-r5", &["--level", "raid5"], 3);
}

#[test]
fn past_4gib_ec_3_2() {
    large("big-ec", &["--level", "ec", "--data", "3", "--parity", "2"], 5);
}
