//! A small hand-written NBD client (fixed newstyle, NBD_OPT_GO, simple replies) for protocol
//! tests and for driving exact, unaligned, pipelined requests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const REP_SERVER: u32 = 2;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const INFO_EXPORT: u16 = 0;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
    pub cookie: u64,
}

pub fn rd<const N: usize>(s: &mut UnixStream) -> [u8; N] {
    let mut b = [0u8; N];
    s.read_exact(&mut b).unwrap_or_else(|e| panic!("reading {N} bytes from the server: {e}"));
    b
}
pub fn u16be(s: &mut UnixStream) -> u16 {
    u16::from_be_bytes(rd(s))
}
pub fn u32be(s: &mut UnixStream) -> u32 {
    u32::from_be_bytes(rd(s))
}
pub fn u64be(s: &mut UnixStream) -> u64 {
    u64::from_be_bytes(rd(s))
}

pub struct Reply {
    pub error: u32,
    pub cookie: u64,
}

impl Client {
    /// Greeting and client flags; the connection is then in the option phase.
    pub fn handshake(sock: &Path) -> UnixStream {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(u64be(&mut s), NBDMAGIC, "server greeting: bad NBDMAGIC");
        assert_eq!(u64be(&mut s), IHAVEOPT, "server greeting: not newstyle (IHAVEOPT)");
        let hflags = u16be(&mut s);
        assert!(hflags & FLAG_FIXED_NEWSTYLE != 0, "server does not offer fixed newstyle: {hflags:#x}");
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        s.write_all(&cflags.to_be_bytes()).unwrap();
        s
    }

    pub fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut o = vec![];
        o.extend(IHAVEOPT.to_be_bytes());
        o.extend(opt.to_be_bytes());
        o.extend((data.len() as u32).to_be_bytes());
        o.extend(data);
        s.write_all(&o).unwrap();
    }

    /// One option reply: (type, payload).
    pub fn opt_reply(s: &mut UnixStream, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(u64be(s), REPLY_MAGIC_OPT, "option reply magic");
        assert_eq!(u32be(s), opt, "option reply for another option");
        let typ = u32be(s);
        let len = u32be(s) as usize;
        assert!(len < 1 << 20, "option reply of {len} bytes");
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        (typ, payload)
    }

    pub fn go_data(export: &str) -> Vec<u8> {
        let mut data = vec![];
        data.extend((export.len() as u32).to_be_bytes());
        data.extend(export.as_bytes());
        data.extend(0u16.to_be_bytes()); // no info requests: the server sends NBD_INFO_EXPORT anyway
        data
    }

    /// NBD_OPT_GO or NBD_OPT_INFO: Ok((size, flags)) or Err(error reply type).
    pub fn go(s: &mut UnixStream, opt: u32, export: &str) -> Result<(u64, u16), u32> {
        Self::send_opt(s, opt, &Self::go_data(export));
        let (mut size, mut flags) = (None, 0);
        loop {
            let (typ, payload) = Self::opt_reply(s, opt);
            if typ & 0x8000_0000 != 0 {
                return Err(typ);
            }
            match typ {
                REP_INFO => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT {
                        assert_eq!(payload.len(), 12, "NBD_INFO_EXPORT length");
                        size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                        flags = u16::from_be_bytes([payload[10], payload[11]]);
                    }
                }
                REP_ACK => break,
                other => panic!("unexpected option reply type {other:#x}"),
            }
        }
        Ok((size.expect("server sent no NBD_INFO_EXPORT before NBD_REP_ACK"), flags))
    }

    /// Handshake and NBD_OPT_GO; Err(reply type) if the server answers GO with an error.
    pub fn try_connect(sock: &Path, export: &str) -> Result<Client, u32> {
        let mut s = Self::handshake(sock);
        let (size, flags) = Self::go(&mut s, OPT_GO, export)?;
        Ok(Client { s, size, flags, cookie: 1 })
    }

    pub fn connect(sock: &Path, export: &str) -> Client {
        Self::try_connect(sock, export).unwrap_or_else(|t| panic!("NBD_OPT_GO {export:?} failed with {t:#x}"))
    }

    pub fn header(&mut self, typ: u16, off: u64, len: u32) -> (Vec<u8>, u64) {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28);
        h.extend(REQUEST_MAGIC.to_be_bytes());
        h.extend(0u16.to_be_bytes());
        h.extend(typ.to_be_bytes());
        h.extend(self.cookie.to_be_bytes());
        h.extend(off.to_be_bytes());
        h.extend(len.to_be_bytes());
        (h, self.cookie)
    }

    pub fn reply(&mut self, cookie: u64) -> Reply {
        assert_eq!(u32be(&mut self.s), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = u32be(&mut self.s);
        let c = u64be(&mut self.s);
        assert_eq!(c, cookie, "reply for another cookie");
        Reply { error, cookie: c }
    }

    pub fn request(&mut self, typ: u16, off: u64, len: u32, payload: &[u8]) -> Reply {
        let (mut h, cookie) = self.header(typ, off, len);
        h.extend(payload);
        self.s.write_all(&h).unwrap();
        self.reply(cookie)
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, off, data.len() as u32, data).error
    }

    /// Read; on success returns the data, on error the error value (and no payload follows).
    pub fn read(&mut self, off: u64, len: u32) -> Result<Vec<u8>, u32> {
        let r = self.request(CMD_READ, off, len, &[]);
        if r.error != 0 {
            return Err(r.error);
        }
        let mut b = vec![0u8; len as usize];
        self.s.read_exact(&mut b).expect("read payload");
        Ok(b)
    }

    pub fn flush(&mut self) -> u32 {
        self.request(CMD_FLUSH, 0, 0, &[]).error
    }

    pub fn disconnect(mut self) {
        let (h, _) = self.header(CMD_DISC, 0, 0);
        let _ = self.s.write_all(&h);
    }

    /// The server closed the connection: the next read sees EOF (or a reset).
    pub fn assert_closed(&mut self, what: &str) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut => {}
            other => panic!("after {what} the server should close the connection, got {other:?}"),
        }
    }
}

impl Client {
    pub fn request_flags(&mut self, flags: u16, typ: u16, off: u64, len: u32, payload: &[u8]) -> Reply {
        let (mut h, cookie) = self.header(typ, off, len);
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h.extend(payload);
        self.s.write_all(&h).unwrap();
        self.reply(cookie)
    }
}
