//! Assembly: from a set of member paths, in any order, to a volume — or a clear refusal that
//! names the member at fault.

use super::health::{Health, Progress, SlotEntry};
use super::{locks::StripeLocks, Volume};
use crate::codec::Codec;
use crate::layout::{Geometry, Level};
use crate::member::{Access, ChecksumLayout, Member, MemberError, PageWrites};
use crate::meta::superblock::{member_id, uuid_string, Superblock};
use crate::meta::SlotState;
use crate::uring::Engine;
use futures::future::join_all;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AssembleError {
    #[error("no members given")]
    NoMembers,
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error("{a} and {b} are the same member, given twice")]
    SameMember { a: PathBuf, b: PathBuf },
    #[error("{path}: belongs to volume {its_name:?} ({its_uuid}), not to volume {name:?} ({uuid}) like the other members")]
    Foreign { path: PathBuf, its_name: String, its_uuid: String, name: String, uuid: String },
    #[error("{a} and {b} both claim slot {slot} of volume {name:?}")]
    DuplicateSlot { a: PathBuf, b: PathBuf, slot: u32, name: String },
    #[error("{path}: its superblock describes a different geometry than {reference}'s (same volume, mixed set refused)")]
    GeometryMismatch { path: PathBuf, reference: PathBuf },
    #[error("{path}: stale member (event counter {event}, the volume is at {newest}): it missed updates while it was out")]
    Stale { path: PathBuf, event: u64, newest: u64 },
    #[error("volume {name:?} cannot be assembled: slot(s) {lost:?} missing, failed or stale, and {level} tolerates only {tolerated} lost")]
    TooManyLost { name: String, level: &'static str, lost: Vec<u32>, tolerated: usize },
    #[error("{path}: superblock has an invalid geometry: {reason}")]
    BadGeometry { path: PathBuf, reason: String },
    #[error("{path}: member is {size} bytes but its superblock needs {need}")]
    Truncated { path: PathBuf, size: u64, need: u64 },
}

/// Opens every member and reads its superblock, all members at once.
pub async fn open_members(paths: &[PathBuf], engine: &Arc<Engine>, access: Access) -> Result<Vec<(Member, Superblock)>, AssembleError> {
    let opened = join_all(paths.iter().map(|p| async move {
        let member = Member::open(p, engine.clone(), access).await?;
        let sb = member.read_superblock().await?;
        Ok::<_, MemberError>((member, sb))
    }))
    .await;
    Ok(opened.into_iter().collect::<Result<Vec<_>, _>>()?)
}

/// Assembles the volume the members at `paths` form.
pub async fn assemble(paths: &[PathBuf], engine: &Arc<Engine>, access: Access) -> Result<Volume, AssembleError> {
    if paths.is_empty() {
        return Err(AssembleError::NoMembers);
    }
    let found = open_members(paths, engine, access).await?;
    let (volume, changed) = from_members(found, engine)?;
    volume.load_checksums().await?;
    if access == Access::Exclusive {
        volume.resync_dirty().await;
        if changed {
            // Record the members found missing or stale, so they are known stale if they return.
            volume.persist_progress().await;
        }
    }
    Ok(volume)
}

