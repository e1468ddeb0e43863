//! The control socket against a fake daemon, over real Unix sockets in a tempdir.

use super::api::*;
use super::client::{call, Client, ClientError};
use super::server::{ControlServer, MAX_LINE};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// A status with one of everything: a failed slot, a replacement, a spare, a rebuild.
pub(crate) fn sample_status() -> VolumeStatus {
    VolumeStatus {
        name: "vol0".into(),
        uuid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
        level: "raid5".into(),
        data_shards: 3,
        parity_shards: 1,
        chunk: 64 << 10,
        size: 3 << 30,
        members: 4,
        state: VolumeState::Rebuilding,
        slots: vec![
            SlotStatus {
                slot: 0,
                path: Some("/d/m0".into()),
                state: "active".into(),
                reads: 1200,
                writes: 800,
                read_errors: 0,
                write_errors: 0,
                checksum_errors: 0,
                repaired_blocks: 0,
                replacement: None,
            },
            SlotStatus {
                slot: 1,
                path: Some("/d/m1".into()),
                state: "replacing".into(),
                reads: 1100,
                writes: 790,
                read_errors: 0,
                write_errors: 0,
                checksum_errors: 0,
                repaired_blocks: 0,
                replacement: Some("/d/new1".into()),
            },
            SlotStatus {
                slot: 2,
                path: Some("/d/m4".into()),
                state: "rebuilding".into(),
                reads: 0,
                writes: 5000,
                read_errors: 0,
                write_errors: 0,
                checksum_errors: 0,
                repaired_blocks: 0,
                replacement: None,
            },
            SlotStatus {
                slot: 3,
                path: None,
                state: "missing".into(),
                reads: 7,
                writes: 3,
                read_errors: 2,
                write_errors: 1,
                checksum_errors: 3,
                repaired_blocks: 3,
                replacement: None,
            },
        ],
        spares: vec!["/d/spare0".into()],
        rebuilds: vec![RebuildStatus {
            slot: 2,
            target: "/d/m4".into(),
            done_bytes: 256 << 20,
            total_bytes: 1 << 30,
            rate: 100.0 * (1 << 20) as f64,
            eta_seconds: Some(7.68),
        }],
        max_rebuild_rate: Some(200 << 20),
        scrub: None,
        intent: Default::default(),
        checksums: true,
        deferred_checksum_pages: false,
        checksum_errors: 3,
        repaired_blocks: 3,
        stripe_cache: Some(StripeCacheStatus { stripes: 2, capacity: 42, hits: 1530, loads: 35 }),
    }
}

/// Records every request; `fail` of member "block" waits for `gate`, "panic" panics.
#[derive(Default)]
struct Fake {
    log: Mutex<Vec<Request>>,
    gate: Notify,
}

impl Admin for Fake {
    async fn handle(&self, request: Request) -> Response {
        if let Ok(mut log) = self.log.lock() {
            log.push(request.clone());
        }
        match request {
            Request::Status => Response { ok: true, message: "status".into(), status: Some(sample_status()) },
            Request::Fail { member } if member == "block" => {
                self.gate.notified().await;
                Response::ok("unblocked")
            }
            Request::Fail { member } if member == "panic" => panic!("fake handler panics on purpose"),
            Request::Fail { member } if member == "nope" => Response::refused("no member nope"),
            other => Response::ok(format!("done: {other:?}")),
        }
    }
}

struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    fake: Arc<Fake>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops the server; hands back the tempdir so the caller can inspect what is left.
    async fn stop(mut self) -> (PathBuf, tempfile::TempDir) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task).await.expect("server stops").expect("server task").expect("server result");
        (self.path, self._dir)
    }

    fn log(&self) -> Vec<Request> {
        self.fake.log.lock().unwrap().clone()
    }
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let server = ControlServer::bind(&path).await.unwrap();
    let fake = Arc::new(Fake::default());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(fake.clone(), async move {
        let _ = rx.await;
    }));
    Running { _dir: dir, path, fake, stop: Some(tx), task }
}

/// A raw connection, for sending what the real client never would.
struct Raw {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        let (r, w) = UnixStream::connect(path).await.unwrap().into_split();
        Raw { reader: BufReader::new(r), writer: w }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn response(&mut self) -> Response {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line)).await.expect("answer in time").unwrap();
        assert!(n > 0, "connection closed without an answer");
        serde_json::from_str(&line).unwrap()
    }
}

