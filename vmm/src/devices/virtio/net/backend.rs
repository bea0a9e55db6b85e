//! What the net device needs from where its frames go: per queue pair a
//! `FrameIo` (a TAP queue fd), offload control, and for vhost-net a kernel
//! datapath that takes the rings over. `BackendState` describes a backend
//! for migration; its fds travel beside the RON, referenced by index.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::super::GuestMemory;
use super::vhost::{VhostError, VringSetup};

/// One queue pair's frames, each read or written whole, vnet header first.
/// Non-blocking: `read_frame` fails with `WouldBlock` when nothing is queued.
pub trait FrameIo: AsRawFd + Send + Sync {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
    /// Attach (`true`) or detach this queue from a multiqueue device, so
    /// the kernel steers no frame to a queue the driver does not serve.
    fn set_enabled(&self, on: bool) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendKind {
    /// Frames move through vmm's device threads (readv/writev on the TAP).
    Tap,
    /// The host kernel's vhost-net moves them; vmm only relays interrupts.
    VhostNet,
}

pub const BACKEND_STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendState {
    pub version: u32,
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
