//! On-disk formats. Every structure carries a magic, a format version and a crc32c.

pub mod bitmap;
pub mod checksums;
pub mod ppl;
pub mod superblock;

pub use superblock::{SlotState, Superblock, SuperblockError};
