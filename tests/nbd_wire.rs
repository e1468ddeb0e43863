//! The NBD protocol against the real binary with a hand-written client: fixed-newstyle
//! handshake with NBD_OPT_GO, simple replies, error replies that keep the connection usable, and
//! protocol violations that cost only the offending connection.

mod common;

use common::nbd::*;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

fn setup(tag: &str) -> (TestDir, Vec<std::path::PathBuf>, Daemon) {
    let dir = TestDir::new(tag);
    let m = dir.members("m", 3);
    create(&["--level", "raid5", "--size", "16MiB", "--name", "wire"], &m);
    let d = Daemon::start(&dir, &m);
    (dir, m, d)
}

#[test]
fn handshake_read_write_and_named_export() {
    let (_dir, _m, d) = setup("wire-rw");
    let size = d.size();
    let mut c = Client::connect(&d.sock, "");
    assert_eq!(c.size, size, "NBD_INFO_EXPORT size differs from nbdinfo");
    assert!(c.flags & 1 != 0, "NBD_FLAG_HAS_FLAGS not set in transmission flags {:#x}", c.flags);
    assert!(c.flags & 2 == 0, "export is read-only ({:#x})", c.flags);
    let a = pattern(4096, 1);
    let b = pattern(65536 + 512, 7);
    assert_eq!(c.write(0, &a), 0);
    assert_eq!(c.write(3 * 65536 - 512, &b), 0);
    assert_eq!(c.write(size - 4096, &a), 0, "write of the last block");
    assert_eq!(c.flush(), 0);
    assert_eq!(c.read(0, 4096).unwrap(), a);
    assert_eq!(c.read(3 * 65536 - 512, b.len() as u32).unwrap(), b);
    assert_eq!(c.read(size - 4096, 4096).unwrap(), a);
    assert_eq!(c.read(4096, 4096).unwrap(), vec![0u8; 4096], "untouched block not zero");

    // the same bytes through a second connection, on the named export
    let mut c2 = Client::connect(&d.sock, "wire");
    assert_eq!(c2.size, size);
    assert_eq!(c2.read(3 * 65536 - 512, b.len() as u32).unwrap(), b);
    c2.disconnect();
    c.disconnect();

    // an export that does not exist is an error reply, not a hang or a crash
    match Client::try_connect(&d.sock, "no-such-export") {
        Err(t) => assert!(t & 0x8000_0000 != 0),
        Ok(_) => panic!("NBD_OPT_GO for an unknown export name succeeded"),
    }
    let mut c3 = Client::connect(&d.sock, "");
    assert_eq!(c3.read(0, 4096).unwrap(), a);
    c3.disconnect();
    d.stop_ok();
}

#[test]
fn unknown_command_is_einval_and_connection_survives() {
    let (_dir, _m, d) = setup("wire-unk");
    let mut c = Client::connect(&d.sock, "");
    let r = c.request(0x55, 0, 0, &[]);
    assert_eq!(r.error, EINVAL, "unknown command type 0x55: expected EINVAL");
    let _ = r.cookie;
    assert_eq!(c.write(8192, &pattern(512, 3)), 0, "connection unusable after an unknown command");
    assert_eq!(c.read(8192, 512).unwrap(), pattern(512, 3));
    c.disconnect();
    d.stop_ok();
}

#[test]
fn out_of_range_read_is_einval() {
    let (_dir, _m, d) = setup("wire-oor");
    let mut c = Client::connect(&d.sock, "");
    let size = c.size;
    assert_eq!(c.read(size, 4096), Err(EINVAL), "read at the end of the volume");
    assert_eq!(c.read(size - 512, 4096), Err(EINVAL), "read crossing the end of the volume");
    assert_eq!(c.read(u64::MAX - 511, 4096), Err(EINVAL), "read at an offset that overflows");
    assert_eq!(c.read(0, 512).unwrap().len(), 512, "connection unusable after EINVAL");
    c.disconnect();
    d.stop_ok();
}

