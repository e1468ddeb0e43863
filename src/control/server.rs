//! The daemon side of the control socket: one JSON [`Request`] per line in, one JSON
//! [`Response`] per line out, many requests per connection, many connections at once.

use super::api::{Admin, Request, Response};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Longest request line accepted. Real requests are a few hundred bytes; the cap keeps a
/// runaway or hostile client from growing the daemon's memory without bound.
pub const MAX_LINE: usize = 1 << 20;

/// Connections served at once. Admin traffic is a handful of CLI calls; the cap keeps a leak
/// of idle connections from exhausting the daemon's file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to finish its current request once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for an answer when probing whether an existing socket is alive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound control socket, not yet serving. Binding separately lets the daemon fail fast
/// (e.g. another daemon owns the path) before it starts exporting anything.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    file: SocketFile,
}

/// The socket file we created; removed when dropped, so it goes away on shutdown and also
/// when the daemon drops the server future without a clean shutdown.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// Identity of the file, so we remove ours and never a successor's that replaced it.
    inode: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.inode => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove control socket {}: {e}", self.path.display());
                }
            }
            // Gone already, or another daemon's socket now: not ours to remove.
            _ => {}
        }
    }
}

/// Binds `path` and serves `admin` on it until `shutdown` resolves.
pub async fn serve_control<A: Admin>(admin: Arc<A>, path: &Path, shutdown: impl Future<Output = ()> + Send) -> io::Result<()> {
    ControlServer::bind(path).await?.run(admin, shutdown).await
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600. A stale socket file (nothing answers on it)
    /// is replaced; a live one, or a file that is not a socket, is refused.
    pub async fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("control socket path {} exists and is not a socket; refusing to replace it", path.display()),
                ));
            }
            Ok(_) => {
                if is_alive(path).await {
                    return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("control socket {} is in use by a running daemon", path.display())));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot inspect control socket path {}: {e}", path.display()))),
        }

        // Bind under a temporary name, restrict it, then rename it over `path`: the socket is
        // never reachable at `path` with looser permissions, and a stale file is replaced
        // atomically instead of removed and re-created.
        let tmp = temp_name(path)?;
        let _ = std::fs::remove_file(&tmp);
        let listener = match UnixListener::bind(&tmp) {
            Ok(listener) => {
                let installed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).and_then(|()| std::fs::rename(&tmp, path));
                if let Err(e) = installed {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io::Error::new(e.kind(), format!("cannot install control socket at {}: {e}", path.display())));
                }
                listener
            }
            // The temporary name is a few bytes longer than `path` and may not fit in a socket
            // address where `path` still does: bind directly and restrict it right after.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                let _ = std::fs::remove_file(path);
                let listener = UnixListener::bind(path).map_err(|e| io::Error::new(e.kind(), format!("cannot bind control socket {}: {e}", path.display())))?;
                if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                    let _ = std::fs::remove_file(path);
                    return Err(io::Error::new(e.kind(), format!("cannot restrict control socket {}: {e}", path.display())));
                }
                listener
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot bind control socket {}: {e}", tmp.display()))),
        };
        let meta = std::fs::symlink_metadata(path)?;
        Ok(ControlServer { listener, file: SocketFile { path: path.to_path_buf(), inode: (meta.dev(), meta.ino()) } })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets each connection finish the
    /// request it is handling (up to a grace period) and removes the socket file.
    pub async fn run<A: Admin>(self, admin: Arc<A>, shutdown: impl Future<Output = ()> + Send) -> io::Result<()> {
        let ControlServer { listener, file } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                // Reap finished connections so the set does not grow with the daemon's uptime.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let admin = admin.clone();
                        let stop = stop_rx.clone();
                        match slots.clone().try_acquire_owned() {
                            Ok(permit) => {
                                conns.spawn(async move {
                                    let _permit = permit;
                                    if let Err(e) = serve_connection(admin, stream, stop).await {
                                        tracing::debug!("control connection ended: {e}");
                                    }
                                });
                            }
                            Err(_) => {
                                conns.spawn(refuse_busy(stream));
                            }
                        }
                    }
                    Err(e) if is_transient_accept_error(&e) => {
                        tracing::warn!("control socket accept: {e}");
                        // Out of descriptors and the like: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => break Err(e),
                },
            }
        };
        let _ = stop_tx.send(true);
        drop(listener);
        drop(file);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("control connections still busy after {SHUTDOWN_GRACE:?}; dropping them");
            conns.abort_all();
        }
        result
    }
}

