//! The whole machine's state as one versioned serde tree (what a local
//! migration sends as RON after the pause): VM-wide KVM state, every vCPU,
//! and the devices. Each piece is defined beside its owner and implements
//! [`Persist`]; this module gathers them, restores them in the right order,
//! and owns the one format version of the whole document.
//!
//! Compatibility: a document carries its [`FormatVersion`]. A reader takes
//! the same major and any minor up to its own ([`FormatVersion::can_read`]);
//! fields added in a minor carry `#[serde(default)]`. A newer document is
//! refused with a message that says so. Every released format has a RON
//! fixture under `tests/fixtures/` that the tests load.
//!
//! fds never go into the RON: they travel beside it (SCM_RIGHTS) in the
//! order of an [`FdTable`], and the state names them by index in that table.

use std::sync::{Arc, Mutex};

use common::migration::{FdRole, FormatVersion};
use serde::{Deserialize, Serialize};

use crate::devices::serial::{SerialDevice, SerialState};
use crate::devices::virtio::net::NetError;
use crate::net::attach::{NetAttachment, NetDeviceState};
use crate::vcpu::{Vcpu, VcpuCaps, VcpuError, VcpuState};
use crate::vm::{Vm, VmError, VmState};

/// The machine state format this build writes (and the newest it reads).
pub const MACHINE_STATE_FORMAT: FormatVersion = FormatVersion { major: 1, minor: 0 };

