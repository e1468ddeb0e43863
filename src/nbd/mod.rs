//! The NBD wire protocol (NetworkBlockDevice/nbd `doc/proto.md`) and a server for any
//! [`BlockDevice`].
//!
//! - [`proto`]: pure message parsing/encoding and request validation (fuzzable, no I/O).
//! - [`handshake`]: fixed newstyle option negotiation.
//! - `connection`: the transmission phase of one client (reader, request tasks, writer).
//! - [`server`]: listeners, accept loops and orderly shutdown.

mod connection;
mod device;
pub mod handshake;
pub mod proto;
pub mod server;
#[cfg(test)]
mod tests;

pub use device::{BlockDevice, DeviceError};
pub use handshake::ExportInfo;
pub use server::{serve, ListenAddr, ParseListenAddrError, ServeStats, Server, ServerConfig};
