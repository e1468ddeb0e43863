//! The tokio NBD server: listeners, accept loops, and orderly shutdown.
//!
//! Typical use by the `serve` command:
//! ```ignore
//! let server = Server::bind(device.clone(), ServerConfig::new("vol0"), &listen).await?;
//! for addr in server.local_addrs() { println!("nbd export at {addr}"); }
//! server.run(sigterm).await?;   // stops accepting, drains, closes every connection
//! device.flush().await?;        // the caller owns durability of the device
//! ```

use super::connection::{serve_connection, ByteBudget, ConnContext, Counters};
use super::device::BlockDevice;
use super::handshake::ExportInfo;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Why a listen address string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {input:?}: {reason} (expected unix:PATH or tcp:HOST:PORT)")]
pub struct ParseListenAddrError {
    input: String,
    reason: String,
}

impl FromStr for ListenAddr {
    type Err = ParseListenAddrError;

    /// `unix:/run/nbraid.sock`, `tcp:127.0.0.1:10809`, `tcp:[::1]:10809`, `tcp:localhost:10809`.
    /// Host names are resolved here (first address wins) so the result is a concrete address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseListenAddrError { input: s.to_string(), reason: reason.to_string() };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(hostport) = s.strip_prefix("tcp:") {
            if let Ok(addr) = hostport.parse::<SocketAddr>() {
                return Ok(ListenAddr::Tcp(addr));
            }
            let (host, port) = hostport.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
            let port: u16 = port.parse().map_err(|_| err("port is not a number 0-65535"))?;
            if host.is_empty() {
                return Err(err("empty host"));
            }
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let addr = (host, port)
                .to_socket_addrs()
                .map_err(|e| err(&format!("cannot resolve host: {e}")))?
                .next()
                .ok_or_else(|| err("host resolves to no address"))?;
            return Ok(ListenAddr::Tcp(addr));
        }
        Err(err("unknown scheme"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Server settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Name of the single export; the default name "" selects it too.
    pub export_name: String,
    /// Human-readable description sent as `NBD_INFO_DESCRIPTION` (omitted when empty).
    pub description: String,
    /// Requests executing at once per connection. Clamped to at least 1.
    pub max_in_flight: usize,
    /// Payload bytes (READ and WRITE lengths) in flight at once per connection, replies not yet
    /// written included; bounds memory a client can pin. A single larger request still runs.
    pub max_in_flight_bytes: usize,
    /// The same bound across all connections together, so the daemon's memory stays bounded
    /// however many clients connect: a connection waits for room before it takes more.
    pub max_server_bytes: usize,
    /// After shutdown, how long a connection may take to deliver its remaining replies before it
    /// is closed regardless (a client that stops reading would otherwise stall shutdown forever).
    /// Device operations already started always run to completion.
    pub shutdown_grace: Duration,
    /// How long a client may take to finish option negotiation; an idle or dribbling client is
    /// disconnected after it, so half-open connections cannot pile up.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    pub fn new(export_name: impl Into<String>) -> Self {
        ServerConfig { export_name: export_name.into(), ..Self::default() }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            description: String::new(),
            max_in_flight: 256,
            // Far above what queue depth needs for speed (the kernel client: 128 x 128 KiB; fio
            // 1 MiB x QD8), far below what 4 clients x 128 x 32 MiB would pin unchecked.
            max_in_flight_bytes: 128 * 1024 * 1024,
            max_server_bytes: 256 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What a finished server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    pub connections: u64,
    pub requests: u64,
}

/// A bound Unix socket file, removed again when dropped — but only if the path still names the
/// socket we created, so a successor server's socket is never deleted by us.
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

enum Listener {
    // Field order matters: the listener closes before the file is removed.
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener),
}

/// Removes a leftover socket file at `path`, but only if it is a socket nobody listens on.
async fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists and is not a socket", path.display())));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, format!("another server is listening on {}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!("removing stale socket {}", path.display());
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// A server with its listeners bound, not yet accepting.
pub struct Server<D> {
    device: Arc<D>,
    config: ServerConfig,
    listeners: Vec<Listener>,
}