fn from_members(found: Vec<(Member, Superblock)>, engine: &Arc<Engine>) -> Result<(Volume, bool), AssembleError> {
    refuse_same_member_twice(&found)?;
    let reference = reference_superblock(&found);
    let ref_path = found.iter().find(|(_, sb)| *sb == reference).map(|(m, _)| m.path().to_path_buf()).unwrap_or_default();
    for (m, sb) in &found {
        if sb.volume_uuid != reference.volume_uuid {
            return Err(AssembleError::Foreign {
                path: m.path().to_path_buf(),
                its_name: sb.name.clone(),
                its_uuid: uuid_string(&sb.volume_uuid),
                name: reference.name.clone(),
                uuid: uuid_string(&reference.volume_uuid),
            });
        }
        if !sb.same_geometry(&reference) {
            return Err(AssembleError::GeometryMismatch { path: m.path().to_path_buf(), reference: ref_path.clone() });
        }
        let need = sb.data_offset.saturating_add(sb.member_data_bytes);
        if m.size() < need {
            return Err(AssembleError::Truncated { path: m.path().to_path_buf(), size: m.size(), need });
        }
    }
    let geometry = geometry_of(&reference, &ref_path)?;
    let n = reference.members as usize;

    let mut claims: Vec<Vec<(Member, Superblock)>> = (0..n).map(|_| Vec::new()).collect();
    let mut replacements: Vec<Option<Member>> = (0..n).map(|_| None).collect();
    let mut spares = Vec::new();
    for (m, sb) in found {
        let slot = sb.member_index as usize;
        if sb.spare {
            spares.push(Arc::new(m));
        } else if sb.replacement {
            replacements[slot] = Some(m);
        } else {
            claims[slot].push((m, sb));
        }
    }

    // Per slot: the newest claimant serves, unless the volume's record says the slot failed
    // after that claimant last heard from it. Anything older is stale and never read.
    let mut changed = false;
    let mut slots = Vec::with_capacity(n);
    for (slot, mut claimants) in claims.into_iter().enumerate() {
        // The member recorded for the slot first, then the newest.
        claimants.sort_by_key(|(_, sb)| (member_id(&sb.member_uuid) != reference.slot_ids[slot], std::cmp::Reverse(sb.event)));
        let mut claimants = claimants.into_iter();
        let chosen = claimants.next();
        for (m, sb) in claimants {
            tracing::warn!("{}: stale member of slot {slot} (event {}, volume at {}): not used", m.path().display(), sb.event, reference.event);
        }
        let recorded = reference.slots[slot];
        let mut entry = SlotEntry { member: None, state: recorded, replacement: None, stale: None, former_stats: Default::default() };
        match chosen {
            // Trusted only if it is the member the volume has recorded in this slot, and the
            // slot has not failed since: anything else missed writes.
            Some((m, sb)) if recorded == SlotState::Failed || member_id(&sb.member_uuid) != reference.slot_ids[slot] => {
                tracing::warn!(
                    "{}: stale member of slot {slot} (event {}, volume at {}): it missed updates while out; not used. `nbraid add` it to resync",
                    m.path().display(),
                    sb.event,
                    reference.event
                );
                entry.state = SlotState::Failed;
                entry.stale = Some(m.path().to_path_buf());
                changed |= recorded != SlotState::Failed;
            }
            Some((m, _)) => entry.member = Some(Arc::new(m)),
            None => {
                if recorded != SlotState::Failed {
                    tracing::warn!("slot {slot} of volume {:?}: member missing; assembling degraded", reference.name);
                    changed = true;
                }
                entry.state = SlotState::Failed;
            }
        }
        if entry.state == SlotState::Replacing {
            match replacements[slot].take().filter(|r| member_id(&r.uuid()) == reference.replacement_ids[slot]) {
                Some(r) => entry.replacement = Some(Arc::new(r)),
                None => {
                    tracing::warn!("slot {slot}: the replacement being built is missing; the replace is abandoned");
                    entry.state = SlotState::Active;
                    changed = true;
                }
            }
        }
        slots.push(entry);
    }
    for (slot, r) in replacements.into_iter().enumerate() {
        if let Some(r) = r {
            tracing::warn!("{}: replacement for slot {slot} that is no longer being replaced: not used", r.path().display());
        }
    }

    let health = Health { slots, spares, exhausted: false };
    let tolerated = geometry.parity_shards as usize;
    if health.lost_slots() > tolerated {
        let lost = health
            .slots
            .iter()
            .enumerate()
            .filter(|(_, e)| e.member.is_none() || e.state != SlotState::Active && e.state != SlotState::Replacing)
            .map(|(i, _)| i as u32)
            .collect();
        return Err(AssembleError::TooManyLost { name: reference.name.clone(), level: geometry.level.name(), lost, tolerated });
    }
    let codec = Codec::for_geometry(&geometry).map_err(|e| AssembleError::BadGeometry { path: ref_path.clone(), reason: e.to_string() })?;
    let checksums = (reference.checksum_offset != 0).then_some(ChecksumLayout {
        volume_uuid: reference.volume_uuid,
        table_offset: reference.checksum_offset,
        data_offset: reference.data_offset,
        data_bytes: reference.member_data_bytes,
    });
    let ppl = (reference.ppl_offset != 0)
        .then(|| super::ppl::PartialParityLog::new(reference.ppl_offset, reference.ppl_slots, geometry.chunk, geometry.members as usize));
    let page_writes = if reference.deferred_checksum_pages { PageWrites::Deferred } else { PageWrites::Ordered };
    let volume = Volume {
        name: reference.name.clone(),
        uuid: reference.volume_uuid,
        geometry,
        codec,
        data_offset: reference.data_offset,
        locks: StripeLocks::default(),
        combiner: Default::default(),
        combining_writes: Default::default(),
        stripe_cache: super::stripe_cache::StripeCache::new(geometry.stripe_data_bytes()),
        health: RwLock::new(Arc::new(health)),
        progress: Progress::new(reference.checkpoints.iter().copied()),
        meta: tokio::sync::Mutex::new(reference),
        rebuild: Default::default(),
        scrub: Default::default(),
        intent: super::intent::Intent::new(geometry.stripes, geometry.chunk),
        engine: engine.clone(),
        checksums,
        page_writes,
        ppl,
    };
    Ok((volume, changed))
}

