//! Integrity, from outside: bit flips and overwritten chunks in member files (daemon stopped and
//! running) are found by `nbraid check`, healed by reads (every byte read back through NBD equals
//! what was written), repaired by `nbraid scrub --repair`, and leave a clean volume; on raid0 a
//! damaged block reads as EIO while the rest of the volume keeps serving; `--checksums off`
//! volumes still work.
//!
//! Damage is placed in the members' data areas (`data_offset .. data_offset +
//! member_data_bytes`, read from the superblock) so that no stripe gets more damaged shards than
//! the level tolerates: each damaged stripe is damaged on one member only, except for one
//! deliberate two-shard row on ec 4+2.

mod common;

use common::admin::*;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BLOCK: u64 = 4096;
const MEMBER_SIZE: &str = "32MiB";

// ------------------------------------------------------------------------------------------
// on-disk geometry, from the superblock

#[derive(Debug, Clone, Copy)]
struct Geo {
    chunk: u64,
    data_offset: u64,
    member_data_bytes: u64,
    checksum_table: u64,
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The geometry of a member, from its first superblock copy (all members agree).
fn geo(member: &Path) -> Geo {
    let sb = read_at(member, 0, 4096);
    assert_eq!(&sb[0..8], b"NBRAIDSB", "{}: no superblock magic at offset 0", member.display());
    let g = Geo { chunk: u64_le(&sb, 80), data_offset: u64_le(&sb, 88), member_data_bytes: u64_le(&sb, 96), checksum_table: u64_le(&sb, 3392) };
    assert!(g.chunk >= BLOCK && g.chunk.is_multiple_of(BLOCK), "{}: implausible chunk {g:?}", member.display());
    assert!(
        g.data_offset.is_multiple_of(BLOCK) && g.member_data_bytes.is_multiple_of(g.chunk) && g.member_data_bytes > 0,
        "{}: implausible geometry {g:?}",
        member.display()
    );
    let len = std::fs::metadata(member).unwrap().len();
    assert!(g.data_offset + g.member_data_bytes <= len, "{}: data area {g:?} beyond the file ({len} bytes)", member.display());
    g
}

fn geo_all(m: &[PathBuf]) -> Geo {
    let g = geo(&m[0]);
    for p in &m[1..] {
        let h = geo(p);
        assert_eq!(
            (h.chunk, h.data_offset, h.member_data_bytes),
            (g.chunk, g.data_offset, g.member_data_bytes),
            "members disagree on the geometry: {} vs {}",
            m[0].display(),
            p.display()
        );
    }
    g
}

// ------------------------------------------------------------------------------------------
// damage

#[derive(Debug, Clone)]
enum Hit {
    /// XOR one byte (a single bit) at an absolute member offset.
    Flip { member: usize, off: u64, mask: u8 },
    /// Overwrite a whole chunk (block-aligned, absolute offset) with random bytes.
    Garbage { member: usize, off: u64, len: u64, seed: u64 },
}

struct Damage {
    hits: Vec<Hit>,
    /// Every damaged 4 KiB block as (member index, absolute member offset).
    blocks: BTreeSet<(usize, u64)>,
}

/// Single-bit flips at random blocks of every member, one chunk of garbage on one member, and
/// (`two_in_a_row`, for levels tolerating two lost shards) one row with two flipped members.
/// Apart from that row, every damaged stripe is damaged on one member only.
///
/// The flips go to n groups of n consecutive stripes (a group starting at a multiple of n); in
/// group t member j is damaged in the group's stripe (j + t) mod n. As parity (raid5, ec) and
/// the mirror a read uses (raid1) rotate with the stripe number, every member gets damaged in
/// every rotation position: some damage lands on parity / on the copy reads do not use, and
/// only a scrub finds it.
fn plan(g: &Geo, n: usize, two_in_a_row: bool, seed: u64) -> Damage {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let stripes = g.member_data_bytes / g.chunk;
    let groups = stripes / n as u64;
    assert!(groups as usize > n + 4, "volume too small for the damage plan: {stripes} stripes");
    let blocks_per_chunk = g.chunk / BLOCK;
    let mut used = BTreeSet::new();
    let mut group = |rng: &mut rand::rngs::StdRng| loop {
        let b = rng.gen_range(0..groups);
        if used.insert(b) {
            return b * n as u64;
        }
    };
    let mut hits = vec![];
    let mut blocks = BTreeSet::new();
    for t in 0..n {
        let base = group(&mut rng);
        for j in 0..n {
            let s = base + ((j + t) % n) as u64;
            let off = g.data_offset + s * g.chunk + rng.gen_range(0..blocks_per_chunk) * BLOCK;
            hits.push(Hit::Flip { member: j, off: off + rng.gen_range(0..BLOCK), mask: 1 << rng.gen_range(0..8) });
            blocks.insert((j, off));
        }
    }
    let gm = rng.gen_range(0..n);
    let off = g.data_offset + (group(&mut rng) + rng.gen_range(0..n as u64)) * g.chunk;
    hits.push(Hit::Garbage { member: gm, off, len: g.chunk, seed: rng.gen() });
    for b in 0..blocks_per_chunk {
        blocks.insert((gm, off + b * BLOCK));
    }
    if two_in_a_row {
        let s = group(&mut rng) + rng.gen_range(0..n as u64);
        let off = g.data_offset + s * g.chunk + rng.gen_range(0..blocks_per_chunk) * BLOCK;
        for i in [0, n - 1] {
            hits.push(Hit::Flip { member: i, off: off + rng.gen_range(0..BLOCK), mask: 1 << rng.gen_range(0..8) });
            blocks.insert((i, off));
        }
    }
    for h in &hits {
        let (member, off, len) = match *h {
            Hit::Flip { member, off, .. } => (member, off, 1),
            Hit::Garbage { member, off, len, .. } => (member, off, len),
        };
        assert!(off >= g.data_offset && off + len <= g.data_offset + g.member_data_bytes, "damage outside the data area of member {member}: {h:?} {g:?}");
    }
    Damage { hits, blocks }
}

/// Write the damage into the member files with ordinary pwrite + fsync (works while the daemon
/// has them open with O_DIRECT, too).
fn apply(m: &[PathBuf], d: &Damage) {
    for h in &d.hits {
        match *h {
            Hit::Flip { member, off, mask } => {
                flip_byte(&m[member], off, mask);
            }
            Hit::Garbage { member, off, len, seed } => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut junk = vec![0u8; len as usize];
                rng.fill(&mut junk[..]);
                let before = read_at(&m[member], off, len as usize);
                assert_ne!(before, junk, "garbage equals what was there");
                let f = OpenOptions::new().write(true).open(&m[member]).unwrap();
                f.write_all_at(&junk, off).unwrap();
                f.sync_all().unwrap();
            }
        }
    }
}

