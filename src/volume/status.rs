//! The volume's report of itself, as `nbraid status` shows it (JSON on the control socket).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Every slot active.
    Optimal,
    /// Some slot lost, still serving from redundancy.
    Degraded,
    /// Degraded, with a rebuild under way (or a replace).
    Rebuilding,
    /// More slots lost than the level tolerates: affected requests get EIO.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: String,
    pub level: String,
    pub data_shards: u32,
    pub parity_shards: u32,
    pub chunk: u64,
    pub size: u64,
    pub members: u32,
    pub state: VolumeState,
    pub slots: Vec<SlotStatus>,
    pub spares: Vec<String>,
    #[serde(default)]
    pub rebuilds: Vec<RebuildStatus>,
    /// Rebuild throttle in bytes per second written to the new member; `None` is unlimited.
    pub max_rebuild_rate: Option<u64>,
    /// The write-intent bitmap.
    pub intent: IntentStatus,
    /// The running or last finished scrub since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<ScrubStatus>,
    /// Whether every block carries a checksum verified on each read.
    #[serde(default)]
    pub checksums: bool,
    /// With checksums: whether client writes defer their checksum pages to the next flush.
    #[serde(default)]
    pub deferred_checksum_pages: bool,
    /// Blocks found damaged and blocks rewritten from redundancy, over every slot.
    #[serde(default)]
    pub checksum_errors: u64,
    #[serde(default)]
    pub repaired_blocks: u64,
    /// Parity levels: the stripes kept in memory for streams of small writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_cache: Option<StripeCacheStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StripeCacheStatus {
    /// Stripes held now, and at most.
    pub stripes: u64,
    pub capacity: u64,
    /// Partial-stripe writes whose parity came from a cached stripe, with no reads.
    pub hits: u64,
    /// Stripes read whole because a stream of writes reached them.
    pub loads: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScrubStatus {
    pub running: bool,
    pub repair: bool,
    pub stripes_done: u64,
    pub stripes_total: u64,
    /// Bytes read from members.
    pub bytes_checked: u64,
    /// Blocks (4 KiB, every member) verified against their checksums.
    #[serde(default)]
    pub blocks_checked: u64,
    /// Blocks that failed their checksum.
    #[serde(default)]
    pub checksum_errors: u64,
    /// Stripes whose parity or mirror copies disagreed with the data (their blocks all passing
    /// their checksums).
    pub mismatches: u64,
    /// Damaged blocks rewritten plus inconsistent stripes rewritten (`repair` only).
    pub repaired: u64,
    /// Damaged blocks that could not be rebuilt (too little redundancy left): reads of them get EIO.
    #[serde(default)]
    pub unrepairable: u64,
    /// Stripes not checked because a member holding part of them is lost.
    pub skipped: u64,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
    /// Why the scrub stopped early, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: u32,
    /// The member currently in the slot, if any.
    pub path: Option<String>,
    /// `active`, `failed`, `missing`, `rebuilding` or `replacing`.
    pub state: String,
    pub reads: u64,
    pub writes: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    /// Blocks on this member that failed their checksum, and those rewritten from redundancy.
    #[serde(default)]
    pub checksum_errors: u64,
    #[serde(default)]
    pub repaired_blocks: u64,
    /// For `replacing`: the member being built to take over the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub slot: u32,
    /// The member being written.
    pub target: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Recent rebuild rate in bytes per second.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IntentStatus {
    /// Bytes of each member one bit covers.
    pub region_bytes: u64,
    pub regions: u64,
    /// Regions marked as possibly holding writes not yet durable everywhere.
    pub dirty_regions: u64,
    /// Regions found dirty at start (after an unclean stop) and resynced.
    pub resync_regions: u64,
    /// Of their stripes, how many had parity or mirrors that disagreed and were rewritten.
    pub resync_repaired: u64,
    /// Dirty stripes that could not be resynced because a member is lost.
    pub resync_skipped: u64,
    /// Blocks of deferred-page writes cut off by the crash, taken as they were found.
    #[serde(default)]
    pub resync_adopted: u64,
    /// Blocks written just before the crash whose table page was left to a flush, found holding
    /// what their write-hole record said (parity levels, ordered pages).
    #[serde(default)]
    pub resync_vouched: u64,
}