impl<D: BlockDevice> Server<D> {
    /// Binds every address. On error nothing stays bound (Unix socket files created so far are
    /// removed again).
    pub async fn bind(device: Arc<D>, config: ServerConfig, addrs: &[ListenAddr]) -> io::Result<Self> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let with_addr = |e: io::Error| io::Error::new(e.kind(), format!("{addr}: {e}"));
            let l = match addr {
                ListenAddr::Unix(path) => {
                    clear_stale_socket(path).await.map_err(with_addr)?;
                    let l = UnixListener::bind(path).map_err(with_addr)?;
                    let m = std::fs::symlink_metadata(path).map_err(with_addr)?;
                    let file = SocketFile { path: path.clone(), id: (m.dev(), m.ino()) };
                    Listener::Unix(l, file)
                }
                ListenAddr::Tcp(sa) => Listener::Tcp(TcpListener::bind(sa).await.map_err(with_addr)?),
            };
            listeners.push(l);
        }
        Ok(Server { device, config, listeners })
    }

    /// The bound addresses (TCP port 0 resolved to the real port).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Unix(_, f) => Some(ListenAddr::Unix(f.path.clone())),
                Listener::Tcp(t) => t.local_addr().ok().map(ListenAddr::Tcp),
            })
            .collect()
    }

    /// Accepts and serves connections until `shutdown` resolves. Then it stops accepting,
    /// removes its Unix socket files, answers requests already received (new ones get
    /// `ESHUTDOWN`), closes every connection, and returns once all connection tasks have ended.
    /// Flushing the device is left to the caller.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> io::Result<ServeStats> {
        let Server { device, config, listeners } = self;
        let export = Arc::new(ExportInfo {
            name: config.export_name.clone(),
            description: config.description.clone(),
            size: device.size(),
            preferred_block_size: device.preferred_block_size(),
        });
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every accept loop, connection task and request task holds a clone of `alive` (inside
        // its context); when the last is dropped, `all_done` yields None: nothing is running, in
        // particular no device operation, so the caller may flush the device.
        let (alive, mut all_done) = mpsc::channel::<()>(1);

        let base_ctx = ConnContext {
            device: device.clone(),
            export,
            max_in_flight: config.max_in_flight.clamp(1, u32::MAX as usize) as u32,
            max_in_flight_bytes: config.max_in_flight_bytes.clamp(1, u32::MAX as usize) as u32,
            server_bytes: ByteBudget::new(config.max_server_bytes),
            shutdown: stop_rx.clone(),
            shutdown_grace: config.shutdown_grace,
            handshake_timeout: config.handshake_timeout,
            counters: counters.clone(),
            alive,
        };

        for listener in listeners {
            let mut stop = stop_rx.clone();
            let base_ctx = base_ctx.clone();
            tokio::spawn(async move {
                match &listener {
                    Listener::Unix(_, f) => info!("listening on unix:{}", f.path.display()),
                    Listener::Tcp(t) => match t.local_addr() {
                        Ok(a) => info!("listening on tcp:{a}"),
                        Err(_) => info!("listening on tcp"),
                    },
                }
                let mut next_id: u64 = 0;
                loop {
                    let accepted = tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        r = accept(&listener) => r,
                    };
                    match accepted {
                        Ok((conn, peer)) => {
                            next_id += 1;
                            let peer = format!("{peer}#{next_id}");
                            let ctx = base_ctx.clone();
                            ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
                            debug!(%peer, "accepted connection");
                            tokio::spawn(async move {
                                match conn {
                                    Conn::Unix(s) => serve_connection(s, ctx, peer).await,
                                    Conn::Tcp(s) => serve_connection(s, ctx, peer).await,
                                }
                            });
                        }
                        Err(e) => {
                            // Typically EMFILE or a connection reset before accept; back off
                            // briefly instead of spinning or giving up on the listener.
                            warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                // Dropping the listener closes it and removes its socket file.
                drop(listener);
                drop(base_ctx);
            });
        }
        drop(base_ctx);

        shutdown.await;
        info!("shutting down: no new connections, draining in-flight requests");
        // send_replace works even when no receiver is currently waiting.
        stop_tx.send_replace(true);
        let _ = all_done.recv().await;
        let stats = ServeStats { connections: counters.connections.load(Ordering::Relaxed), requests: counters.requests.load(Ordering::Relaxed) };
        info!(connections = stats.connections, requests = stats.requests, "all connections closed");
        Ok(stats)
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &Listener) -> io::Result<(Conn, String)> {
    match listener {
        Listener::Unix(l, f) => {
            let (s, _) = l.accept().await?;
            Ok((Conn::Unix(s), format!("unix:{}", f.path.display())))
        }
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // Replies are already batched by the writer; Nagle would only add latency.
            s.set_nodelay(true)?;
            Ok((Conn::Tcp(s), format!("tcp:{peer}")))
        }
    }
}

/// Binds `listeners` and serves `device` on them until `shutdown` resolves; see [`Server::run`].
pub async fn serve<D: BlockDevice>(
    device: Arc<D>,
    config: ServerConfig,
    listeners: Vec<ListenAddr>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<ServeStats> {
    Server::bind(device, config, &listeners).await?.run(shutdown).await
}
