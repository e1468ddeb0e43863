//! Randomised differential test: batches of random, byte-unaligned writes (and write-zeroes),
//! biased towards chunk and stripe boundaries, pipelined over several connections at once with
//! disjoint byte ranges (so several of them touch the same stripe concurrently), checked after
//! every batch against an in-memory model of the whole volume — read back with nbdcopy, an
//! independent client. Then an offline check and a restart with shuffled members.
//! Seeds are fixed, so a failure reproduces; the message names the seed and first bad byte.

mod common;

use common::nbd::*;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;

struct Geo {
    tag: &'static str,
    args: &'static [&'static str],
    members: usize,
    chunk: u64,
    k: u64,
    redundant: bool,
}

fn pick_range(rng: &mut StdRng, size: u64, chunk: u64, stripe: u64) -> (u64, u64) {
    let len = match rng.gen_range(0..10) {
        0 => 1,
        1 => rng.gen_range(1..512),
        2..=4 => rng.gen_range(1..2 * chunk),
        5..=6 => rng.gen_range(chunk..3 * stripe),
        7 => stripe,
        8 => rng.gen_range(1..8192),
        _ => rng.gen_range(1..stripe + 1),
    };
    let len = len.min(size);
    let off = match rng.gen_range(0..6) {
        // near a chunk or stripe boundary, either side
        0 | 1 => {
            let unit = if rng.gen_bool(0.5) { chunk } else { stripe };
            let b = rng.gen_range(0..size / unit + 1) * unit;
            let delta = rng.gen_range(0..3u64).pow(2) * [1, 511, 4095][rng.gen_range(0..3)] % unit;
            if rng.gen_bool(0.5) {
                b.saturating_sub(delta)
            } else {
                b + delta
            }
        }
        2 => size - len, // the very end
        _ => rng.gen_range(0..size),
    };
    let off = off.min(size - len);
    (off, len)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn compare(model: &[u8], dir: &TestDir, d: &Daemon, what: &str) {
    let out = dir.join("readback.img");
    let _ = std::fs::remove_file(&out);
    nbdcopy(d.uri(), &out);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), model.len(), "{what}: nbdcopy read {} bytes, volume is {}", got.len(), model.len());
    if got != model {
        let i = (0..model.len()).find(|&i| got[i] != model[i]).unwrap();
        let end = (i..model.len()).find(|&j| got[j] == model[j]).unwrap_or(model.len());
        panic!("{what}: volume differs from the model at bytes [{i}, {end}) (first: got {:#04x}, want {:#04x})\n{}", got[i], model[i], d.context());
    }
    std::fs::remove_file(&out).unwrap();
}

/// `NBRAID_MODEL_ROUNDS=N` runs N seeds per geometry (default 1) for a longer bug hunt.
fn run_model(g: Geo, seed: u64) {
    let rounds: u64 = std::env::var("NBRAID_MODEL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    for r in 0..rounds {
        run_model_once(&g, seed + 1000 * r);
    }
}

