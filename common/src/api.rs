//! The control API of a running vmm (`--api-socket`), spoken by `vmctl`.
//!
//! One request, one response per connection is enough for every command, but
//! the server also accepts several requests on one connection. The first
//! frame must be [`ApiRequest::Hello`] with [`API_VERSION`].
//!
//! Only the vmm's own uid and root may connect (the socket is created 0600
//! and the server checks SO_PEERCRED). A request carries no fds; unknown
//! fields and well-formed RON of another type are answered with
//! [`ApiResponse::Error`]. Each connection has an overall deadline.

use serde::{Deserialize, Serialize};

pub const API_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ApiRequest {
    Hello {
        version: u32,
    },
    Status,
    /// Stops every vCPU (kicked out of KVM_RUN and parked) and the devices.
    Pause,
    Resume,
    /// Stops the VM; vmm exits 0 as if the guest had powered off.
    Shutdown,
    /// Local live migration to a target vmm listening on `to` (`--incoming`).
    Migrate {
        to: String,
        backend_transfer: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Created,
    Running,
    Paused,
    ShuttingDown,
    Migrated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    pub id: String,
    pub tap: String,
    pub mac: String,
    pub queues: u16,
    pub vhost: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: RunState,
    pub pid: u32,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub uptime_ms: u64,
    pub nets: Vec<NetStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// "ok", or the reason the migration failed (the source then resumed).
    pub result: String,
    /// Source vCPU pause to target vCPU resume.
    pub downtime_us: u64,
    pub total_us: u64,
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub backend_transfer: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiResponse {
    Hello { version: u32 },
    Ok,
    Status(VmStatus),
    Migrated(MigrationReport),
    Error { message: String },
}
