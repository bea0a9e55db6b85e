//! The machine as migration sees it: handles on the VM, the vCPUs and the
//! devices, the fds that travel beside its state, pausing and resuming the
//! device threads, and saving and restoring the whole in the right order
//! (each part through its [`Persist`] impl, beside its owner; the document
//! and its version are [`crate::persist`]'s).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use common::migration::{FdRole, Timeline};

use crate::devices::serial::SerialDevice;
use crate::devices::virtio::net::NetError;
use crate::net::attach::NetAttachment;
use crate::persist::{
    FdTable, MACHINE_STATE_FORMAT, MachineState, Persist, PersistError, check_format,
};
use crate::vcpu::{Vcpu, VcpuActivity, VcpuCaps, VcpuState};
use crate::vm::Vm;

/// About as many CPUID entries as KVM reports here (the rehearsal's size).
const REHEARSAL_CPUID_ENTRIES: usize = 64;

/// Handles on everything whose state makes up the machine. The vCPU mutexes
/// are the ones the vCPU threads hold during KVM_RUN: a paused vCPU's lock is
/// free.
pub struct Machine {
    pub vm: Arc<Vm>,
    pub vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// Each vCPU's [`Vcpu::activity`], readable while its thread holds it.
    pub vcpu_activity: Vec<Arc<VcpuActivity>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// What KVM can save of a vCPU (MSR list, XSAVE, XCRs).
    pub vcpu_caps: VcpuCaps,
    /// `--net` devices, in slot order.
    pub nets: Vec<NetAttachment>,
}

impl Machine {
    /// Stops the devices' threads (while the vCPUs park, see
    /// [`crate::runtime`]): frames wait in the TAP queues. Tries every
    /// device; reports the first error.
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

    /// The fds a migration sends beside this machine's state: the RAM
    /// memfd, then every TAP queue of every NIC (with backend transfer).
    pub fn fd_table(&self, with_taps: bool) -> std::io::Result<FdTable> {
        Ok(self.handover(with_taps)?.0)
    }

    /// The fds a migration sends beside this machine's state, with their
    /// table: the RAM memfd, then each NIC's ([`NetAttachment::handover`]).
    pub fn handover(&self, with_taps: bool) -> std::io::Result<(FdTable, Vec<OwnedFd>)> {
        let mut t = FdTable::default();
        let mut fds = vec![self.vm.ram.memfd.as_fd().try_clone_to_owned()?];
        t.push(FdRole::GuestRam);
        for n in &self.nets {
            for (role, fd) in n.handover(with_taps)? {
                t.push(role);
                fds.push(fd);
            }
        }
        Ok((t, fds))
    }

    /// Reads the machine state, naming fds by their index in `fds`. The
    /// caller pauses the vCPUs and the devices first.
    pub fn save(&self, fds: &FdTable) -> Result<MachineState, PersistError> {
        self.save_marked(fds, &mut Timeline::default())
    }

