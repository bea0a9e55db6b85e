//! What the net device needs from where its frames go: per queue pair a
//! `FrameIo` (a TAP queue fd, `net_datapath::frame_io`), offload control,
//! and for vhost-net a kernel datapath that takes the rings over. `BackendState` describes a backend
//! for migration (part of the net device's state, saved through its
//! `Persist`); its fds travel beside the RON, referenced by index.

use std::io;
use std::sync::Arc;

pub use net_datapath::FrameIo;
use serde::{Deserialize, Serialize};

use super::super::GuestMemory;
use super::vhost::{VhostError, VringSetup};
use crate::persist::Format10PartVersion;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum BackendKind {
    /// Frames move through vmm's device threads (readv/writev on the TAP).
    Tap,
    /// The host kernel's vhost-net moves them; vmm only relays interrupts.
    VhostNet,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    pub kind: BackendKind,
    /// The TAP interface, as TUNGETIFF reports it.
    pub ifname: String,
    pub queue_pairs: u16,
    pub vnet_hdr_len: u16,
    /// TUN_F_* flags last set with TUNSETOFFLOAD.
    pub offloads: u32,
    /// Index, in the fd list sent beside the state, of each pair's TAP fd.
    pub tap_fds: Vec<usize>,
}

/// A backend of the net device.
pub trait NetBackend: Send {
    fn state(&self) -> BackendState;
    fn queue_pairs(&self) -> u16;
    /// Frame I/O of queue pair `pair`.
    fn frame_io(&self, pair: usize) -> Option<Arc<dyn FrameIo>>;
    /// Feature bits the backend can serve, out of `offered`.
    fn filter_features(&self, offered: u64) -> u64 {
        offered
    }
    /// Apply the offloads the driver acked (TUNSETOFFLOAD).
    fn set_offload(&mut self, acked_features: u64) -> io::Result<()>;
    /// A backend whose rings the kernel serves (vhost-net).
    fn kernel_datapath(&mut self) -> Option<&mut dyn KernelDatapath> {
        None
    }
}

/// A datapath in the kernel: vmm hands it the rings and gets them back.
pub trait KernelDatapath: Send {
    /// Starts serving `rings` (rx, tx per pair, in queue order).
    fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        rings: &[VringSetup<'_>],
    ) -> Result<(), VhostError>;
    /// Stops serving; returns each ring's next available index.
    fn stop(&mut self) -> Result<Vec<u16>, VhostError>;
}
