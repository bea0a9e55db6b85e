//! The net device's migratable state. Queue states belong to the transport
//! (`mmio::MmioState`); this is the device's own part plus the backend's
//! description. A VMM snapshot holds both, and the TAP fds beside them.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::backend::{BackendState, NetBackend};
use super::device::{NetDevice, NetError};

pub const NET_STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u32,
    pub mac: [u8; 6],
    pub link_up: bool,
    pub queue_pairs: u16,
    pub avail_features: u64,
    pub acked_features: u64,
    pub active_pairs: u16,
    pub backend: BackendState,
}

impl NetDevice {
    /// Saves the device; it must be paused (or never activated).
    pub fn save(&self) -> Result<NetState, NetError> {
        if self.is_running() {
            return Err(NetError::Running);
        }
        Ok(NetState {
            version: NET_STATE_VERSION,
            mac: self.mac,
            link_up: self.link_up,
            queue_pairs: self.queue_pairs(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            active_pairs: self.active_pairs.load(Ordering::SeqCst),
            backend: self.backend.state(),
        })
    }

    /// Rebuilds a device on `backend` (made from the fds that came beside
    /// the state). It stays paused through the transport's restore until
    /// `resume`.
    pub fn restore(backend: Box<dyn NetBackend>, state: &NetState) -> Result<Self, NetError> {
        if state.version != NET_STATE_VERSION {
            return Err(NetError::State(format!(
                "version {} (expected {NET_STATE_VERSION})",
                state.version
            )));
        }
        if backend.queue_pairs() != state.queue_pairs {
            return Err(NetError::State(format!(
                "{} queue pairs saved, backend has {}",
                state.queue_pairs,
                backend.queue_pairs()
            )));
        }
        let mut d = NetDevice::new(backend, Some(state.mac))?;
        // The driver's features must still be served here.
        if state.acked_features & !d.avail_features != 0 {
            return Err(NetError::State(format!(
                "driver features {:#x} not all offered ({:#x})",
                state.acked_features, d.avail_features
            )));
        }
        d.avail_features = state.avail_features & d.avail_features | state.acked_features;
        d.acked_features = state.acked_features;
        d.link_up = state.link_up;
        d.start_paused = true;
        d.restored_pairs = Some(state.active_pairs.clamp(1, state.queue_pairs));
        Ok(d)
    }
}