#[tokio::test]
async fn control_every_request_round_trips() {
    let srv = start().await;
    let requests = vec![
        Request::Status,
        Request::Fail { member: "2".into() },
        Request::Add { path: "/d/new".into() },
        Request::Replace { old: "/d/m1".into(), new: "/d/new1".into() },
        Request::Rebuild { max_rate: Some(200 << 20) },
        Request::Rebuild { max_rate: None },
        Request::Fault { member: "1".into(), fault: FaultSpec { read_errors: true, write_errors: false, after_ops: 10, delay_ms: 5, torn_write: false } },
    ];
    // One connection for all of them: many requests per connection.
    let mut client = Client::connect(&srv.path).await.unwrap();
    for req in &requests {
        let resp = client.request(req).await.unwrap();
        assert!(resp.ok, "{req:?}: {resp:?}");
        if *req == Request::Status {
            assert_eq!(resp.status, Some(sample_status()));
        } else {
            assert_eq!(resp.message, format!("done: {req:?}"));
        }
    }
    // And one connection each through `call`.
    for req in &requests {
        assert!(call(&srv.path, req).await.unwrap().ok);
    }
    let mut expected = requests.clone();
    expected.extend(requests);
    assert_eq!(srv.log(), expected);
    srv.stop().await;
}

#[tokio::test]
async fn control_refusal_passes_through() {
    let srv = start().await;
    let resp = call(&srv.path, &Request::Fail { member: "nope".into() }).await.unwrap();
    assert_eq!(resp, Response::refused("no member nope"));
    srv.stop().await;
}

#[tokio::test]
async fn control_malformed_json_is_refused_and_connection_survives() {
    let srv = start().await;
    let mut raw = Raw::connect(&srv.path).await;
    for bad in
        [&b"{not json\n"[..], b"[1,2\n", b"\xff\xfe\n", b"\n", b"   \r\n", b"{\"cmd\": 7}\n", b"{\"member\":\"1\"}\n", b"{\"cmd\":\"fail\"}\n", b"null\n"]
    {
        raw.send(bad).await;
        let resp = raw.response().await;
        assert!(!resp.ok, "{:?} accepted", String::from_utf8_lossy(bad));
        assert!(!resp.message.is_empty());
    }
    raw.send(b"{\"cmd\":\"status\"}\r\n").await;
    let resp = raw.response().await;
    assert!(resp.ok && resp.status.is_some(), "{resp:?}");
    srv.stop().await;
}

#[tokio::test]
async fn control_unknown_cmd_is_refused() {
    let srv = start().await;
    let mut raw = Raw::connect(&srv.path).await;
    raw.send(b"{\"cmd\":\"format-all-disks\"}\n").await;
    let resp = raw.response().await;
    assert!(!resp.ok);
    assert!(resp.message.contains("unknown command"), "{}", resp.message);
    raw.send(b"{\"cmd\":\"status\"}\n").await;
    assert!(raw.response().await.ok);
    assert!(srv.log().iter().all(|r| *r == Request::Status));
    srv.stop().await;
}

#[tokio::test]
async fn control_known_commands_match_the_enum() {
    let all = [
        Request::Status,
        Request::Fail { member: String::new() },
        Request::Add { path: PathBuf::new() },
        Request::Replace { old: String::new(), new: PathBuf::new() },
        Request::Rebuild { max_rate: None },
        Request::Fault { member: String::new(), fault: FaultSpec::default() },
    ];
    for req in all {
        let line = serde_json::to_vec(&req).unwrap();
        assert_eq!(super::server::parse_request(&line).ok(), Some(req));
    }
}

#[tokio::test]
async fn control_final_line_without_newline_is_answered() {
    let srv = start().await;
    let mut raw = Raw::connect(&srv.path).await;
    raw.send(b"{\"cmd\":\"status\"}").await;
    raw.writer.shutdown().await.unwrap();
    assert!(raw.response().await.ok);
    srv.stop().await;
}

#[tokio::test]
async fn control_line_of_exactly_the_limit_is_accepted() {
    let srv = start().await;
    let mut raw = Raw::connect(&srv.path).await;
    let mut line = b"{\"cmd\":\"status\"}".to_vec();
    line.resize(MAX_LINE, b' ');
    line.push(b'\n');
    raw.send(&line).await;
    assert!(raw.response().await.ok);
    srv.stop().await;
}

#[tokio::test]
async fn control_oversized_line_closes_the_connection() {
    let srv = start().await;
    let (r, mut w) = UnixStream::connect(&srv.path).await.unwrap().into_split();
    // The server stops reading mid-line, so the writer may see EPIPE: that is expected.
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..(2 * MAX_LINE / chunk.len()) {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Keep the write half open: the close must come from the server.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut reader = BufReader::new(r);
    let mut all = Vec::new();
    // Until EOF or reset; either way the server hung up, within the timeout.
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut all)).await.expect("server closes the connection");
    if !all.is_empty() {
        let resp: Response = serde_json::from_slice(&all).unwrap();
        assert!(!resp.ok && resp.message.contains("longer than"), "{resp:?}");
    }
    writer.abort();
    // The server itself is unharmed.
    assert!(call(&srv.path, &Request::Status).await.unwrap().ok);
    assert!(srv.log().iter().all(|r| *r == Request::Status));
    srv.stop().await;
}

