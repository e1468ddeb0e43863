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

