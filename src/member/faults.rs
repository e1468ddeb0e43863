//! Fault injection for tests: make one member fail or slow down on command.
//!
//! Kept apart from the I/O code on purpose: the production path pays one relaxed atomic load
//! per operation ([`Faults::is_armed`]) and nothing else while no fault is set.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub read_errors: bool,
    /// Writes and flushes fail.
    pub write_errors: bool,
    /// Operations let through before errors start.
    pub after_ops: u64,
    /// Added to every operation.
    pub delay: Duration,
    /// Once `after_ops` writes have passed, the next write persists only part of itself, ending
    /// in the middle of a 4 KiB block (see [`tear_point`]), and the process dies on the spot:
    /// a power cut mid-write.
    pub torn_write: bool,
}

/// What to do instead of (or to) one operation.
pub enum Injected {
    Error(io::Error),
    /// Persist this many bytes of the write, then die.
    Tear(usize),
}

#[derive(Default)]
pub struct Faults {
    armed: AtomicBool,
    plan: Mutex<FaultPlan>,
    /// Operations still to let through before errors start.
    grace: AtomicU64,
}

impl Faults {
    pub fn set(&self, plan: FaultPlan) {
        let active = plan != FaultPlan::default();
        self.grace.store(plan.after_ops, Ordering::SeqCst);
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
        self.armed.store(active, Ordering::SeqCst);
    }

    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Applies the plan to one operation (`write_len`: `Some` for a write of that many bytes):
    /// sleeps for the delay, then says what to do instead of the plain I/O, if anything.
    pub async fn apply(&self, is_write: bool, write_len: Option<usize>) -> Option<Injected> {
        let plan = self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let tears = plan.torn_write && write_len.is_some();
        let fails = if is_write { plan.write_errors } else { plan.read_errors };
        if !fails && !tears {
            return None;
        }
        let passed = self.grace.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |g| g.checked_sub(1)).is_ok();
        match (passed, tears, write_len) {
            (true, _, _) => None,
            (false, true, Some(len)) => Some(Injected::Tear(tear_point(len))),
            (false, _, _) if fails => Some(Injected::Error(io::Error::from_raw_os_error(libc::EIO))),
            _ => None,
        }
    }
}

/// How many bytes of a `len`-byte write a tear keeps: about half, in whole 512-byte sectors,
/// ending inside a 4 KiB block so one block holds part old and part new bytes.
pub fn tear_point(len: usize) -> usize {
    if len < 1024 {
        return len / 2 / 512 * 512;
    }
    let half_blocks = len / 2 / 4096 * 4096;
    (half_blocks + 2048).min(len - 512)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tears_land_inside_a_block() {
        assert_eq!(super::tear_point(4096), 2048);
        assert_eq!(super::tear_point(65536), 32768 + 2048);
        assert_eq!(super::tear_point(8192), 4096 + 2048);
        for len in [1024, 4096, 12288, 1 << 20] {
            let t = super::tear_point(len);
            assert!(t > 0 && t < len && t.is_multiple_of(512) && !t.is_multiple_of(4096), "{len}: {t}");
        }
    }
}
