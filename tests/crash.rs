//! Crash consistency: rounds of `kill -9` under write load with periodic FLUSH on raid5 and
//! ec 4+2. After every restart:
//! - the write-intent bitmap limits the resync to the dirty regions: at least one, and a small
//!   fraction of a large volume (`status --json`: `intent.resync_regions` of `intent.regions`);
//! - every write acknowledged before the kill reads back intact (see below);
//! - once stopped, `nbraid check` finds every stripe consistent.
//!
//! Then the same with one member left out of the restart (a different one each round): the
//! volume assembles degraded, its resync must mend every dirty stripe (`intent.resync_skipped
//! == 0`: the partial-parity log), the data is verified through the degraded daemon, on ec 4+2
//! (parity to spare) `check` of the present members must already find it consistent, and the
//! member is added back and rebuilt before the final `check`.
//!
//! A kill -9 is not a power cut: every write the daemon acknowledged is in the member files. So
//! the checks below require every *acknowledged* write to read back, which is stronger than
//! "every write acknowledged before the last completed FLUSH".
//!
//! The load in each round is two writers at once, on separate windows:
//!
//! 1. fio (`--ioengine=nbd`, `--verify=crc32c`, FLUSH every few writes via `--fsync`), four
//!    jobs of random writes (three of 4 KiB, one of 96 KiB, which straddles chunk and stripe
//!    boundaries), each saving its verify state when the daemon dies under it
//!    (`--verify_state_save=1`, into `--aux-path`). After the restart `--verify_only
//!    --verify_state_load=1` with the same options and seed replays each job's write sequence
//!    and reads back every write the job saw complete. Two things make that sound, both
//!    established by experiment against the daemon (fio 3.33, `verify_state_should_stop`):
//!    - the jobs run at `--iodepth=1`. fio's state holds the number of writes issued and the
//!      offsets of the last `iodepth` completions, and the replay verifies every write but the
//!      last `iodepth` issued ones unconditionally. With `iodepth=16` that is wrong for a
//!      server that completes out of order: a write issued 28th from last was still in flight
//!      at the kill and the replay reported it (`bad magic header 0`). At depth 1 every write
//!      but the last one has completed, and the last one is checked only if it did;
//!    - no rate limit or think time: there fio's nbd engine spins forever once the connection
//!      is dead (`io_u_quiesce` loops on `nbd_poll: nothing to poll for in state DEAD`). A hang
//!      guard below fails the round instead of waiting for it.
//!
//!    The verify pass must be given `--do_verify=1` or it reads nothing and passes; so each
//!    pass must have read at least every write its job completed but the last one (from the
//!    write pass's own JSON report), which also proves the saved state was found and used.
//!    Each job writes each block at most once (one pass, no `--time_based`), as the replay
//!    requires.
//! 2. Concurrency within stripes and out-of-order completion, which fio at depth 1 does not
//!    give: [`Writer`], a pipelined NBD client (16 requests in flight, FLUSH every 24 writes)
//!    writing tagged blocks, 4–96 KiB at random 4 KiB offsets in a fixed 8 MiB window. It
//!    records which writes were acknowledged; no two writes in flight overlap, so each block's
//!    writes are ordered. After the restart every block must hold exactly its last acknowledged
//!    write, or the write to it that was in flight at the kill, or (never acknowledged a write
//!    this round) what it held after the previous round, byte for byte. The model carries over
//!    from round to round, so data acknowledged in earlier rounds is checked again after every
//!    later crash and resync. One exception, documented by the daemon: after a restart with a
//!    member missing, rows of the lost member that the interrupted (never acknowledged) write
//!    was changing read as whatever the survivors encode, so a block under a write in flight
//!    may then hold anything; it must keep those bytes until written again.
//!
//! Rounds vary the fio seed and window, the writer's seed and the moment of the kill.

mod common;