#[test]
fn write_past_end_is_enospc_then_next_request_works() {
    let (_dir, _m, d) = setup("wire-nospc");
    let mut c = Client::connect(&d.sock, "");
    let size = c.size;
    let p = pattern(8192, 9);
    assert_eq!(c.write(size - 4096, &p), ENOSPC, "write crossing the end of the volume");
    assert_eq!(c.write(size, &p[..512]), ENOSPC, "write at the end of the volume");
    // the refused payload was consumed: the next request is parsed correctly
    assert_eq!(c.read(size - 4096, 4096).unwrap(), vec![0u8; 4096], "a refused write changed data");
    assert_eq!(c.write(size - 8192, &p), 0);
    assert_eq!(c.read(size - 8192, 8192).unwrap(), p);
    c.disconnect();
    d.stop_ok();
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (_dir, _m, d) = setup("wire-magic");
    let mut good = Client::connect(&d.sock, "");
    assert_eq!(good.write(0, &pattern(4096, 5)), 0);
    let mut bad = Client::connect(&d.sock, "");
    let mut h = vec![];
    h.extend(0xdead_beefu32.to_be_bytes());
    h.extend([0u8; 24]);
    bad.s.write_all(&h).unwrap();
    bad.assert_closed("a request with a bad magic");
    assert_eq!(good.read(0, 4096).unwrap(), pattern(4096, 5), "the other connection broke");
    let mut fresh = Client::connect(&d.sock, "");
    assert_eq!(fresh.read(0, 4096).unwrap(), pattern(4096, 5));
    fresh.disconnect();
    good.disconnect();
    d.stop_ok();
}

#[test]
fn hangup_mid_write_payload_then_new_connection_works() {
    let (_dir, m, d) = setup("wire-hup");
    let mut c = Client::connect(&d.sock, "");
    assert_eq!(c.write(65536, &pattern(65536, 2)), 0);
    let (mut h, _) = c.header(CMD_WRITE, 0, 65536);
    h.extend(pattern(1000, 77));
    c.s.write_all(&h).unwrap();
    drop(c); // hang up with 64536 payload bytes missing
             // and a client that vanishes in the middle of the handshake
    {
        let mut s = UnixStream::connect(&d.sock).unwrap();
        let _ = s.write_all(&[0u8; 3]);
    }
    let mut c = Client::connect(&d.sock, "");
    assert_eq!(c.read(65536, 65536).unwrap(), pattern(65536, 2));
    let p = pattern(4096, 8);
    assert_eq!(c.write(0, &p), 0);
    assert_eq!(c.read(0, 4096).unwrap(), p);
    c.disconnect();
    d.stop_ok();
    check_clean(&m);
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let (_dir, _m, d) = setup("wire-pipe");
    let mut c = Client::connect(&d.sock, "");
    // pipeline 64 writes, then collect the replies in whatever order they come
    let mut cookies = std::collections::BTreeSet::new();
    let mut buf = vec![];
    for i in 0..64u64 {
        let (mut h, ck) = c.header(CMD_WRITE, i * 12288 + 7 * 512, 12288);
        h.extend(pattern(12288, i as u8));
        buf.extend(h);
        cookies.insert(ck);
    }
    c.s.write_all(&buf).unwrap();
    for _ in 0..64 {
        assert_eq!(u32be(&mut c.s), SIMPLE_REPLY_MAGIC);
        assert_eq!(u32be(&mut c.s), 0, "pipelined write failed");
        let ck = u64be(&mut c.s);
        assert!(cookies.remove(&ck), "reply with unknown or repeated cookie {ck}");
    }
    for i in 0..64u64 {
        assert_eq!(c.read(i * 12288 + 7 * 512, 12288).unwrap(), pattern(12288, i as u8), "block {i}");
    }
    c.disconnect();
    d.stop_ok();
}

#[test]
fn option_phase_list_info_unknown_then_go() {
    let (_dir, _m, d) = setup("wire-opts");
    let mut s = Client::handshake(&d.sock);
    // an option the server does not know: NBD_REP_ERR_UNSUP, and the option phase goes on
    Client::send_opt(&mut s, 0x4242, b"whatever");
    let (typ, _) = Client::opt_reply(&mut s, 0x4242);
    assert_eq!(typ, REP_ERR_UNSUP, "unknown option: expected NBD_REP_ERR_UNSUP");
    // LIST names the volume
    Client::send_opt(&mut s, OPT_LIST, &[]);
    let mut names = vec![];
    loop {
        let (typ, p) = Client::opt_reply(&mut s, OPT_LIST);
        match typ {
            REP_SERVER => {
                let n = u32::from_be_bytes(p[0..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&p[4..4 + n]).to_string());
            }
            REP_ACK => break,
            other => panic!("NBD_OPT_LIST: unexpected reply {other:#x}"),
        }
    }
    assert!(names.iter().any(|n| n == "wire"), "NBD_OPT_LIST does not list the volume `wire`: {names:?}");
    // INFO then GO on the same connection
    let (size, _) = Client::go(&mut s, OPT_INFO, "wire").expect("NBD_OPT_INFO");
    let (size2, _) = Client::go(&mut s, OPT_GO, "").expect("NBD_OPT_GO after INFO");
    assert_eq!(size, size2);
    let mut c = Client { s, size, flags: 0, cookie: 1 };
    assert_eq!(c.write(0, &pattern(4096, 4)), 0);
    assert_eq!(c.read(0, 4096).unwrap(), pattern(4096, 4));
    c.disconnect();
    // ABORT: the server may ack, then closes
    let mut s = Client::handshake(&d.sock);
    Client::send_opt(&mut s, OPT_ABORT, &[]);
    drop(s);
    // an absurd option length: the server must not try to read 2 GiB; it closes or errors
    let mut s = Client::handshake(&d.sock);
    let mut o = vec![];
    o.extend(IHAVEOPT.to_be_bytes());
    o.extend(OPT_GO.to_be_bytes());
    o.extend(0x7fff_ffffu32.to_be_bytes());
    o.extend([0u8; 64]);
    let _ = s.write_all(&o);
    drop(s);
    let mut c = Client::connect(&d.sock, "wire");
    assert_eq!(c.read(0, 4096).unwrap(), pattern(4096, 4), "daemon unusable after option abuse");
    c.disconnect();
    d.stop_ok();
}