fn run_model_once(g: &Geo, seed: u64) {
    let dir = TestDir::new(g.tag);
    let m = dir.members("m", g.members);
    let mut args = g.args.to_vec();
    args.extend(["--size", "8MiB", "--name", "model"]);
    create(&args, &m);
    let d = Daemon::start(&dir, &m);
    let size = d.size();
    let stripe = g.chunk * g.k;
    let mut model = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut conns: Vec<Client> = (0..3).map(|_| Client::connect(&d.sock, "")).collect();
    let can_zero = conns[0].flags & (1 << 6) != 0;

    for batch in 0..12 {
        // up to 24 writes with pairwise-disjoint ranges, all in flight together
        let mut ranges: Vec<(u64, u64)> = vec![];
        for _ in 0..200 {
            if ranges.len() == 24 {
                break;
            }
            let r = pick_range(&mut rng, size, g.chunk, stripe);
            if ranges.iter().all(|&q| !overlaps(q, r)) {
                ranges.push(r);
            }
        }
        let mut pending: Vec<Vec<u64>> = vec![vec![]; conns.len()];
        let mut bufs: Vec<Vec<u8>> = vec![vec![]; conns.len()];
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let ci = i % conns.len();
            let c = &mut conns[ci];
            let zero = can_zero && rng.gen_ratio(1, 8);
            if zero {
                let (h, ck) = c.header(CMD_WRITE_ZEROES, off, len as u32);
                bufs[ci].extend(h);
                pending[ci].push(ck);
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let (h, ck) = c.header(CMD_WRITE, off, len as u32);
                bufs[ci].extend(h);
                bufs[ci].extend(&data);
                pending[ci].push(ck);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        // send everything from all connections, then collect every reply
        std::thread::scope(|sc| {
            for (c, b) in conns.iter_mut().zip(&bufs) {
                let mut s = c.s.try_clone().unwrap();
                sc.spawn(move || s.write_all(b).unwrap());
            }
        });
        for (c, cookies) in conns.iter_mut().zip(&pending) {
            let mut want: std::collections::BTreeSet<u64> = cookies.iter().copied().collect();
            while !want.is_empty() {
                let mut s = c.s.try_clone().unwrap();
                let magic = {
                    let mut b = [0u8; 4];
                    std::io::Read::read_exact(&mut s, &mut b).expect("reply");
                    u32::from_be_bytes(b)
                };
                assert_eq!(magic, SIMPLE_REPLY_MAGIC);
                let mut e = [0u8; 4];
                std::io::Read::read_exact(&mut s, &mut e).unwrap();
                let mut ck = [0u8; 8];
                std::io::Read::read_exact(&mut s, &mut ck).unwrap();
                let ck = u64::from_be_bytes(ck);
                assert!(want.remove(&ck), "unexpected cookie {ck}");
                assert_eq!(u32::from_be_bytes(e), 0, "seed {seed} batch {batch}: a write failed");
            }
        }
        compare(&model, &dir, &d, &format!("{} seed {seed} after batch {batch}", g.tag));
    }
    for c in conns {
        c.disconnect();
    }
    d.stop_ok();
    if g.redundant {
        check_clean(&m);
    }
    let d = Daemon::start(&dir, &shuffled(&m, seed));
    compare(&model, &dir, &d, &format!("{} seed {seed} after restart", g.tag));
    d.stop_ok();
}

#[test]
fn model_raid0_x3_chunk_12k() {
    run_model(Geo { tag: "mdl-r0", args: &["--level", "raid0", "--chunk", "12KiB"], members: 3, chunk: 12 * KIB, k: 3, redundant: false }, 1);
}

#[test]
fn model_raid1_x2_chunk_4k() {
    run_model(Geo { tag: "mdl-r1", args: &["--level", "raid1", "--chunk", "4KiB"], members: 2, chunk: 4 * KIB, k: 1, redundant: true }, 2);
}

#[test]
fn model_raid5_x4_chunk_4k() {
    run_model(Geo { tag: "mdl-r5a", args: &["--level", "raid5", "--chunk", "4KiB"], members: 4, chunk: 4 * KIB, k: 3, redundant: true }, 3);
}

#[test]
fn model_raid5_x3_chunk_64k() {
    run_model(Geo { tag: "mdl-r5b", args: &["--level", "raid5"], members: 3, chunk: 64 * KIB, k: 2, redundant: true }, 4);
}

#[test]
fn model_raid6_x5_chunk_8k() {
    run_model(Geo { tag: "mdl-r6", args: &["--level", "raid6", "--chunk", "8KiB"], members: 5, chunk: 8 * KIB, k: 3, redundant: true }, 5);
}

#[test]
fn model_ec_5_3_chunk_4k() {
    run_model(
        Geo { tag: "mdl-ec53", args: &["--level", "ec", "--data", "5", "--parity", "3", "--chunk", "4KiB"], members: 8, chunk: 4 * KIB, k: 5, redundant: true },
        6,
    );
}

#[test]
fn model_ec_2_1_chunk_20k() {
    run_model(
        Geo {
            tag: "mdl-ec21",
            args: &["--level", "ec", "--data", "2", "--parity", "1", "--chunk", "20KiB"],
            members: 3,
            chunk: 20 * KIB,
            k: 2,
            redundant: true,
        },
        7,
    );
}
