//! The NBD wire format: constants, and pure functions that parse and encode protocol messages and
//! decide how a request must be answered. Nothing here does I/O, so all of it can be tested and
//! fuzzed on plain byte slices.
//!
//! Reference: NetworkBlockDevice/nbd `doc/proto.md`. All integers are big-endian.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, first thing the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after `NBDMAGIC` (newstyle) and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags (sent with the export size)
// ---------------------------------------------------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options and option replies
// ---------------------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// `NBD_INFO_*` types carried in `NBD_REP_INFO` replies (and requested by INFO/GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission: commands, command flags, reply types, errors
// ---------------------------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: this is the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Sizes of fixed-length wire messages.
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Largest READ or WRITE payload we accept (advertised as the maximum block size). Larger WRITEs
/// cannot be skipped cheaply, so they end the connection; larger READs are refused with an error.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Advertised minimum block size. Advisory only: the device accepts unaligned requests, so clients
/// that never asked for block sizes (and may send byte-granular requests) are still served.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The spec caps strings (export names, messages) at 4096 bytes.
pub const MAX_STRING_LEN: usize = 4096;

/// An NBD error value, as carried in simple replies and error chunks. The numbers are fixed by the
/// protocol and happen to match Linux errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Invalid = 22,
    NoSpace = 28,
    Overflow = 75,
    NotSupported = 95,
    Shutdown = 108,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The error named by a wire value, if it is one the protocol defines.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::Perm,
            5 => ErrorCode::Io,
            12 => ErrorCode::NoMem,
            22 => ErrorCode::Invalid,
            28 => ErrorCode::NoSpace,
            75 => ErrorCode::Overflow,
            95 => ErrorCode::NotSupported,
            108 => ErrorCode::Shutdown,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorCode::Perm => "EPERM",
            ErrorCode::Io => "EIO",
            ErrorCode::NoMem => "ENOMEM",
            ErrorCode::Invalid => "EINVAL",
            ErrorCode::NoSpace => "ENOSPC",
            ErrorCode::Overflow => "EOVERFLOW",
            ErrorCode::NotSupported => "ENOTSUP",
            ErrorCode::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// A transmission command. Unknown values are kept (not a parse error) because the request still
/// has a cookie that must be answered with `EINVAL`, after which the connection continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Anything we do not implement (CACHE, BLOCK_STATUS, RESIZE, or unassigned values).
    Other(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::Other(v) => v,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Read => f.write_str("READ"),
            Command::Write => f.write_str("WRITE"),
            Command::Disc => f.write_str("DISC"),
            Command::Flush => f.write_str("FLUSH"),
            Command::Trim => f.write_str("TRIM"),
            Command::WriteZeroes => f.write_str("WRITE_ZEROES"),
            Command::Other(v) => write!(f, "command {v}"),
        }
    }
}

/// One parsed request header. For `Write`, `length` payload bytes follow on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// Opaque client value echoed in the reply (the spec's "handle", renamed "cookie").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire, whatever we decide about it.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Why a request header could not be parsed. Both are fatal to the connection: there is no way to
/// find the next request boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("request header truncated: {0} of 28 bytes")]
    Truncated(usize),
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses a request header from the first 28 bytes of `buf` (extra bytes are ignored).
pub fn parse_request(buf: &[u8]) -> Result<Request, ParseError> {
    let truncated = ParseError::Truncated(buf.len().min(REQUEST_LEN));
    if buf.len() < REQUEST_LEN {
        return Err(truncated);
    }
    let magic = be_u32(buf, 0).ok_or(truncated)?;
    if magic != REQUEST_MAGIC {
        return Err(ParseError::BadMagic(magic));
    }
    Ok(Request {
        flags: be_u16(buf, 4).ok_or(truncated)?,
        command: Command::from_u16(be_u16(buf, 6).ok_or(truncated)?),
        cookie: be_u64(buf, 8).ok_or(truncated)?,
        offset: be_u64(buf, 16).ok_or(truncated)?,
        length: be_u32(buf, 24).ok_or(truncated)?,
    })
}

