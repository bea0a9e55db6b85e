//! What the net device needs from where its frames go: per queue pair a
//! `FrameIo` (a TAP queue fd, `net_datapath::frame_io`) and offload
//! control, or an external datapath that takes the rings over (the
//! kernel's vhost-net, or a vhost-user backend process). `BackendState`
//! describes a backend for migration (part of the net device's state,
//! saved through its `Persist`); its fds travel beside the RON, referenced
//! by index.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

pub use net_datapath::FrameIo;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};
use vhost::VhostUserMemoryRegionInfo;
use virtio_queue::Queue;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::super::GuestMemory;
use crate::persist::Format10PartVersion;

/// One ring to hand to an external datapath, with the eventfds the
/// driver's notifications arrive on (kick) and its completions leave on
/// (call).
pub struct VringSetup<'a> {
    pub queue: &'a Queue,
    pub kick: &'a Arc<EventFd>,
    pub call: &'a Arc<EventFd>,
}

/// The queue pairs behind `rings` (rx, tx per pair, in queue order): the
/// driver sets up pairs in order, a driver without MQ one. At least one
/// and at most `max_pairs`.
pub fn ring_pairs(rings: &[VringSetup<'_>], max_pairs: usize) -> Result<usize, DatapathError> {
    let pairs = rings.len() / 2;
    if !rings.len().is_multiple_of(2) || pairs == 0 || pairs > max_pairs {
        return Err(DatapathError::Rings(format!(
            "{} rings for {max_pairs} pairs",
            rings.len()
        )));
    }
    Ok(pairs)
}

/// Guest RAM as a vhost memory table: each region's guest address, size
/// and this process's mapping, with the file (the RAM memfd) and offset
/// behind it (vhost-user sends those; the kernel's vhost-net ignores them).
pub fn memory_table(mem: &GuestMemory) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            mmap_offset: r.file_offset().map_or(0, |f| f.start()),
            mmap_handle: r.file_offset().map_or(-1, |f| f.file().as_raw_fd()),
        })
        .collect()
}

/// An external datapath refused the rings or could not give them back.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{op} (ring set {pair}): {err}")]
    Vhost {
        op: &'static str,
        pair: usize,
        err: vhost::Error,
    },
    #[error("ring layout: {0}")]
    Rings(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum BackendKind {
    /// Frames move through vmm's device threads (readv/writev on the TAP).
    Tap,
    /// The host kernel's vhost-net moves them; vmm only relays interrupts.
    VhostNet,
    /// A vhost-user backend process moves them; vmm relays interrupts and
    /// keeps the connection (it travels beside the state on migration).
    VhostUser,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    pub kind: BackendKind,
    /// The TAP interface, as TUNGETIFF reports it (empty for vhost-user:
    /// the TAP is the backend's).
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
    /// A backend whose rings something else serves (vhost-net, vhost-user).
    fn external_datapath(&mut self) -> Option<&mut dyn ExternalDatapath> {
        None
    }
    /// The link as the guest sees it (VIRTIO_NET_S_LINK_UP): a vhost-user
    /// backend's is down while its process is away.
    fn link_up(&self) -> bool {
        true
    }
    /// A vhost-user backend's connection, duplicated for a migration
    /// target; `None` when there is none (not vhost-user, or the backend is
    /// away).
    fn dup_connection(&self) -> Option<io::Result<std::os::fd::OwnedFd>> {
        None
    }
    /// A vhost-user NIC's connection, for `vmctl status`.
    fn connection_status(&self) -> Option<common::api::VhostUserStatus> {
        None
    }
}

/// A datapath outside the device threads: vmm hands it the rings and gets
/// them back.
pub trait ExternalDatapath: Send {
    /// Starts serving `rings` (rx, tx per pair, in queue order).
    fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        rings: &[VringSetup<'_>],
    ) -> Result<(), DatapathError>;
    /// Stops serving; returns each ring's next available index.
    fn stop(&mut self) -> Result<Vec<u16>, DatapathError>;
    /// A datapath in another process: its connection, which the relay
    /// thread watches and re-establishes.
    fn remote(&self) -> Option<Arc<dyn RemoteDatapath>> {
        None
    }
}

/// The connection to a datapath in another process, as the relay thread
/// sees it. Called only while the rings are handed over (between `start`
/// and `stop`).
pub trait RemoteDatapath: Send + Sync {
    /// The connection to watch, with a number that changes with every new
    /// connection (an fd number can be reused); `None` while down.
    fn watch(&self) -> Option<(u64, RawFd)>;
    /// The watched fd woke: false when the peer is gone (the connection is
    /// then dropped and the link is down).
    fn check(&self) -> bool;
    /// Connects again and hands the rings over; true when the link is up.
    fn reconnect(&self) -> bool;
    /// The driver uses queue pairs `0..n` (VQ_PAIRS_SET, or a restored
    /// device's count before `start`): only their rings are enabled, now
    /// and on every later hand-over. True when done (or to be done on the
    /// next connection).
    fn set_active_pairs(&self, n: u16) -> bool;
}
