//! The admin API on a Unix socket: the daemon side serves [`api::Admin`], the CLI side sends
//! [`api::Request`]s. Knows nothing of member I/O.

pub mod api;