/// Encodes a request header; the inverse of [`parse_request`] (used by tests and clients).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.command.as_u16().to_be_bytes());
    b[8..16].copy_from_slice(&req.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..28].copy_from_slice(&req.length.to_be_bytes());
    b
}

// ---------------------------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------------------------

/// What the handshake settled that affects how requests are judged and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Export size in bytes.
    pub size: u64,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
}

impl Session {
    /// The transmission flags we advertise for this session. `SEND_DF` is offered only with
    /// structured replies (the spec forbids it otherwise); we honour DF trivially because every
    /// read is answered with a single data chunk.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;
        if self.structured {
            f |= FLAG_SEND_DF;
        }
        f
    }
}

/// How a request that must not be executed is to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Answer with this error (after consuming any WRITE payload) and carry on.
    Reply(ErrorCode, &'static str),
    /// The stream cannot be kept in sync (a WRITE payload we refuse to buffer): close.
    Disconnect(&'static str),
}

/// Decides whether `req` may be executed against the export. `Ok` means the request is
/// well-formed and in range; the device may still fail it.
///
/// Choices where the spec leaves room (matching nbdkit where it has an opinion):
/// - Zero-length READ/WRITE/TRIM/WRITE_ZEROES → `EINVAL` (nbdkit does the same for reads).
/// - Out of range: WRITE and WRITE_ZEROES → `ENOSPC` (spec SHOULD); READ and TRIM → `EINVAL`.
/// - READ longer than [`MAX_PAYLOAD`] → `EOVERFLOW` with structured replies, else `EINVAL`.
/// - WRITE longer than [`MAX_PAYLOAD`] → disconnect, since we will not swallow the payload.
/// - FLUSH with non-zero offset or length → `EINVAL` (they are reserved, MUST be zero).
/// - FUA is accepted on every command (spec: the server MUST accept it once SEND_FUA is set).
pub fn check_request(req: &Request, session: &Session) -> Result<(), Rejection> {
    use Rejection::Reply;
    let kind = req.command;
    if let Command::Other(_) = kind {
        return Err(Reply(ErrorCode::Invalid, "unsupported command"));
    }
    if kind == Command::Disc {
        // Nothing to check: there is no reply, the connection ends either way.
        return Ok(());
    }

    let mut allowed = CMD_FLAG_FUA;
    match kind {
        Command::WriteZeroes => allowed |= CMD_FLAG_NO_HOLE,
        Command::Read if session.structured => allowed |= CMD_FLAG_DF,
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(Reply(ErrorCode::Invalid, "command flag not supported for this command"));
    }

    if req.length > MAX_PAYLOAD {
        match kind {
            Command::Write => return Err(Rejection::Disconnect("write payload exceeds 32 MiB")),
            Command::Read => {
                let code = if session.structured { ErrorCode::Overflow } else { ErrorCode::Invalid };
                return Err(Reply(code, "read length exceeds maximum block size"));
            }
            _ => {}
        }
    }

    if kind == Command::Flush {
        if req.offset != 0 || req.length != 0 {
            return Err(Reply(ErrorCode::Invalid, "flush offset and length must be zero"));
        }
        return Ok(());
    }

    if req.length == 0 {
        return Err(Reply(ErrorCode::Invalid, "zero-length request"));
    }
    let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= session.size);
    if !in_range {
        return Err(match kind {
            Command::Write | Command::WriteZeroes => Reply(ErrorCode::NoSpace, "write beyond the end of the export"),
            _ => Reply(ErrorCode::Invalid, "request beyond the end of the export"),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Transmission replies
// ---------------------------------------------------------------------------------------------

/// A simple reply header; for a successful READ the data follows.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header announcing `payload_len` bytes of payload.
pub fn encode_chunk_header(flags: u16, kind: u16, cookie: u64, payload_len: u32) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// The final `NBD_REPLY_TYPE_NONE` chunk: success with no data.
pub fn encode_chunk_none(cookie: u64) -> [u8; STRUCTURED_HEADER_LEN] {
    encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// Everything of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk up to its data: the chunk header and the
/// 64-bit offset. `data_len` bytes must follow. Returns `None` if the chunk cannot describe that
/// much data (more than 2^32 - 9 bytes), or if it would describe none (the spec requires >= 1).
pub fn encode_offset_data_header(cookie: u64, done: bool, offset: u64, data_len: usize) -> Option<[u8; STRUCTURED_HEADER_LEN + 8]> {
    if data_len == 0 {
        return None;
    }
    let payload_len = u32::try_from(data_len).ok()?.checked_add(8)?;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = [0u8; STRUCTURED_HEADER_LEN + 8];
    b[..STRUCTURED_HEADER_LEN].copy_from_slice(&encode_chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, payload_len));
    b[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    Some(b)
}

/// A complete final `NBD_REPLY_TYPE_ERROR` chunk carrying `error` (must be non-zero) and a human
/// readable message (truncated to [`MAX_STRING_LEN`]).
pub fn encode_chunk_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message[..message.floor_char_boundary(MAX_STRING_LEN)];
    // MAX_STRING_LEN fits in u16, so neither conversion can fail; keep them checked anyway.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg.as_bytes()[..usize::from(msg_len)];
    let payload_len = 6 + u32::from(msg_len);
    let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + payload_len as usize);
    b.extend_from_slice(&encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, payload_len));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&msg_len.to_be_bytes());
    b.extend_from_slice(msg);
    b
}

// ---------------------------------------------------------------------------------------------
// Handshake messages
// ---------------------------------------------------------------------------------------------

/// The server's opening: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_server_greeting(handshake_flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// An option request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Parses the 16-byte option header; `None` if the magic is not `IHAVEOPT` or input is short.
pub fn parse_option_header(buf: &[u8]) -> Option<OptionHeader> {
    if be_u64(buf, 0)? != IHAVEOPT {
        return None;
    }
    Some(OptionHeader { option: be_u32(buf, 8)?, length: be_u32(buf, 12)? })
}

/// Encodes an option request header (for tests and clients).
pub fn encode_option_header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&length.to_be_bytes());
    b
}

