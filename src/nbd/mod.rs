//! The NBD wire protocol (NetworkBlockDevice/nbd `doc/proto.md`) and a server for any
//! [`BlockDevice`].

mod device;

pub use device::{BlockDevice, DeviceError};
