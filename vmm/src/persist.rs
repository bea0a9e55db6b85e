//! The whole machine's state as one versioned serde tree (what a local
//! migration sends as RON beside the memfd): VM-wide KVM state, every vCPU,
//! and the devices. Each piece is defined beside its owner; this module only
//! gathers them and restores them in the right order.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::devices::serial::{SerialDevice, SerialState};
use crate::devices::virtio::net::NetError;
use crate::net::attach::{NetAttachment, NetDeviceState};
use crate::vcpu::{Vcpu, VcpuError, VcpuState};
use crate::vm::{Vm, VmError, VmState};

pub const MACHINE_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("the vCPUs must be paused to save or restore state")]
    NotPaused,
    #[error("unsupported machine state version {0}")]
    Version(u32),
    #[error("state has {got} vCPUs, this VM {expected}")]
    VcpuCount { expected: usize, got: usize },
    #[error("state is for {got} bytes of RAM, this VM has {expected}")]
    MemorySize { expected: u64, got: u64 },
    #[error("serial: {0}")]
    Serial(String),
    #[error("RON: {0}")]
    Ron(String),
    #[error("net {id}: {err}")]
    Net { id: String, err: NetError },
}

#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub version: u32,
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    /// virtio-net devices in slot order (their TAP fds travel beside).
    #[serde(default)]
    pub nets: Vec<NetDeviceState>,
}

impl MachineState {
    pub fn to_ron(&self) -> Result<String, PersistError> {
        ron::to_string(self).map_err(|e| PersistError::Ron(e.to_string()))
    }

    pub fn from_ron(text: &str) -> Result<Self, PersistError> {
        let s: MachineState = ron::from_str(text).map_err(|e| PersistError::Ron(e.to_string()))?;
        if s.version != MACHINE_STATE_VERSION {
            return Err(PersistError::Version(s.version));
        }
        Ok(s)
    }
}

/// Handles on everything whose state makes up the machine. The vCPU mutexes
/// are the ones the vCPU threads hold during KVM_RUN: a paused vCPU's lock is
/// free.
pub struct Machine {
    pub vm: Arc<Vm>,
    pub vcpus: Vec<Arc<Mutex<Vcpu>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// MSRs carried in each vCPU's state ([`Vcpu::saveable_msrs`]).
    pub msrs: Vec<u32>,
    /// `--net` devices, in slot order.
    pub nets: Vec<NetAttachment>,
}

impl Machine {
    /// Stops the devices' threads (after the vCPUs are paused): frames
    /// wait in the TAP queues. Tries every device; reports the first error.
    pub fn pause_devices(&self) -> Result<(), PersistError> {
        let mut first = Ok(());
        for n in &self.nets {
            if let Err(err) = n.pause() {
                log::warn!("net {}: pause: {err}", n.config.id);
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

    /// Restarts the devices' threads (before the vCPUs resume).
    pub fn resume_devices(&self) -> Result<(), PersistError> {
        let mut first = Ok(());
        for n in &self.nets {
            if let Err(err) = n.resume() {
                log::warn!("net {}: resume: {err}", n.config.id);
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

    /// Reads the machine state. The caller pauses the vCPUs and the devices
    /// first.
    pub fn save(&self) -> Result<MachineState, PersistError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let v = v.try_lock().map_err(|_| PersistError::NotPaused)?;
            vcpus.push(v.save_state(&self.vm.kvm, &self.msrs)?);
        }
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
        let nets = self
            .nets
            .iter()
            .map(|n| {
                n.save().map_err(|err| PersistError::Net {
                    id: n.config.id.clone(),
                    err,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            memory_bytes: self.vm.ram.size,
            vm: self.vm.save_state()?,
            vcpus,
            serial,
            nets,
        })
    }

    /// Writes a saved state into this freshly built (not yet running)
    /// machine of the same shape: VM-wide state first (the LAPIC restore in
    /// each vCPU relies on the irqchip), then the vCPUs, then the devices.
    pub fn restore(&self, s: &MachineState) -> Result<(), PersistError> {
        if s.version != MACHINE_STATE_VERSION {
            return Err(PersistError::Version(s.version));
        }
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
        self.vm.restore_state(&s.vm)?;
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let v = v.try_lock().map_err(|_| PersistError::NotPaused)?;
            v.restore_state(st)?;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        serial
            .restore_registers(&s.serial)
            .map_err(PersistError::Serial)
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
        let v = Vcpu::new(&vm, 0).unwrap();
        let entry = PvhEntry {
            entry: 0x10_0000,
            start_info: 0x6000,
        };
        v.configure_pvh(&vm.kvm, &vm.ram.memory, entry).unwrap();
        let msrs = Vcpu::saveable_msrs(&vm.kvm).unwrap();
        let serial = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        Machine {
            vm: Arc::new(vm),
            vcpus: vec![Arc::new(Mutex::new(v))],
            serial: Arc::new(Mutex::new(serial)),
            msrs,
            nets: Vec::new(),
        }
    }

    #[test]
    fn machine_state_round_trips_through_ron_into_a_new_vm() {
        let a = machine();
        {
            use crate::devices::bus::BusDevice;
            a.serial.lock().unwrap().write(7, &[0x42]);
        }
        let text = a.save().unwrap().to_ron().unwrap();
        let state = MachineState::from_ron(&text).unwrap();
        let b = machine();
        b.restore(&state).unwrap();
        let again = b.save().unwrap();
        assert_eq!(again.serial, state.serial);
        assert_eq!(again.serial.scratch, 0x42);
        assert_eq!(again.vcpus[0].regs.rip, 0x10_0000);
        assert_eq!(
            ron::to_string(&again.vcpus[0].sregs).unwrap(),
            ron::to_string(&state.vcpus[0].sregs).unwrap()
        );
    }

    #[test]
    fn wrong_version_and_shape_are_refused() {
        let a = machine();
        let mut s = a.save().unwrap();
        s.memory_bytes += 4096;
        assert!(matches!(
            a.restore(&s),
            Err(PersistError::MemorySize { .. })
        ));
        s.version = 7;
        let text = s.to_ron().unwrap();
        assert!(matches!(
            MachineState::from_ron(&text),
            Err(PersistError::Version(7))
        ));
    }

    #[test]
    fn save_refuses_a_running_vcpu() {
        let a = machine();
        let _running = a.vcpus[0].lock().unwrap();
        assert!(matches!(a.save(), Err(PersistError::NotPaused)));
    }
}