use common::admin::*;
use common::nbd::{Client, CMD_FLUSH, CMD_WRITE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;
const DEGRADED_ROUNDS: usize = 5;
const DEFERRED_ROUNDS: usize = 8;
/// Large, sparse members: the writes touch small windows, so a resync must stay small.
const MEMBER_SIZE: &str = "256MiB";
/// Hang guard for fio to notice the dead daemon and exit.
const FIO_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------------
// fio with a saved verify state

/// One fio job: a fixed block size (the verify replay must be exact), its own window, a FLUSH
/// every `fsync` writes. Always `iodepth=1` (see the top of the file).
struct Job {
    name: &'static str,
    bs: u64,
    size: u64,
    /// offset of the job's window from the round's base
    at: u64,
    fsync: u64,
}

const JOBS: [Job; 4] = [
    Job { name: "s0", bs: 4 * KIB, size: 6 * MIB, at: 0, fsync: 16 },
    Job { name: "s1", bs: 4 * KIB, size: 6 * MIB, at: 6 * MIB, fsync: 32 },
    Job { name: "s2", bs: 4 * KIB, size: 6 * MIB, at: 12 * MIB, fsync: 64 },
    Job { name: "l0", bs: 96 * KIB, size: 12 * MIB, at: 18 * MIB, fsync: 4 },
];
/// The round's fio base: moves around the volume (multiples of 3 MiB, so 96 KiB-aligned),
/// above the [`Writer`] window and below 620 MiB (raid5 3+1 of 256 MiB members: ~747 MiB).
fn fio_base(round: usize) -> u64 {
    48 * MIB + (round as u64 % 5) * 135 * MIB
}

/// The fio command line for the round: `verify == false` is the write pass (saving the verify
/// state into `state`), `true` the verify pass (loading it).
fn fio_args(uri: &str, state: &Path, round: usize, verify: bool) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--aux-path={}", state.display()),
        "--rw=randwrite".into(),
        "--verify=crc32c".into(),
        "--iodepth=1".into(),
        format!("--randseed={}", 7919 + round),
    ];
    if verify {
        v.extend(["--do_verify=1", "--verify_only", "--verify_state_load=1", "--verify_state_save=0"].map(String::from));
    } else {
        v.extend(["--do_verify=0", "--verify_state_save=1"].map(String::from));
    }
    for j in &JOBS {
        v.push(format!("--name={}", j.name));
        v.push(format!("--bs={}", j.bs));
        v.push(format!("--offset={}", fio_base(round) + j.at));
        v.push(format!("--size={}", j.size));
        v.push(format!("--fsync={}", j.fsync));
    }
    v
}

fn fio_json(out: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&out[out.find('{')?..]).ok()
}

fn job_bytes(v: &serde_json::Value, name: &str, dir: &str) -> u64 {
    let jobs = v["jobs"].as_array().unwrap_or_else(|| panic!("fio JSON without jobs: {v:#}"));
    let j = jobs.iter().find(|j| j["jobname"] == name).unwrap_or_else(|| panic!("fio JSON without job {name}: {v:#}"));
    j[dir]["io_bytes"].as_u64().unwrap_or(0)
}

/// fio `--verify_only` from the saved state: every write fio saw complete must read back
/// intact, and the pass must actually have read them. `written`: bytes each job completed.
fn fio_verify(d: &Daemon, state: &Path, round: usize, written: &[u64], what: &str) -> u64 {
    let args = fio_args(&d.uri(), state, round, true);
    let v = fio_ctx(&args, &|| format!("{what}: fio verify pass after the restart\n{}", d.context()));
    let mut total = 0;
    for (j, &w) in JOBS.iter().zip(written) {
        let read = job_bytes(&v, j.name, "read");
        // every completed write but possibly the last one (depth 1) is read back
        let floor = w.saturating_sub(j.bs);
        assert!(
            read >= floor && (w == 0 || read > 0),
            "{what}: fio's verify pass of job {} read {read} bytes, but the write pass had completed {w} (expected >= {floor}): \
             the verify state was not used or the pass checked nothing\n{v:#}",
            j.name
        );
        total += read;
    }
    total
}

