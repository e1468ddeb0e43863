//! What the NBD server needs from whatever it exports. The server knows nothing of RAID: the
//! volume is adapted to this trait by the `serve` command.

use crate::buf::AlignedBuf;
use std::future::Future;

/// Why a device request failed; each maps onto one NBD error value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Media or member failure (NBD_EIO).
    #[error("I/O error: {0}")]
    Io(String),
    /// A request the device cannot honour as asked (NBD_EINVAL).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A write beyond the end or into a full device (NBD_ENOSPC).
    #[error("no space left on device")]
    NoSpace,
    /// The device is shutting down (NBD_ESHUTDOWN).
    #[error("device is shutting down")]
    Shutdown,
}

/// A byte-addressed block device. Offsets and lengths need not be aligned; the server has already
/// checked that `offset + len <= size()`. All methods may be called concurrently.
pub trait BlockDevice: Send + Sync + 'static {
    /// Export size in bytes (a multiple of 4096).
    fn size(&self) -> u64;
    /// Preferred I/O size to advertise (NBD_INFO_BLOCK_SIZE preferred), a power of two >= 4096.
    fn preferred_block_size(&self) -> u32;
    /// Reads `len` bytes at `offset`; the returned buffer has exactly `len` bytes.
    fn read(&self, offset: u64, len: usize) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send;
    /// Writes `data` at `offset`. With `fua`, answers only once the data is durable.
    fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Advisory discard; the device may leave the data in place.
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Writes `len` zero bytes at `offset`. With `fua`, durable before answering.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;
}
