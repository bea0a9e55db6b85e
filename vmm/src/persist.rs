//! The machine state document and its one version: what a local migration
//! sends as RON after the pause. Its parts are defined beside their owners,
//! each of which implements [`Persist`] there (one `save`/`restore` pair per
//! component: [`crate::vm::Vm`], [`crate::vcpu::Vcpu`], the serial port,
//! the virtio-mmio transport, the net device and its attachment);
//! [`crate::machine::Machine`] saves and restores them in order.
//!
//! Versioning: the document carries one [`FormatVersion`]
//! ([`MACHINE_STATE_FORMAT`]); its parts carry none. A reader takes the same
//! major and any minor up to its own ([`FormatVersion::can_read`]); a field
//! added in a minor carries `#[serde(default)]`, a field dropped in a minor
//! stays readable (as [`Format10PartVersion`] does). Every struct and enum of
//! the document denies unknown fields, so a document of a newer minor is
//! refused as such, not half read. Every released format has a RON fixture
//! under `tests/fixtures/`, captured from a real source; the tests load and
//! restore each.
//!
//! | format | written by | change |
//! |--------|------------|--------|
//! | 1.0 | v0.1.0 | first |
//! | 1.1 | v0.2.0 | the per-part `version: 1` fields are no longer written |
//! | 1.2 | v0.3.0 development | a vCPU's registers, special registers, events, debug registers, XCRs, MP state and CPUID are hex strings (`kvm_blob`): a third of the decoding time |
//! | 1.3 | v0.3.0 | several vCPUs: each names the APIC ID the guest knows it by (`apic_id`; absent in older documents, where the one vCPU is ID 0), and a restore refuses a vCPU's state in another's slot |
//! | 1.4 | v0.3.0 | a NIC's counters, per queue pair (`net.counters`; absent in older documents, where they start at 0): the target's go on from the source's |
//!
//! fds never go into the RON: they travel beside it (SCM_RIGHTS) in the
//! order of an [`FdTable`], and the state names them by index in that table.

use common::migration::{FdRole, FormatVersion};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::devices::serial::{SerialError, SerialState};
use crate::devices::virtio::net::NetError;
use crate::net::attach::NetDeviceState;
use crate::vcpu::{VcpuError, VcpuState};
use crate::vm::{VmError, VmState};

/// The machine state format this build writes (and the newest it reads).
pub const MACHINE_STATE_FORMAT: FormatVersion = FormatVersion { major: 1, minor: 4 };

/// Symmetric save and restore of one component, implemented beside it: the
/// one way its migratable state goes out and comes back. `save` reads a
/// quiescent (paused) component; `restore` writes a saved state into a
/// freshly built, not yet running component of the same shape (a migration
/// target builds its machine exactly as a boot does, then restores into it).
///
/// A component whose state lives in the kernel or behind a lock of its own
/// (the VM fd, a NIC's shared transport) is restored through a shared
/// reference: it implements `Persist` for `&T`, as std implements `Write`
/// for `&File`.
pub trait Persist {
    type State;
    /// What both directions need besides the component: the fd table the
    /// state names fds by, KVM's capabilities.
    type Context<'a>;
    type Error;
    fn save(&self, ctx: Self::Context<'_>) -> Result<Self::State, Self::Error>;
    fn restore(&mut self, ctx: Self::Context<'_>, state: &Self::State) -> Result<(), Self::Error>;
}

/// The `version: 1` that format 1.0 wrote in each part of the document
/// (VM, vCPU, serial, transport, net device, backend, NIC), beside the
/// document's own version. Format 1.1 dropped them: each part keeps it as
/// a field `#[serde(rename = "version", default, skip_serializing)]`, so a
/// 1.0 document (a live upgrade from v0.1.0) still loads while every other
/// unknown field is still refused. Read, never written; a value other than
/// the 1 that format 1.0 always wrote is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Format10PartVersion;

impl<'de> Deserialize<'de> for Format10PartVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            1 => Ok(Format10PartVersion),
            v => Err(D::Error::custom(format!(
                "part version {v}: format 1.0 wrote only 1"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("the vCPUs must be paused to save or restore state")]
    NotPaused,
    #[error(
        "machine state format {got} cannot be read by this vmm (format {MACHINE_STATE_FORMAT}): {why}"
    )]
    Format {
        got: FormatVersion,
        why: &'static str,
    },
    #[error("state has {got} vCPUs, this VM {expected}")]
    VcpuCount { expected: usize, got: usize },
    #[error("state is for {got} bytes of RAM, this VM has {expected}")]
    MemorySize { expected: u64, got: u64 },
    #[error("state has {got} NICs, this VM {expected}")]
    NetCount { expected: usize, got: usize },
    #[error("serial: {0}")]
    Serial(#[from] SerialError),
    #[error("RON: {0}")]
    Ron(String),
    #[error("net {id}: {err}")]
    Net { id: String, err: NetError },
}

/// The fds that travel beside a machine state, in order; the state refers
/// to each by its index here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdTable {
    pub roles: Vec<FdRole>,
}

impl FdTable {
    /// Adds `role` and returns its index.
    pub fn push(&mut self, role: FdRole) -> usize {
        self.roles.push(role);
        self.roles.len() - 1
    }

