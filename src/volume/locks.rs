//! Stripe locks: writes that touch the same stripe run one at a time, different stripes in parallel.
//!
//! Only stripes someone holds or waits for have an entry, so memory stays proportional to the
//! requests in flight rather than to the volume size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

const SHARDS: usize = 64;

type Table = HashMap<u64, Arc<AsyncMutex<()>>>;

pub struct StripeLocks {
    shards: Vec<Mutex<Table>>,
}

/// Holds one stripe; released (and its table entry dropped if unused) on drop.
pub struct StripeGuard<'a> {
    locks: &'a StripeLocks,
    stripe: u64,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Default for StripeLocks {
    fn default() -> Self {
        StripeLocks { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl StripeLocks {
    fn table(&self, stripe: u64) -> std::sync::MutexGuard<'_, Table> {
        self.shards[(stripe % SHARDS as u64) as usize].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn lock(&self, stripe: u64) -> StripeGuard<'_> {
        let entry = self.table(stripe).entry(stripe).or_default().clone();
        let guard = entry.lock_owned().await;
        StripeGuard { locks: self, stripe, guard: Some(guard) }
    }

    /// Locks every stripe in `stripes`, which must be ascending: a global order means two
    /// multi-stripe writes can never each hold a stripe the other waits for.
    pub async fn lock_all(&self, stripes: impl Iterator<Item = u64>) -> Vec<StripeGuard<'_>> {
        let mut guards = Vec::new();
        for s in stripes {
            debug_assert!(guards.last().is_none_or(|g: &StripeGuard| g.stripe < s));
            guards.push(self.lock(s).await);
        }
        guards
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.shards.iter().map(|t| t.lock().unwrap().len()).sum()
    }
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        let mut table = self.locks.table(self.stripe);
        self.guard.take();
        // The table holds one reference; any other is a waiter that still needs the entry.
        if table.get(&self.stripe).is_some_and(|e| Arc::strong_count(e) == 1) {
            table.remove(&self.stripe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serializes_same_stripe_and_cleans_up() {
        let locks = Arc::new(StripeLocks::default());
        let inside = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (locks, inside) = (locks.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock_all([i % 3, 7].into_iter().filter(|&s| s != 7 || i % 2 == 0)).await;
                if i % 2 == 0 {
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders of stripe 7");
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(locks.entries(), 0);
    }
}
