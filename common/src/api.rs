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
        /// Longest the guest may stay paused before the source takes it
        /// back, in ms (`common::migration::DEFAULT_DOWNTIME_LIMIT_MS` when
        /// absent; left out of the frame then, so a 0.1.0 vmm still reads it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_limit_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Created,
    Running,
    Paused,
    ShuttingDown,
    /// A migration holds the machine (vCPUs stopped while it sends).
    Migrating,
    Migrated,
}

/// One NIC. Fields added after 0.2.0 carry `#[serde(default)]` (a newer
/// vmctl reads an older vmm's status); an older vmctl skips them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStatus {
    pub id: String,
    pub tap: String,
    pub mac: String,
    pub queues: u16,
    pub vhost: bool,
    /// The NIC's counters: the sum of `queue_counters`. Since 0.3.0
    /// (`None` from an older vmm).
    #[serde(default)]
    pub counters: Option<NetCounters>,
    /// Each queue pair's counters, in pair order. Since 0.3.0.
    #[serde(default)]
    pub queue_counters: Vec<NetCounters>,
    /// What the counters leave out, when they do: with vhost-net the
    /// kernel moves the frames. Since 0.3.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters_note: Option<String>,
    /// A vhost-user NIC's connection to its backend. Since 0.3.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<VhostUserStatus>,
}

/// A vhost-user NIC's connection to its backend process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserStatus {
    /// The backend's socket.
    pub socket: String,
    /// Connected and serving the rings; false while the vmm reconnects.
    pub connected: bool,
    /// Connections made since the NIC was created in this process (the
    /// first included); more than one means the backend was restarted.
    pub connections: u64,
    /// Why the last connection ended or the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A NIC's (or one queue pair's) counters since it was created; a
/// migrated NIC's go on from its source's. rx is towards the guest, tx
/// from it; bytes are Ethernet frame bytes (the vnet header left out), as
/// the TAP's own statistics count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: NetDrops,
    /// Used-buffer notifications (interrupts) sent to the guest.
    pub interrupts: u64,
    /// Used-buffer notifications left out because the driver's
    /// `used_event` said it did not need them yet (EVENT_IDX).
    pub interrupts_saved_by_event_idx: u64,
}

/// Frames and buffers dropped, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetDrops {
    /// Frames from the TAP that the guest's rx buffers could not hold.
    pub no_rx_buffer: u64,
    /// Unusable frames read from the TAP (shorter than a vnet header, too
    /// long to assemble).
    pub rx_tap_errors: u64,
    /// Guest frames the TAP refused (write failed).
    pub tx_tap_errors: u64,
    /// Chains the device could not use (wrong direction, outside guest
    /// memory, too short or long, a loop), returned to the driver empty:
    /// on the rx, tx and control queues.
    pub rx_bad_chains: u64,
    pub tx_bad_chains: u64,
    pub ctrl_bad_chains: u64,
}

impl NetDrops {
    pub fn total(&self) -> u64 {
        self.no_rx_buffer
            + self.rx_tap_errors
            + self.tx_tap_errors
            + self.rx_bad_chains
            + self.tx_bad_chains
            + self.ctrl_bad_chains
    }
}

/// Fields added after 0.1.0 carry `#[serde(default)]`, so a newer vmctl
/// still reads an older vmm's status (they are `None` then); an older
/// vmctl skips fields it does not know (no `deny_unknown_fields` here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub state: RunState,
    pub pid: u32,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub uptime_ms: u64,
    pub nets: Vec<NetStatus>,
    /// The answering vmm's version (x.y.z); since 0.2.0.
    #[serde(default)]
    pub version: Option<String>,
    /// The machine state format it writes ("major.minor"); since 0.2.0.
    #[serde(default)]
    pub format: Option<String>,
    /// Each vCPU, in index order; since 0.3.0.
    #[serde(default)]
    pub vcpu_list: Option<Vec<VcpuStatus>>,
}

/// One vCPU as `vmctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    pub id: u8,
    /// What the guest's firmware tables call it.
    pub apic_id: u32,
    pub run: VcpuRun,
    /// As last seen by its thread (an exit, a wake-up, a pause's save).
    pub mp_state: VcpuMpState,
}

/// A vCPU's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VcpuRun {
    Running,
    /// Parked: the VM is paused, migrating, or not started yet.
    Paused,
    /// The VM is ending, or the vCPU failed.
    Ended,
}

