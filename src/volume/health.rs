//! Who holds each slot and what each slot can be trusted for, stripe by stripe.
//!
//! A [`Health`] is an immutable snapshot: I/O paths take one (an `Arc` clone) and work from it;
//! membership changes build a new one and swap it in. Rebuild progress moves too often for that,
//! so it lives beside the snapshots in per-slot atomics ([`Progress`]).

use crate::member::{Member, MemberStats};
use crate::meta::SlotState;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub(crate) struct SlotEntry {
    /// The member serving the slot; `None` once failed or when missing at assembly.
    pub member: Option<Arc<Member>>,
    pub state: SlotState,
    /// For `Replacing`: the member being built to take over.
    pub replacement: Option<Arc<Member>>,
    /// For a failed slot: the member that last served it, or one presented at assembly that
    /// missed updates. Shown in status, never used for I/O.
    pub stale: Option<PathBuf>,
    /// I/O counts of the member that last served a failed slot, so status still shows its errors.
    pub former_stats: MemberStats,
}

#[derive(Clone)]
pub(crate) struct Health {
    pub slots: Vec<SlotEntry>,
    pub spares: Vec<Arc<Member>>,
    /// Set when a failure went beyond what the level tolerates; not recorded on disk, so the
    /// members stay assemblable once the fault is fixed.
    pub exhausted: bool,
}

/// Per-slot rebuild checkpoints: stripes `[0, done)` of a rebuilding slot (or of a replacing
/// slot's replacement) hold valid data.
pub(crate) struct Progress(Vec<AtomicU64>);

impl Progress {
    pub fn new(values: impl Iterator<Item = u64>) -> Self {
        Progress(values.map(AtomicU64::new).collect())
    }

    pub fn get(&self, slot: usize) -> u64 {
        self.0[slot].load(Ordering::Acquire)
    }

    pub fn set(&self, slot: usize, stripes: u64) {
        self.0[slot].store(stripes, Ordering::Release)
    }
}

impl Health {
    /// The member to read `slot`'s data of `stripe` from, if it holds valid data there.
    pub fn readable(&self, slot: usize, stripe: u64, progress: &Progress) -> Option<&Arc<Member>> {
        let e = &self.slots[slot];
        match e.state {
            SlotState::Active | SlotState::Replacing => e.member.as_ref(),
            SlotState::Rebuilding if stripe < progress.get(slot) => e.member.as_ref(),
            _ => None,
        }
    }

    /// Every member that must receive a write of `slot`'s data in `stripe`. A rebuilding member
    /// beyond its checkpoint gets nothing: the rebuild will compute that stripe later, from the
    /// other members, after this write.
    pub fn targets(&self, slot: usize, stripe: u64, progress: &Progress) -> Vec<Arc<Member>> {
        let e = &self.slots[slot];
        let mut out = Vec::with_capacity(2);
        if let Some(m) = self.readable(slot, stripe, progress) {
            out.push(m.clone());
        }
        if let (SlotState::Replacing, Some(r)) = (e.state, &e.replacement) {
            if stripe < progress.get(slot) {
                out.push(r.clone());
            }
        }
        out
    }

    /// Slots without a fully valid member (failed, missing, or still rebuilding).
    pub fn lost_slots(&self) -> usize {
        self.slots.iter().filter(|e| e.member.is_none() || matches!(e.state, SlotState::Failed | SlotState::Rebuilding)).count()
    }

    /// Whether anything is being rebuilt or replaced.
    pub fn rebuilding(&self) -> bool {
        self.slots.iter().any(|e| matches!(e.state, SlotState::Rebuilding | SlotState::Replacing))
    }

    /// The slot that `member` serves, as primary or replacement.
    pub fn slot_of(&self, member: &Arc<Member>) -> Option<(usize, bool)> {
        self.slots.iter().enumerate().find_map(|(i, e)| {
            if e.member.as_ref().is_some_and(|m| Arc::ptr_eq(m, member)) {
                Some((i, false))
            } else if e.replacement.as_ref().is_some_and(|m| Arc::ptr_eq(m, member)) {
                Some((i, true))
            } else {
                None
            }
        })
    }
}