fn member_index(m: &[PathBuf], path: &str) -> usize {
    let name = Path::new(path).file_name().unwrap_or_else(|| panic!("slot path {path:?} has no file name"));
    m.iter().position(|p| p.file_name() == Some(name)).unwrap_or_else(|| panic!("slot path {path:?} is none of the members {m:?}"))
}

// ------------------------------------------------------------------------------------------
// `nbraid check`, with its checksum line

struct CheckOut {
    ok: bool,
    inconsistent: u64,
    failing: u64,
    /// `damaged block: PATH at offset OFF` lines.
    listed: Vec<(String, u64)>,
    text: String,
}

fn check_full(m: &[PathBuf]) -> CheckOut {
    let (ok, inconsistent, o) = check(m);
    let text = show(&o);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let failing = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("blocks failing their checksum:")?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("`nbraid check` printed no `blocks failing their checksum: N` line\n{text}"));
    let listed = out
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("damaged block: ")?;
            let (p, off) = rest.rsplit_once(" at offset ")?;
            Some((p.to_string(), off.trim().parse::<u64>().ok()?))
        })
        .collect();
    CheckOut { ok, inconsistent, failing, listed, text }
}

fn assert_check_clean(m: &[PathBuf], what: &str) {
    let c = check_full(m);
    assert!(
        c.ok && c.inconsistent == 0 && c.failing == 0,
        "{what}: expected `nbraid check` clean (exit 0, no inconsistent stripe, no failing block)\n{}",
        c.text
    );
}

/// `check` must exit 1 and name exactly the damaged blocks.
fn assert_check_finds(m: &[PathBuf], d: &Damage) {
    let c = check_full(m);
    assert!(!c.ok, "`nbraid check` exited 0 on damaged members\n{}", c.text);
    assert_eq!(c.failing, d.blocks.len() as u64, "`nbraid check` counted a different number of damaged blocks than were damaged\n{}", c.text);
    assert!(!c.listed.is_empty(), "`nbraid check` listed no damaged block\n{}", c.text);
    assert_eq!(c.listed.len(), d.blocks.len().min(c.listed.len()));
    for (p, off) in &c.listed {
        let i = member_index(m, p);
        assert!(d.blocks.contains(&(i, *off)), "`nbraid check` lists {p} at offset {off}, which was not damaged; damaged: {:?}\n{}", d.blocks, c.text);
    }
}

// ------------------------------------------------------------------------------------------
// status helpers

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("status without numeric {key:?}: {v:#}"))
}