#[tokio::test]
async fn control_two_clients_at_once() {
    let srv = start().await;
    let path = srv.path.clone();
    let blocked = tokio::spawn(async move { call(&path, &Request::Fail { member: "block".into() }).await });
    // Wait until the first request is inside the handler.
    for _ in 0..200 {
        if !srv.log().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.log().len(), 1, "first request never arrived");
    // The second client is answered while the first is still waiting.
    let resp = tokio::time::timeout(Duration::from_secs(5), call(&srv.path, &Request::Status)).await.expect("second client answered").unwrap();
    assert!(resp.ok);
    assert!(!blocked.is_finished());
    srv.fake.gate.notify_one();
    let first = tokio::time::timeout(Duration::from_secs(5), blocked).await.unwrap().unwrap().unwrap();
    assert_eq!(first, Response::ok("unblocked"));
    srv.stop().await;
}

#[tokio::test]
async fn control_handler_panic_is_an_error_response() {
    let srv = start().await;
    let mut client = Client::connect(&srv.path).await.unwrap();
    let resp = client.request(&Request::Fail { member: "panic".into() }).await.unwrap();
    assert!(!resp.ok && resp.message.contains("internal error"), "{resp:?}");
    // Same connection still works.
    assert!(client.request(&Request::Status).await.unwrap().ok);
    srv.stop().await;
}

#[tokio::test]
async fn control_socket_is_private_and_removed_on_shutdown() {
    let srv = start().await;
    let mode = std::fs::metadata(&srv.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    // An idle open connection must not hold shutdown up.
    let _idle = Raw::connect(&srv.path).await;
    let (path, _dir) = srv.stop().await;
    assert!(!path.exists(), "socket file left behind");
    // No temporary file left either.
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn control_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    // A daemon that died without cleaning up leaves its socket file behind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ControlServer::bind(&path).await.expect("stale socket replaced");
    let fake = Arc::new(Fake::default());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(fake, async move {
        let _ = rx.await;
    }));
    assert!(call(&path, &Request::Status).await.unwrap().ok);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn control_live_socket_is_refused() {
    let srv = start().await;
    let err = ControlServer::bind(&srv.path).await.expect_err("second daemon on the same socket");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("running daemon"), "{err}");
    // The live daemon is untouched.
    assert!(call(&srv.path, &Request::Status).await.unwrap().ok);
    srv.stop().await;
}

#[tokio::test]
async fn control_non_socket_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    std::fs::write(&path, b"precious").unwrap();
    let err = ControlServer::bind(&path).await.expect_err("regular file kept");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn control_client_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing-here");
    let err = call(&path, &Request::Status).await.expect_err("nobody listening");
    assert!(matches!(err, ClientError::Connect { .. }));
    let text = err.to_string();
    assert!(text.contains("cannot connect to control socket") && text.contains("nbraid serve --control"), "{text}");

    // A "daemon" that accepts and never answers runs into the timeout.
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let hold = tokio::spawn(async move {
        let conn = listener.accept().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(conn);
    });
    let err = super::client::call_with_timeout(&path, &Request::Status, Duration::from_millis(200)).await.expect_err("times out");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    hold.abort();
}

#[tokio::test]
async fn control_client_reports_garbage_and_hangups() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake_daemon = tokio::spawn(async move {
        // First connection: garbage. Second: hang up after reading the request.
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await;
        s.write_all(b"this is not json\n").await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = s.read(&mut buf).await;
        drop(s);
    });
    let err = call(&path, &Request::Status).await.expect_err("garbage");
    assert!(matches!(err, ClientError::BadResponse { .. }), "{err}");
    let err = call(&path, &Request::Status).await.expect_err("hang-up");
    assert!(matches!(err, ClientError::Closed { .. } | ClientError::Io { .. }), "{err}");
    fake_daemon.await.unwrap();
}

#[tokio::test]
async fn control_path_near_the_socket_address_limit_binds() {
    let dir = tempfile::tempdir().unwrap();
    // Fits a socket address (108 bytes with the NUL) but the temporary sibling would not.
    let base = dir.path().as_os_str().len() + 1;
    assert!(base < 90, "tempdir path too long for this test: {}", dir.path().display());
    let path = dir.path().join("c".repeat(104 - base));
    assert_eq!(path.as_os_str().len(), 104);
    let server = ControlServer::bind(&path).await.expect("binds directly");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(Arc::new(Fake::default()), async move {
        let _ = rx.await;
    }));
    assert!(call(&path, &Request::Status).await.unwrap().ok);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn control_socket_removed_when_server_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl");
    let server = ControlServer::bind(&path).await.unwrap();
    let task = tokio::spawn(server.run(Arc::new(Fake::default()), std::future::pending::<()>()));
    assert!(call(&path, &Request::Status).await.unwrap().ok);
    // The daemon aborting the task instead of signalling shutdown still cleans up.
    task.abort();
    let _ = task.await;
    assert!(!path.exists(), "socket file left behind");
}
