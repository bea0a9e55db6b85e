//! The local live-migration protocol: a source vmm hands a running guest to
//! a fresh target vmm on the same host over a UNIX stream socket, with the
//! shared frame codec ([`crate::codec`]). Guest RAM is a memfd both
//! processes map, so no page is copied; the TAP queue fds move with
//! SCM_RIGHTS (backend transfer) and netd is never asked. Who runs the
//! guest is decided by one atomic word in a shared page
//! ([`crate::ownership`]), never by which messages arrived.
//!
//! ```text
//!  source vmm (running guest)                      target vmm (--incoming PATH)
//!  ─────────────────────────                       ───────────────────────────
//!                                                  sandboxed, VM shell, vCPU and
//!                                                  device threads parked, listening
//!  connect; SO_PEERCRED: the target must run       accept: SO_PEERCRED uid must be
//!  as this vmm's uid, else nothing is sent         its own (or root), else refused
//!  Hello{versions, shape, fds}  + [memfd (sealed), owner page (sealed, Offered),
//!                                  TAP fds…, API listener?]
//!                               ─────────────────► check versions and shape, map the
//!                                                  memfd, register RAM with KVM,
//!                                                  check every fd; stop listening
//!                               ◄───────────────── Ready | Refused{reason}
//!  ── guest still running up to here: a refusal costs it nothing ──
//!  the target rehearses the restore on its own state (runs warm later)
//!  stop answering the API; pause vCPUs and device threads (frames wait
//!  in the TAP)
//!  ── from here every step must end by pause + downtime limit ──
//!  State(machine state, one RON document): the commit
//!                               ─────────────────► restore into the pre-built VM,
//!                                                  owner page: take() (CAS)
//!                                                  won: Resumed, then vCPUs and
//!                                                  devices run, the API is served
//!                                                  lost: exit 1, never runs the guest
//!                               ◄───────────────── Resumed{timeline} | Failed{reason}
//!  reply to vmctl, exit 0
//! ```
//!
//! Any failure, a dead or silent target, or the downtime limit passing:
//! the source takes the guest back with `take_back()` (CAS) and, if it
//! wins, resumes it on its own fds. If it loses, the target owns the
//! guest: the source exits 0 if the target lives, or says in one line
//! that the owner died with the guest. There is no separate Commit
//! message since protocol 3: the ownership word is the commit, and a
//! round trip fewer is a shorter pause. A protocol 1 or 2 source (releases
//! 0.1.0, 0.2.0) still gets `Loaded` after its State and sends `Commit`.
//!
//! Versions: a target accepts a source of protocol [`MIGRATION_PROTOCOL_VERSION`]
//! or any back to [`OLDEST_SOURCE_PROTOCOL`] (protocol 1, release 0.1.0,
//! has no owner page and sends an unsealed memfd: its Commit alone hands
//! the guest over). A target of an older protocol cannot parse a newer
//! Hello and closes the connection before the pause. The machine state's
//! [`FormatVersion`] must have the same major, and a minor no newer than
//! the target's; the target says so in Refused while the source runs.

use serde::{Deserialize, Serialize};

/// The protocol this build speaks as a source.
pub const MIGRATION_PROTOCOL_VERSION: u32 = 3;
/// The oldest source protocol a target accepts (release 0.1.0's).
pub const OLDEST_SOURCE_PROTOCOL: u32 = 1;

/// How long the guest may stay paused by a migration before the source
/// takes it back (`vmctl migrate --downtime-limit-ms`).
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 1000;
/// The largest downtime limit a migration accepts.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 60_000;

/// Cap on one frame: the machine state document (a few hundred KiB with
/// several vCPUs and NICs) and a frame that carries a frame in flight.
pub const MIGRATION_MAX_FRAME: usize = 8 << 20;

/// Most fds a Hello may carry: the memfd, the TAP queues of every NIC,
/// the API socket.
pub const MIGRATION_MAX_FDS: usize = crate::codec::MAX_FDS;

/// Version of the machine state document (`vmm::persist::MachineState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatVersion {
    pub major: u16,
    pub minor: u16,
}

impl FormatVersion {
    /// Whether a reader of `self` can load a document written as `written`:
    /// same major, and not newer.
    pub fn can_read(self, written: FormatVersion) -> bool {
        written.major == self.major && written.minor <= self.minor
    }
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One guest RAM region: where the guest sees it, how long it is, and
/// where it starts in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub memfd_offset: u64,
}

/// One NIC as both sides must agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetShape {
    pub id: String,
    pub mac: [u8; 6],
    pub queues: u16,
    pub vhost: bool,
    /// The datapath is a vhost-user backend; its connection travels as
    /// [`FdRole::VhostUser`] (when connected). Since 0.3.0; absent for a
    /// TAP NIC, so their Hello is unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost_user: bool,
}