fn scrub_of(ctl: &Path) -> serde_json::Value {
    let st = status(ctl);
    let s = st["scrub"].clone();
    assert!(s.is_object(), "status has no scrub after `scrub --wait`: {st:#}");
    assert_eq!(s["running"].as_bool(), Some(false), "scrub still running after --wait: {s:#}");
    assert_eq!(u(&s, "stripes_done"), u(&s, "stripes_total"), "scrub did not cover every stripe: {s:#}");
    assert!(s["error"].is_null(), "scrub stopped early: {s:#}");
    s
}

/// Volume totals equal the sum over the slots, for checksum_errors and repaired_blocks.
fn assert_slot_sums(st: &serde_json::Value) {
    for key in ["checksum_errors", "repaired_blocks"] {
        let sum: u64 = slots(st).iter().map(|s| u(s, key)).sum();
        assert_eq!(sum, u(st, key), "volume {key} is not the sum of the slots' {key}: {st:#}");
    }
}

fn total_blocks(g: &Geo, n: usize) -> u64 {
    n as u64 * g.member_data_bytes / BLOCK
}

/// data shards per stripe for the test's levels
fn data_shards(level: &str, n: usize) -> u64 {
    match level {
        "raid0" => n as u64,
        "raid1" => 1,
        "raid5" => n as u64 - 1,
        "ec" => 4,
        _ => unreachable!(),
    }
}

/// Create the volume, start it, fill it entirely with random data (nbdcopy). Returns the
/// daemon, control socket, the source image and the geometry.
fn filled(dir: &TestDir, m: &[PathBuf], level: &str, extra: &[&str], seed: u64) -> (Daemon, PathBuf, PathBuf, Geo) {
    let mut a = vec!["--level", level, "--size", MEMBER_SIZE];
    a.extend(extra);
    create(&a, m);
    let g = geo_all(m);
    assert!(g.checksum_table > 0, "a volume created with checksums on has no checksum table offset: {g:?}");
    let (d, ctl) = start_admin_with(dir, m, false);
    let st = status(&ctl);
    assert_eq!(st["checksums"].as_bool(), Some(true), "status should say checksums: true\n{st:#}");
    assert_eq!((u(&st, "checksum_errors"), u(&st, "repaired_blocks")), (0, 0), "fresh volume with errors: {st:#}");
    let size = d.size();
    assert_eq!(size, data_shards(level, m.len()) * g.member_data_bytes, "export size vs the members' data area {g:?}");
    let src = dir.join("src.img");
    random_file(&src, size, seed);
    nbdcopy(&src, d.uri());
    (d, ctl, src, g)
}

/// Waits (hang guard only) until the cleaner has cleared every write-intent bit.
fn wait_bitmap_clean(ctl: &Path) {
    wait_status(ctl, "a clean write-intent bitmap", |v| v["intent"]["dirty_regions"].as_u64() == Some(0));
}

fn read_back_equal(dir: &TestDir, d: &Daemon, src: &Path, what: &str) {
    let out = dir.join("back.img");
    let _ = std::fs::remove_file(&out);
    let o = run(Command::new(tool("nbdcopy")).arg(d.uri()).arg(&out));
    assert!(o.status.success(), "{what}: nbdcopy from the volume failed\n{}\n{}", show(&o), d.context());
    let (g, w) = (sha256_file(&out), sha256_file(src));
    assert!(g == w, "{what}: read back differs from what was written (first difference at byte {:?})\n{}", first_diff(&out, src), d.context());
    std::fs::remove_file(&out).unwrap();
}

// ------------------------------------------------------------------------------------------
// 1. damage while stopped: check finds it, reads heal it, scrub repairs the rest