    /// The index of `role`, if present.
    pub fn index_of(&self, role: &FdRole) -> Option<usize> {
        self.roles.iter().position(|r| r == role)
    }

    /// The index of TAP queue `queue` of NIC `net`.
    pub fn tap_queue(&self, net: &str, queue: u16) -> Option<usize> {
        self.index_of(&FdRole::TapQueue {
            net: net.to_string(),
            queue,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    pub format: FormatVersion,
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    /// virtio-net devices in slot order (their TAP fds travel beside).
    pub nets: Vec<NetDeviceState>,
}

/// Checks that this build can read a document of `got`.
pub fn check_format(got: FormatVersion) -> Result<(), PersistError> {
    if MACHINE_STATE_FORMAT.can_read(got) {
        return Ok(());
    }
    let why = if got.major != MACHINE_STATE_FORMAT.major {
        "another major version"
    } else {
        "it is newer: upgrade the target vmm"
    };
    Err(PersistError::Format { got, why })
}

impl MachineState {
    pub fn to_ron(&self) -> Result<String, PersistError> {
        ron::to_string(self).map_err(|e| PersistError::Ron(e.to_string()))
    }

    /// Parses a document. One of another format is reported as such (not
    /// as an unknown field): its header is read when the whole fails.
    pub fn from_ron(text: &str) -> Result<Self, PersistError> {
        match ron::from_str::<MachineState>(text) {
            Ok(s) => {
                check_format(s.format)?;
                Ok(s)
            }
            Err(e) => {
                #[derive(Deserialize)]
                struct Header {
                    format: FormatVersion,
                }
                // Ignores all fields but `format`.
                if let Ok(h) = ron::from_str::<Header>(text) {
                    check_format(h.format)?;
                }
                Err(PersistError::Ron(e.to_string()))
            }
        }
    }
}

/// Every released state format and its fixture (see
/// `tests/fixtures/README.md` for how one is captured).
#[cfg(test)]
pub(crate) const FIXTURES: &[(&str, &str)] = &[
    (
        "1.0",
        include_str!("../../tests/fixtures/machine-state-1.0.ron"),
    ),
    (
        "1.1",
        include_str!("../../tests/fixtures/machine-state-1.1.ron"),
    ),
    (
        "1.2",
        include_str!("../../tests/fixtures/machine-state-1.2.ron"),
    ),
    (
        "1.3",
        include_str!("../../tests/fixtures/machine-state-1.3.ron"),
    ),
    (
        "1.4",
        include_str!("../../tests/fixtures/machine-state-1.4.ron"),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture of the format this build writes.
    fn current() -> &'static str {
        let (v, text) = FIXTURES.last().unwrap();
        assert_eq!(*v, MACHINE_STATE_FORMAT.to_string(), "no fixture yet");
        text
    }

    fn with_format(text: &str, major: u16, minor: u16) -> String {
        let mut s = MachineState::from_ron(text).unwrap();
        s.format = FormatVersion { major, minor };
        s.to_ron().unwrap()
    }

    #[test]
    fn every_released_format_fixture_loads() {
        for (version, text) in FIXTURES {
            let s = MachineState::from_ron(text)
                .unwrap_or_else(|e| panic!("fixture {version} no longer loads: {e}"));
            assert_eq!(s.format.to_string(), *version);
            assert_eq!(s.vcpus.len(), 1);
            assert_eq!(s.nets.len(), 1, "the fixtures carry a NIC");
            assert_eq!(s.nets[0].net.backend.tap_fds, vec![1]);
        }
        assert!(FIXTURES[0].1.contains("vm:(version:1,"));
    }

    /// What the target's State reader (the codec's compact reader) makes
    /// of `text`, re-encoded; `None` when it leaves the text to `ron`.
    fn read_compact(text: &str) -> Option<String> {
        let s = common::codec::decode_compact::<MachineState>(text)?;
        Some(s.to_ron().unwrap())
    }

    fn read_by_ron(text: &str) -> Option<String> {
        let s = ron::from_str::<MachineState>(text).ok()?;
        Some(s.to_ron().unwrap())
    }

    /// A migration's State goes through the codec's compact reader (a
    /// quarter of `ron`'s time, inside the pause): it must take every
    /// released format's state as a source writes it, and make of it
    /// what `ron` makes.
    #[test]
    fn the_compact_reader_reads_every_state_as_ron_does() {
        use common::migration::SourceMsg;
        for (version, text) in FIXTURES {
            let state = MachineState::from_ron(text).unwrap();
            let expected = state.to_ron().unwrap();
            let sent = common::codec::encode_unescaped(&SourceMsg::State(&state)).unwrap();
            let got = common::codec::decode_compact::<SourceMsg<MachineState>>(&sent);
            let Some(SourceMsg::State(got)) = got else {
                panic!("format {version}: the compact reader refused the State");
            };
            assert_eq!(got.to_ron().unwrap(), expected, "format {version}");
            // The fixture as captured, where the compact reader takes it
            // (the older formats' named-field structs it leaves to `ron`).
            if let Some(got) = read_compact(text) {
                assert_eq!(got, expected, "fixture {version}");
            }
        }
    }

    /// Every one-character change to the current fixture (in steps over
    /// its hex, character by character around its structure): where the
    /// compact reader still accepts the text, `ron` reads the same state.
    #[test]
    fn the_compact_reader_never_reads_a_damaged_state_otherwise_than_ron() {
        let text = current();
        let (mut accepted, mut refused) = (0, 0);
        let mut at = 0;
        while at < text.len() {
            for with in ["", "0", "9", "a", "\"", ",", ")", "(", "-", ":", "\\", "N"] {
                let damaged = format!("{}{with}{}", &text[..at], &text[at + 1..]);
                match read_compact(&damaged) {
                    Some(got) => {
                        accepted += 1;
                        assert_eq!(Some(got), read_by_ron(&damaged), "changed at {at}");
                    }
                    None => refused += 1,
                }
            }
            let in_hex = text.as_bytes()[at].is_ascii_hexdigit()
                && text
                    .as_bytes()
                    .get(at + 1)
                    .is_some_and(u8::is_ascii_hexdigit);
            at += if in_hex { 61 } else { 1 };
        }
        assert!(
            accepted > 100 && refused > 1000,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn this_format_writes_no_part_version() {
        let s = MachineState::from_ron(FIXTURES[0].1).unwrap();
        let text = s.to_ron().unwrap();
        assert!(!text.contains("version:"), "{}", &text[..200]);
        assert!(!current().contains("version:"));
    }

    #[test]
    fn a_part_version_other_than_format_1_0_wrote_is_refused() {
        let text = FIXTURES[0]
            .1
            .replacen("vm:(version:1,", "vm:(version:2,", 1);
        assert_ne!(text, FIXTURES[0].1);
        let e = MachineState::from_ron(&text).err().unwrap().to_string();
        assert!(e.contains("format 1.0 wrote only 1"), "{e}");
    }

    #[test]
    fn unknown_fields_are_refused_at_every_level() {
        let anchors = [
            "memory_bytes:",
            "vm:(",
            "vcpus:[(",
            "serial:(",
            "nets:[(",
            "mmio:(",
            "net:(",
            "backend:(",
            "slot:(",
            "queues:[((",
        ];
        for text in [FIXTURES[0].1, current()] {
            for a in anchors {
                let with = if a == "memory_bytes:" {
                    format!("future_field:1,{a}")
                } else {
                    format!("{a}future_field:1,")
                };
                let bad = text.replacen(a, &with, 1);
                assert_ne!(bad, text, "{a} not in the fixture");
                let e = MachineState::from_ron(&bad).err();
                assert!(
                    matches!(&e, Some(PersistError::Ron(m)) if m.contains("future_field")),
                    "{a}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn format_rules_same_major_older_or_equal_minor() {
        let text = current();
        let (major, minor) = (MACHINE_STATE_FORMAT.major, MACHINE_STATE_FORMAT.minor);
        let newer = MachineState::from_ron(&with_format(text, major, minor + 1));
        let e = newer.err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
        let other = MachineState::from_ron(&with_format(text, major + 1, 0));
        let e = other.err().unwrap().to_string();
        assert!(e.contains("another major"), "{e}");
        assert!(MachineState::from_ron(&with_format(text, major, minor)).is_ok());
        assert!(MachineState::from_ron(&with_format(text, major, 0)).is_ok());
        // A newer document is named as such even when it has fields this
        // build does not know, at the top or in a part.
        for (at, field) in [("memory_bytes:", "future_field:1,"), ("vm:(", "")] {
            let t = with_format(text, major, minor + 1);
            let t = if field.is_empty() {
                t.replacen(at, "vm:(future_field:1,", 1)
            } else {
                t.replacen(at, &format!("{field}{at}"), 1)
            };
            let e = MachineState::from_ron(&t).err().unwrap().to_string();
            assert!(e.contains("newer"), "{e}");
        }
    }
}