/// What the target must have been started with to take the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineShape {
    pub memory_bytes: u64,
    pub ram: Vec<RamRegion>,
    pub vcpus: u8,
    pub nets: Vec<NetShape>,
}

/// What each fd beside [`SourceMsg::Hello`] is, in order. The state
/// document refers to them by their index in this list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum FdRole {
    /// The guest RAM memfd.
    GuestRam,
    /// One queue of a NIC's TAP (backend transfer).
    TapQueue { net: String, queue: u16 },
    /// The source's listening API socket; a target started without
    /// `--api-socket` serves it (the path keeps answering), others close it.
    ApiListener,
    /// The ownership page of this migration ([`crate::ownership`]);
    /// protocol 2 on.
    OwnerPage,
    /// A vhost-user NIC's connection to its backend (since 0.3.0). Absent
    /// when the backend was away at the Hello: the target connects then.
    VhostUser { net: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum SourceMsg<S> {
    Hello {
        protocol: u32,
        format: FormatVersion,
        vmm_version: String,
        shape: MachineShape,
        /// TAP fds come along (true) or the target uses its own (the
        /// classic path: a new TAP from netd, announced with RARP).
        backend_transfer: bool,
        /// The guest's vCPUs were paused by the user before the migration:
        /// the target keeps them paused.
        paused: bool,
        fds: Vec<FdRole>,
    },
    /// The machine state, sent after the pause.
    State(S),
    /// The guest is the target's from now on.
    Commit,
    /// The source gives up (and resumes the guest itself).
    Abort { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum TargetMsg {
    /// The target is prepared: RAM mapped and registered, fds checked.
    Ready {
        vmm_version: String,
        /// The target was started without `--api-socket` and serves the
        /// source's listening socket from now on: the source must leave
        /// the path in place when it exits.
        takes_api_socket: bool,
    },
    Refused {
        reason: String,
    },
    /// The state is restored into the target's VM; nothing runs yet.
    Loaded {
        /// Microseconds the target spent decoding and restoring.
        restore_us: u64,
    },
    Failed {
        reason: String,
    },
    /// The target owns the guest and its vCPUs run (or stay parked for a
    /// paused guest).
    Resumed {
        /// CLOCK_MONOTONIC, in ns, when the target released its vCPUs.
        /// Informational: a source measures the downtime on its own clock.
        at_ns: u64,
        /// The target's moments of the switch-over (protocol 3 on; never
        /// sent to an older source, which refuses unknown fields).
        #[serde(default, skip_serializing_if = "Timeline::is_empty")]
        timeline: Timeline,
    },
}

/// The marks of a timeline that something reads back (the source's
/// phases, bench_migrate); the others are for people.
pub mod marks {
    pub const STATE_SENT: &str = "source: state sent";
    pub const RESUMED_RECEIVED: &str = "source: resumed received";
    pub const MESSAGE_RECEIVED: &str = "target: message received";
    pub const STATE_RESTORED: &str = "target: state restored";
    /// The target's last moment before it wakes its vCPUs.
    pub const SENDING_RESUMED: &str = "target: sending resumed";
}

/// Named moments of one side of a switch-over, CLOCK_MONOTONIC in ns.
/// Informational: reported, never acted on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline(pub Vec<(String, u64)>);

impl Timeline {
    pub fn mark(&mut self, what: &str) {
        self.0.push((what.to_string(), monotonic_ns()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock both processes share on one
/// host, for the downtime (source pause → target resume).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_compatibility_rules() {
        let me = FormatVersion { major: 1, minor: 2 };
        assert!(me.can_read(FormatVersion { major: 1, minor: 0 }));
        assert!(me.can_read(FormatVersion { major: 1, minor: 2 }));
        assert!(!me.can_read(FormatVersion { major: 1, minor: 3 }));
        assert!(!me.can_read(FormatVersion { major: 2, minor: 0 }));
        assert!(!me.can_read(FormatVersion { major: 0, minor: 9 }));
    }

    #[test]
    fn messages_round_trip_and_refuse_unknown_fields() {
        let m: SourceMsg<()> = SourceMsg::Abort { reason: "x".into() };
        let t = ron::to_string(&m).unwrap();
        assert_eq!(ron::from_str::<SourceMsg<()>>(&t).unwrap(), m);
        let bad = "Ready(vmm_version: \"1\", takes_api_socket: false, extra: 1)";
        assert!(ron::from_str::<TargetMsg>(bad).is_err());
    }
}