fn heal_stopped(tag: &str, level: &str, extra: &[&str], n: usize, two_in_a_row: bool, seed: u64) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let (d, ctl, src, g) = filled(&dir, &m, level, extra, seed);
    // Let the write-intent bitmap go clean first: a clean stop leaves bits set (see
    // `lost_write_right_after_clean_stop_reads_eio`), the next start would resync those regions
    // and that, not the reads, would heal the damage.
    wait_bitmap_clean(&ctl);
    d.stop_ok();
    assert_check_clean(&m, "before any damage");

    let dmg = plan(&g, n, two_in_a_row, seed + 1);
    apply(&m, &dmg);
    let expected = dmg.blocks.len() as u64;
    assert_check_finds(&m, &dmg);

    let (mut d, ctl) = start_admin_with(&dir, &m, false);
    let st = status(&ctl);
    assert_eq!(u(&st["intent"], "resync_regions"), 0, "no resync expected after a clean stop with a clean bitmap: {st:#}");
    assert_eq!((u(&st, "checksum_errors"), u(&st, "repaired_blocks")), (0, 0), "damage found before any read: {st:#}");
    read_back_equal(&dir, &d, &src, "after damage, first read (self-healing)");
    let st = status(&ctl);
    assert_slot_sums(&st);
    let (ce, rb) = (u(&st, "checksum_errors"), u(&st, "repaired_blocks"));
    assert!(ce > 0 && rb > 0, "reading the damaged volume counted no checksum error / no repaired block: {st:#}\n{}", d.context());
    assert!(rb <= expected, "reads repaired {rb} blocks, but only {expected} were damaged: {st:#}");
    // every damaged block a read found was repaired (one damaged shard per row at most: always
    // repairable)
    assert_eq!(rb, ce, "reads found {ce} damaged blocks but repaired {rb}: {st:#}\n{}", d.context());
    assert!(rb < expected, "reads healed all {expected} damaged blocks: the plan puts some on parity / on the mirror copy reads do not use, which only a scrub should find\n{st:#}");
    // per slot: never more than was damaged on that member
    for s in slots(&st) {
        let i = member_index(&m, s["path"].as_str().unwrap_or(""));
        let on_member = dmg.blocks.iter().filter(|(j, _)| *j == i).count() as u64;
        assert!(u(&s, "repaired_blocks") <= on_member, "slot {s:#} repaired more than the {on_member} blocks damaged on {}", m[i].display());
    }

    admin_ok(&ctl, &["scrub", "--repair", "--wait"]);
    let sc = scrub_of(&ctl);
    assert_eq!(sc["repair"].as_bool(), Some(true), "{sc:#}");
    assert_eq!(u(&sc, "unrepairable"), 0, "{sc:#}");
    assert_eq!(u(&sc, "mismatches"), 0, "parity disagreed although every damaged block fails its checksum: {sc:#}");
    assert_eq!(
        u(&sc, "checksum_errors"),
        expected - rb,
        "scrub should find exactly the damaged blocks reads did not touch ({expected} damaged, {rb} healed by reads): {sc:#}"
    );
    assert_eq!(u(&sc, "repaired"), expected - rb, "{sc:#}");
    assert_eq!(u(&sc, "blocks_checked"), total_blocks(&g, n), "scrub did not check every block: {sc:#}");
    eprintln!("{level}: {expected} damaged blocks; reads healed {rb}, scrub --repair the other {}", u(&sc, "repaired"));

    admin_ok(&ctl, &["scrub", "--wait"]);
    let sc = scrub_of(&ctl);
    assert_eq!(sc["repair"].as_bool(), Some(false), "{sc:#}");
    assert_eq!((u(&sc, "checksum_errors"), u(&sc, "mismatches")), (0, 0), "a second scrub still finds damage: {sc:#}\n{}", d.context());
    assert_eq!(u(&sc, "blocks_checked"), total_blocks(&g, n), "{sc:#}");

    read_back_equal(&dir, &d, &src, "after scrub --repair");
    assert!(d.is_running(), "daemon died\n{}", d.context());
    d.stop_ok();
    assert_check_clean(&m, "after reads healed and scrub repaired");
}

#[test]
fn stopped_damage_raid1() {
    heal_stopped("int-st-r1", "raid1", &[], 2, false, 100);
}

#[test]
fn stopped_damage_raid5() {
    heal_stopped("int-st-r5", "raid5", &[], 4, false, 200);
}

#[test]
fn stopped_damage_ec_4_2() {
    heal_stopped("int-st-ec", "ec", &["--data", "4", "--parity", "2"], 6, true, 300);
}

// ------------------------------------------------------------------------------------------
// 2. damage while running: scrub --repair first, then reads

fn heal_running(tag: &str, level: &str, extra: &[&str], n: usize, two_in_a_row: bool, seed: u64) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let (d, ctl, src, g) = filled(&dir, &m, level, extra, seed);

    let dmg = plan(&g, n, two_in_a_row, seed + 1);
    apply(&m, &dmg);
    let expected = dmg.blocks.len() as u64;

    admin_ok(&ctl, &["scrub", "--repair", "--wait"]);
    let sc = scrub_of(&ctl);
    assert!(u(&sc, "checksum_errors") >= expected, "scrub --repair found fewer than the {expected} damaged blocks: {sc:#}\n{}", d.context());
    assert_eq!(u(&sc, "checksum_errors"), expected, "scrub --repair counted more damaged blocks than were damaged: {sc:#}");
    assert_eq!(u(&sc, "repaired"), expected, "{sc:#}\n{}", d.context());
    assert_eq!(u(&sc, "unrepairable"), 0, "{sc:#}");
    assert_eq!(u(&sc, "mismatches"), 0, "{sc:#}");
    assert_eq!(u(&sc, "blocks_checked"), total_blocks(&g, n), "{sc:#}");

    admin_ok(&ctl, &["scrub", "--wait"]);
    let sc = scrub_of(&ctl);
    assert_eq!((u(&sc, "checksum_errors"), u(&sc, "mismatches")), (0, 0), "a second scrub still finds damage: {sc:#}\n{}", d.context());

    let before = status(&ctl);
    read_back_equal(&dir, &d, &src, "after damage while running and scrub --repair");
    let after = status(&ctl);
    assert_slot_sums(&after);
    assert_eq!(u(&after, "checksum_errors"), u(&before, "checksum_errors"), "reads after the repair still found damaged blocks: {after:#}");

    d.stop_ok();
    assert_check_clean(&m, "after scrub --repair of damage done while running");
}