#[test]
fn fua_trim_write_zeroes_and_odd_lengths() {
    let (_dir, m, d) = setup("wire-cmds");
    let mut c = Client::connect(&d.sock, "");
    let p = pattern(3 * 65536, 6);
    assert_eq!(c.request_flags(CMD_FLAG_FUA, CMD_WRITE, 65536 - 512, p.len() as u32, &p).error, 0, "FUA write");
    assert_eq!(c.read(65536 - 512, p.len() as u32).unwrap(), p);
    if c.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
        assert_eq!(c.request_flags(0, CMD_WRITE_ZEROES, 65536 + 100, 70000, &[]).error, 0, "WRITE_ZEROES");
        let mut want = p.clone();
        want[612..612 + 70000].fill(0);
        assert_eq!(c.read(65536 - 512, p.len() as u32).unwrap(), want, "WRITE_ZEROES did not zero exactly its range");
    }
    if c.flags & TFLAG_SEND_TRIM != 0 {
        assert_eq!(c.request_flags(0, CMD_TRIM, 8 * 65536, 4 * 65536 + 4096, &[]).error, 0, "TRIM");
    }
    // zero-length requests: answered (success or EINVAL), and the connection goes on
    let r = c.request(CMD_READ, 4096, 0, &[]);
    assert!(r.error == 0 || r.error == EINVAL, "zero-length read: error {}", r.error);
    let r = c.request(CMD_WRITE, 4096, 0, &[]);
    assert!(r.error == 0 || r.error == EINVAL, "zero-length write: error {}", r.error);
    assert_eq!(c.write(4096 + 1, &pattern(1, 1)), 0, "one-byte write");
    assert_eq!(c.read(4096, 3).unwrap(), vec![0, pattern(1, 1)[0], 0]);
    assert_eq!(c.flush(), 0);
    c.disconnect();
    // a read larger than the advertised maximum: EINVAL or a closed connection, never a crash
    let mut c = Client::connect(&d.sock, "");
    let (h, cookie) = c.header(CMD_READ, 0, 256 << 20);
    c.s.write_all(&h).unwrap();
    let mut magic = [0u8; 4];
    // A disconnect instead of the error reply is allowed too.
    if c.s.read_exact(&mut magic).is_ok() {
        assert_eq!(u32::from_be_bytes(magic), SIMPLE_REPLY_MAGIC);
        assert_eq!(u32be(&mut c.s), EINVAL, "256 MiB read: expected EINVAL");
        assert_eq!(u64be(&mut c.s), cookie);
    }
    let mut c = Client::connect(&d.sock, "");
    assert_eq!(c.read(65536 - 512, p.len() as u32).unwrap().len(), p.len());
    c.disconnect();
    d.stop_ok();
    check_clean(&m);
}

#[test]
fn many_connections_at_once() {
    let (_dir, m, d) = setup("wire-many");
    let mut cs: Vec<Client> = (0..32).map(|_| Client::connect(&d.sock, "")).collect();
    for (i, c) in cs.iter_mut().enumerate() {
        assert_eq!(c.write(i as u64 * 20000, &pattern(20000, i as u8)), 0);
    }
    for (i, c) in cs.iter_mut().enumerate() {
        let j = (i + 7) % 32;
        assert_eq!(c.read(j as u64 * 20000, 20000).unwrap(), pattern(20000, j as u8), "block {j} via connection {i}");
    }
    for c in cs {
        c.disconnect();
    }
    d.stop_ok();
    check_clean(&m);
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap();
    kb * 1024
}

