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

    /// Applies the plan to one operation: sleeps for the delay, then returns the error to
    /// report instead of doing the I/O, if any.
    pub async fn apply(&self, is_write: bool) -> Option<io::Error> {
        let plan = self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let fails = if is_write { plan.write_errors } else { plan.read_errors };
        if !fails {
            return None;
        }
        let passed = self.grace.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |g| g.checked_sub(1)).is_ok();
        (!passed).then(|| io::Error::from_raw_os_error(libc::EIO))
    }
}
