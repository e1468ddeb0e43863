//! Fixed newstyle negotiation: from the server greeting to the start of transmission.
//!
//! We serve exactly one export, selected by its configured name or by the default name "".
//! There is no TLS, no metadata contexts and no extended headers; those options are refused with
//! the error the spec prescribes so that clients fall back cleanly.

use super::proto::{self, Session};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Option payloads larger than this are not something any real client sends (the largest
/// legitimate one is an INFO/GO with a 4 KiB name); we drop such a client rather than buffer it.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// What the handshake advertises about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    /// Sent as `NBD_INFO_DESCRIPTION` when asked for and non-empty.
    pub description: String,
    pub size: u64,
    /// Advertised preferred block size; see [`sanitize_preferred`].
    pub preferred_block_size: u32,
}

impl ExportInfo {
    /// True if a client naming `name` means this export (the empty name is the default export).
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// The `NBD_INFO_BLOCK_SIZE` triple.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (proto::MIN_BLOCK_SIZE, sanitize_preferred(self.preferred_block_size), proto::MAX_PAYLOAD)
    }
}

/// The spec requires preferred to be a power of two between the minimum and maximum. A device
/// reporting something else would make strict clients refuse the export, so fall back to 4096.
pub fn sanitize_preferred(preferred: u32) -> u32 {
    if preferred.is_power_of_two() && (proto::MIN_BLOCK_SIZE..=proto::MAX_PAYLOAD).contains(&preferred) {
        preferred
    } else {
        4096
    }
}

/// Why negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client broke a MUST of the protocol; the connection is dropped.
    #[error("protocol violation during handshake: {0}")]
    Protocol(String),
    /// The client asked for an export we do not have via `NBD_OPT_EXPORT_NAME`, which cannot
    /// carry an error, so the spec says to drop the connection.
    #[error("client requested unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
}

/// How negotiation ended successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enter transmission with these parameters.
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT` (and was answered) or hung up between options.
    Aborted,
}

/// Runs the server side of fixed newstyle negotiation on `stream`.
pub async fn negotiate<S>(stream: &mut S, export: &ExportInfo) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&proto::encode_server_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    // A client that omits C_FIXED_NEWSTYLE still gets fixed-newstyle replies (the spec lets us
    // honour it anyway); such a client only ever sends EXPORT_NAME, which is answered the same.
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;

    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            // Hanging up between options is an (impolite) end of negotiation, not an error.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Aborted),
            Err(e) => return Err(e.into()),
        }
        let opt = proto::parse_option_header(&header).ok_or_else(|| HandshakeError::Protocol("bad option magic".into()))?;
        if opt.length > MAX_OPTION_LEN {
            return Err(HandshakeError::Protocol(format!("option {} has absurd length {}", opt.option, opt.length)));
        }
        let mut data = vec![0u8; opt.length as usize];
        stream.read_exact(&mut data).await?;

        let session = Session { size: export.size, structured };
        let mut out: Vec<u8> = Vec::new();
        let mut reply = |reply_type: u32, payload: &[u8]| {
            if let Some(bytes) = proto::encode_option_reply(opt.option, reply_type, payload) {
                out.extend_from_slice(&bytes);
            }
        };

        match opt.option {
            proto::OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    return Err(HandshakeError::UnknownExport(String::from_utf8_lossy(&data).into_owned()));
                }
                let bytes = proto::encode_export_name_reply(export.size, session.transmission_flags(), no_zeroes);
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                return Ok(Outcome::Transmission(session));
            }
            proto::OPT_ABORT => {
                reply(proto::REP_ACK, &[]);
                // The client may already have hung up; the spec asks us to tolerate that.
                let _ = stream.write_all(&out).await;
                let _ = stream.flush().await;
                return Ok(Outcome::Aborted);
            }
            proto::OPT_LIST => {
                if data.is_empty() {
                    reply(proto::REP_SERVER, &proto::encode_rep_server(&export.name));
                    reply(proto::REP_ACK, &[]);
                } else {
                    reply(proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
            }
            proto::OPT_STARTTLS => {
                reply(proto::REP_ERR_POLICY, b"TLS is not supported by this server");
            }
            proto::OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    reply(proto::REP_ACK, &[]);
                } else {
                    reply(proto::REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data");
                }
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::parse_info_request(&data) {
                None => reply(proto::REP_ERR_INVALID, b"malformed INFO/GO request"),
                Some(req) if !export.matches(&req.name) => {
                    let msg = format!("unknown export {:?}", String::from_utf8_lossy(&req.name));
                    reply(proto::REP_ERR_UNKNOWN, msg.as_bytes());
                }
                Some(req) => {
                    let flags = session.transmission_flags();
                    reply(proto::REP_INFO, &proto::encode_info_export(export.size, flags));
                    if req.requests.contains(&proto::INFO_NAME) {
                        let name = proto::encode_info_string(proto::INFO_NAME, &export.name);
                        reply(proto::REP_INFO, &name);
                    }
                    if req.requests.contains(&proto::INFO_DESCRIPTION) && !export.description.is_empty() {
                        let d = proto::encode_info_string(proto::INFO_DESCRIPTION, &export.description);
                        reply(proto::REP_INFO, &d);
                    }
                    // Always sent: it tells clients our 32 MiB limit even if they did not ask.
                    let (min, pref, max) = export.block_sizes();
                    reply(proto::REP_INFO, &proto::encode_info_block_size(min, pref, max));
                    reply(proto::REP_ACK, &[]);
                    if opt.option == proto::OPT_GO {
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        return Ok(Outcome::Transmission(session));
                    }
                }
            },
            // PEEK_EXPORT, LIST/SET_META_CONTEXT, EXTENDED_HEADERS and anything unassigned.
            _ => reply(proto::REP_ERR_UNSUP, b"option not supported"),
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
}
