//! Assembly: from a set of member paths, in any order, to a volume — or a clear refusal that
//! names the member at fault.

use super::{locks::StripeLocks, Volume};
use crate::codec::Codec;
use crate::layout::{Geometry, Level};
use crate::member::{Access, Member, MemberError};
use crate::meta::superblock::{uuid_string, Superblock};
use crate::uring::Engine;
use futures::future::join_all;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    #[error("volume {name:?} has {members} members; missing slot(s) {missing:?}")]
    Missing { name: String, members: u32, missing: Vec<u32> },
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
    from_members(found)
}

fn from_members(found: Vec<(Member, Superblock)>) -> Result<Volume, AssembleError> {
    refuse_same_member_twice(&found)?;
    let reference = reference_superblock(&found);
    let ref_path = found.iter().find(|(_, sb)| sb.volume_uuid == reference.volume_uuid).map(|(m, _)| m.path().to_path_buf());
    let ref_path = ref_path.unwrap_or_default();

    let newest = found.iter().filter(|(_, sb)| sb.volume_uuid == reference.volume_uuid).map(|(_, sb)| sb.event).max().unwrap_or(0);
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
        if sb.event < newest {
            return Err(AssembleError::Stale { path: m.path().to_path_buf(), event: sb.event, newest });
        }
        let need = sb.data_offset + sb.member_data_bytes;
        if m.size() < need {
            return Err(AssembleError::Truncated { path: m.path().to_path_buf(), size: m.size(), need });
        }
    }

    let geometry = geometry_of(&reference, &ref_path)?;
    let mut slots: Vec<Option<Member>> = (0..reference.members).map(|_| None).collect();
    let mut newest_sb = reference.clone();
    for (m, sb) in found {
        let slot = sb.member_index as usize;
        if let Some(prev) = &slots[slot] {
            return Err(AssembleError::DuplicateSlot {
                a: prev.path().to_path_buf(),
                b: m.path().to_path_buf(),
                slot: sb.member_index,
                name: sb.name.clone(),
            });
        }
        if sb.event >= newest_sb.event {
            newest_sb = sb;
        }
        slots[slot] = Some(m);
    }
    let missing: Vec<u32> = slots.iter().enumerate().filter(|(_, m)| m.is_none()).map(|(i, _)| i as u32).collect();
    if !missing.is_empty() {
        return Err(AssembleError::Missing { name: reference.name.clone(), members: reference.members, missing });
    }
    let members: Vec<Member> = slots.into_iter().flatten().collect();
    let codec = Codec::for_geometry(&geometry).map_err(|e| AssembleError::BadGeometry { path: ref_path.clone(), reason: e.to_string() })?;
    for m in &members {
        if !m.is_direct() {
            tracing::info!("{}: buffered I/O (no O_DIRECT)", m.path().display());
        }
    }
    Ok(Volume {
        name: newest_sb.name.clone(),
        uuid: newest_sb.volume_uuid,
        geometry,
        codec,
        members,
        data_offset: newest_sb.data_offset,
        locks: StripeLocks::default(),
        superblock: newest_sb,
    })
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