// ------------------------------------------------------------------------------------------
// a pipelined writer of tagged blocks

const BLOCK: u64 = 4 * KIB;
/// The writer's window: fixed, below every fio window.
const WIN_OFF: u64 = 32 * MIB;
const WIN_BLOCKS: usize = (8 * MIB / BLOCK) as usize;
const DEPTH: usize = 16;
const MAX_BLOCKS: usize = 24;
const FLUSH_EVERY: u64 = 24;
const TAG_MAGIC: &[u8; 8] = b"NBRCRASH";

/// Tag 0: the block was never written (zeros).
fn fill(tag: u64, blk: u64, buf: &mut [u8]) {
    if tag == 0 {
        buf.fill(0);
        return;
    }
    buf[0..8].copy_from_slice(TAG_MAGIC);
    buf[8..16].copy_from_slice(&tag.to_le_bytes());
    buf[16..24].copy_from_slice(&blk.to_le_bytes());
    let mut x = (tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ blk.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)) | 1;
    for c in buf[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// Which tag's data block `blk` holds, or what is wrong with it.
fn decode(blk: u64, buf: &[u8]) -> Result<u64, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    if &buf[0..8] != TAG_MAGIC {
        return Err(format!("not a written block (first bytes {:02x?})", &buf[..16]));
    }
    let tag = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    let at = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    if at != blk {
        return Err(format!("the data of tag {tag:#x} for block {at} (misplaced)"));
    }
    let mut want = vec![0u8; buf.len()];
    fill(tag, blk, &mut want);
    match want.iter().zip(buf).position(|(a, b)| a != b) {
        None => Ok(tag),
        Some(i) => Err(format!("tag {tag:#x} header but its data differs from byte {i} (torn or mixed block)")),
    }
}

enum Op {
    Write { tag: u64, first: usize, n: usize },
    Flush,
}

#[derive(Default)]
struct Book {
    busy: Vec<bool>,
    /// per block, the tags written to it this round, in issue order
    hist: Vec<Vec<u64>>,
    inflight: HashMap<u64, Op>,
    acked: HashSet<u64>,
    /// tag -> (first block, blocks)
    ranges: HashMap<u64, (usize, usize)>,
    stop: bool,
    /// error replies (there must be none: the daemon dies without answering)
    errors: Vec<String>,
    writes_acked: u64,
    flushes_acked: u64,
    writes_sent: u64,
}

/// What the model knows each block of the window holds: a tag (0: zeros), or, for a block an
/// interrupted write left undefined, exactly the bytes it was found holding.
struct Model {
    known: Vec<u64>,
    raw: HashMap<usize, Vec<u8>>,
}

/// `Model::known` of a block whose content is in `Model::raw`.
const UNDEFINED: u64 = u64::MAX;