/// A complete option reply: header plus `data`. Returns `None` if `data` is too long for the
/// 32-bit length field (never the case for anything we send).
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(data.len()).ok()?;
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    Some(b)
}

/// A parsed option reply header (for tests and clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn parse_option_reply_header(buf: &[u8]) -> Option<OptionReplyHeader> {
    if be_u64(buf, 0)? != OPTION_REPLY_MAGIC {
        return None;
    }
    Some(OptionReplyHeader { option: be_u32(buf, 8)?, reply_type: be_u32(buf, 12)?, length: be_u32(buf, 16)? })
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client negotiated
/// `NO_ZEROES`, 124 reserved zero bytes.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        b.resize(10 + 124, 0);
    }
    b
}

/// `NBD_REP_SERVER` data: name length, then the name.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let name = &name[..name.floor_char_boundary(MAX_STRING_LEN)];
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: the type then the string.
pub fn encode_info_string(info_type: u16, s: &str) -> Vec<u8> {
    let s = &s[..s.floor_char_boundary(MAX_STRING_LEN)];
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info_type.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&minimum.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&maximum.to_be_bytes());
    b
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Raw export name bytes; compared byte-wise, never required to be UTF-8.
    pub name: Vec<u8>,
    /// `NBD_INFO_*` types the client asked for (may contain unknown values, which we ignore).
    pub requests: Vec<u16>,
}

/// Parses INFO/GO option data: u32 name length, name, u16 count, count × u16. The lengths must
/// account for the data exactly; anything else is `NBD_REP_ERR_INVALID`.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let name_len = usize::try_from(be_u32(data, 0)?).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?.to_vec();
    let count = usize::from(be_u16(data, name_end)?);
    let list_start = name_end + 2;
    if data.len() != list_start.checked_add(count.checked_mul(2)?)? {
        return None;
    }
    let requests = (0..count).map(|i| be_u16(data, list_start + 2 * i)).collect::<Option<Vec<u16>>>()?;
    Some(InfoRequest { name, requests })
}