    /// [`Machine::save`], noting in `tl` when each part was read.
    pub fn save_marked(
        &self,
        fds: &FdTable,
        tl: &mut Timeline,
    ) -> Result<MachineState, PersistError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let v = v.try_lock().map_err(|_| PersistError::NotPaused)?;
            vcpus.push(v.save(&self.vcpu_caps)?);
        }
        tl.mark("source: vcpus read");
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
        tl.mark("source: devices read");
        let vm = (&*self.vm).save(())?;
        tl.mark("source: vm read");
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        Ok(MachineState {
            format: MACHINE_STATE_FORMAT,
            memory_bytes: self.vm.ram.size,
            vm,
            vcpus,
            serial: serial.save(())?,
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
        self.restore_marked(s, fds, &mut Timeline::default())
    }

    /// A state document shaped like this running machine's, for a source
    /// to rehearse the encoding while the guest still runs (a fresh
    /// process's first encoding costs about twice the next): the VM and
    /// the serial port as they are, blank vCPUs (their state cannot be
    /// read while they run), no NICs (nor can theirs). Never restored.
    pub fn rehearsal_state(&self) -> Result<MachineState, PersistError> {
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        Ok(MachineState {
            format: MACHINE_STATE_FORMAT,
            memory_bytes: self.vm.ram.size,
            vm: (&*self.vm).save(())?,
            vcpus: (0..self.vcpus.len())
                .map(|id| VcpuState::blank(id as u8, REHEARSAL_CPUID_ENTRIES, &self.vcpu_caps.msrs))
                .collect(),
            serial: serial.save(())?,
            nets: Vec::new(),
        })
    }

    /// The VM-wide state, then each vCPU's (the LAPIC restore relies on
    /// the irqchip). Alone, this is the part of a restore a machine can
    /// rehearse on its own state ([`crate::migration::target`]): it
    /// changes nothing, where restoring a device starts its set-up.
    pub fn restore_vm_and_vcpus(
        &self,
        s: &MachineState,
        tl: &mut Timeline,
    ) -> Result<(), PersistError> {
        (&*self.vm).restore((), &s.vm)?;
        tl.mark("target: vm restored");
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let mut v = v.try_lock().map_err(|_| PersistError::NotPaused)?;
            v.restore(&self.vcpu_caps, st)?;
        }
        tl.mark("target: vcpus restored");
        Ok(())
    }

    /// [`Machine::restore`], noting in `tl` when each part was written.
    pub fn restore_marked(
        &self,
        s: &MachineState,
        fds: Option<&FdTable>,
        tl: &mut Timeline,
    ) -> Result<(), PersistError> {
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
        self.restore_vm_and_vcpus(s, tl)?;
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore((), &s.serial)?;
        for (n, st) in self.nets.iter().zip(&s.nets) {
            let mut n = n;
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
    use crate::net::attach::{OpenedNet, attach_nets, tests as attach_tests};
    use crate::persist::FIXTURES;
    use common::migration::FormatVersion;
    use kvm_ioctls::Kvm;
    use std::os::fd::OwnedFd;
    use vmm_sys_util::eventfd::EventFd;

    /// A 32 MiB one-vCPU machine, with NIC `vm0` on the TAP `(fd, name)`
    /// when given (the shape of the fixtures).
    fn machine_on(tap: Option<(OwnedFd, &str)>) -> Machine {
        machine_of(1, tap)
    }

    /// [`machine_on`] with `count` vCPUs: vCPU 0 at the PVH entry, the
    /// others application processors waiting for INIT.
    fn machine_of(count: u8, tap: Option<(OwnedFd, &str)>) -> Machine {
        let mut vm = Vm::new(Kvm::new().unwrap(), GuestRam::new(32 << 20).unwrap()).unwrap();
        let nets = match tap {
            Some((tap, name)) => {
                let cfg = attach_tests::config("vm0");
                let opened = OpenedNet::from_fds(cfg, name.into(), vec![tap], vec![], None);
                attach_nets(&mut vm, vec![opened.unwrap()]).unwrap()
            }
            None => Vec::new(),
        };
        let entry = PvhEntry {
            entry: 0x10_0000,
            start_info: 0x6000,
        };
        let vcpus: Vec<Vcpu> = (0..count)
            .map(|i| {
                let v = Vcpu::new(&vm.fd, i).unwrap();
                if i == 0 {
                    v.configure_pvh(&vm.kvm, &vm.ram.memory, entry, count)
                        .unwrap();
                } else {
                    v.configure_ap(&vm.kvm, count).unwrap();
                }
                v
            })
            .collect();
        let vcpu_caps = VcpuCaps {
            several: count > 1,
            ..VcpuCaps::of(&vm.kvm).unwrap()
        };
        let serial = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        Machine {
            vm: Arc::new(vm),
            vcpu_activity: vcpus.iter().map(|v| v.activity.clone()).collect(),
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            serial: Arc::new(Mutex::new(serial)),
            vcpu_caps,
            nets,
        }
    }

    fn machine() -> Machine {
        machine_on(None)
    }

    fn table() -> FdTable {
        machine().fd_table(true).unwrap()
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
        assert_eq!(state.format, MACHINE_STATE_FORMAT);
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
    fn every_vcpu_of_a_4_vcpu_machine_round_trips() {
        use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
        let a = machine_of(4, None);
        let text = a
            .save(&a.fd_table(true).unwrap())
            .unwrap()
            .to_ron()
            .unwrap();
        let state = MachineState::from_ron(&text).unwrap();
        assert_eq!(state.vcpus.len(), 4);
        for (i, v) in state.vcpus.iter().enumerate() {
            assert_eq!((usize::from(v.id), v.apic_id), (i, Some(i as u32)));
            // The boot processor runs; the APs wait for the guest's INIT.
            let want = if i == 0 {
                KVM_MP_STATE_RUNNABLE
            } else {
                KVM_MP_STATE_UNINITIALIZED
            };
            assert_eq!(v.mp_state.mp_state, want, "vCPU {i}");
            let leaf1 = v.cpuid.iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, i as u32, "vCPU {i}'s CPUID APIC ID");
        }
        let b = machine_of(4, None);
        b.restore(&state, None).unwrap();
        let again = b.save(&b.fd_table(true).unwrap()).unwrap();
        for (x, y) in again.vcpus.iter().zip(&state.vcpus) {
            assert_eq!(x.mp_state.mp_state, y.mp_state.mp_state);
            assert_eq!(x.regs.rip, y.regs.rip);
            assert!(crate::kvm_blob::same(&x.lapic, &y.lapic));
        }

        // Another vCPU's state in a slot is refused, not restored.
        let mut swapped = MachineState::from_ron(&text).unwrap();
        swapped.vcpus.swap(1, 2);
        let e = machine_of(4, None).restore(&swapped, None).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        // A 1.2 document has no APIC IDs: vCPU i is APIC ID i.
        let mut old = MachineState::from_ron(&text).unwrap();
        for v in &mut old.vcpus {
            v.apic_id = None;
        }
        machine_of(4, None).restore(&old, None).unwrap();
    }

    #[test]
    fn wrong_shape_or_format_is_refused() {
        let a = machine();
        let mut s = a.save(&table()).unwrap();
        s.memory_bytes += 4096;
        assert!(matches!(
            a.restore(&s, None),
            Err(PersistError::MemorySize { .. })
        ));
        s.memory_bytes -= 4096;
        s.format = FormatVersion {
            major: MACHINE_STATE_FORMAT.major,
            minor: MACHINE_STATE_FORMAT.minor + 1,
        };
        assert!(matches!(
            a.restore(&s, None),
            Err(PersistError::Format { .. })
        ));
        s.format = MACHINE_STATE_FORMAT;
        s.vcpus.clear();
        assert!(matches!(
            a.restore(&s, None),
            Err(PersistError::VcpuCount { .. })
        ));
    }

    #[test]
    fn save_refuses_a_running_vcpu() {
        let a = machine();
        let _running = a.vcpus[0].lock().unwrap();
        assert!(matches!(a.save(&table()), Err(PersistError::NotPaused)));
    }

    /// Restores fixture `text` into a machine of its shape, its NIC on a
    /// TAP of its own (`tap`), and reads it back.
    fn restore_fixture(version: &str, text: &str, tap: OwnedFd, name: &str) {
        let s = MachineState::from_ron(text)
            .unwrap_or_else(|e| panic!("fixture {version} no longer loads: {e}"));
        let m = machine_on(Some((tap, name)));
        let fds = m.fd_table(true).unwrap();
        m.restore(&s, Some(&fds))
            .unwrap_or_else(|e| panic!("fixture {version} does not restore: {e}"));
        assert!(!m.nets[0].is_running(), "restored devices wait for resume");
        let back = m.save(&fds).unwrap();
        assert_eq!(back.format, MACHINE_STATE_FORMAT);
        assert_eq!(back.serial, s.serial, "{version}");
        assert_eq!(back.vcpus[0].regs.rip, s.vcpus[0].regs.rip, "{version}");
        assert_eq!(back.vcpus[0].msrs.len(), s.vcpus[0].msrs.len());
        assert_eq!(back.nets[0].mmio, s.nets[0].mmio, "{version}");
        assert_eq!(back.nets[0].net.mac, s.nets[0].net.mac, "{version}");
        assert_eq!(back.nets[0].net.rx_pending, s.nets[0].net.rx_pending);
        // The counters go on from the saved ones (since 1.4; 0 before).
        let saved = &s.nets[0].net.counters;
        assert_eq!(saved.is_empty(), version < "1.4", "{version}");
        let want = saved.first().copied().unwrap_or_default();
        assert_eq!(back.nets[0].net.counters, vec![want], "{version}");
        assert_eq!(
            m.nets[0].status().queue_counters[0].rx_packets,
            want.rx_packets
        );
        m.resume_devices().unwrap();
        assert!(m.nets[0].is_running());
        m.pause_devices().unwrap();
    }

    fn every_fixture_in_own_netns() {
        for (i, (version, text)) in FIXTURES.iter().enumerate() {
            let name = format!("vmfx{i}");
            let Some(tap) = attach_tests::own_netns_tap(&name) else {
                return;
            };
            restore_fixture(version, text, tap, &name);
        }
    }

    #[test]
    fn every_released_format_fixture_restores_nic_included() {
        // The namespace belongs to this helper thread only.
        std::thread::spawn(every_fixture_in_own_netns)
            .join()
            .unwrap();
    }
}
