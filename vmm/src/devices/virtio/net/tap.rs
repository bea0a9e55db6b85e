//! The TAP backend of the in-vmm device: the TAP's queues
//! (`net_datapath::tap::TapQueue`, one per queue pair), its name and the
//! offloads set, described for migration by `BackendState`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use net_datapath::tap::{TapError, TapQueue};

use super::backend::{BackendKind, BackendState, FrameIo, NetBackend};
use crate::persist::Format10PartVersion;
use net_datapath::VNET_HDR_LEN;

/// A TAP device: one queue per virtio queue pair.
#[derive(Debug)]
pub struct Tap {
    queues: Vec<Arc<TapQueue>>,
    ifname: String,
    offloads: u32,
}

impl Tap {
    /// Takes the queue fds of TAP `name`, in queue order (from netd or a
    /// migration source), checked as `TapQueue::from_fds` checks them.
    pub fn from_fds(name: &str, fds: Vec<OwnedFd>) -> Result<Self, TapError> {
        let queues = TapQueue::from_fds(name, fds)?;
        Ok(Self {
            queues: queues.into_iter().map(Arc::new).collect(),
            ifname: name.to_string(),
            offloads: 0,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The TAP queue fds, in queue order (for migration and vhost).
    pub fn queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }
}

impl NetBackend for Tap {
    fn state(&self) -> BackendState {
        BackendState {
            format_1_0_version: Format10PartVersion,
            kind: BackendKind::Tap,
            ifname: self.ifname.clone(),
            queue_pairs: self.queues.len() as u16,
            vnet_hdr_len: VNET_HDR_LEN as u16,
            offloads: self.offloads,
            tap_fds: (0..self.queues.len()).collect(),
        }
    }

    fn queue_pairs(&self) -> u16 {
        self.queues.len() as u16
    }

    fn frame_io(&self, pair: usize) -> Option<Arc<dyn FrameIo>> {
        self.queues.get(pair).map(|q| q.clone() as Arc<dyn FrameIo>)
    }

    fn set_offload(&mut self, acked_features: u64) -> io::Result<()> {
        // TUNSETOFFLOAD acts on the device: one queue sets it for all.
        if let Some(q) = self.queues.first() {
            self.offloads = q.set_offload(acked_features)?;
        }
        Ok(())
    }
}
