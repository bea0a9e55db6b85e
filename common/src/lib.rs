//! Shared by netd, vmm and vmctl: the frame codec and the three protocols
//! carried over it (netd requests, the control API, and the migration stream).

pub mod api;
pub mod codec;
pub mod migration;
pub mod netd;