#[test]
fn running_damage_raid1() {
    heal_running("int-run-r1", "raid1", &[], 2, false, 400);
}

#[test]
fn running_damage_raid5() {
    heal_running("int-run-r5", "raid5", &[], 4, false, 500);
}

#[test]
fn running_damage_ec_4_2() {
    heal_running("int-run-ec", "ec", &["--data", "4", "--parity", "2"], 6, true, 600);
}

// ------------------------------------------------------------------------------------------
// 3. raid0: no redundancy, the damaged block reads as EIO, the rest serves

#[test]
fn raid0_damaged_block_is_eio() {
    let dir = TestDir::new("int-r0");
    let m = dir.members("m", 2);
    let (mut d, ctl, src, g) = filled(&dir, &m, "raid0", &[], 700);
    let uri = d.uri();
    let size = d.size();

    // a volume block in the middle of a chunk of the second member of some stripe
    let stripe = (g.member_data_bytes / g.chunk) / 3;
    let v = stripe * 2 * g.chunk + g.chunk + 5 * BLOCK;
    assert!(v + BLOCK <= size);
    let moff = g.data_offset + stripe * g.chunk + 5 * BLOCK;
    let want = read_at(&src, v, BLOCK as usize);
    let holders: Vec<usize> = (0..2).filter(|&i| read_at(&m[i], moff, BLOCK as usize) == want).collect();
    assert_eq!(holders.len(), 1, "expected exactly one member holding volume offset {v} at member offset {moff} (raid0 mapping), found {holders:?}");
    let mi = holders[0];
    flip_byte(&m[mi], moff + 1234, 0x10);

    // the damaged block: EIO, whole or in part
    for cmd in [format!("read {v} {BLOCK}"), format!("read {} 512", v + 1024), format!("read {} {}", v - BLOCK, 3 * BLOCK)] {
        let o = qemu_io_raw(&uri, std::slice::from_ref(&cmd));
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).to_lowercase();
        assert!(text.contains("input/output error"), "qemu-io `{cmd}` of a damaged raid0 block should fail with an I/O error\n{}\n{}", show(&o), d.context());
        assert!(!text.lines().any(|l| l.starts_with("read ") && l.contains("bytes at offset")), "qemu-io `{cmd}` reported success\n{}", show(&o));
    }
    let o = run(Command::new(tool("nbdcopy")).arg(&uri).arg(dir.join("all.img")));
    assert!(!o.status.success(), "nbdcopy of the whole volume succeeded although a block is damaged\n{}", show(&o));
    assert!(d.is_running(), "the daemon exited after a damaged read\n{}", d.context());

    // its neighbours read fine (with the right bytes: the whole volume, salvaging around the bad
    // block, equals what was written with that block zeroed)
    qemu_io(&uri, &[format!("read {} {BLOCK}", v - BLOCK), format!("read {} {BLOCK}", v + BLOCK), format!("read 0 {}", MIB)]);
    let salvaged = dir.join("salvaged.img");
    let o = run(Command::new(tool("qemu-img")).args(["convert", "--salvage", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&salvaged));
    assert!(o.status.success(), "qemu-img convert --salvage failed\n{}\n{}", show(&o), d.context());
    let expect = dir.join("expect.img");
    std::fs::copy(&src, &expect).unwrap();
    OpenOptions::new().write(true).open(&expect).unwrap().write_all_at(&[0u8; BLOCK as usize], v).unwrap();
    assert_same_file(&salvaged, &expect, "the volume read around the damaged block");
    std::fs::remove_file(&salvaged).unwrap();

    let st = status(&ctl);
    assert_status(&st, "optimal", &["active", "active"], "a checksum error is not a member failure");
    assert!(u(&st, "checksum_errors") > 0, "status counts no checksum error after the EIO: {st:#}");
    assert_eq!(u(&st, "repaired_blocks"), 0, "raid0 cannot repair: {st:#}");
    assert_slot_sums(&st);
    let damaged_slot = slots(&st).into_iter().find(|s| member_index(&m, s["path"].as_str().unwrap_or("")) == mi).unwrap();
    assert!(u(&damaged_slot, "checksum_errors") > 0, "the damaged member's slot counts no checksum error: {st:#}");

    // scrub can only report it
    let o = admin(&ctl, &["scrub", "--repair", "--wait"]);
    assert!(!o.status.success(), "scrub --repair --wait on raid0 with a damaged block should exit non-zero\n{}", show(&o));
    let sc = scrub_of(&ctl);
    assert_eq!((u(&sc, "checksum_errors"), u(&sc, "unrepairable"), u(&sc, "repaired")), (1, 1, 0), "{sc:#}");
    assert_eq!(u(&sc, "blocks_checked"), total_blocks(&g, 2), "{sc:#}");

    // overwriting the whole block mends it
    qemu_io(&uri, &[format!("write -P 0x5a {v} {BLOCK}"), format!("read -P 0x5a {v} {BLOCK}")]);
    OpenOptions::new().write(true).open(&expect).unwrap().write_all_at(&[0x5au8; BLOCK as usize], v).unwrap();
    read_back_equal(&dir, &d, &expect, "after overwriting the damaged block");
    admin_ok(&ctl, &["scrub", "--wait"]);
    let sc = scrub_of(&ctl);
    assert_eq!(u(&sc, "checksum_errors"), 0, "{sc:#}");
    d.stop_ok();
    assert_check_clean(&m, "raid0 after the damaged block was overwritten");
}