/// A hidden sibling of `path`, unique to this process.
fn temp_name(path: &Path) -> io::Result<PathBuf> {
    let name =
        path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("control socket path {} has no file name", path.display())))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Whether something accepts connections on the socket at `path`. Only a refused connection
/// counts as stale: any other failure (e.g. permissions) is treated as alive, because removing
/// a live daemon's socket would orphan it.
async fn is_alive(path: &Path) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => !matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound),
        // A listener whose backlog is full still belongs to a live process.
        Err(_) => true,
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED | libc::EINTR))
}

async fn refuse_busy(mut stream: UnixStream) {
    let _ = write_response(&mut stream, &Response::refused(format!("too many control connections (limit {MAX_CONNECTIONS}); try again"))).await;
}

/// One connection: lines in, responses out, until EOF, an oversized line, an I/O error or
/// shutdown.
async fn serve_connection<A: Admin>(admin: Arc<A>, stream: UnixStream, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let n = tokio::select! {
            n = limited.read_until(b'\n', &mut line) => n?,
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if line.len() > MAX_LINE {
            // The rest of the line is still unread, so the stream cannot be resynchronised.
            let _ = write_response(&mut write, &Response::refused(format!("request line longer than {MAX_LINE} bytes; closing the connection"))).await;
            return Ok(());
        }
        let response = match parse_request(&line) {
            Ok(request) => dispatch(&admin, request).await,
            Err(refusal) => Response::refused(refusal),
        };
        write_response(&mut write, &response).await?;
        if !complete {
            // EOF right after an unterminated final line: it was answered, nothing more comes.
            return Ok(());
        }
    }
}

/// Runs the handler in its own task so that a panic in the daemon's code answers this request
/// with an error instead of silently dropping the connection.
async fn dispatch<A: Admin>(admin: &Arc<A>, request: Request) -> Response {
    let admin = admin.clone();
    match tokio::spawn(async move { admin.handle(request).await }).await {
        Ok(response) => response,
        Err(e) if e.is_panic() => {
            tracing::error!("control request handler panicked");
            Response::refused("internal error: the daemon failed while handling this request (see its log)")
        }
        Err(_) => Response::refused("the daemon is shutting down"),
    }
}

/// Parses one request line; the error is the refusal message to send back.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, String> {
    const EXAMPLE: &str = "send one JSON object per line, like {\"cmd\":\"status\"}";
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("empty request: {EXAMPLE}"));
    }
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| format!("malformed JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!("invalid request: not a JSON object; {EXAMPLE}"));
    }
    match value.get("cmd") {
        None => return Err("invalid request: missing \"cmd\"".into()),
        Some(serde_json::Value::String(cmd)) if !KNOWN_COMMANDS.contains(&cmd.as_str()) => {
            return Err(format!("unknown command {cmd:?} (known: {})", KNOWN_COMMANDS.join(", ")));
        }
        Some(serde_json::Value::String(_)) => {}
        Some(_) => return Err("invalid request: \"cmd\" must be a string".into()),
    }
    serde_json::from_value(value).map_err(|e| format!("invalid request: {e}"))
}

/// The `cmd` tags of [`Request`]; a test keeps this list in step with the enum.
const KNOWN_COMMANDS: &[&str] = &["status", "fail", "add", "replace", "rebuild", "scrub", "fault"];

async fn write_response<W: AsyncWriteExt + Unpin>(write: &mut W, response: &Response) -> io::Result<()> {
    let mut out = match serde_json::to_vec(response) {
        Ok(out) => out,
        Err(e) => serde_json::to_vec(&Response::refused(format!("internal error: cannot encode the response: {e}"))).unwrap_or_default(),
    };
    out.push(b'\n');
    write.write_all(&out).await?;
    write.flush().await
}