/// Encodes INFO/GO option data (for tests and clients).
pub fn encode_info_request(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn session(size: u64, structured: bool) -> Session {
        Session { size, structured }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, command, cookie: 7, offset, length }
    }

    #[test]
    fn request_bytes_match_spec_layout() {
        let r = Request { flags: 0x0102, command: Command::Write, cookie: 0x1122_3344_5566_7788, offset: 0x0a0b_0c0d_0e0f_1011, length: 0x1213_1415 };
        let expect: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, 0x01, 0x02, 0x00, 0x01, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11,
            0x12, 0x13, 0x14, 0x15,
        ];
        assert_eq!(encode_request(&r), expect);
        assert_eq!(parse_request(&expect), Ok(r));
    }

    #[test]
    fn parse_errors_are_typed() {
        assert_eq!(parse_request(&[0u8; 27]), Err(ParseError::Truncated(27)));
        let mut b = encode_request(&req(Command::Read, 0, 0, 1));
        b[0] = 0xff;
        assert_eq!(parse_request(&b), Err(ParseError::BadMagic(0xff60_9513)));
    }

    #[test]
    fn unknown_command_is_parsed_then_rejected() {
        let r = parse_request(&encode_request(&req(Command::Other(5), 0, 0, 512))).unwrap();
        assert_eq!(r.command, Command::Other(5));
        assert_eq!(check_request(&r, &session(1 << 20, false)), Err(Rejection::Reply(ErrorCode::Invalid, "unsupported command")));
    }

    #[test]
    fn validation_table() {
        let s = session(1 << 20, false);
        let st = session(1 << 20, true);
        let code = |r: Request, s: &Session| match check_request(&r, s) {
            Ok(()) => None,
            Err(Rejection::Reply(c, _)) => Some(Ok(c)),
            Err(Rejection::Disconnect(_)) => Some(Err(())),
        };
        use Command::*;
        use ErrorCode::*;
        // In range, at the very end.
        assert_eq!(code(req(Read, 0, (1 << 20) - 512, 512), &s), None);
        assert_eq!(code(req(Write, CMD_FLAG_FUA, 0, 4096), &s), None);
        assert_eq!(code(req(WriteZeroes, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, 0, 1 << 20), &s), None);
        assert_eq!(code(req(Flush, 0, 0, 0), &s), None);
        assert_eq!(code(req(Flush, CMD_FLAG_FUA, 0, 0), &s), None);
        assert_eq!(code(req(Disc, 0xffff, 5, 5), &s), None);
        // Out of range.
        assert_eq!(code(req(Read, 0, 1 << 20, 1), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Trim, 0, (1 << 20) - 1, 2), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Write, 0, 1 << 20, 1), &s), Some(Ok(NoSpace)));
        assert_eq!(code(req(WriteZeroes, 0, u64::MAX, 1), &s), Some(Ok(NoSpace)));
        assert_eq!(code(req(Read, 0, u64::MAX, u32::MAX), &s), Some(Ok(Invalid)));
        // Zero length.
        assert_eq!(code(req(Read, 0, 0, 0), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Write, 0, 0, 0), &s), Some(Ok(Invalid)));
        // Flags.
        assert_eq!(code(req(Write, CMD_FLAG_NO_HOLE, 0, 1), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Read, CMD_FLAG_DF, 0, 1), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Read, CMD_FLAG_DF, 0, 1), &st), None);
        assert_eq!(code(req(WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 1), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Read, 1 << 15, 0, 1), &s), Some(Ok(Invalid)));
        // Flush must have zero offset/length.
        assert_eq!(code(req(Flush, 0, 0, 1), &s), Some(Ok(Invalid)));
        // Oversized payloads.
        let big = MAX_PAYLOAD + 1;
        assert_eq!(code(req(Read, 0, 0, big), &s), Some(Ok(Invalid)));
        assert_eq!(code(req(Read, 0, 0, big), &st), Some(Ok(Overflow)));
        assert_eq!(code(req(Write, 0, 0, big), &s), Some(Err(())));
        // TRIM/WRITE_ZEROES have no payload, so no size cap beyond the export.
        let huge = session(1 << 40, false);
        assert_eq!(code(req(Trim, 0, 0, u32::MAX), &huge), None);
        assert_eq!(code(req(WriteZeroes, 0, 0, u32::MAX), &huge), None);
    }

    #[test]
    fn reply_encodings() {
        assert_eq!(encode_simple_reply(0x0102_0304_0506_0708, 22), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(encode_chunk_none(9), [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0]);
        let h = encode_offset_data_header(9, true, 0x1000, 512).unwrap();
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert_eq!(&h[20..28], &0x1000u64.to_be_bytes());
        assert!(encode_offset_data_header(9, true, 0, 0).is_none());
        let e = encode_chunk_error(9, 28, "full");
        assert_eq!(&e[4..8], &[0, 1, 0x80, 0x01]);
        assert_eq!(&e[16..20], &10u32.to_be_bytes());
        assert_eq!(&e[20..24], &28u32.to_be_bytes());
        assert_eq!(&e[24..26], &4u16.to_be_bytes());
        assert_eq!(&e[26..], b"full");
        let long = "é".repeat(3000);
        let e = encode_chunk_error(1, 5, &long);
        let n = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert!(n <= MAX_STRING_LEN && std::str::from_utf8(&e[26..26 + n]).is_ok());
        assert_eq!(e.len(), 26 + n);
    }

    #[test]
    fn handshake_encodings() {
        let g = encode_server_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(encode_export_name_reply(4096, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(4096, 1, true).len(), 10);
        let r = encode_option_reply(OPT_LIST, REP_ACK, &[]).unwrap();
        assert_eq!(parse_option_reply_header(&r), Some(OptionReplyHeader { option: OPT_LIST, reply_type: REP_ACK, length: 0 }));
        assert_eq!(encode_info_export(1 << 30, 0x1ff)[..2], [0, 0]);
        assert_eq!(encode_info_block_size(512, 65536, MAX_PAYLOAD)[..2], [0, 3]);
    }

    #[test]
    fn info_request_lengths_must_be_exact() {
        let good = encode_info_request(b"vol0", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(parse_info_request(&good), Some(InfoRequest { name: b"vol0".to_vec(), requests: vec![INFO_NAME, INFO_BLOCK_SIZE] }));
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(parse_info_request(&extra), None);
        assert_eq!(parse_info_request(&good[..good.len() - 1]), None);
        // Name length pointing past the end.
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
        assert_eq!(parse_info_request(&[]), None);
    }

    fn any_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from_u16)
    }

    proptest! {
        #[test]
        fn request_round_trips(flags: u16, command in any_command(), cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command, cookie, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_request(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_option_reply_header(&bytes);
            let _ = parse_info_request(&bytes);
        }

        #[test]
        fn validation_never_panics_and_ok_means_in_range(
            bytes in proptest::array::uniform28(any::<u8>()),
            size in any::<u64>(),
            structured: bool,
        ) {
            let mut bytes = bytes;
            bytes[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let r = parse_request(&bytes).unwrap();
            let s = Session { size, structured };
            if check_request(&r, &s).is_ok() && !matches!(r.command, Command::Disc | Command::Flush) {
                prop_assert!(r.length > 0);
                prop_assert!(r.offset.checked_add(u64::from(r.length)).is_some_and(|e| e <= size));
            }
        }

        #[test]
        fn info_request_round_trips(name in proptest::collection::vec(any::<u8>(), 0..300),
                                    reqs in proptest::collection::vec(any::<u16>(), 0..20)) {
            let enc = encode_info_request(&name, &reqs);
            prop_assert_eq!(parse_info_request(&enc), Some(InfoRequest { name, requests: reqs }));
        }

        #[test]
        fn option_header_round_trips(option: u32, length: u32) {
            prop_assert_eq!(
                parse_option_header(&encode_option_header(option, length)),
                Some(OptionHeader { option, length })
            );
        }
    }
}