// ------------------------------------------------------------------------------------------
// 4. --checksums off

#[test]
fn checksums_off_volume_works() {
    let dir = TestDir::new("int-off");
    let m = dir.members("m", 3);
    create(&["--level", "raid5", "--size", MEMBER_SIZE, "--checksums", "off"], &m);
    let g = geo_all(&m);
    assert_eq!(g.checksum_table, 0, "--checksums off, yet the superblock names a checksum table: {g:?}");
    let (d, ctl) = start_admin_with(&dir, &m, false);
    let st = status(&ctl);
    assert_eq!(st["checksums"].as_bool(), Some(false), "status should say checksums: false\n{st:#}");
    let size = d.size();
    assert_eq!(size, 2 * g.member_data_bytes);
    let src = dir.join("src.img");
    random_file(&src, size, 800);
    nbdcopy(&src, d.uri());
    read_back_equal(&dir, &d, &src, "checksums off");
    admin_ok(&ctl, &["scrub", "--wait"]);
    let sc = scrub_of(&ctl);
    assert_eq!((u(&sc, "checksum_errors"), u(&sc, "mismatches")), (0, 0), "{sc:#}");
    let st = status(&ctl);
    assert_eq!((u(&st, "checksum_errors"), u(&st, "repaired_blocks")), (0, 0), "{st:#}");
    d.stop_ok();
    let (ok, n, o) = check(&m);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(ok && n == 0, "check of a clean --checksums off volume\n{}", show(&o));
    assert!(text.contains("block checksums: none"), "check should say the volume has no block checksums\n{}", show(&o));
    // parity still catches a flipped bit offline
    flip_byte(&m[1], g.data_offset + 7 * g.chunk + 100, 0x01);
    check_dirty(&m, "a bit flip in a --checksums off raid5 member");
}

// ------------------------------------------------------------------------------------------
// 5. beyond what the level tolerates: EIO, never wrong bytes

