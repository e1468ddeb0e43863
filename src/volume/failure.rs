//! Member failure: taking a member out of service and recording that on the survivors.
//!
//! Order matters: the new membership is installed first (so new I/O avoids the dead member),
//! then written to the surviving superblocks, and only then is the request that hit the failure
//! answered — a crash at any point leaves either the old record (the member was still in sync)
//! or the new one.

use super::health::Health;
use super::Volume;
use crate::member::{Member, MemberError};
use crate::meta::superblock::member_id;
use crate::meta::{SlotState, Superblock};
use futures::future::join_all;
use std::sync::Arc;

impl Volume {
    /// Called when I/O on `member` failed: takes it out of service. Returns once the change is
    /// on disk (or known not to be recordable), so the caller can retry from redundancy.
    pub(super) async fn member_failed(&self, member: &Arc<Member>, error: &MemberError) {
        let mut sb = self.meta.lock().await;
        let current = self.health();
        let Some((slot, replacement)) = current.slot_of(member) else {
            return; // already taken out by a concurrent failure
        };
        if !replacement && current.slots[slot].state == SlotState::Failed {
            return;
        }
        tracing::error!("slot {slot}: {error}; failing member {}", member.path().display());
        let mut next = (*current).clone();
        self.take_out(&mut next, slot, replacement);
        self.commit(&mut sb, next).await;
    }

    /// Applies the loss of a slot's member (or of its replacement) to a membership.
    pub(super) fn take_out(&self, h: &mut Health, slot: usize, replacement: bool) {
        let e = &mut h.slots[slot];
        if replacement {
            tracing::warn!("slot {slot}: replacement member failed; the replace is abandoned");
            e.replacement = None;
            e.state = SlotState::Active;
            return;
        }
        if e.state == SlotState::Replacing {
            // The replacement carries on, now rebuilt from the other members.
            tracing::warn!("slot {slot}: member failed during replace; the replacement continues as a rebuild");
            e.member = e.replacement.take();
            e.state = SlotState::Rebuilding;
            return;
        }
        if let Some(m) = e.member.take() {
            e.stale = Some(m.path().to_path_buf());
            e.former_stats = m.stats();
        }
        e.state = SlotState::Failed;
        if !h.spares.is_empty() {
            let spare = h.spares.remove(0);
            tracing::info!("slot {slot}: hot spare {} takes over; rebuilding", spare.path().display());
            let e = &mut h.slots[slot];
            e.member = Some(spare);
            e.state = SlotState::Rebuilding;
            e.stale = None;
            self.progress.set(slot, 0);
        }
    }

    /// Installs `next` and records it in every member's superblock. A member that cannot take
    /// the write is failed too, and the round repeats. A membership that has lost more than the
    /// level tolerates is kept in memory only: the members on disk stay as they were, so the
    /// volume can be assembled again once the fault is gone.
    pub(super) async fn commit(&self, sb: &mut Superblock, mut next: Health) {
        loop {
            if next.exhausted || next.lost_slots() > self.geometry.parity_shards as usize {
                if !next.exhausted {
                    tracing::error!(
                        "volume {:?}: more members lost than {} tolerates; requests that need them get EIO (not recorded on disk)",
                        self.name,
                        self.geometry.level
                    );
                }
                next.exhausted = true;
                self.set_health(next);
                return;
            }
            self.set_health(next.clone());
            self.map_intent(&next);
            let failed = self.write_superblocks(sb, &next).await;
            if failed.is_empty() {
                if next.rebuilding() {
                    self.rebuild.wake();
                }
                return;
            }
            for (m, e) in failed {
                tracing::error!("{e}; failing member {}", m.path().display());
                match next.slot_of(&m) {
                    Some((slot, replacement)) => self.take_out(&mut next, slot, replacement),
                    None => next.spares.retain(|s| !Arc::ptr_eq(s, &m)),
                }
            }
        }
    }

    /// Writes the next superblock generation to every member in `h`; returns those that failed.
    pub(super) async fn write_superblocks(&self, sb: &mut Superblock, h: &Health) -> Vec<(Arc<Member>, MemberError)> {
        sb.event += 1;
        sb.slots = h.slots.iter().map(|e| e.state).collect();
        for (i, e) in h.slots.iter().enumerate() {
            // A failed slot keeps the id of the member that failed, so that disk stays untrusted.
            if let Some(m) = &e.member {
                sb.slot_ids[i] = member_id(&m.uuid());
            }
            sb.replacement_ids[i] = e.replacement.as_ref().map_or(0, |r| member_id(&r.uuid()));
        }
        sb.checkpoints = (0..h.slots.len())
            .map(|i| match h.slots[i].state {
                SlotState::Rebuilding | SlotState::Replacing => self.progress.get(i),
                _ => 0,
            })
            .collect();
        let mut copies: Vec<(Arc<Member>, Superblock)> = Vec::new();
        let member_copy = |m: &Arc<Member>, index: usize, spare: bool, replacement: bool| {
            let mut c = sb.clone();
            c.member_index = index as u32;
            c.member_uuid = m.uuid();
            c.spare = spare;
            c.replacement = replacement;
            (m.clone(), c)
        };
        for (i, e) in h.slots.iter().enumerate() {
            if let Some(m) = &e.member {
                copies.push(member_copy(m, i, false, false));
            }
            if let Some(r) = &e.replacement {
                copies.push(member_copy(r, i, false, true));
            }
        }
        for s in &h.spares {
            copies.push(member_copy(s, 0, true, false));
        }
        let results = join_all(copies.iter().map(|(m, c)| m.write_superblock(c))).await;
        copies.into_iter().zip(results).filter_map(|((m, _), r)| r.err().map(|e| (m, e))).collect()
    }
}
