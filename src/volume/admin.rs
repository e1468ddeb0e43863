//! Administrative operations on a running volume: status, fail, add, replace, throttle, and the
//! fault-injection test hook. Every refusal says why.

use super::health::Health;
use super::status::{RebuildStatus, SlotStatus, VolumeState, VolumeStatus};
use super::Volume;
use crate::layout::Level;
use crate::member::{Access, FaultPlan, Member, MemberError};
use crate::meta::superblock::uuid_string;
use crate::meta::{SlotState, SuperblockError};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Member(#[from] MemberError),
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, AdminError> {
    Err(AdminError::Refused(msg.into()))
}

impl Volume {
    pub fn status(&self) -> VolumeStatus {
        let h = self.health();
        let g = self.geometry;
        let state = if h.exhausted {
            VolumeState::Failed
        } else if h.rebuilding() {
            VolumeState::Rebuilding
        } else if h.lost_slots() > 0 {
            VolumeState::Degraded
        } else {
            VolumeState::Optimal
        };
        let slots = h
            .slots
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let stats = e.member.as_ref().map(|m| m.stats()).unwrap_or(e.former_stats);
                let state = match (e.state, &e.member, &e.stale) {
                    (SlotState::Failed, None, None) => "missing",
                    (SlotState::Failed, _, _) => "failed",
                    (SlotState::Active, _, _) => "active",
                    (SlotState::Rebuilding, _, _) => "rebuilding",
                    (SlotState::Replacing, _, _) => "replacing",
                };
                SlotStatus {
                    slot: i as u32,
                    path: e.member.as_ref().map(|m| m.path().to_path_buf()).or_else(|| e.stale.clone()).map(|p| p.display().to_string()),
                    state: state.into(),
                    reads: stats.reads,
                    writes: stats.writes,
                    read_errors: stats.read_errors,
                    write_errors: stats.write_errors,
                    checksum_errors: stats.checksum_errors,
                    repaired_blocks: stats.repaired,
                    replacement: e.replacement.as_ref().map(|m| m.path().display().to_string()),
                }
            })
            .collect::<Vec<SlotStatus>>();
        let checksum_errors = slots.iter().map(|s| s.checksum_errors).sum();
        let repaired_blocks = slots.iter().map(|s| s.repaired_blocks).sum();
        let rebuilds = h
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let target = match e.state {
                    SlotState::Rebuilding => e.member.as_ref()?,
                    SlotState::Replacing => e.replacement.as_ref()?,
                    _ => return None,
                };
                let done = self.progress.get(i);
                let stripes_per_sec = self.rebuild.rate(i, done).unwrap_or(0.0);
                let remaining = g.stripes.saturating_sub(done);
                Some(RebuildStatus {
                    slot: i as u32,
                    target: target.path().display().to_string(),
                    done_bytes: done * g.chunk,
                    total_bytes: g.stripes * g.chunk,
                    rate: stripes_per_sec * g.chunk as f64,
                    eta_seconds: (stripes_per_sec > 0.0).then(|| remaining as f64 / stripes_per_sec),
                })
            })
            .collect();
        VolumeStatus {
            name: self.name.clone(),
            uuid: uuid_string(&self.uuid),
            level: g.level.name().into(),
            data_shards: g.data_shards,
            parity_shards: g.parity_shards,
            chunk: g.chunk,
            size: self.size(),
            members: g.members,
            state,
            slots,
            spares: h.spares.iter().map(|m| m.path().display().to_string()).collect(),
            rebuilds,
            max_rebuild_rate: self.rebuild.max_rate(),
            intent: self.intent_status(),
            scrub: self.scrub_status(),
            checksums: self.checksums.is_some(),
            deferred_checksum_pages: self.page_writes == crate::member::PageWrites::Deferred,
            checksum_errors,
            repaired_blocks,
            stripe_cache: matches!(g.level, Level::Raid5 | Level::Ec).then(|| self.stripe_cache.status()),
        }
    }

    /// A slot named by number or by the path of the member in it.
    fn resolve_slot(&self, h: &Health, name: &str) -> Result<usize, AdminError> {
        if let Ok(i) = name.parse::<usize>() {
            if i < h.slots.len() {
                return Ok(i);
            }
            return refuse(format!("no slot {i}: the volume has {} slots", h.slots.len()));
        }
        let want = std::fs::canonicalize(name).unwrap_or_else(|_| name.into());
        let same = |m: &Arc<Member>| std::fs::canonicalize(m.path()).unwrap_or_else(|_| m.path().to_path_buf()) == want;
        if let Some(i) = h.slots.iter().position(|e| e.member.as_ref().is_some_and(same)) {
            return Ok(i);
        }
        if h.slots.iter().any(|e| e.replacement.as_ref().is_some_and(same)) {
            return refuse(format!("{name} is a replacement still being built, not a slot's member"));
        }
        refuse(format!("{name} is not a member of volume {:?}", self.name))
    }

    /// Administrative fail. Refused when it would leave a stripe without the data it needs.
    pub async fn fail(&self, name: &str) -> Result<String, AdminError> {
        let mut sb = self.meta.lock().await;
        let h = self.health();
        let slot = self.resolve_slot(&h, name)?;
        let e = &h.slots[slot];
        let Some(member) = e.member.clone() else {
            return refuse(format!("slot {slot} has already failed"));
        };
        let m = self.geometry.parity_shards as usize;
        let lost_after = h.lost_slots() + usize::from(e.state != SlotState::Rebuilding);
        if lost_after > m {
            return refuse(format!(
                "failing slot {slot} ({}) would leave volume {:?} ({} tolerating {m} lost member{}) unable to serve its data; {} slot(s) already lost",
                member.path().display(),
                self.name,
                self.geometry.level,
                if m == 1 { "" } else { "s" },
                h.lost_slots()
            ));
        }
        tracing::warn!("slot {slot}: {} failed by the administrator", member.path().display());
        let mut next = (*h).clone();
        self.take_out(&mut next, slot, false);
        self.commit(&mut sb, next).await;
        Ok(format!("slot {slot} ({}) failed", member.path().display()))
    }

    /// Opens a disk to join this volume, refusing disks of other volumes, disks with data,
    /// disks already in this volume, and disks too small.
    async fn open_new_member(&self, h: &Health, path: &Path) -> Result<Arc<Member>, AdminError> {
        let meta = std::fs::metadata(path).map_err(|e| AdminError::Refused(format!("{}: {e}", path.display())))?;
        let identity = if meta.file_type().is_block_device() { (0, meta.rdev()) } else { (meta.dev(), meta.ino()) };
        let in_use = h.slots.iter().flat_map(|e| e.member.iter().chain(e.replacement.iter())).chain(h.spares.iter());
        if in_use.into_iter().any(|m| m.identity() == identity) {
            return refuse(format!("{} is already in use by this volume", path.display()));
        }
        let member = Member::open(path, self.engine.clone(), Access::Exclusive).await?;
        match member.read_superblock().await {
            Ok(sb) if sb.volume_uuid != self.uuid => {
                return refuse(format!("{} belongs to volume {:?} ({}); wipe it first if it is free", path.display(), sb.name, uuid_string(&sb.volume_uuid)))
            }
            Ok(_) => tracing::info!("{}: a former member of this volume; it will be rebuilt in full", path.display()),
            Err(MemberError::Superblock { source: SuperblockError::NoMagic, .. }) => {
                if super::create::has_data(path).unwrap_or(true) {
                    return refuse(format!("{} holds data that is not an nbraid member; wipe it first", path.display()));
                }
            }
            Err(MemberError::Superblock { source, .. }) => return refuse(format!("{}: {source}; wipe it first", path.display())),
            Err(e) => return Err(e.into()),
        }
        let need = self.data_offset + self.geometry.stripes * self.geometry.chunk;
        if member.size() < need {
            return refuse(format!("{} is too small: {} bytes, this volume needs {need} per member", path.display(), member.size()));
        }
        // A new identity: whatever this disk held before, it is not what the volume has recorded.
        member.assign_uuid(crate::meta::superblock::random_uuid().map_err(|e| AdminError::Refused(format!("random UUID: {e}")))?);
        // Whatever checksum pages and log records the disk holds from an earlier life (even in
        // this very volume) must not outrank what is written from now on.
        let meta_start = crate::meta::superblock::METADATA_RESERVED;
        let mut at = meta_start;
        while at < self.data_offset {
            let len = (self.data_offset - at).min(8 << 20);
            member.write_at(at, crate::uring::BufRange::whole(Arc::new(crate::buf::AlignedBuf::zeroed(len as usize)))).await?;
            at += len;
        }
        if let Some(layout) = self.checksums {
            member.fresh_checksums(layout);
        }
        Ok(Arc::new(member))
    }

    /// Adds a disk: it fills the first failed slot and is rebuilt, or waits as a hot spare.
    pub async fn add(&self, path: &Path) -> Result<String, AdminError> {
        let mut sb = self.meta.lock().await;
        let h = self.health();
        if h.exhausted {
            return refuse("the volume has failed (more members lost than it tolerates); restart it once the lost members are back");
        }
        let member = self.open_new_member(&h, path).await?;
        let mut next = (*h).clone();
        let msg = match next.slots.iter().position(|e| e.state == SlotState::Failed) {
            Some(slot) => {
                let e = &mut next.slots[slot];
                e.member = Some(member);
                e.state = SlotState::Rebuilding;
                e.stale = None;
                self.progress.set(slot, 0);
                format!("{} fills slot {slot}; rebuilding", path.display())
            }
            None => {
                next.spares.push(member);
                format!("{} added as a hot spare", path.display())
            }
        };
        self.commit(&mut sb, next).await;
        Ok(msg)
    }

    /// Builds `new` as a copy of slot `old` while `old` keeps serving, then retires `old`.
    pub async fn replace(&self, old: &str, new: &Path) -> Result<String, AdminError> {
        let mut sb = self.meta.lock().await;
        let h = self.health();
        let slot = self.resolve_slot(&h, old)?;
        if h.slots[slot].state != SlotState::Active {
            return refuse(format!("slot {slot} is not active; use `nbraid add` to fill a failed slot"));
        }
        let member = self.open_new_member(&h, new).await?;
        let mut next = (*h).clone();
        next.slots[slot].replacement = Some(member);
        next.slots[slot].state = SlotState::Replacing;
        self.progress.set(slot, 0);
        self.commit(&mut sb, next).await;
        Ok(format!("replacing slot {slot} with {}; the old member serves until the copy is complete", new.display()))
    }

    pub fn set_max_rebuild_rate(&self, bytes_per_sec: Option<u64>) -> String {
        self.rebuild.set_max_rate(bytes_per_sec.filter(|&r| r > 0));
        match self.rebuild.max_rate() {
            Some(r) => format!("rebuild rate limited to {:.1} MiB/s", r as f64 / (1u64 << 20) as f64),
            None => "rebuild rate unlimited".into(),
        }
    }

    /// Test hook: inject faults into the member serving a slot (or a replacement or spare).
    pub fn inject_faults(&self, name: &str, plan: FaultPlan) -> Result<String, AdminError> {
        let h = self.health();
        let want = std::fs::canonicalize(name).unwrap_or_else(|_| name.into());
        let by_path = h
            .slots
            .iter()
            .flat_map(|e| e.member.iter().chain(e.replacement.iter()))
            .chain(h.spares.iter())
            .find(|m| std::fs::canonicalize(m.path()).unwrap_or_else(|_| m.path().to_path_buf()) == want)
            .cloned();
        let member = match by_path {
            Some(m) => m,
            None => {
                let slot = self.resolve_slot(&h, name)?;
                h.slots[slot].member.clone().ok_or_else(|| AdminError::Refused(format!("slot {slot} has no member")))?
            }
        };
        member.inject_faults(plan.clone());
        Ok(format!("faults on {}: {plan:?}", member.path().display()))
    }
}
