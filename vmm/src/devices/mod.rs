//! Emulated devices. Each device keeps its migratable state in a versioned
//! serde struct beside its code.

pub mod bus;
pub mod power;
pub mod serial;
pub mod virtio;