/// Symmetric save and restore of one component. `save` reads a quiescent
/// (paused) component; `restore` writes a saved state into a freshly built,
/// not yet running component of the same shape (a migration target builds
/// its machine exactly as a boot does, then restores into it). Components
/// are shared handles (KVM fds, devices behind a mutex), hence `&self`.
pub trait Persist {
    type State;
    /// What both directions need besides the component: the fd table the
    /// state names fds by, KVM's capabilities.
    type Context<'a>;
    type Error;
    fn save(&self, ctx: Self::Context<'_>) -> Result<Self::State, Self::Error>;
    fn restore(&self, ctx: Self::Context<'_>, state: &Self::State) -> Result<(), Self::Error>;
}

/// What a vCPU's state depends on: what KVM can save, asked once.
pub type VcpuContext<'a> = &'a VcpuCaps;

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
    Serial(String),
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

impl Persist for Vm {
    type State = VmState;
    type Context<'a> = ();
    type Error = VmError;
    fn save(&self, _: ()) -> Result<VmState, VmError> {
        self.save_state()
    }
    fn restore(&self, _: (), state: &VmState) -> Result<(), VmError> {
        self.restore_state(state)
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Context<'a> = VcpuContext<'a>;
    type Error = VcpuError;
    fn save(&self, ctx: VcpuContext<'_>) -> Result<VcpuState, VcpuError> {
        self.save_state(ctx)
    }
    fn restore(&self, _: VcpuContext<'_>, state: &VcpuState) -> Result<(), VcpuError> {
        self.restore_state(state)
    }
}

impl Persist for Mutex<SerialDevice> {
    type State = SerialState;
    type Context<'a> = ();
    type Error = PersistError;
    fn save(&self, _: ()) -> Result<SerialState, PersistError> {
        Ok(self.lock().unwrap_or_else(|p| p.into_inner()).save())
    }
    fn restore(&self, _: (), state: &SerialState) -> Result<(), PersistError> {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_registers(state)
            .map_err(PersistError::Serial)
    }
}

/// Handles on everything whose state makes up the machine. The vCPU mutexes
/// are the ones the vCPU threads hold during KVM_RUN: a paused vCPU's lock is
/// free.
pub struct Machine {
    pub vm: Arc<Vm>,
    pub vcpus: Vec<Arc<Mutex<Vcpu>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// What KVM can save of a vCPU (MSR list, XSAVE, XCRs).
    pub vcpu_caps: VcpuCaps,
    /// `--net` devices, in slot order.
    pub nets: Vec<NetAttachment>,
}

impl Machine {
    /// Stops the devices' threads (after the vCPUs are paused): frames
    /// wait in the TAP queues. Tries every device; reports the first error.
    pub fn pause_devices(&self) -> Result<(), PersistError> {
        self.each_net(|n| n.pause())
    }

    /// Restarts the devices' threads (before the vCPUs resume).
    pub fn resume_devices(&self) -> Result<(), PersistError> {
        self.each_net(|n| n.resume())
    }

    fn each_net(
        &self,
        f: impl Fn(&NetAttachment) -> Result<(), NetError>,
    ) -> Result<(), PersistError> {
        let mut first = Ok(());
        for n in &self.nets {
            if let Err(err) = f(n) {
                log::warn!("net {}: {err}", n.config.id);
                if first.is_ok() {
                    first = Err(PersistError::Net {
                        id: n.config.id.clone(),
                        err,
                    });
                }
            }
        }
        first
    }

    fn vcpu_context(&self) -> VcpuContext<'_> {
        &self.vcpu_caps
    }

    /// The fds a migration sends beside this machine's state: the RAM
    /// memfd, then every TAP queue of every NIC (with backend transfer).
    pub fn fd_table(&self, with_taps: bool) -> FdTable {
        let mut t = FdTable::default();
        t.push(FdRole::GuestRam);
        if with_taps {
            for n in &self.nets {
                for q in 0..n.queue_pairs() {
                    t.push(FdRole::TapQueue {
                        net: n.config.id.clone(),
                        queue: q,
                    });
                }
            }
        }
        t
    }

    /// Reads the machine state, naming fds by their index in `fds`. The
    /// caller pauses the vCPUs and the devices first.
    pub fn save(&self, fds: &FdTable) -> Result<MachineState, PersistError> {
        let ctx = self.vcpu_context();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let v = v.try_lock().map_err(|_| PersistError::NotPaused)?;
            vcpus.push(v.save(ctx)?);
        }
        let nets = self
            .nets
            .iter()
            .map(|n| {
                n.save(Some(fds)).map_err(|err| PersistError::Net {
                    id: n.config.id.clone(),
                    err,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            format: MACHINE_STATE_FORMAT,
            memory_bytes: self.vm.ram.size,
            vm: self.vm.save(())?,
            vcpus,
            serial: self.serial.save(())?,
            nets,
        })
    }

    /// Writes a saved state into this freshly built (not yet running)
    /// machine of the same shape: VM-wide state first (the LAPIC restore in
    /// each vCPU relies on the irqchip), then the vCPUs, then the devices,
    /// which stay paused until [`Machine::resume_devices`]. `fds` is the
    /// table the TAP fds came in (backend transfer), `None` when the NICs
    /// run on TAPs of their own.
    pub fn restore(&self, s: &MachineState, fds: Option<&FdTable>) -> Result<(), PersistError> {
        check_format(s.format)?;
        if s.vcpus.len() != self.vcpus.len() {
            return Err(PersistError::VcpuCount {
                expected: self.vcpus.len(),
                got: s.vcpus.len(),
            });
        }
        if s.memory_bytes != self.vm.ram.size {
            return Err(PersistError::MemorySize {
                expected: self.vm.ram.size,
                got: s.memory_bytes,
            });
        }
        if s.nets.len() != self.nets.len() {
            return Err(PersistError::NetCount {
                expected: self.nets.len(),
                got: s.nets.len(),
            });
        }
        self.vm.restore((), &s.vm)?;
        let ctx = self.vcpu_context();
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let v = v.try_lock().map_err(|_| PersistError::NotPaused)?;
            v.restore(ctx, st)?;
        }
        self.serial.restore((), &s.serial)?;
        for (n, st) in self.nets.iter().zip(&s.nets) {
            n.restore(fds, st).map_err(|err| PersistError::Net {
                id: n.config.id.clone(),
                err,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::pvh::PvhEntry;
    use crate::memory::GuestRam;
    use kvm_ioctls::Kvm;
    use vmm_sys_util::eventfd::EventFd;

    fn machine() -> Machine {
        let vm = Vm::new(Kvm::new().unwrap(), GuestRam::new(32 << 20).unwrap()).unwrap();
        let v = Vcpu::new(&vm.fd, 0).unwrap();
        let entry = PvhEntry {
            entry: 0x10_0000,
            start_info: 0x6000,
        };
        v.configure_pvh(&vm.kvm, &vm.ram.memory, entry).unwrap();
        let vcpu_caps = VcpuCaps::of(&vm.kvm).unwrap();
        let serial = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        Machine {
            vm: Arc::new(vm),
            vcpus: vec![Arc::new(Mutex::new(v))],
            serial: Arc::new(Mutex::new(serial)),
            vcpu_caps,
            nets: Vec::new(),
        }
    }

    fn table() -> FdTable {
        machine().fd_table(true)
    }

    #[test]
    fn machine_state_round_trips_through_ron_into_a_new_vm() {
        let a = machine();
        {
            use crate::devices::bus::BusDevice;
            a.serial.lock().unwrap().write(7, &[0x42]);
        }
        let text = a.save(&table()).unwrap().to_ron().unwrap();
        let state = MachineState::from_ron(&text).unwrap();
        let b = machine();
        b.restore(&state, None).unwrap();
        let again = b.save(&table()).unwrap();
        assert_eq!(again.serial, state.serial);
        assert_eq!(again.serial.scratch, 0x42);
        assert_eq!(again.vcpus[0].regs.rip, 0x10_0000);
        assert_eq!(
            ron::to_string(&again.vcpus[0].sregs).unwrap(),
            ron::to_string(&state.vcpus[0].sregs).unwrap()
        );
    }

    #[test]
    fn wrong_shape_is_refused() {
        let a = machine();
        let mut s = a.save(&table()).unwrap();
        s.memory_bytes += 4096;
        assert!(matches!(
            a.restore(&s, None),
            Err(PersistError::MemorySize { .. })
        ));
        s.memory_bytes -= 4096;
        s.vcpus.clear();
        assert!(matches!(
            a.restore(&s, None),
            Err(PersistError::VcpuCount { .. })
        ));
    }

    #[test]
    fn format_rules_same_major_older_or_equal_minor() {
        let a = machine();
        let mut s = a.save(&table()).unwrap();
        let with = |s: &mut MachineState, major, minor| {
            s.format = FormatVersion { major, minor };
            MachineState::from_ron(&s.to_ron().unwrap())
        };
        let newer = with(
            &mut s,
            MACHINE_STATE_FORMAT.major,
            MACHINE_STATE_FORMAT.minor + 1,
        );
        let e = newer.err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
        let other = with(&mut s, MACHINE_STATE_FORMAT.major + 1, 0);
        assert!(matches!(other, Err(PersistError::Format { .. })));
        assert!(
            with(
                &mut s,
                MACHINE_STATE_FORMAT.major,
                MACHINE_STATE_FORMAT.minor
            )
            .is_ok()
        );
        // A newer document is named as such even when it has fields this
        // build does not know.
        let text = s.to_ron().unwrap().replacen(
            &format!("minor:{}", MACHINE_STATE_FORMAT.minor),
            &format!("minor:{}", MACHINE_STATE_FORMAT.minor + 1),
            1,
        );
        let text = text.replacen("memory_bytes:", "future_field:1,memory_bytes:", 1);
        let e = MachineState::from_ron(&text).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn save_refuses_a_running_vcpu() {
        let a = machine();
        let _running = a.vcpus[0].lock().unwrap();
        assert!(matches!(a.save(&table()), Err(PersistError::NotPaused)));
    }

    /// Every released state format: its fixture must still load (see
    /// `tests/fixtures/README.md` for how one is captured).
    const FIXTURES: &[(&str, &str)] = &[(
        "1.0",
        include_str!("../../tests/fixtures/machine-state-1.0.ron"),
    )];

    #[test]
    fn every_released_format_fixture_loads() {
        for (version, text) in FIXTURES {
            let s = MachineState::from_ron(text)
                .unwrap_or_else(|e| panic!("fixture {version} no longer loads: {e}"));
            assert_eq!(s.format.to_string(), *version);
            assert_eq!(s.vcpus.len(), 1);
            assert_eq!(s.nets.len(), 1, "the fixtures carry a NIC");
            assert_eq!(s.nets[0].net.backend.tap_fds, vec![1]);
            // And it restores into a machine of its shape.
            let m = machine();
            let mut shaped = MachineState::from_ron(text).unwrap();
            shaped.nets.clear();
            m.restore(&shaped, None)
                .unwrap_or_else(|e| panic!("fixture {version} does not restore: {e}"));
        }
    }
}
