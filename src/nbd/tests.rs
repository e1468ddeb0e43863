//! End-to-end tests of the NBD server over Unix sockets: a raw-socket client that checks bytes on
//! the wire, and real independent clients (nbdinfo, qemu-io, nbdcopy) run as child processes.

use super::proto::{self, *};
use super::{BlockDevice, DeviceError, ListenAddr, ServeStats, Server, ServerConfig};
use crate::buf::AlignedBuf;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const SIZE: u64 = 8 << 20;
const PREFERRED: u32 = 64 * 1024;
const NAME: &str = "vol0";
const DESCRIPTION: &str = "test volume";
const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// An in-memory device with knobs for delaying and gating reads.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct MemDevice {
    data: Mutex<Vec<u8>>,
    /// Reads at offset `o` first sleep `read_delay_per_block * (blocks - o/4096)` — later blocks
    /// finish first, forcing out-of-order replies.
    reverse_delay: Option<(Duration, u64)>,
    /// Reads at this offset wait for a permit on the semaphore.
    gate: Option<(u64, Arc<Semaphore>)>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    flushes: AtomicUsize,
}

impl MemDevice {
    fn new() -> Self {
        MemDevice { data: Mutex::new(vec![0; SIZE as usize]), ..Default::default() }
    }

    fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off as usize..off as usize + len].to_vec()
    }

    fn fill(&self, off: u64, bytes: &[u8]) {
        self.data.lock().unwrap()[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    }
}

struct Active<'a>(&'a MemDevice);

impl<'a> Active<'a> {
    fn enter(d: &'a MemDevice) -> Self {
        let now = d.active.fetch_add(1, Ordering::SeqCst) + 1;
        d.max_active.fetch_max(now, Ordering::SeqCst);
        Active(d)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        SIZE
    }