/// The 32 MiB pattern request `i` of connection `c` writes: a byte per (c, i), and the pair
/// spelled out at the start so a misplaced buffer is named.
fn big_pattern(c: usize, i: usize) -> Vec<u8> {
    let mut p = vec![(c * 31 + i * 7 + 1) as u8; 32 << 20];
    p[..16].copy_from_slice(&[(c as u64).to_be_bytes(), (i as u64).to_be_bytes()].concat());
    p
}

/// Four connections each pipeline 24 WRITEs of 32 MiB, then 24 READs of 32 MiB whose replies
/// they leave unread for three seconds: 3 GiB offered at once. The daemon must stop reading requests
/// once its byte budget is taken (backpressure), so its RSS stays far below what was offered,
/// and every byte read back is what was written last.
#[test]
fn memory_stays_bounded_under_many_32mib_requests() {
    const CONNS: usize = 4;
    const REQS: usize = 24;
    const LEN: usize = 32 << 20;
    let dir = TestDir::new("wire-memory");
    let m = dir.members("m", 4);
    create(&["--level", "raid0", "--size", "80MiB", "--name", "mem"], &m);
    // Without backpressure the daemon holds every read result while the client is not reading:
    // 3 GiB. With it, the budget plus one payload being received per connection, plus what the
    // allocator keeps cached for reuse (mimalloc's purge delay; ~450 MiB measured in all).
    let d = Daemon::start_with(&dir, &m, &["--max-buffered", "64MiB"]);
    assert!(d.size() >= (CONNS * 2 * LEN) as u64, "volume too small: {}", d.size());
    let pid = d.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_bytes(pid)));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let workers: Vec<_> = (0..CONNS)
        .map(|c| {
            let sock = d.sock.clone();
            std::thread::spawn(move || {
                let mut cl = Client::connect(&sock, "");
                let slot = |i: usize| ((c * 2 + i % 2) * LEN) as u64;
                // Writes: a second thread sends them all while this one collects the replies.
                let mut tx = cl.s.try_clone().unwrap();
                let headers: Vec<Vec<u8>> = (0..REQS).map(|i| cl.header(CMD_WRITE, slot(i), LEN as u32).0).collect();
                let sender = std::thread::spawn(move || {
                    for (i, h) in headers.iter().enumerate() {
                        tx.write_all(h).unwrap();
                        tx.write_all(&big_pattern(c, i)).unwrap();
                    }
                });
                for _ in 0..REQS {
                    assert_eq!(u32be(&mut cl.s), SIMPLE_REPLY_MAGIC);
                    assert_eq!(u32be(&mut cl.s), 0, "32 MiB write failed");
                    u64be(&mut cl.s);
                }
                sender.join().unwrap();
                // Reads, all sent at once, replies left unread for a while.
                let mut all = Vec::new();
                for i in 0..REQS {
                    all.extend(cl.header(CMD_READ, slot(i), LEN as u32).0);
                }
                let mut tx = cl.s.try_clone().unwrap();
                let sender = std::thread::spawn(move || tx.write_all(&all).unwrap());
                std::thread::sleep(std::time::Duration::from_secs(3));
                let mut buf = vec![0u8; LEN];
                for _ in 0..REQS {
                    assert_eq!(u32be(&mut cl.s), SIMPLE_REPLY_MAGIC);
                    assert_eq!(u32be(&mut cl.s), 0, "32 MiB read failed");
                    u64be(&mut cl.s);
                    cl.s.read_exact(&mut buf).unwrap();
                    // Replies come in any order, but both reads of one slot return its last write.
                    let got = (u64::from_be_bytes(buf[..8].try_into().unwrap()), u64::from_be_bytes(buf[8..16].try_into().unwrap()));
                    assert_eq!(got.0, c as u64, "read returned another connection's data");
                    let last = if got.1 % 2 == 0 { REQS - 2 } else { REQS - 1 };
                    assert!(buf == big_pattern(c, last), "connection {c}: a read returned other bytes than the last write of its slot");
                }
                sender.join().unwrap();
                cl.disconnect();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let offered = (CONNS * REQS * LEN) as u64;
    eprintln!("daemon RSS peak {} MiB with {} MiB offered", peak >> 20, offered >> 20);
    assert!(peak < 1 << 30, "daemon RSS reached {} MiB with {} MiB of requests offered: no backpressure\n{}", peak >> 20, offered >> 20, d.context());
    d.stop_ok();
}
