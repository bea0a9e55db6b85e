//! The net device's migratable state and its [`Persist`] impl. Queue states
//! belong to the transport (`mmio::MmioState`); this is the device's own
//! part plus the backend's description ([`BackendState`]). The machine
//! state holds both (`net::attach::NetDeviceState`), and the TAP fds travel
//! beside it.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::backend::BackendState;
use super::counters::NetStats;
use super::device::{NetDevice, NetError, offered_features};
use crate::persist::{Format10PartVersion, Persist};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    pub mac: [u8; 6],
    pub link_up: bool,
    pub queue_pairs: u16,
    pub avail_features: u64,
    pub acked_features: u64,
    pub active_pairs: u16,
    pub backend: BackendState,
    /// Per queue pair, a frame already read from the TAP that waits for rx
    /// buffers (vnet header first; empty when none). It is delivered by the
    /// restored device before anything newer, so a migration loses none.
    #[serde(default)]
    pub rx_pending: Vec<Vec<u8>>,
    /// Per queue pair, its counters, which the restored device goes on
    /// from. Since format 1.4; absent before (they start at 0 then).
    #[serde(default)]
    pub counters: Vec<NetStats>,
}

impl Persist for NetDevice {
    type State = NetState;
    type Context<'a> = ();
    type Error = NetError;

    /// Saves the device; it must be paused (or never activated). The
    /// backend's `tap_fds` name its queues in its own order; the machine
    /// renames them by the fd table they travel in.
    fn save(&self, _: ()) -> Result<NetState, NetError> {
        if self.is_running() {
            return Err(NetError::Running);
        }
        Ok(NetState {
            format_1_0_version: Format10PartVersion,
            mac: self.mac,
            link_up: self.link_up,
            queue_pairs: self.queue_pairs(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            active_pairs: self.active_pairs.load(Ordering::SeqCst),
            backend: self.backend.state(),
            rx_pending: self.pending_rx(),
            counters: self.queue_stats(),
        })
    }

    /// Loads a saved state into this device, freshly built on the backend
    /// made from the fds that came beside the state (not yet activated). It
    /// stays paused through the transport's restore until `resume`, and
    /// touches the backend only then.
    fn restore(&mut self, _: (), state: &NetState) -> Result<(), NetError> {
        if self.is_running() {
            return Err(NetError::Running);
        }
        if self.queue_pairs() != state.queue_pairs {
            return Err(NetError::State(format!(
                "{} queue pairs saved, backend has {}",
                state.queue_pairs,
                self.queue_pairs()
            )));
        }
        if state.rx_pending.len() > usize::from(state.queue_pairs) {
            return Err(NetError::State(format!(
                "{} pending rx frames for {} queue pairs",
                state.rx_pending.len(),
                state.queue_pairs
            )));
        }
        if state.counters.len() > usize::from(state.queue_pairs) {
            return Err(NetError::State(format!(
                "counters for {} queue pairs, the device has {}",
                state.counters.len(),
                state.queue_pairs
            )));
        }
        // The driver's features must still be served here.
        let offered = self
            .backend
            .filter_features(offered_features(state.queue_pairs));
        if state.acked_features & !offered != 0 {
            return Err(NetError::State(format!(
                "driver features {:#x} not all offered ({:#x})",
                state.acked_features, offered
            )));
        }
        self.mac = state.mac;
        self.avail_features = state.avail_features & offered | state.acked_features;
        self.acked_features = state.acked_features;
        self.link_up = state.link_up;
        self.start_paused = true;
        self.restored_pairs = Some(state.active_pairs.clamp(1, state.queue_pairs));
        self.restored_rx = state.rx_pending.clone();
        self.set_queue_stats(&state.counters);
        Ok(())
    }
}