/// KVM's MP state of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VcpuMpState {
    Runnable,
    Halted,
    /// An application processor the guest has not started (no INIT yet).
    WaitingForInit,
    /// INIT received, waiting for the guest's SIPI.
    WaitingForSipi,
    SipiReceived,
    /// A state this vmm has no name for (KVM's number).
    Other(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// "ok", or the reason the migration failed (the source then resumed,
    /// unless the failure came after the commit: then the guest is lost).
    pub result: String,
    /// Source vCPU pause to target vCPU resume (CLOCK_MONOTONIC of both
    /// processes), 0 when the guest never paused.
    pub downtime_us: u64,
    /// vmctl's request to the reply.
    pub total_us: u64,
    pub memory_bytes: u64,
    /// Bytes of the machine state document.
    pub state_bytes: u64,
    /// fds sent with SCM_RIGHTS (memfd, TAP queues, API socket).
    pub fds_passed: u32,
    pub backend_transfer: bool,
    /// The phases, in microseconds.
    pub phases: MigrationPhases,
}

/// Where a migration's time went (microseconds). `pause` to `resume` make
/// up the downtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPhases {
    /// Connecting to the target.
    pub connect_us: u64,
    /// Hello sent to Ready received: the target maps RAM and builds the
    /// machine while the guest runs.
    pub prepare_us: u64,
    /// Stopping vCPUs and device threads.
    pub pause_us: u64,
    /// Reading the state and encoding it as RON.
    pub save_us: u64,
    /// State sent to the target having restored it.
    pub load_us: u64,
    /// Of that, the target receiving, decoding and restoring.
    pub restore_us: u64,
    /// The target's restore to its Resumed received: it takes the guest,
    /// starts the devices, answers, then wakes its vCPUs.
    pub resume_us: u64,
    /// The switch-over moment by moment, from both processes (one
    /// CLOCK_MONOTONIC): where the downtime went. Since 0.3.0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<PhaseMark>,
}

/// One moment of a migration's switch-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseMark {
    /// "source: vcpus parked", "target: state decoded", ...
    pub what: String,
    /// Microseconds after the source began to pause the guest.
    pub at_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiResponse {
    Hello { version: u32 },
    Ok,
    Status(VmStatus),
    Migrated(MigrationReport),
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as a 0.1.0 vmm sends it (checked below against 0.1.0's
    /// declaration).
    const STATUS_0_1_0: &str = r#"Status((state:Running,pid:42,vcpus:1,memory_bytes:268435456,uptime_ms:7,nets:[(id:"vm0",tap:"vm0",mac:"52:54:00:00:00:02",queues:1,vhost:false)]))"#;

    /// VmStatus, NetStatus and the response as 0.1.0 declared them.
    #[derive(Debug, Serialize, Deserialize)]
    struct OldStatus {
        state: RunState,
        pid: u32,
        vcpus: u8,
        memory_bytes: u64,
        uptime_ms: u64,
        nets: Vec<OldNet>,
    }
    #[derive(Debug, Serialize, Deserialize)]
    struct OldNet {
        id: String,
        tap: String,
        mac: String,
        queues: u16,
        vhost: bool,
    }
    #[derive(Debug, Serialize, Deserialize)]
    enum OldResponse {
        Status(OldStatus),
    }

    #[test]
    fn a_newer_vmctl_reads_the_status_of_a_0_1_0_vmm() {
        let OldResponse::Status(old) = ron::from_str(STATUS_0_1_0).unwrap();
        assert_eq!(
            ron::to_string(&OldResponse::Status(old)).unwrap(),
            STATUS_0_1_0
        );
        let r: ApiResponse = ron::from_str(STATUS_0_1_0).unwrap();
        let ApiResponse::Status(s) = r else {
            panic!("not a status: {r:?}")
        };
        assert_eq!((s.pid, s.version, s.format), (42, None, None));
        assert_eq!(s.nets[0].counters, None);
        assert!(s.nets[0].queue_counters.is_empty());
    }

    #[test]
    fn a_0_1_0_vmctl_reads_the_status_of_a_newer_vmm() {
        let mut old: ApiResponse = ron::from_str(STATUS_0_1_0).unwrap();
        if let ApiResponse::Status(s) = &mut old {
            s.version = Some("9.9.9".into());
            s.format = Some("1.0".into());
            let c = NetCounters {
                rx_packets: 7,
                drops: NetDrops {
                    tx_bad_chains: 3,
                    ..NetDrops::default()
                },
                ..NetCounters::default()
            };
            s.nets[0].counters = Some(c);
            s.nets[0].queue_counters = vec![c];
            s.nets[0].counters_note = Some("note".into());
        }
        let text = ron::to_string(&old).unwrap();
        assert!(text.contains("9.9.9"), "{text}");
        assert!(text.contains("tx_bad_chains:3"), "{text}");
        let OldResponse::Status(s) = ron::from_str(&text).unwrap();
        assert_eq!((s.pid, s.nets.len()), (42, 1));
        assert_eq!(s.nets[0].id, "vm0");
        // And a newer vmctl reads the counters back.
        let ApiResponse::Status(new) = ron::from_str(&text).unwrap() else {
            panic!("not a status")
        };
        assert_eq!(new.nets[0].counters.unwrap().rx_packets, 7);
        assert_eq!(new.nets[0].queue_counters[0].drops.total(), 3);
    }
}
