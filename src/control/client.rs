//! The CLI side of the control socket.

use super::api::{Request, Response};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long one admin call may take. Fail/add/replace update superblocks on every member,
/// which can be slow on a loaded or failing disk, but an admin should not wait on a wedged
/// daemon forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest response accepted: a status for hundreds of slots is still far below this.
const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {}: is `nbraid serve --control {}` running? ({source})", path.display(), path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("control socket {}: no answer within {}s", path.display(), after.as_secs_f64())]
    Timeout { path: PathBuf, after: Duration },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket {}: the daemon closed the connection without answering", path.display())]
    Closed { path: PathBuf },
    #[error("control socket {}: unreadable answer from the daemon: {detail}", path.display())]
    BadResponse { path: PathBuf, detail: String },
}

/// Sends one request and waits for its answer, within [`DEFAULT_TIMEOUT`].
pub async fn call(path: &Path, req: &Request) -> Result<Response, ClientError> {
    call_with_timeout(path, req, DEFAULT_TIMEOUT).await
}

pub async fn call_with_timeout(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let mut client = Client::connect_with_timeout(path, timeout).await?;
    client.request_with_timeout(req, timeout).await
}

/// A connection that carries many requests, for callers that poll (e.g. `--wait`).
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT).await
    }

    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ClientError::Connect { path: path.to_path_buf(), source }),
            Err(_) => return Err(ClientError::Timeout { path: path.to_path_buf(), after: timeout }),
        };
        let (read, writer) = stream.into_split();
        Ok(Client { path: path.to_path_buf(), reader: BufReader::new(read), writer })
    }

    pub async fn request(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.request_with_timeout(req, DEFAULT_TIMEOUT).await
    }

    pub async fn request_with_timeout(&mut self, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
        match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { path: self.path.clone(), after: timeout }),
        }
    }

    async fn exchange(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(|e| self.bad(format!("cannot encode the request: {e}")))?;
        line.push(b'\n');
        self.writer.write_all(&line).await.map_err(|e| self.io(e))?;
        self.writer.flush().await.map_err(|e| self.io(e))?;

        let mut buf = Vec::new();
        let n = (&mut self.reader).take(MAX_RESPONSE as u64 + 1).read_until(b'\n', &mut buf).await.map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(ClientError::Closed { path: self.path.clone() });
        }
        if buf.len() > MAX_RESPONSE {
            return Err(self.bad(format!("response longer than {MAX_RESPONSE} bytes")));
        }
        serde_json::from_slice(&buf).map_err(|e| self.bad(e.to_string()))
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io { path: self.path.clone(), source }
    }

    fn bad(&self, detail: String) -> ClientError {
        ClientError::BadResponse { path: self.path.clone(), detail }
    }
}
