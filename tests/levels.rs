//! Every RAID level end to end through real clients: unaligned qemu-io patterns across chunk and
//! stripe boundaries (with untouched neighbours read back as zero), a 64 MiB random image in and
//! out with nbdcopy, then a restart with the members in a shuffled order and everything again.

mod common;

use common::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const IMAGE: u64 = 64 * MIB;

struct Level {
    tag: &'static str,
    args: Vec<&'static str>,
    members: usize,
    member_size: u64,
    chunk: u64,
    /// data shards per stripe
    k: u64,
}

fn size_arg(bytes: u64) -> String {
    format!("{}MiB", bytes / MIB)
}

/// The write plan: (absolute volume offset, length, pattern) in the order they are issued.
fn plan(size: u64, c: u64, s: u64) -> (Shadow, Shadow) {
    // Region 1 sits right after the random image; `b` is a stripe boundary inside it.
    let b = round_up(IMAGE + 128 * KIB, s);
    let mut r1 = Shadow::new(IMAGE, b - IMAGE + 5 * s + 8 * MIB + 256 * KIB);
    r1.write(b + 1, 1, 0x11);
    r1.write(b + c - 1, 2, 0x22); // crosses the first chunk boundary
    r1.write(b + c + 100, 4095, 0x33);
    r1.write(b + s - 6000, 12345, 0x44); // crosses a stripe boundary
    r1.write(b + s + c - 1, 65537, 0x55); // crosses chunk boundaries
    r1.write(b + 2 * s - 65535 + 7, 65535, 0x66); // crosses into the third stripe
    r1.write(b - 4095, 4096 + s + 3, 0x77); // from before b across a whole stripe, over earlier writes
    r1.write(b + 2 * s, s, 0x99); // one aligned full stripe
    r1.write(b + 2 * s + c + 3, 513, 0xaa); // partial write into that full stripe
    r1.write(b + 3 * s - 1, s + 2, 0xbb); // crosses two stripe boundaries
    r1.write(b + 4 * s + c, 1, 0xcc);
    r1.write(b + 12345, 1, 0xdd);
    r1.write_zeroes(b + s - 100, 300); // zeroes across a stripe boundary, inside written data
    r1.write_fua(b + 5 * s + 3, 8 * MIB - 5, 0x5f); // one large unaligned FUA request, many stripes
    r1.write_zeroes(b + 6 * s, 2 * s); // whole stripes of zeroes inside it
    r1.write_fua(b + 6 * s + c + 1, 1000, 0x5e);

    // Region 2: the last stripes of the volume.
    let base2 = size - 2 * s - 128 * KIB;
    assert!(base2 > r1.base + r1.bytes.len() as u64, "volume too small for the plan");
    let mut r2 = Shadow::new(base2, size - base2);
    r2.write(size - 2 * s - 100, s, 0xe4);
    r2.write(size - 4095, 4095, 0xe1);
    r2.write(size - s - 1, 3, 0xe2);
    r2.write(size - 1, 1, 0xe3);
    (r1, r2)
}

/// The image the whole volume should equal: random prefix, zeros, the two shadow regions.
fn expected_image(dir: &TestDir, random: &PathBuf, size: u64, regions: &[&Shadow]) -> PathBuf {
    let p = dir.join("expected.img");
    std::fs::copy(random, &p).unwrap();
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(size).unwrap();
    for r in regions {
        f.write_all_at(&r.bytes, r.base).unwrap();
    }
    f.sync_all().unwrap();
    p
}

fn export_and_compare(d: &Daemon, dir: &TestDir, expected: &Path, random: &Path, what: &str) {
    let out = dir.join("out.img");
    let _ = std::fs::remove_file(&out);
    nbdcopy(d.uri(), &out);
    assert_eq!(
        sha256_prefix(&out, IMAGE),
        sha256_file(random),
        "{what}: the first 64 MiB read back with nbdcopy differ from the random file written (first diff at {:?})",
        first_diff(&out, random)
    );
    assert_same_file(&out, expected, &format!("{what}: whole volume vs expected image"));
    std::fs::remove_file(&out).unwrap();
}

