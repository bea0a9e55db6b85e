//! virtio-net: the device (features, config, activation), its datapath over
//! virtqueues, the device threads, and the TAP / vhost-net backends.

pub mod backend;
pub mod datapath;
pub mod device;
pub mod event_handler;
pub mod persist;
pub mod tap;
pub mod vhost;

pub use backend::{BackendKind, BackendState, FrameIo, NetBackend};
pub use device::{NetDevice, NetError};
pub use persist::NetState;
pub use tap::Tap;
pub use vhost::VhostNetBackend;
