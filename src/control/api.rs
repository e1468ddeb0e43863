//! The admin API's messages, shared by the daemon and the CLI. On the wire: one JSON object per
//! line each way, over the daemon's `--control` Unix socket.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;

pub use crate::volume::status::{RebuildStatus, ScrubStatus, SlotStatus, StripeCacheStatus, VolumeState, VolumeStatus};

/// A request from the CLI. Members are named by path or by slot number (`"2"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Administratively fail a member.
    Fail {
        member: String,
    },
    /// Add a member: fills a failed slot (and rebuilds it) or waits as a hot spare.
    Add {
        path: PathBuf,
    },
    /// Rebuild `new` while `old` keeps serving, then retire `old`.
    Replace {
        old: String,
        new: PathBuf,
    },
    /// Throttle rebuilds; `None` (or 0) means unlimited.
    Rebuild {
        max_rate: Option<u64>,
    },
    /// Verify every stripe's parity or mirrors in the background; with `repair`, rewrite what
    /// disagrees. `max_rate` limits bytes read per second.
    Scrub {
        #[serde(default)]
        repair: bool,
        #[serde(default)]
        max_rate: Option<u64>,
    },
    /// Test hook: inject faults into a member's I/O (refused unless the daemon allows it).
    Fault {
        member: String,
        fault: FaultSpec,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What happened, or why the request was refused; printed by the CLI.
    pub message: String,
    /// Filled for `Status`, and for other requests where it helps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeStatus>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response { ok: true, message: message.into(), status: None }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Response { ok: false, message: message.into(), status: None }
    }
}

/// Faults to inject into one member's I/O, for tests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// Fail reads with EIO.
    #[serde(default)]
    pub read_errors: bool,
    /// Fail writes (and flushes) with EIO.
    #[serde(default)]
    pub write_errors: bool,
    /// Let this many operations through first.
    #[serde(default)]
    pub after_ops: u64,
    /// Delay every operation by this much.
    #[serde(default)]
    pub delay_ms: u64,
    /// After `after_ops`, persist half of the next write and stop the daemon dead.
    #[serde(default)]
    pub torn_write: bool,
}

/// What the control server needs from the daemon.
pub trait Admin: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}