/// raid5 with two damaged shards in one row: the row cannot be rebuilt, so the data blocks
/// there read as EIO (a rebuilt block is only kept if its checksum accepts it), everything else
/// reads back exactly, and scrub --repair reports both blocks unrepairable.
#[test]
fn raid5_two_damaged_shards_in_a_row_is_eio_not_garbage() {
    let dir = TestDir::new("int-r5-2");
    let m = dir.members("m", 3);
    let (mut d, ctl, src, g) = filled(&dir, &m, "raid5", &[], 900);
    let uri = d.uri();
    let row = g.data_offset + 11 * g.chunk + 3 * BLOCK;
    flip_byte(&m[0], row + 17, 0x04);
    flip_byte(&m[1], row + 4000, 0x80);

    let o = run(Command::new(tool("nbdcopy")).arg(&uri).arg(dir.join("all.img")));
    assert!(!o.status.success(), "nbdcopy succeeded although a row has two damaged shards on raid5\n{}\n{}", show(&o), d.context());
    let salvaged = dir.join("salvaged.img");
    let o = run(Command::new(tool("qemu-img")).args(["convert", "--salvage", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&salvaged));
    assert!(o.status.success(), "qemu-img convert --salvage failed\n{}\n{}", show(&o), d.context());
    assert!(d.is_running(), "daemon exited\n{}", d.context());
    // only whole blocks differ, and those read as errors (zeroed by --salvage): 1 or 2 data blocks
    let (a, b) = (std::fs::read(&salvaged).unwrap(), std::fs::read(&src).unwrap());
    assert_eq!(a.len(), b.len());
    let differing: Vec<usize> = (0..a.len() / BLOCK as usize).filter(|&i| a[i * 4096..(i + 1) * 4096] != b[i * 4096..(i + 1) * 4096]).collect();
    assert!((1..=2).contains(&differing.len()), "expected 1 or 2 unreadable data blocks, got {} differing blocks {differing:?}", differing.len());
    for &i in &differing {
        assert!(a[i * 4096..(i + 1) * 4096].iter().all(|&x| x == 0), "volume block {i} read back with wrong (non-error) bytes\n{}", d.context());
    }

    let o = admin(&ctl, &["scrub", "--repair", "--wait"]);
    assert!(!o.status.success(), "scrub --repair --wait should exit non-zero when it cannot repair\n{}", show(&o));
    let sc = scrub_of(&ctl);
    assert_eq!((u(&sc, "checksum_errors"), u(&sc, "repaired"), u(&sc, "unrepairable")), (2, 0, 2), "{sc:#}");
    let st = status(&ctl);
    assert_eq!(vol_state(&st), "optimal", "damaged blocks are not a member failure: {st:#}");
    assert_eq!(u(&st, "repaired_blocks"), 0, "{st:#}");
    d.stop_ok();
    let c = check_full(&m);
    assert!(!c.ok && c.failing == 2, "check should still see the two damaged blocks\n{}", c.text);
}

// ------------------------------------------------------------------------------------------
// 6. a lost write (the block reverts to what it held before) after a clean stop

struct LostWrite {
    check: CheckOut,
    read_eio: bool,
    served_stale: bool,
    summary: String,
}

/// raid0 ×2: write a block, stop the daemon cleanly (SIGTERM, exit 0), then put the block's
/// previous bytes back into the member (a write the disk acknowledged and lost). Outside crash
/// recovery only a block's `current` checksum is accepted, so `check` should flag it and a read
/// should get EIO, never the stale bytes. `wait_idle`: let the write-intent bitmap go clean
/// before stopping. Runs `check` offline, then restarts and reads the block.
fn lost_write_after_clean_stop(tag: &str, wait_idle: bool) -> LostWrite {
    let dir = TestDir::new(tag);
    let m = dir.members("m", 2);
    let (d, ctl, src, g) = filled(&dir, &m, "raid0", &[], 1000);
    wait_bitmap_clean(&ctl);
    let uri = d.uri();
    let stripe = (g.member_data_bytes / g.chunk) / 2;
    let v = stripe * 2 * g.chunk + 2 * BLOCK; // first member's chunk of the stripe
    let moff = g.data_offset + stripe * g.chunk + 2 * BLOCK;
    let old = read_at(&src, v, BLOCK as usize);
    let holders: Vec<usize> = (0..2).filter(|&i| read_at(&m[i], moff, BLOCK as usize) == old).collect();
    assert_eq!(holders.len(), 1, "expected exactly one member holding volume offset {v} at member offset {moff}, found {holders:?}");
    let mi = holders[0];
    qemu_io(&uri, &[format!("write -P 0x22 {v} {BLOCK}"), format!("read -P 0x22 {v} {BLOCK}")]);
    assert_eq!(read_at(&m[mi], moff, BLOCK as usize), vec![0x22u8; BLOCK as usize], "the write did not reach the member where expected");
    if wait_idle {
        wait_bitmap_clean(&ctl);
    }
    let dirty_at_stop = u(&status(&ctl)["intent"], "dirty_regions");
    d.stop_ok();

    // the lost write: the block holds its previous bytes again
    let f = OpenOptions::new().write(true).open(&m[mi]).unwrap();
    f.write_all_at(&old, moff).unwrap();
    f.sync_all().unwrap();

    let check = check_full(&m);
    let (mut d, ctl) = start_admin_with(&dir, &m, false);
    let o = qemu_io_raw(&d.uri(), &[format!("read -v {v} {BLOCK}")]);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)).to_lowercase();
    let read_eio = text.contains("input/output error");
    let served_stale = !read_eio && text.lines().any(|l| l.starts_with("read ") && l.contains("bytes at offset"));
    let st = status(&ctl);
    assert!(d.is_running(), "daemon exited\n{}", d.context());
    let shown: String = show(&o).lines().take(12).collect::<Vec<_>>().join("\n");
    let summary = format!(
        "dirty regions when stopped: {dirty_at_stop}; after restart: intent {}, checksum_errors {}\n`nbraid check` (after the clean stop):\n{}\nqemu-io read of the block after restart (EIO: {read_eio}, served the stale bytes: {served_stale}):\n{shown}\n{}",
        st["intent"],
        st["checksum_errors"],
        check.text,
        d.context()
    );
    d.stop_ok();
    LostWrite { check, read_eio, served_stale, summary }
}