struct Writer {
    book: Arc<(Mutex<Book>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(sock: &Path, round: usize) -> Writer {
        let c = Client::connect(sock, "");
        let mut tx = c.s.try_clone().unwrap();
        let mut rx = c.s;
        rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let book = Arc::new((Mutex::new(Book { busy: vec![false; WIN_BLOCKS], hist: vec![vec![]; WIN_BLOCKS], ..Default::default() }), Condvar::new()));
        let b = book.clone();
        let sender = std::thread::spawn(move || {
            let (m, cv) = &*b;
            let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE + round as u64);
            let mut cookie = 0u64;
            let mut seq = 0u64;
            let mut since_flush = 0;
            let mut buf = vec![];
            loop {
                let mut g = m.lock().unwrap();
                while !g.stop && g.inflight.len() >= DEPTH {
                    g = cv.wait(g).unwrap();
                }
                if g.stop {
                    return;
                }
                cookie += 1;
                buf.clear();
                let (typ, off, len);
                if since_flush >= FLUSH_EVERY {
                    since_flush = 0;
                    g.inflight.insert(cookie, Op::Flush);
                    drop(g);
                    (typ, off, len) = (CMD_FLUSH, 0, 0);
                } else {
                    let n = if rng.gen_bool(0.5) { 1 } else { rng.gen_range(2..=MAX_BLOCKS) };
                    let first = rng.gen_range(0..=WIN_BLOCKS - n);
                    if g.busy[first..first + n].iter().any(|&x| x) {
                        continue; // overlaps a write in flight: pick again
                    }
                    seq += 1;
                    let tag = ((round as u64 + 1) << 32) | seq;
                    for i in first..first + n {
                        g.busy[i] = true;
                        g.hist[i].push(tag);
                    }
                    g.inflight.insert(cookie, Op::Write { tag, first, n });
                    g.ranges.insert(tag, (first, n));
                    g.writes_sent += 1;
                    since_flush += 1;
                    drop(g);
                    buf.resize(n * BLOCK as usize, 0);
                    for (i, blk) in buf.chunks_mut(BLOCK as usize).enumerate() {
                        fill(tag, (first + i) as u64, blk);
                    }
                    (typ, off, len) = (CMD_WRITE, WIN_OFF + first as u64 * BLOCK, (n as u64 * BLOCK) as u32);
                }
                let mut h = Vec::with_capacity(28 + buf.len());
                h.extend(REQUEST_MAGIC.to_be_bytes());
                h.extend(0u16.to_be_bytes());
                h.extend(typ.to_be_bytes());
                h.extend(cookie.to_be_bytes());
                h.extend(off.to_be_bytes());
                h.extend(len.to_be_bytes());
                h.extend(&buf);
                if tx.write_all(&h).is_err() {
                    let mut g = m.lock().unwrap();
                    g.stop = true;
                    cv.notify_all();
                    return;
                }
            }
        });
        let b = book.clone();
        let receiver = std::thread::spawn(move || {
            let (m, cv) = &*b;
            loop {
                let mut r = [0u8; 16];
                if rx.read_exact(&mut r).is_err() {
                    break; // the daemon died
                }
                let mut g = m.lock().unwrap();
                let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
                let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
                if magic != SIMPLE_REPLY_MAGIC {
                    g.errors.push(format!("reply with magic {magic:#x}"));
                    break;
                }
                match g.inflight.remove(&cookie) {
                    None => {
                        g.errors.push(format!("reply for unknown cookie {cookie}"));
                        break;
                    }
                    Some(_) if error != 0 => {
                        g.errors.push(format!("error {error} for request {cookie}"));
                        break;
                    }
                    Some(Op::Flush) => g.flushes_acked += 1,
                    Some(Op::Write { tag, first, n }) => {
                        g.acked.insert(tag);
                        g.writes_acked += 1;
                        for i in first..first + n {
                            g.busy[i] = false;
                        }
                    }
                }
                cv.notify_all();
            }
            let mut g = m.lock().unwrap();
            g.stop = true;
            cv.notify_all();
        });
        Writer { book, threads: vec![sender, receiver] }
    }

    fn acked(&self) -> u64 {
        self.book.0.lock().unwrap().writes_acked
    }

    fn is_running(&self) -> bool {
        !self.book.0.lock().unwrap().stop
    }

    /// After the daemon died: wait for both threads (the connection is closed).
    fn finish(self) -> Book {
        for t in self.threads {
            t.join().expect("writer thread panicked");
        }
        Arc::try_unwrap(self.book).ok().expect("writer book still shared").0.into_inner().unwrap()
    }
}

