//! Torn writes: a fault-injecting member persists only the first half of one write (data, a
//! checksum page or a log record, whichever comes) and the daemon dies on the spot, as in a
//! power cut. After a restart no block may return garbage: each block reads as its old or its
//! new content, or (raid0, nothing to heal from) fails with EIO.
//!
//! With deferred checksum pages the table knows neither version of an unflushed block, so the
//! torn one cannot be told from the others and is taken as found: every block must read, and
//! at most one (the one the tear cut through) may hold a mix of old and new.

mod common;

use common::admin::*;
use common::nbd::Client;
use common::*;

const REGION: u64 = 4 * MIB;
const OLD: u8 = 0xa1;
const NEW: u8 = 0xb2;
const BLOCK: usize = 4096;

/// What one block of the region read back as.
#[derive(Debug, PartialEq)]
enum Seen {
    Old,
    New,
    Eio,
    /// Neither old nor new: part of each.
    Mixed,
}

fn read_region(d: &Daemon, what: &str) -> Vec<Seen> {
    let mut c = Client::connect(&d.sock, "");
    let mut out = Vec::new();
    for off in (0..REGION).step_by(BLOCK) {
        match c.read(off, BLOCK as u32) {
            Ok(b) if b.iter().all(|&x| x == OLD) => out.push(Seen::Old),
            Ok(b) if b.iter().all(|&x| x == NEW) => out.push(Seen::New),
            Ok(b) if b.iter().all(|&x| x == OLD || x == NEW) => out.push(Seen::Mixed),
            Ok(b) => {
                let first = b.iter().position(|&x| x != OLD && x != NEW).unwrap_or(0);
                panic!("{what}: block at {off} holds bytes that were never written (first at {first}: {:02x})\n{}", b[first], d.context());
            }
            Err(_) => out.push(Seen::Eio),
        }
    }
    c.disconnect();
    out
}

fn torn_rounds(tag: &str, args: &[&str], n: usize, rounds: usize) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", "32MiB"]);
    create(&a, &m);
    let redundant = !args.contains(&"raid0");
    let deferred = args.contains(&"deferred");
    let (mut adopted, mut mixed_seen) = (0, 0);
    for round in 0..rounds {
        let what = format!("{tag} round {round}");
        let (d, ctl) = start_admin(&dir, &m);
        qemu_io(&d.uri(), &[format!("write -P {OLD} 0 {REGION}"), "flush".into()]);
        let slot = (round % n).to_string();
        let after = (round * 7 % 23).to_string();
        admin_ok(&ctl, &["fault", &slot, "--torn-write", "--after", &after]);
        // Many small requests, so the tear lands somewhere in the middle of them.
        let writes: Vec<String> = (0..REGION / (64 * KIB)).map(|i| format!("write -P {NEW} {} {}", i * 64 * KIB, 64 * KIB)).collect();
        // Write-back, as a filesystem writes between its flushes: qemu-io's default
        // (write-through) flushes after every write, so nothing would be left unflushed.
        let o = run(std::process::Command::new(tool("qemu-io")).args(["-f", "raw", "-t", "writeback", &d.uri()]).args(writes.iter().flat_map(|w| ["-c", w])));
        let (exit, log) = d.wait_exit();
        assert!(!exit.success(), "{what}: the daemon should have died at the torn write\nqemu-io: {}\n{log}", show(&o));
        assert!(log.contains("tearing a write"), "{what}: the daemon died, but not at the injected tear\n{log}");

        let (d, ctl) = start_admin(&dir, &m);
        let seen = read_region(&d, &what);
        let eio = seen.iter().filter(|s| **s == Seen::Eio).count();
        let mixed = seen.iter().filter(|s| **s == Seen::Mixed).count();
        if deferred {
            assert_eq!(eio, 0, "{what}: {eio} block(s) unreadable; with deferred checksum pages the resync takes them as found\n{}", d.context());
            assert!(mixed <= 1, "{what}: {mixed} blocks hold part old, part new data; one torn write can mix at most one\n{}", d.context());
        } else {
            assert_eq!(mixed, 0, "{what}: {mixed} block(s) hold part old, part new data: a torn block was returned\n{}", d.context());
            if redundant {
                assert_eq!(eio, 0, "{what}: {eio} block(s) unreadable although the level has redundancy\n{}", d.context());
            } else {
                assert!(eio <= 1, "{what}: one torn write can damage at most one block of raid0, {eio} are unreadable");
            }
        }
        let st = status(&ctl);
        assert_eq!(st["intent"]["dirty_regions"].as_u64(), Some(0), "{what}: {}", st["intent"]);
        adopted += st["intent"]["resync_adopted"].as_u64().unwrap_or(0);
        mixed_seen += mixed;
        d.stop_ok();
        if redundant || deferred {
            check_clean(&m);
        } else {
            let (_, _, o) = check(&m);
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(text.contains(&format!("blocks failing their checksum: {eio}")), "{what}: check should report the {eio} torn block(s)\n{text}");
            if eio > 0 {
                // Rewrite the damaged block so the next round starts clean.
                let d = Daemon::start(&dir, &m);
                qemu_io(&d.uri(), &[format!("write -P {OLD} 0 {REGION}"), "flush".into()]);
                d.stop_ok();
            }
        }
    }
    // The writes before the tear were never flushed: deferred, their blocks must have been
    // adopted; ordered, there is nothing to adopt.
    assert_eq!(adopted > 0, deferred, "{tag}: {adopted} blocks adopted by the resyncs");
    eprintln!("{tag}: {rounds} rounds, {adopted} blocks adopted, {mixed_seen} mixed blocks read");
}

#[test]
fn torn_writes_raid5() {
    torn_rounds("torn-r5", &["--level", "raid5"], 4, 6);
}

#[test]
fn torn_writes_ec_4_2() {
    torn_rounds("torn-ec", &["--level", "ec", "--data", "4", "--parity", "2"], 6, 6);
}

#[test]
fn torn_writes_raid1() {
    torn_rounds("torn-r1", &["--level", "raid1"], 2, 4);
}

#[test]
fn torn_writes_raid5_deferred_pages() {
    torn_rounds("torn-r5-def", &["--level", "raid5", "--checksum-pages", "deferred"], 4, 6);
}

#[test]
fn torn_writes_raid1_deferred_pages() {
    torn_rounds("torn-r1-def", &["--level", "raid1", "--checksum-pages", "deferred"], 2, 4);
}

#[test]
fn torn_writes_raid0_deferred_pages() {
    torn_rounds("torn-r0-def", &["--level", "raid0", "--checksum-pages", "deferred"], 2, 4);
}

#[test]
fn torn_writes_raid0_never_return_garbage() {
    torn_rounds("torn-r0", &["--level", "raid0"], 2, 4);
}