/// Offline `check` after a clean, idle stop (bitmap clean) must flag a reverted block.
#[test]
fn check_flags_lost_write_after_clean_stop() {
    let r = lost_write_after_clean_stop("int-lost-chk", true);
    assert!(!r.check.ok && r.check.failing == 1, "`nbraid check` after a clean stop must flag the reverted block (exit 1, 1 failing block)\n{}", r.summary);
}

/// After a clean, idle stop the daemon must answer a reverted block with EIO.
#[test]
fn lost_write_after_idle_clean_stop_reads_eio() {
    let r = lost_write_after_clean_stop("int-lost-idle", true);
    assert!(r.read_eio && !r.served_stale, "a read of the reverted block must get EIO, not the stale bytes\n{}", r.summary);
}

/// The same right after the write: a clean stop (SIGTERM, exit 0) is not a crash, so the
/// restart must not accept the block's previous contents either.
#[test]
fn lost_write_right_after_clean_stop_reads_eio() {
    let r = lost_write_after_clean_stop("int-lost-now", false);
    assert!(r.read_eio && !r.served_stale, "after a clean stop, a read of the reverted block must get EIO, not the stale bytes\n{}", r.summary);
}

// ------------------------------------------------------------------------------------------
// 4. ordering on a volatile write cache: a block's checksum page must be on stable storage
//    before its data, or a power cut can keep the new data with an entry that knows neither crc

/// (cache flushes the block device under `p` has completed, whether its write cache is volatile),
/// from `/sys/dev/block/MAJ:MIN/` (stat field 15, counted from 0, is flushes completed).
fn device_flushes(p: &Path) -> (u64, bool) {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(p).unwrap().dev();
    let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let stat = std::fs::read_to_string(sys.join("stat")).unwrap_or_else(|e| panic!("{}: {e} (the test needs its files on a block device)", sys.display()));
    let fields: Vec<u64> = stat.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert!(fields.len() >= 17, "{}: no flush counters in {stat:?} (kernel older than 5.5?)", sys.display());
    // A partition's queue is its disk's.
    let cache = ["queue/write_cache", "../queue/write_cache"].iter().find_map(|q| std::fs::read_to_string(sys.join(q)).ok()).unwrap_or_default();
    (fields[15], cache.trim() == "write back")
}

#[test]
fn checksum_pages_are_flushed_to_stable_storage_before_the_data_they_describe() {
    let dir = TestDir::new("durable");
    let m = dir.members("m", 4);
    create(&["--level", "raid0", "--size", MEMBER_SIZE], &m);
    let (_, volatile) = device_flushes(&m[0]);
    assert!(
        volatile,
        "{}: its device's write cache is write-through, so durable writes need no flush and this test cannot see them; run the tests with TMPDIR on a device with a volatile write cache",
        m[0].display()
    );
    let d = Daemon::start(&dir, &m);
    const WRITES: u64 = 120;
    // One client write at a time (qemu-io runs its commands in order), each 4 KiB in a block of
    // its own, so each waits for a page write of its own.
    let writes: Vec<String> = (0..WRITES).map(|i| format!("write -P {} {} 4k", i % 250 + 1, i * 917_504 + (i % 7) * BLOCK)).collect();
    // The first pass allocates the blocks in the member files and marks their write-intent
    // regions dirty, which flushes by itself; the second overwrites the same blocks at once,
    // inside regions still dirty, so only the checksum pages can ask for flushes.
    qemu_io(&d.uri(), &writes);
    let (before, _) = device_flushes(&m[0]);
    // writeback: qemu-io's default (writethrough) follows every write with a flush of its own.
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-t", "writeback", "-f", "raw"]).arg(d.uri());
    for w in &writes {
        c.arg("-c").arg(w);
    }
    let o = run(&mut c);
    let (after, _) = device_flushes(&m[0]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"), "qemu-io writes failed\n{}\n{}", show(&o), d.context());
    // Without the flush, O_DIRECT overwrites complete from the device's cache and the count
    // moves only with the filesystem's own journal commits (a few per second).
    assert!(
        after - before >= WRITES,
        "{WRITES} client writes, each behind a checksum page write that must be durable, caused only {} cache flushes on the members' device\n{}",
        after - before,
        d.context()
    );
    let reads: Vec<String> = (0..WRITES).map(|i| format!("read -P {} {} 4k", i % 250 + 1, i * 917_504 + (i % 7) * BLOCK)).collect();
    qemu_io(&d.uri(), &reads);
}