    fn preferred_block_size(&self) -> u32 {
        PREFERRED
    }

    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, DeviceError> {
        let _a = Active::enter(self);
        if let Some((step, blocks)) = self.reverse_delay {
            let block = offset / 4096;
            tokio::time::sleep(step * blocks.saturating_sub(block) as u32).await;
        }
        if let Some((at, sem)) = &self.gate {
            if *at == offset {
                let _p = sem.acquire().await.map_err(|_| DeviceError::Shutdown)?;
            }
        }
        Ok(AlignedBuf::from_slice(&self.bytes(offset, len)))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), DeviceError> {
        let _a = Active::enter(self);
        self.fill(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        self.fill(offset, &vec![0; len as usize]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Harness: a server on a Unix socket in a temp dir.
// ---------------------------------------------------------------------------------------------

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: Arc<MemDevice>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<ServeStats>>,
}

fn config() -> ServerConfig {
    ServerConfig { description: DESCRIPTION.into(), ..ServerConfig::new(NAME) }
}

async fn start(dev: MemDevice) -> Harness {
    start_with(dev, config()).await
}

async fn start_with(dev: MemDevice, cfg: ServerConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let dev = Arc::new(dev);
    let server = Server::bind(dev.clone(), cfg, &[ListenAddr::Unix(path.clone())]).await.unwrap();
    assert_eq!(server.local_addrs(), vec![ListenAddr::Unix(path.clone())]);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Harness { _dir: dir, path, dev, stop: Some(tx), task }
}

impl Harness {
    fn uri(&self) -> String {
        format!("nbd+unix:///{NAME}?socket={}", self.path.display())
    }

    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.path).await.unwrap()
    }

    /// Signals shutdown and waits until the server has stopped accepting (socket file gone).
    async fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        timeout(T, async {
            while self.path.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("socket file removed on shutdown");
    }

    async fn stop(mut self) -> ServeStats {
        self.begin_shutdown().await;
        timeout(T, self.task).await.expect("serve returns after shutdown").unwrap().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// A raw-socket client.
// ---------------------------------------------------------------------------------------------

async fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    timeout(T, s.read_exact(&mut b)).await.expect("timely reply").expect("server sent enough bytes");
    b
}

async fn greeting(s: &mut UnixStream, client_flags: u32) {
    let g = read_n(s, 18).await;
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
    s.write_all(&client_flags.to_be_bytes()).await.unwrap();
}

async fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = encode_option_header(opt, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

async fn opt_reply(s: &mut UnixStream) -> (OptionReplyHeader, Vec<u8>) {
    let h = parse_option_reply_header(&read_n(s, 20).await).expect("option reply magic");
    let data = read_n(s, h.length as usize).await;
    (h, data)
}

async fn expect_opt_reply(s: &mut UnixStream, opt: u32, reply_type: u32) -> Vec<u8> {
    let (h, data) = opt_reply(s).await;
    assert_eq!((h.option, h.reply_type), (opt, reply_type), "reply data {data:?}");
    data
}

/// Asserts the server closes the connection (EOF or reset) without sending anything more.
async fn expect_closed(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    match timeout(T, s.read(&mut b)).await.expect("server closes") {
        Ok(0) => {}
        Ok(n) => panic!("expected close, got {n} bytes: {:?}", &b[..n]),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

/// Handshake through NBD_OPT_GO; returns the connected stream.
async fn open(h: &Harness, structured: bool) -> UnixStream {
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    if structured {
        send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
        expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK).await;
    }
    send_opt(&mut s, OPT_GO, &encode_info_request(b"", &[])).await;
    loop {
        let (hd, _) = opt_reply(&mut s).await;
        assert_eq!(hd.option, OPT_GO);
        if hd.reply_type == REP_ACK {
            return s;
        }
        assert_eq!(hd.reply_type, REP_INFO);
    }
}

async fn send_req(s: &mut UnixStream, cmd: u16, flags: u16, cookie: u64, off: u64, len: u32) {
    let r = Request { flags, command: Command::from_u16(cmd), cookie, offset: off, length: len };
    s.write_all(&encode_request(&r)).await.unwrap();
}

/// Reads a simple reply header: (error, cookie).
async fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let b = read_n(s, 16).await;
    assert_eq!(&b[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes(), "simple reply magic");
    (u32::from_be_bytes(b[4..8].try_into().unwrap()), u64::from_be_bytes(b[8..16].try_into().unwrap()))
}

/// Reads one structured chunk: (flags, type, cookie, payload).
async fn chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let b = read_n(s, 20).await;
    assert_eq!(&b[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes(), "chunk magic");
    let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
    (
        u16::from_be_bytes(b[4..6].try_into().unwrap()),
        u16::from_be_bytes(b[6..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
        read_n(s, len as usize).await,
    )
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed * 7 + 1) as u8).collect()
}

fn flags_for(structured: bool) -> u16 {
    proto::Session { size: SIZE, structured }.transmission_flags()
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn option_haggling() {
    let h = start(MemDevice::new()).await;
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;

    send_opt(&mut s, OPT_LIST, &[]).await;
    assert_eq!(expect_opt_reply(&mut s, OPT_LIST, REP_SERVER).await, b"\0\0\0\x04vol0");
    expect_opt_reply(&mut s, OPT_LIST, REP_ACK).await;
    send_opt(&mut s, OPT_LIST, b"x").await;
    expect_opt_reply(&mut s, OPT_LIST, REP_ERR_INVALID).await;

    send_opt(&mut s, OPT_STARTTLS, &[]).await;
    expect_opt_reply(&mut s, OPT_STARTTLS, REP_ERR_POLICY).await;

    // Unsupported options: payload consumed, negotiation continues.
    for (opt, data) in [
        (99u32, &b"hello"[..]),
        (OPT_SET_META_CONTEXT, &b"\0\0\0\0\0\0\0\x01\0\0\0\x0fbase:allocation"[..]),
        (OPT_LIST_META_CONTEXT, &b"\0\0\0\0\0\0\0\0"[..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
        (OPT_PEEK_EXPORT, &[][..]),
    ] {
        send_opt(&mut s, opt, data).await;
        expect_opt_reply(&mut s, opt, REP_ERR_UNSUP).await;
    }

    send_opt(&mut s, OPT_STRUCTURED_REPLY, b"x").await;
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ERR_INVALID).await;
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    expect_opt_reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK).await;

    send_opt(&mut s, OPT_INFO, &encode_info_request(b"nope", &[])).await;
    let msg = expect_opt_reply(&mut s, OPT_INFO, REP_ERR_UNKNOWN).await;
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    send_opt(&mut s, OPT_GO, &[0, 0, 0, 9, b'v']).await;
    expect_opt_reply(&mut s, OPT_GO, REP_ERR_INVALID).await;

    let flags = flags_for(true);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    let export = encode_info_export(SIZE, flags).to_vec();
    let block = encode_info_block_size(512, PREFERRED, 32 << 20).to_vec();
    let reqs = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x7777];
    // INFO and GO (by name and by the default name) must describe the export identically.
    for (opt, name) in [(OPT_INFO, &b"vol0"[..]), (OPT_INFO, b""), (OPT_GO, b"vol0")] {
        send_opt(&mut s, opt, &encode_info_request(name, &reqs)).await;
        assert_eq!(expect_opt_reply(&mut s, opt, REP_INFO).await, export);
        assert_eq!(expect_opt_reply(&mut s, opt, REP_INFO).await, b"\0\x01vol0");
        assert_eq!(expect_opt_reply(&mut s, opt, REP_INFO).await, b"\0\x02test volume");
        assert_eq!(expect_opt_reply(&mut s, opt, REP_INFO).await, block);
        expect_opt_reply(&mut s, opt, REP_ACK).await;
    }

    // In transmission, with structured replies.
    h.dev.fill(4096, &pattern(1, 100));
    send_req(&mut s, CMD_READ, CMD_FLAG_DF, 5, 4096, 100).await;
    let (f, ty, cookie, payload) = chunk(&mut s).await;
    assert_eq!((f, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 5));
    assert_eq!(&payload[..8], &4096u64.to_be_bytes());
    assert_eq!(&payload[8..], &pattern(1, 100)[..]);
    h.stop().await;
}

#[tokio::test]
async fn go_without_requests_still_sends_block_size() {
    let h = start(MemDevice::new()).await;
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(&mut s, OPT_GO, &encode_info_request(b"", &[])).await;
    assert_eq!(expect_opt_reply(&mut s, OPT_GO, REP_INFO).await, encode_info_export(SIZE, flags_for(false)));
    assert_eq!(expect_opt_reply(&mut s, OPT_GO, REP_INFO).await, encode_info_block_size(512, PREFERRED, 32 << 20));
    expect_opt_reply(&mut s, OPT_GO, REP_ACK).await;
    assert_eq!(flags_for(false) & FLAG_SEND_DF, 0);
    send_req(&mut s, CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    h.stop().await;
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let h = start(MemDevice::new()).await;
    h.dev.fill(0, b"abcd");
    for (client_flags, name, tail) in [
        (FLAG_C_FIXED_NEWSTYLE, &b"vol0"[..], 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, b"", 0),
        (0, b"vol0", 124), // plain (non-fixed) newstyle client
    ] {
        let mut s = h.connect().await;
        greeting(&mut s, client_flags).await;
        send_opt(&mut s, OPT_EXPORT_NAME, name).await;
        let r = read_n(&mut s, 10 + tail).await;
        assert_eq!(&r[..8], &SIZE.to_be_bytes());
        assert_eq!(&r[8..10], &flags_for(false).to_be_bytes());
        assert!(r[10..].iter().all(|&b| b == 0));
        // The very next bytes must be the reply (so no stray zeroes were sent).
        send_req(&mut s, CMD_READ, 0, 77, 0, 4).await;
        assert_eq!(simple_reply(&mut s).await, (0, 77));
        assert_eq!(read_n(&mut s, 4).await, b"abcd");
        send_req(&mut s, CMD_DISC, 0, 78, 0, 0).await;
        expect_closed(&mut s).await;
    }
    h.stop().await;
}

#[tokio::test]
async fn handshake_violations_close_the_connection() {
    let h = start(MemDevice::new()).await;

    // Unknown client flag.
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE | 1 << 5).await;
    expect_closed(&mut s).await;

    // EXPORT_NAME of an unknown export cannot be answered with an error.
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(&mut s, OPT_EXPORT_NAME, b"other").await;
    expect_closed(&mut s).await;

    // Bad option magic.
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    s.write_all(&[0u8; 16]).await.unwrap();
    expect_closed(&mut s).await;

    // Absurd option length.
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    s.write_all(&encode_option_header(OPT_LIST, 1 << 30)).await.unwrap();
    expect_closed(&mut s).await;

    // ABORT is acknowledged, then the server closes.
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    send_opt(&mut s, OPT_ABORT, &[]).await;
    expect_opt_reply(&mut s, OPT_ABORT, REP_ACK).await;
    expect_closed(&mut s).await;

    // Hang-ups mid-handshake, at several points.
    drop(h.connect().await);
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    s.write_all(&encode_option_header(OPT_GO, 100)[..10]).await.unwrap();
    drop(s);
    let mut s = h.connect().await;
    greeting(&mut s, FLAG_C_FIXED_NEWSTYLE).await;
    s.write_all(&encode_option_header(OPT_GO, 100)).await.unwrap();
    s.write_all(&[0; 50]).await.unwrap();
    drop(s);

    // The server is still fine.
    let mut s = open(&h, false).await;
    send_req(&mut s, CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    let stats = h.stop().await;
    assert_eq!(stats.connections, 9);
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn commands_and_errors_with_simple_replies() {
    let h = start(MemDevice::new()).await;
    let mut s = open(&h, false).await;
    let data = pattern(3, 70_000);

    // WRITE (FUA) then READ back, unaligned.
    send_req(&mut s, CMD_WRITE, CMD_FLAG_FUA, 1, 12_345, data.len() as u32).await;
    s.write_all(&data).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    assert_eq!(h.dev.bytes(12_345, data.len()), data);
    send_req(&mut s, CMD_READ, CMD_FLAG_FUA, 2, 12_345, data.len() as u32).await;
    assert_eq!(simple_reply(&mut s).await, (0, 2));
    assert_eq!(read_n(&mut s, data.len()).await, data);

    // WRITE_ZEROES, TRIM, FLUSH.
    send_req(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 3, 12_345, 1000).await;
    assert_eq!(simple_reply(&mut s).await, (0, 3));
    assert!(h.dev.bytes(12_345, 1000).iter().all(|&b| b == 0));
    assert_eq!(h.dev.bytes(13_345, 10), data[1000..1010]);
    send_req(&mut s, CMD_TRIM, 0, 4, 0, 4096).await;
    assert_eq!(simple_reply(&mut s).await, (0, 4));
    send_req(&mut s, CMD_FLUSH, 0, 5, 0, 0).await;
    assert_eq!(simple_reply(&mut s).await, (0, 5));
    assert_eq!(h.dev.flushes.load(Ordering::SeqCst), 1);

    // WRITE past the end: ENOSPC, its payload consumed, the device untouched.
    send_req(&mut s, CMD_WRITE, 0, 6, SIZE - 100, 200).await;
    s.write_all(&[0xee; 200]).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (28, 6));
    assert!(h.dev.bytes(SIZE - 100, 100).iter().all(|&b| b == 0));
    // WRITE with an unknown flag: EINVAL, payload consumed.
    send_req(&mut s, CMD_WRITE, 1 << 9, 7, 0, 300).await;
    s.write_all(&[0xee; 300]).await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (22, 7));
    // Out-of-range READ, zero-length READ, oversized READ, unknown command: EINVAL, no data.
    send_req(&mut s, CMD_READ, 0, 8, SIZE, 1).await;
    assert_eq!(simple_reply(&mut s).await, (22, 8));
    send_req(&mut s, CMD_READ, 0, 9, 0, 0).await;
    assert_eq!(simple_reply(&mut s).await, (22, 9));
    send_req(&mut s, CMD_READ, 0, 10, 0, (32 << 20) + 1).await;
    assert_eq!(simple_reply(&mut s).await, (22, 10));
    send_req(&mut s, 42, 0, 11, 0, 512).await;
    assert_eq!(simple_reply(&mut s).await, (22, 11));
    send_req(&mut s, CMD_BLOCK_STATUS, 0, 12, 0, 512).await;
    assert_eq!(simple_reply(&mut s).await, (22, 12));
    // DF without structured replies is an unknown flag here.
    send_req(&mut s, CMD_READ, CMD_FLAG_DF, 13, 0, 512).await;
    assert_eq!(simple_reply(&mut s).await, (22, 13));
    // TRIM out of range: EINVAL; WRITE_ZEROES out of range: ENOSPC.
    send_req(&mut s, CMD_TRIM, 0, 14, SIZE - 1, 2).await;
    assert_eq!(simple_reply(&mut s).await, (22, 14));
    send_req(&mut s, CMD_WRITE_ZEROES, 0, 15, u64::MAX - 1, 4).await;
    assert_eq!(simple_reply(&mut s).await, (28, 15));

    // The stream is still in sync: the last byte of the export reads back as written earlier.
    h.dev.fill(SIZE - 1, &[0x5a]);
    send_req(&mut s, CMD_READ, 0, 16, SIZE - 1, 1).await;
    assert_eq!(simple_reply(&mut s).await, (0, 16));
    assert_eq!(read_n(&mut s, 1).await, [0x5a]);
    send_req(&mut s, CMD_DISC, 0, 17, 0, 0).await;
    expect_closed(&mut s).await;
    h.stop().await;
}

#[tokio::test]
async fn structured_replies() {
    let h = start(MemDevice::new()).await;
    let mut s = open(&h, true).await;

    send_req(&mut s, CMD_WRITE, 0, 1, 0, 3).await;
    s.write_all(b"xyz").await.unwrap();
    assert_eq!(chunk(&mut s).await, (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, vec![]));

    send_req(&mut s, CMD_READ, 0, 2, SIZE - 2, 4).await;
    let (f, ty, cookie, p) = chunk(&mut s).await;
    assert_eq!((f, ty, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2));
    assert_eq!(&p[..4], &22u32.to_be_bytes());
    let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
    assert_eq!(p.len(), 6 + msg_len);

    send_req(&mut s, CMD_READ, 0, 3, 0, (32 << 20) + 1).await;
    let (_, ty, cookie, p) = chunk(&mut s).await;
    assert_eq!((ty, cookie), (REPLY_TYPE_ERROR, 3));
    assert_eq!(&p[..4], &75u32.to_be_bytes(), "EOVERFLOW");

    send_req(&mut s, CMD_WRITE, 0, 4, SIZE, 1).await;
    s.write_all(b"!").await.unwrap();
    let (_, ty, cookie, p) = chunk(&mut s).await;
    assert_eq!((ty, cookie, &p[..4]), (REPLY_TYPE_ERROR, 4, &28u32.to_be_bytes()[..]));

    send_req(&mut s, CMD_READ, 0, 5, 0, 3).await;
    let (_, ty, cookie, p) = chunk(&mut s).await;
    assert_eq!((ty, cookie), (REPLY_TYPE_OFFSET_DATA, 5));
    assert_eq!(p, b"\0\0\0\0\0\0\0\0xyz");
    h.stop().await;
}

#[tokio::test]
async fn bad_magic_closes_only_that_connection() {
    let h = start(MemDevice::new()).await;
    let mut good = open(&h, false).await;
    let mut bad = open(&h, false).await;
    bad.write_all(&[0xde; 28]).await.unwrap();
    expect_closed(&mut bad).await;

    // A WRITE larger than 32 MiB cannot be skipped cheaply: closed too.
    let mut big = open(&h, true).await;
    send_req(&mut big, CMD_WRITE, 0, 1, 0, (32 << 20) + 1).await;
    expect_closed(&mut big).await;

    send_req(&mut good, CMD_READ, 0, 9, 0, 8).await;
    assert_eq!(simple_reply(&mut good).await, (0, 9));
    assert_eq!(read_n(&mut good, 8).await, [0; 8]);
    let mut late = open(&h, false).await;
    send_req(&mut late, CMD_FLUSH, 0, 10, 0, 0).await;
    assert_eq!(simple_reply(&mut late).await, (0, 10));
    h.stop().await;
}

#[tokio::test]
async fn hang_ups_leak_nothing() {
    let gate = Arc::new(Semaphore::new(0));
    let h = start(MemDevice { gate: Some((8192, gate.clone())), ..MemDevice::new() }).await;

    // Mid-payload: half a 1 MiB write, then gone. Nothing must be written.
    let mut s = open(&h, false).await;
    send_req(&mut s, CMD_WRITE, 0, 1, 0, 1 << 20).await;
    s.write_all(&vec![0xab; 1 << 19]).await.unwrap();
    drop(s);

    // Mid-header.
    let mut s = open(&h, true).await;
    s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    drop(s);

    // With a request stuck in the device and many queued behind the semaphore-free path.
    let mut s = open(&h, false).await;
    send_req(&mut s, CMD_READ, 0, 2, 8192, 512).await;
    for i in 0..50 {
        send_req(&mut s, CMD_READ, 0, 100 + i, 0, 4096).await;
    }
    timeout(T, async {
        while h.dev.active.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    drop(s);

    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(h.dev.bytes(0, 1 << 20).iter().all(|&b| b == 0));
    // Releasing the stuck read lets its task finish into a dead connection without trouble.
    gate.add_permits(1);
    timeout(T, async {
        while h.dev.active.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();
    // And the server shuts down: every connection task has ended.
    let stats = h.stop().await;
    assert_eq!(stats.connections, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_reply_out_of_order() {
    const N: u64 = 200;
    let h = start(MemDevice { reverse_delay: Some((Duration::from_millis(2), N)), ..MemDevice::new() }).await;
    for i in 0..N {
        h.dev.fill(i * 4096, &pattern(i, 4096));
    }
    let mut s = open(&h, true).await;
    let mut batch = Vec::new();
    for i in 0..N {
        let r = Request { flags: 0, command: Command::Read, cookie: 1000 + i, offset: i * 4096, length: 4096 };
        batch.extend_from_slice(&encode_request(&r));
    }
    s.write_all(&batch).await.unwrap();

    let mut order = Vec::new();
    for _ in 0..N {
        let (f, ty, cookie, p) = chunk(&mut s).await;
        assert_eq!((f, ty), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
        let i = cookie - 1000;
        assert_eq!(&p[..8], &(i * 4096).to_be_bytes());
        assert_eq!(&p[8..], &pattern(i, 4096)[..], "data for cookie {cookie}");
        order.push(i);
    }
    let unique: HashSet<_> = order.iter().collect();
    assert_eq!(unique.len(), N as usize, "each cookie answered once");
    assert!(order.windows(2).any(|w| w[0] > w[1]), "replies were out of order");
    let peak = h.dev.max_active.load(Ordering::SeqCst);
    assert!(peak >= 128, "only {peak} requests were in flight at once");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_is_respected() {
    const N: u64 = 64;
    let h =
        start_with(MemDevice { reverse_delay: Some((Duration::from_millis(1), N)), ..MemDevice::new() }, ServerConfig { max_in_flight: 8, ..config() }).await;
    let mut s = open(&h, false).await;
    for i in 0..N {
        send_req(&mut s, CMD_READ, 0, i, i * 4096, 4096).await;
    }
    for _ in 0..N {
        let (err, _) = simple_reply(&mut s).await;
        assert_eq!(err, 0);
        read_n(&mut s, 4096).await;
    }
    let peak = h.dev.max_active.load(Ordering::SeqCst);
    assert!((2..=8).contains(&peak), "peak {peak}");
    h.stop().await;
}

#[tokio::test]
async fn shutdown_drains_then_refuses_with_eshutdown() {
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(MemDevice { gate: Some((8192, gate.clone())), ..MemDevice::new() }).await;
    h.dev.fill(8192, b"drained");
    let mut s = open(&h, false).await;
    let mut st = open(&h, true).await;
    send_req(&mut s, CMD_READ, 0, 1, 8192, 7).await;
    timeout(T, async {
        while h.dev.active.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap();

    h.begin_shutdown().await;
    assert!(UnixStream::connect(&h.path).await.is_err(), "no longer accepting");
    // Requests arriving now are refused (a WRITE's payload is still consumed).
    send_req(&mut s, CMD_WRITE, 0, 2, 0, 5).await;
    s.write_all(b"late!").await.unwrap();
    assert_eq!(simple_reply(&mut s).await, (108, 2));
    send_req(&mut s, CMD_FLUSH, 0, 3, 0, 0).await;
    assert_eq!(simple_reply(&mut s).await, (108, 3));
    assert!(h.dev.bytes(0, 5).iter().all(|&b| b == 0));
    // The structured connection was idle; it may already be closed, or answer ESHUTDOWN.
    let _ = st.write_all(&encode_request(&Request { flags: 0, command: Command::Read, cookie: 4, offset: 0, length: 1 })).await;

    // The request received before shutdown completes normally, then the connection closes.
    gate.add_permits(1);
    assert_eq!(simple_reply(&mut s).await, (0, 1));
    assert_eq!(read_n(&mut s, 7).await, b"drained");
    expect_closed(&mut s).await;
    let stats = h.stop().await;
    assert_eq!(stats.connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_a_client_that_stops_reading() {
    let h = start_with(MemDevice::new(), ServerConfig { shutdown_grace: Duration::from_millis(200), ..config() }).await;
    let mut s = open(&h, false).await;
    // 64 MiB of replies that are never read: the writer blocks on a full socket buffer.
    for i in 0..64 {
        send_req(&mut s, CMD_READ, 0, i, 0, 1 << 20).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = h.stop().await;
    assert_eq!(stats.connections, 1);
    drop(s);
}

#[tokio::test]
async fn serve_waits_for_running_device_operations() {
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(MemDevice {
        gate: Some((0, gate.clone())),
        // Block 1 answers after 50 ms, when the client is gone: that write fails and ends the
        // reply writer, so only the gated request task itself is still running.
        reverse_delay: Some((Duration::from_millis(50), 2)),
        ..MemDevice::new()
    })
    .await;
    let mut s = open(&h, false).await;
    send_req(&mut s, CMD_READ, 0, 1, 0, 512).await;
    send_req(&mut s, CMD_READ, 0, 2, 4096, 512).await;
    timeout(T, async {
        while h.dev.active.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    drop(s); // the client is gone, but its read is still inside the device
    h.begin_shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!h.task.is_finished(), "serve returned while a device op was running");
    gate.add_permits(1);
    let dev = h.dev.clone();
    h.stop().await;
    assert_eq!(dev.active.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------------------------

#[test]
fn listen_addr_parse_and_display() {
    let u: ListenAddr = "unix:/run/nbraid.sock".parse().unwrap();
    assert_eq!(u, ListenAddr::Unix("/run/nbraid.sock".into()));
    assert_eq!(u.to_string(), "unix:/run/nbraid.sock");
    let t: ListenAddr = "tcp:127.0.0.1:10809".parse().unwrap();
    assert_eq!(t, ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()));
    assert_eq!(t.to_string(), "tcp:127.0.0.1:10809");
    let v6: ListenAddr = "tcp:[::1]:10809".parse().unwrap();
    assert_eq!(v6.to_string(), "tcp:[::1]:10809");
    assert_eq!(v6.to_string().parse::<ListenAddr>().unwrap(), v6);
    let l: ListenAddr = "tcp:localhost:10809".parse().unwrap();
    assert!(matches!(l, ListenAddr::Tcp(a) if a.port() == 10809 && a.ip().is_loopback()));
    for bad in ["", "unix:", "tcp:", "tcp:1.2.3.4", "tcp:1.2.3.4:99999", "tcp::80", "udp:x:1", "/x"] {
        let e = bad.parse::<ListenAddr>().unwrap_err().to_string();
        assert!(e.contains("unix:PATH or tcp:HOST:PORT"), "{bad}: {e}");
    }
}

#[tokio::test]
async fn unix_socket_files_are_handled_carefully() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let addr = [ListenAddr::Unix(path.clone())];
    let dev = Arc::new(MemDevice::new());

    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::bind(dev.clone(), config(), &addr).await.unwrap();

    // A live one is not.
    let err = Server::bind(dev.clone(), config(), &addr).await.err().expect("second bind refused");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("unix:"), "{err}");
    drop(server);
    assert!(!path.exists(), "socket removed when the server is dropped");

    // A regular file is never deleted.
    std::fs::write(&path, b"precious").unwrap();
    assert!(Server::bind(dev.clone(), config(), &addr).await.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn tcp_listener() {
    let dev = Arc::new(MemDevice::new());
    dev.fill(0, b"tcp!");
    let server = Server::bind(dev, config(), &["tcp:127.0.0.1:0".parse().unwrap()]).await.unwrap();
    let Some(ListenAddr::Tcp(addr)) = server.local_addrs().first().cloned() else {
        panic!("tcp address expected");
    };
    assert_ne!(addr.port(), 0);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let exchange = async {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await?;
        s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await?;
        s.write_all(&encode_option_header(OPT_EXPORT_NAME, 0)).await?;
        let mut r = [0u8; 134];
        s.read_exact(&mut r).await?;
        assert_eq!(&r[..8], &SIZE.to_be_bytes());
        assert!(r[10..].iter().all(|&b| b == 0));
        let req = Request { flags: 0, command: Command::Read, cookie: 3, offset: 0, length: 4 };
        s.write_all(&encode_request(&req)).await?;
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).await?;
        std::io::Result::Ok(reply)
    };
    let reply = timeout(T, exchange).await.expect("timely").unwrap();
    assert_eq!(&reply[..16], &encode_simple_reply(3, 0));
    assert_eq!(&reply[16..], b"tcp!");
    tx.send(()).unwrap();
    let stats = timeout(T, task).await.unwrap().unwrap().unwrap();
    assert_eq!(stats.connections, 1);
}

// ---------------------------------------------------------------------------------------------
// Real, independent clients
// ---------------------------------------------------------------------------------------------

/// Runs a command to completion off the async threads, killed after two minutes so a protocol
/// bug shows up as a failure rather than a hung test; panics with its output if it fails.
async fn run_tool(args: Vec<String>) -> String {
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || std::process::Command::new("timeout").args(["--kill-after=5", "120"]).args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (apt-get install -y libnbd-bin qemu-utils)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{shown} failed: {}\nstdout: {stdout}\nstderr: {stderr}", out.status);
    stdout
}

fn s(x: &str) -> String {
    x.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_and_block_sizes() {
    let h = start(MemDevice::new()).await;
    let out = run_tool(vec![s("nbdinfo"), s("--json"), h.uri()]).await;
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], NAME);
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], PREFERRED);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["description"], DESCRIPTION);
    for cap in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"] {
        assert_eq!(e[cap], true, "{cap} in {e}");
    }
    assert_eq!(e["is_read_only"], false);

    // Listing goes through NBD_OPT_LIST and then INFO per export.
    let list = run_tool(vec![s("nbdinfo"), s("--list"), s("--json"), h.uri()]).await;
    let v: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list JSON");
    assert_eq!(v["exports"][0]["export-name"], NAME);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_a_pattern() {
    let h = start(MemDevice::new()).await;
    let out = run_tool(vec![
        s("qemu-io"),
        s("-f"),
        s("raw"),
        h.uri(),
        s("-c"),
        s("write -P 0xab 12345 70000"),
        s("-c"),
        s("read -P 0xab 12345 70000"),
        s("-c"),
        s("write -z 20000 4096"),
        s("-c"),
        s("read -P 0 20000 4096"),
        s("-c"),
        s("flush"),
    ])
    .await;
    for bad in ["Pattern verification failed", "error", "failed"] {
        assert!(!out.contains(bad), "qemu-io output: {out}");
    }
    assert_eq!(out.matches("wrote").count(), 2, "{out}");
    assert_eq!(out.matches("read ").count(), 2, "{out}");
    let mut expect = vec![0xab; 70_000];
    expect[20_000 - 12_345..20_000 - 12_345 + 4096].fill(0);
    assert_eq!(h.dev.bytes(12_345, 70_000), expect);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_a_random_image() {
    use rand::RngCore;
    let h = start(MemDevice::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.img");
    let dst = dir.path().join("out.img");
    let mut data = vec![0u8; SIZE as usize];
    rand::thread_rng().fill_bytes(&mut data);
    // A zero region exercises nbdcopy's zero detection (WRITE_ZEROES / TRIM).
    data[1 << 20..3 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();

    let path = |p: &Path| p.display().to_string();
    run_tool(vec![s("nbdcopy"), path(&src), h.uri()]).await;
    assert!(h.dev.bytes(0, SIZE as usize) == data, "device matches the image");
    run_tool(vec![s("nbdcopy"), h.uri(), path(&dst)]).await;
    assert!(std::fs::read(&dst).unwrap() == data, "copied-out image matches");
    let stats = h.stop().await;
    assert!(stats.connections >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify_with_deep_queues() {
    let h = start(MemDevice::new()).await;
    let out = run_tool(vec![
        s("fio"),
        s("--name=verify"),
        s("--ioengine=nbd"),
        format!("--uri={}", h.uri()),
        s("--rw=randwrite"),
        s("--bsrange=512-64k"),
        s("--iodepth=64"),
        s("--size=8M"),
        s("--verify=crc32c"),
        s("--do_verify=1"),
        s("--verify_fatal=1"),
        s("--verify_state_save=0"),
        s("--output-format=json"),
    ])
    .await;
    let json = &out[out.find('{').expect("fio JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= SIZE, "{job}");
    assert!(job["read"]["io_bytes"].as_u64().unwrap() >= SIZE, "verify pass read: {job}");
    h.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_negotiating_is_dropped() {
    let h = start_with(MemDevice::new(), ServerConfig { handshake_timeout: Duration::from_millis(200), ..config() }).await;
    let mut idle = h.connect().await;
    greeting(&mut idle, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    // Sends no option at all: the server must give up on it, while a prompt client still works.
    let mut prompt = open(&h, false).await;
    expect_closed(&mut idle).await;
    send_req(&mut prompt, CMD_READ, 0, 7, 0, 512).await;
    assert_eq!(read_n(&mut prompt, 16 + 512).await.len(), 16 + 512);
    drop(prompt);
    h.stop().await;
}
