//! Serde for virtio-queue's `QueueState` (the crate has none): a remote
//! definition, used with `#[serde(with = "...")]` in the state structs.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState", deny_unknown_fields)]
pub struct QueueStateDef {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// A serializable wrapper, for vectors and options of queue states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue(#[serde(with = "QueueStateDef")] pub QueueState);