fn exercise(l: Level) {
    let dir = TestDir::new(l.tag);
    let members = dir.members("m", l.members);
    let size_s = size_arg(l.member_size);
    let mut args: Vec<&str> = l.args.clone();
    args.extend(["--size", &size_s, "--name", "vol"]);
    create(&args, &members);
    for m in &members {
        assert_eq!(std::fs::metadata(m).unwrap().len(), l.member_size, "member {} has the wrong size", m.display());
    }

    let s = l.chunk * l.k;
    let d = Daemon::start(&dir, &members);
    let size = d.size();
    // Every member has the same layout; the data area is whole stripes just below what is left
    // of the member after its metadata. That metadata is the first MiB, the checksum table (two
    // 4 KiB copies of a page per 511 blocks) and on parity levels the write-hole log (about
    // 4 MiB), rounded up to a MiB: a data area starting later wastes space.
    let layout = member_layout(&members[0]);
    for m in &members[1..] {
        assert_eq!(member_layout(m), layout, "{}: member {} has another layout than {}", l.tag, m.display(), members[0].display());
    }
    assert_eq!(layout.chunk, l.chunk, "{}: chunk in the superblock: {layout:?}", l.tag);
    let table_max = 2 * 4096 * (l.member_size / 4096).div_ceil(511);
    let meta_max = META + round_up(table_max + 5 * MIB, MIB);
    assert!(
        layout.data_offset <= meta_max,
        "{}: the data area starts at {}, beyond the {meta_max} its metadata needs at most: {layout:?}",
        l.tag,
        layout.data_offset
    );
    let room = l.member_size - layout.data_offset;
    assert!(
        layout.member_data_bytes <= room && room - layout.member_data_bytes < l.chunk,
        "{}: {} data bytes per member should be whole chunks just below the {room} after the metadata: {layout:?}",
        l.tag,
        layout.member_data_bytes
    );
    let bound = l.k * room;
    assert!(
        size <= bound && bound - size < s && size.is_multiple_of(s),
        "{}: volume size {size} should be whole stripes of {s} just below {bound} ({layout:?})",
        l.tag
    );
    assert_eq!(size, l.k * layout.member_data_bytes, "{}: volume size vs {} data shards of {layout:?}", l.tag, l.k);
    assert_eq!(nbdinfo_size(&d.uri_named("vol")), size, "named export `vol` has another size than \"\"");

    // 1. random image in with nbdcopy
    let random = dir.join("random.bin");
    random_file(&random, IMAGE, 0x5eed ^ l.members as u64);
    nbdcopy(&random, d.uri());

    // 2. unaligned patterns with qemu-io, then read back (patterns and zero neighbours)
    let (r1, r2) = plan(size, l.chunk, s);
    r1.apply(&d.uri());
    r2.apply(&d.uri_named("vol"));
    r1.verify(&d.uri());
    r2.verify(&d.uri());

    // 3. the whole volume out with nbdcopy
    let expected = expected_image(&dir, &random, size, &[&r1, &r2]);
    export_and_compare(&d, &dir, &expected, &random, "first run");
    d.stop_ok();

    // 4. offline check of the quiescent volume
    check_clean(&members);

    // 5. restart with the members in another order
    let order = shuffled(&members, 7);
    let d = Daemon::start(&dir, &order);
    assert_eq!(d.size(), size, "volume size changed across a restart with members {order:?}");
    r1.verify(&d.uri());
    r2.verify(&d.uri_named("vol"));
    export_and_compare(&d, &dir, &expected, &random, "after restart with shuffled members");
    d.stop_ok();
    check_clean(&members);
}

#[test]
fn raid0_x4() {
    exercise(Level { tag: "raid0x4", args: vec!["--level", "raid0"], members: 4, member_size: 64 * MIB, chunk: 64 * KIB, k: 4 });
}

#[test]
fn raid1_x2() {
    exercise(Level { tag: "raid1x2", args: vec!["--level", "raid1"], members: 2, member_size: 128 * MIB, chunk: 64 * KIB, k: 1 });
}

#[test]
fn raid1_x3() {
    exercise(Level { tag: "raid1x3", args: vec!["--level", "raid1", "--chunk", "32KiB"], members: 3, member_size: 128 * MIB, chunk: 32 * KIB, k: 1 });
}

#[test]
fn raid5_x3() {
    exercise(Level { tag: "raid5x3", args: vec!["--level", "raid5"], members: 3, member_size: 64 * MIB, chunk: 64 * KIB, k: 2 });
}

#[test]
fn raid5_x5() {
    exercise(Level { tag: "raid5x5", args: vec!["--level", "raid5", "--chunk", "16KiB"], members: 5, member_size: 64 * MIB, chunk: 16 * KIB, k: 4 });
}

#[test]
fn ec_4_2() {
    exercise(Level { tag: "ec4p2", args: vec!["--level", "ec", "--data", "4", "--parity", "2"], members: 6, member_size: 64 * MIB, chunk: 64 * KIB, k: 4 });
}

#[test]
fn ec_3_1() {
    exercise(Level {
        tag: "ec3p1",
        args: vec!["--level", "ec", "--data", "3", "--parity", "1", "--chunk", "128KiB"],
        members: 4,
        member_size: 64 * MIB,
        chunk: 128 * KIB,
        k: 3,
    });
}

#[test]
fn raid6_is_ec_k_2() {
    exercise(Level { tag: "raid6x4", args: vec!["--level", "raid6"], members: 4, member_size: 64 * MIB, chunk: 64 * KIB, k: 2 });
}