/// Reads the writer's window through the daemon. Every block must hold its last acknowledged
/// write, or the write in flight after it, or (none acknowledged this round) its content from
/// before the round. With `degraded` (the restart left a member out), a block under the write
/// in flight at the kill may hold anything: the daemon documents that rows of the lost member
/// that an interrupted write was changing read as whatever the survivors encode; such a block
/// must then keep those bytes until it is written again. Updates the model to what was found;
/// returns (blocks holding data acknowledged this round, which must be > 0 to show the check
/// compared real data; blocks left undefined).
fn writer_verify(d: &Daemon, model: &mut Model, book: &Book, degraded: bool, what: &str) -> (usize, usize) {
    let mut c = Client::connect(&d.sock, "");
    const CHUNK: usize = 64;
    let mut bad = vec![];
    let mut nbad = 0;
    let (mut fresh, mut undefined) = (0, 0);
    let acked = |t: &u64| book.acked.contains(t);
    for start in (0..WIN_BLOCKS).step_by(CHUNK) {
        let data = c
            .read(WIN_OFF + start as u64 * BLOCK, (CHUNK as u64 * BLOCK) as u32)
            .unwrap_or_else(|e| panic!("{what}: reading the writer's window at block {start}: NBD error {e}\n{}", d.context()));
        for (i, blk) in data.chunks(BLOCK as usize).enumerate() {
            let b = start + i;
            let h = &book.hist[b];
            let last_acked = h.iter().rposition(acked);
            let prior_ok = last_acked.is_none();
            let mut allowed: Vec<u64> = h[last_acked.unwrap_or(0)..].to_vec();
            if prior_ok && model.known[b] != UNDEFINED {
                allowed.insert(0, model.known[b]);
            }
            let interrupted = h.last().is_some_and(|t| !acked(t));
            let found = decode(b as u64, blk);
            match &found {
                Ok(t) if allowed.contains(t) => {
                    fresh += usize::from(acked(t));
                    model.known[b] = *t;
                    model.raw.remove(&b);
                    continue;
                }
                _ if prior_ok && model.known[b] == UNDEFINED && model.raw.get(&b).is_some_and(|r| r[..] == *blk) => continue,
                _ if degraded && interrupted => {
                    undefined += 1;
                    model.known[b] = UNDEFINED;
                    model.raw.insert(b, blk.to_vec());
                    continue;
                }
                _ => {}
            }
            nbad += 1;
            if bad.len() < 20 {
                let desc = |t: &u64| {
                    let (f, n) = book.ranges.get(t).copied().unwrap_or_default();
                    format!("{t:#x} blocks {f}..{}{}", f + n, if acked(t) { " (acked)" } else { " (in flight)" })
                };
                let hs: Vec<String> = h.iter().map(desc).collect();
                let found = match &found {
                    Ok(t) => format!("Ok({})", desc(t)),
                    Err(e) => format!("Err({e})"),
                };
                let before = match model.known[b] {
                    UNDEFINED => "bytes left undefined by an earlier interrupted write".to_string(),
                    t => format!("{t:#x}"),
                };
                bad.push(format!(
                    "  block {b} (volume offset {}): found {found}; allowed {allowed:x?}; before this round {before}; this round {hs:?}",
                    WIN_OFF + b as u64 * BLOCK,
                ));
            }
        }
    }
    c.disconnect();
    assert!(
        nbad == 0,
        "{what}: {nbad} block(s) of the writer's window do not hold what was acknowledged \
         ({} writes and {} flushes acknowledged, {} sent):\n{}\n{}",
        book.writes_acked,
        book.flushes_acked,
        book.writes_sent,
        bad.join("\n"),
        d.context()
    );
    assert!(fresh > 0, "{what}: no block of the writer's window holds a write acknowledged this round ({} acknowledged)", book.writes_acked);
    (fresh, undefined)
}

// ------------------------------------------------------------------------------------------
// the rounds

fn member_writes(v: &serde_json::Value) -> u64 {
    slots(v).iter().map(|s| s["writes"].as_u64().unwrap_or(0)).sum()
}

/// The writer's writes in flight at the kill, as volume byte ranges (for failure messages).
fn in_flight(book: &Book) -> String {
    let mut v: Vec<(u64, u64)> = book
        .ranges
        .iter()
        .filter(|(t, _)| !book.acked.contains(t))
        .map(|(_, &(f, n))| (WIN_OFF + f as u64 * BLOCK, WIN_OFF + (f + n) as u64 * BLOCK))
        .collect();
    v.sort();
    v.iter().map(|(a, b)| format!("{a}..{b}")).collect::<Vec<_>>().join(", ")
}

