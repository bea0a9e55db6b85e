//! The virtio-net datapath, shared by the vmm's in-process device and the
//! vhost-user-net backend process: frames between virtqueues in guest
//! memory and TAP queue fds. Nothing here knows KVM, the virtio transport
//! or how the guest is interrupted; every value read from guest memory is
//! untrusted.
//!
//! - [`counters`]: per-queue-pair counters, owned by the pair's worker and
//!   published once per batch;
//! - [`features`]: the virtio feature bits it serves;
//! - [`frame_io`]: one frame per read or write, scattered into or gathered
//!   from guest memory (`FrameIo`, `IoVecs`);
//! - [`tap`]: a checked TAP queue fd as a `FrameIo`, and the offloads;
//! - [`datapath`]: rx (with merged buffers), tx and the control queue over
//!   a `virtio_queue::Queue`;
//! - [`queue_pair`]: serving a ring when its event fires, telling the
//!   driver through a [`queue_pair::Notify`] (the vmm's interrupt, a
//!   vhost-user call eventfd).
//! - `testing` and `fuzz` (feature `testing`): a socketpair in place of a
//!   TAP queue, and a hostile driver for whatever serves the rings.

pub mod counters;
pub mod datapath;
pub mod features;
pub mod frame_io;
#[cfg(any(test, feature = "testing"))]
pub mod fuzz;
pub mod queue_pair;
pub mod tap;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use datapath::{MAX_FRAME_LEN, NetStats, QueueFault, VNET_HDR_LEN};
pub use frame_io::{Dest, FrameIo, IOV_MAX, IoVecs, Src};
pub use tap::TapQueue;

/// Guest memory as the datapath sees it: the guest's RAM regions mapped
/// into this process (shared, from the guest's memfd).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
