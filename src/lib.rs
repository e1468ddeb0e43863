//! nbraid: a RAID / erasure-coded block volume, with io_uring member I/O, exported over NBD.
//!
//! Layers, from the wire down (nothing reaches up):
//! - [`nbd`]: the NBD protocol and server, over any [`nbd::BlockDevice`].
//! - [`volume`]: the RAID block device: stripe splitting, locking, parity, assembly.
//! - [`layout`]: pure geometry, volume extent → member extents.
//! - [`codec`]: pure parity math (XOR, Reed-Solomon) and checksums.
//! - [`member`]: one member disk or file.
//! - [`uring`]: the io_uring engine.
//! - [`meta`]: on-disk formats (superblock).
//! - [`cli`]: the command line.

pub mod buf;
pub mod cli;
pub mod codec;
pub mod control;
pub mod layout;
pub mod member;
pub mod meta;
pub mod nbd;
pub mod uring;
pub mod volume;
