//! The admin API on a Unix socket: the daemon side serves [`api::Admin`], the CLI side sends
//! [`api::Request`]s. Knows nothing of member I/O.

pub mod api;
pub mod client;
pub mod server;

pub use client::{call, Client, ClientError};
pub use server::{serve_control, ControlServer};

#[cfg(test)]
pub(crate) mod tests;