/// What a round wrote before the kill.
struct Load {
    /// bytes each fio job completed (from fio's own report)
    fio: Vec<u64>,
    book: Book,
}

/// Start the daemon, run both writers, kill -9 the daemon once they are well under way.
fn write_and_kill(dir: &TestDir, m: &[PathBuf], state: &Path, round: usize, what: &str) -> Load {
    std::fs::create_dir_all(state).unwrap();
    let (d, ctl) = start_admin(dir, m);
    let st = status(&ctl);
    assert_eq!(vol_state(&st), "optimal", "{what}: volume not optimal before the load\n{st:#}");
    let mut fio = BgFio::spawn(dir, &fio_args(&d.uri(), state, round, false));
    // fio first (it takes a moment to connect): the writer joins once fio's writes reach the
    // members. Then kill once both are well under way, at a point that varies from round to
    // round.
    let before = member_writes(&st);
    let t = Instant::now();
    let wait = |fio: &mut BgFio, writer: Option<&Writer>, member: u64, acked: u64| {
        while member_writes(&status(&ctl)) < member || writer.is_some_and(|w| w.acked() < acked) {
            assert!(fio.is_running(), "{what}: fio ended before the kill\n{}", d.context());
            if let Some(w) = writer {
                assert!(w.is_running(), "{what}: the writer stopped before the kill: {:?}\n{}", w.book.0.lock().unwrap().errors, d.context());
            }
            assert!(t.elapsed() < READY_TIMEOUT, "{what}: the load never reached the daemon\n{}", d.context());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait(&mut fio, None, before + 200, 0);
    let writer = Writer::start(&d.sock, round);
    let member = member_writes(&status(&ctl)) + 300 + (round as u64 * 97) % 500;
    wait(&mut fio, Some(&writer), member, 100 + (round as u64 * 61) % 300);
    assert!(fio.is_running(), "{what}: fio ended before the kill\n{}", d.context());
    d.kill9();

    let t = Instant::now();
    while fio.is_running() {
        assert!(
            t.elapsed() < FIO_EXIT_TIMEOUT,
            "{what}: fio did not exit within {FIO_EXIT_TIMEOUT:?} of the daemon's death (fio's nbd engine can spin on a dead connection)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (fst, out, err) = fio.finish_any();
    let ctx = || format!("{what}: fio write pass ({fst})\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    let v = fio_json(&out).unwrap_or_else(|| panic!("fio printed no JSON report after the kill\n{}", ctx()));
    let written: Vec<u64> = JOBS.iter().map(|j| job_bytes(&v, j.name, "write")).collect();
    for (j, w) in JOBS.iter().zip(&written) {
        assert!(*w > 0, "{what}: fio job {} completed no write before the kill\n{}", j.name, ctx());
    }
    for (i, j) in JOBS.iter().enumerate() {
        let f = state.join(format!("local-{}-{i}-verify.state", j.name));
        assert!(f.is_file(), "{what}: fio left no verify state {}\n{}", f.display(), ctx());
    }
    let book = writer.finish();
    assert!(book.errors.is_empty(), "{what}: the writer got error replies before the kill: {:?}", book.errors);
    Load { fio: written, book }
}

/// The resync the restart did: something was dirty, and only a small part of the volume.
fn assert_resync(ctl: &Path, what: &str, d: &Daemon) -> serde_json::Value {
    let intent = status(ctl)["intent"].clone();
    let regions = intent["regions"].as_u64().unwrap_or_else(|| panic!("{what}: no intent.regions: {intent}"));
    let resynced = intent["resync_regions"].as_u64().unwrap_or_else(|| panic!("{what}: no intent.resync_regions: {intent}"));
    assert!(resynced >= 1, "{what}: a kill -9 under load left no dirty region to resync: {intent}\n{}", d.context());
    // The load covers 38 MiB of the volume, i.e. 10-13 MiB of each member (a few of its 4 MiB
    // regions); only the regions written since their last idle flush are dirty at the kill.
    assert!(resynced * 8 <= regions, "{what}: resync touched {resynced} of {regions} regions for 38 MiB of writes: {intent}\n{}", d.context());
    assert_eq!(intent["dirty_regions"].as_u64(), Some(0), "{what}: regions still dirty once serving: {intent}\n{}", d.context());
    assert_eq!(
        intent["resync_skipped"].as_u64(),
        Some(0),
        "{what}: the resync could not mend some dirty stripes (with a member missing, the partial-parity log should): {intent}\n{}",
        d.context()
    );
    intent
}

/// `nrounds` crash rounds; with `remove_member`, each restart leaves a member out, and with
/// `check_degraded` (parity to spare) the degraded volume is also `check`ed before the re-add.
fn rounds(tag: &str, args: &[&str], n: usize, nrounds: usize, remove_member: bool, check_degraded: bool) {
    let t0 = Instant::now();
    let dir = TestDir::new(tag);
    let m = dir.members("m", n);
    let mut a = args.to_vec();
    a.extend(["--size", MEMBER_SIZE]);
    create(&a, &m);
    let mut model = Model { known: vec![0; WIN_BLOCKS], raw: HashMap::new() };
    let mut log = vec![];
    // With deferred checksum pages a kill -9 leaves the table behind every write since the
    // last flush: the resyncs must have taken some blocks as found. Ordered, never.
    let deferred = args.contains(&"deferred");
    let mut adopted = 0;
    // Ordered parity levels leave the first parity shard's page to a flush, its checksums being
    // in the write-hole record: some resync must have found blocks only a record knew. (Not
    // asserted with a member left out: its blocks are rebuilt, not judged, and few remain.)
    let parity_level = args.contains(&"raid5") || args.contains(&"ec");
    let mut vouched = 0;
    for round in 0..nrounds {
        // a different member left out each round (raid5: 1 2 3 0 1, ec 4+2: 1 0 5 4 3)
        let gone = remove_member.then_some((round * 5 + 1) % n);
        let what = match gone {
            Some(g) => format!("{tag} round {round} (restart without member {g})"),
            None => format!("{tag} round {round}"),
        };
        let state = dir.join(format!("state{round}"));
        let load = write_and_kill(&dir, &m, &state, round, &what);

        let present: Vec<PathBuf> = m.iter().enumerate().filter(|(i, _)| Some(*i) != gone).map(|(_, p)| p.clone()).collect();
        let (mut d, mut ctl) = start_admin(&dir, &present);
        if let Some(g) = gone {
            let want: Vec<&str> = (0..n).map(|i| if i == g { "missing" } else { "active" }).collect();
            assert_status(&status(&ctl), "degraded", &want, &what);
        }
        let intent = assert_resync(&ctl, &what, &d);
        let round_adopted = intent["resync_adopted"].as_u64().unwrap_or_else(|| panic!("{what}: no intent.resync_adopted: {intent}"));
        assert!(deferred || round_adopted == 0, "{what}: blocks adopted by a volume with ordered checksum pages: {intent}\n{}", d.context());
        adopted += round_adopted;
        vouched += intent["resync_vouched"].as_u64().unwrap_or_else(|| panic!("{what}: no intent.resync_vouched: {intent}"));
        let (fresh, undefined) = writer_verify(&d, &mut model, &load.book, gone.is_some(), &what);
        let fio_read = fio_verify(&d, &state, round, &load.fio, &what);

        let mut rebuild = None;
        if let Some(g) = gone {
            // With parity to spare (ec 4+2 minus one), `check` can still cross-check the
            // degraded volume: the resync must have left it consistent before any rebuild.
            if check_degraded {
                let dlog = d.log.clone();
                d.stop_ok();
                let c = check_counts(&present);
                assert!(
                    c.ok && c.inconsistent == 0 && c.failing() == 0,
                    "{what}: after the degraded restart and resync (intent {intent}), `nbraid check` of the {} present members expected a consistent volume (exit 0, inconsistent stripes: 0, blocks failing their checksum: 0)\n{}\nwriter's writes in flight at the kill (volume bytes): {}\n--- daemon stderr ---\n{}",
                    present.len(),
                    show(&c.output),
                    in_flight(&load.book),
                    std::fs::read_to_string(&dlog).unwrap_or_default()
                );
                (d, ctl) = start_admin(&dir, &present);
            }
            admin_ok(&ctl, &["add", m[g].to_str().unwrap()]);
            let t = Instant::now();
            wait_optimal(&ctl);
            rebuild = Some(t.elapsed());
        }
        let dlog = d.log.clone();
        d.stop_ok();
        let c = check_counts(&m);
        assert!(
            c.ok && c.inconsistent == 0 && c.failing() == 0,
            "{what}: after the restart{}, `nbraid check` expected a consistent volume (exit 0, inconsistent stripes: 0, blocks failing their checksum: 0)\n{}\n--- daemon stderr ---\n{}",
            if gone.is_some() { ", the re-add and the rebuild" } else { "" },
            show(&c.output),
            std::fs::read_to_string(&dlog).unwrap_or_default()
        );
        log.push(format!(
            "round {round}: fio wrote {:?} KiB, verified {} KiB; writer {} writes / {} flushes acked of {} sent, {fresh} blocks verified holding them, {undefined} left undefined; intent {intent}{}",
            load.fio.iter().map(|b| b / KIB).collect::<Vec<_>>(),
            fio_read / KIB,
            load.book.writes_acked,
            load.book.flushes_acked,
            load.book.writes_sent,
            rebuild.map(|r| format!("; rebuild {r:?}")).unwrap_or_default()
        ));
    }
    assert!(!deferred || adopted > 0, "{tag}: deferred checksum pages, yet no resync adopted a block in {nrounds} rounds");
    assert!(
        deferred || !parity_level || remove_member || vouched > 0,
        "{tag}: ordered checksum pages on a parity level, yet no resync found a block vouched for by its write-hole record in {nrounds} rounds"
    );
    assert!(
        !deferred || vouched == 0,
        "{tag}: deferred pages, yet {vouched} blocks vouched for by write-hole records (deferred writes put no checksums in them)"
    );
    eprintln!("{tag}: {nrounds} rounds in {:?}, {adopted} blocks adopted, {vouched} vouched for by write-hole records\n{}", t0.elapsed(), log.join("\n"));
}

#[test]
fn kill9_rounds_raid5() {
    rounds("crash-r5", &["--level", "raid5"], 4, ROUNDS, false, false);
}

#[test]
fn kill9_rounds_ec_4_2() {
    rounds("crash-ec", &["--level", "ec", "--data", "4", "--parity", "2"], 6, ROUNDS, false, false);
}

#[test]
fn kill9_rounds_member_removed_raid5() {
    rounds("crash-r5-gone", &["--level", "raid5"], 4, DEGRADED_ROUNDS, true, false);
}

/// Deferred checksum pages: unflushed writes reach the members without their table pages.
#[test]
fn kill9_rounds_raid5_deferred_pages() {
    rounds("crash-r5-def", &["--level", "raid5", "--checksum-pages", "deferred"], 4, DEFERRED_ROUNDS, false, false);
}

#[test]
fn kill9_rounds_raid0_deferred_pages() {
    rounds("crash-r0-def", &["--level", "raid0", "--checksum-pages", "deferred"], 4, DEFERRED_ROUNDS, false, false);
}

#[test]
fn kill9_rounds_member_removed_raid5_deferred_pages() {
    rounds("crash-r5-gone-def", &["--level", "raid5", "--checksum-pages", "deferred"], 4, DEGRADED_ROUNDS, true, false);
}

#[test]
fn kill9_rounds_member_removed_ec_4_2() {
    rounds("crash-ec-gone", &["--level", "ec", "--data", "4", "--parity", "2"], 6, DEGRADED_ROUNDS, true, true);
}
