//! virtio-net: the device (features, config, activation), its datapath over
//! virtqueues, the device threads, and the TAP / vhost-net / vhost-user
//! backends.

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod persist;
pub mod tap;
pub mod vhost;
pub mod vhost_user;

pub use backend::{BackendKind, BackendState, FrameIo, NetBackend};
pub use device::{NetDevice, NetError};
/// The datapath itself, and its counters, live in the `net-datapath`
/// crate, shared with the vhost-user-net backend.
pub use net_datapath::{NetStats, counters, datapath};
pub use persist::NetState;
pub use tap::Tap;
pub use vhost::VhostNetBackend;
pub use vhost_user::VhostUserNet;

use std::os::fd::OwnedFd;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("TAP: {0}")]
    Tap(#[from] tap::TapError),
    #[error("vhost-net: {0}")]
    Vhost(#[from] vhost::VhostError),
}

/// The backend for the fds of TAP `tap` (netd's `NetdResponse::Tap`, or a
/// migration source's): the TAP queue fds, then (when vhost was granted)
/// one vhost-net fd per queue.
pub fn backend_from_fds(
    tap: &str,
    tap_fds: Vec<OwnedFd>,
    vhost_fds: Vec<OwnedFd>,
) -> Result<Box<dyn NetBackend>, BackendError> {
    let tap = Tap::from_fds(tap, tap_fds)?;
    if vhost_fds.is_empty() {
        return Ok(Box::new(tap));
    }
    let files = vhost_fds.into_iter().map(std::fs::File::from).collect();
    Ok(Box::new(VhostNetBackend::new(tap, files)?))
}