impl Volume {
    /// Reads the checksum table of every member in service; spares start with unknown blocks,
    /// which their rebuild fills in.
    async fn load_checksums(&self) -> Result<(), MemberError> {
        let Some(layout) = self.checksums else { return Ok(()) };
        let h = self.health();
        for m in h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter())) {
            m.load_checksums(layout).await?;
        }
        for m in &h.spares {
            m.fresh_checksums(layout);
        }
        Ok(())
    }
}

fn refuse_same_member_twice(found: &[(Member, Superblock)]) -> Result<(), AssembleError> {
    let mut seen: HashMap<_, &Path> = HashMap::new();
    for (m, _) in found {
        if let Some(prev) = seen.insert(m.identity(), m.path()) {
            return Err(AssembleError::SameMember { a: prev.to_path_buf(), b: m.path().to_path_buf() });
        }
    }
    Ok(())
}

/// The superblock that defines the volume: of the volume most members belong to (ties go to
/// the first member given), the copy with the highest event counter.
fn reference_superblock(found: &[(Member, Superblock)]) -> Superblock {
    let mut votes: HashMap<[u8; 16], usize> = HashMap::new();
    for (_, sb) in found {
        *votes.entry(sb.volume_uuid).or_default() += 1;
    }
    let best = votes.values().copied().max().unwrap_or(0);
    let uuid = found.iter().map(|(_, sb)| sb.volume_uuid).find(|u| votes[u] == best).unwrap_or_default();
    found
        .iter()
        .map(|(_, sb)| sb)
        .filter(|sb| sb.volume_uuid == uuid)
        .max_by_key(|sb| sb.event)
        .cloned()
        .expect("at least one member belongs to the chosen volume")
}

fn geometry_of(sb: &Superblock, path: &Path) -> Result<Geometry, AssembleError> {
    let bad = |reason: String| AssembleError::BadGeometry { path: path.to_path_buf(), reason };
    let level = Level::from_code(sb.level_code).ok_or_else(|| bad(format!("unknown level code {}", sb.level_code)))?;
    let ec = (level == Level::Ec).then_some((sb.data_shards, sb.parity_shards));
    let g = Geometry::new(level, sb.members, ec, sb.chunk, sb.member_data_bytes).map_err(|e| bad(e.to_string()))?;
    if g.data_shards != sb.data_shards || g.parity_shards != sb.parity_shards || g.volume_size() != sb.volume_size {
        return Err(bad("recorded shard counts or volume size do not match the level".into()));
    }
    Ok(g)
}
