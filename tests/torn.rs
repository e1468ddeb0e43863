//! Torn writes: a fault-injecting member persists only the first half of one write (data, a
//! checksum page or a log record, whichever comes) and the daemon dies on the spot, as in a
//! power cut. After a restart no block may return garbage: each block reads as its old or its
//! new content, or (raid0, nothing to heal from) fails with EIO.

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
}

fn read_region(d: &Daemon, what: &str) -> Vec<Seen> {
    let mut c = Client::connect(&d.sock, "");
    let mut out = Vec::new();
    for off in (0..REGION).step_by(BLOCK) {
        match c.read(off, BLOCK as u32) {
            Ok(b) if b.iter().all(|&x| x == OLD) => out.push(Seen::Old),
            Ok(b) if b.iter().all(|&x| x == NEW) => out.push(Seen::New),
            Ok(b) => {
                let first = b.iter().position(|&x| x != b[0]).unwrap_or(0);
                panic!("{what}: block at {off} is neither old nor new (first bytes {:02x?}, changes at {first})\n{}", &b[..8], d.context());
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
    for round in 0..rounds {
        let what = format!("{tag} round {round}");
        let (d, ctl) = start_admin(&dir, &m);
        qemu_io(&d.uri(), &[format!("write -P {OLD} 0 {REGION}"), "flush".into()]);
        let slot = (round % n).to_string();
        let after = (round * 7 % 23).to_string();
        admin_ok(&ctl, &["fault", &slot, "--torn-write", "--after", &after]);
        // Many small requests, so the tear lands somewhere in the middle of them.
        let writes: Vec<String> = (0..REGION / (64 * KIB)).map(|i| format!("write -P {NEW} {} {}", i * 64 * KIB, 64 * KIB)).collect();
        let o = qemu_io_raw(&d.uri(), &writes);
        let (exit, log) = d.wait_exit();
        assert!(!exit.success(), "{what}: the daemon should have died at the torn write\nqemu-io: {}\n{log}", show(&o));
        assert!(log.contains("tearing a write"), "{what}: the daemon died, but not at the injected tear\n{log}");

        let (d, ctl) = start_admin(&dir, &m);
        let seen = read_region(&d, &what);
        let eio = seen.iter().filter(|s| **s == Seen::Eio).count();
        if redundant {
            assert_eq!(eio, 0, "{what}: {eio} block(s) unreadable although the level has redundancy\n{}", d.context());
        } else {
            assert!(eio <= 1, "{what}: one torn write can damage at most one block of raid0, {eio} are unreadable");
        }
        let st = status(&ctl);
        assert_eq!(st["intent"]["dirty_regions"].as_u64(), Some(0), "{what}: {}", st["intent"]);
        d.stop_ok();
        if redundant {
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
fn torn_writes_raid0_never_return_garbage() {
    torn_rounds("torn-r0", &["--level", "raid0"], 2, 4);
}
