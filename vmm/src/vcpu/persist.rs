//! A vCPU's migratable state ([`VcpuState`]) and its one save and
//! restore ([`Persist`] for [`Vcpu`]): what is read in which order, what a
//! restore may skip, and what KVM can save ([`VcpuCaps`]).

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, Msrs, kvm_cpuid_entry2,
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, SyncReg};
use serde::{Deserialize, Serialize};

use super::{InKvmRun, Vcpu, VcpuError, kvm_err};
use crate::persist::{Format10PartVersion, Persist};

/// MSRs carried in the vCPU state, where KVM lists them as saveable.
pub(super) const SAVED_MSRS: &[u32] = &[
    0x10, // TSC
    0x1b, // APIC_BASE
    0x174,
    0x175,
    0x176,       // SYSENTER
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x2ff,       // MTRRdefType
    0x6e0,       // TSC_DEADLINE
    0xc000_0080, // EFER
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084, // STAR..SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00,
    0x4b56_4d01, // kvmclock (new)
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04, // async PF, steal time, PV EOI
];

/// Everything KVM holds for one vCPU, for migration.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Written by format 1.0, ignored ([`Format10PartVersion`]).
    #[serde(rename = "version", default, skip_serializing)]
    pub format_1_0_version: Format10PartVersion,
    pub id: u8,
    /// The APIC ID the guest knows this vCPU by (its firmware tables
    /// name it). Since format 1.3; absent, it is `id` (one vCPU, ID 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apic_id: Option<u32>,
    #[serde(with = "crate::kvm_blob::cpuid")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(with = "crate::kvm_blob::either")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "crate::kvm_blob::either")]
    pub regs: kvm_regs,
    #[serde(with = "crate::kvm_blob::either")]
    pub sregs: kvm_sregs,
    /// Present when KVM has KVM_CAP_XSAVE (it then also covers the FPU).
    #[serde(with = "crate::kvm_blob::option")]
    pub xsave: Option<kvm_xsave>,
    /// Present when KVM has KVM_CAP_XCRS.
    #[serde(with = "crate::kvm_blob::either::option")]
    pub xcrs: Option<kvm_xcrs>,
    #[serde(with = "crate::kvm_blob::either")]
    pub debugregs: kvm_debugregs,
    #[serde(with = "crate::kvm_blob")]
    pub lapic: kvm_lapic_state,
    /// (index, value) of each saved MSR. A plain list: RON decodes it ~50x
    /// faster than kvm-bindings' `Msrs`, and it is on the downtime path.
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "crate::kvm_blob::either")]
    pub vcpu_events: kvm_vcpu_events,
}

impl VcpuState {
    /// A state of zeros shaped like a real one (`cpuid_entries` CPUID
    /// entries, every optional part present, `msrs` MSRs): what a source
    /// encodes to rehearse the encoding while its vCPUs still run
    /// ([`crate::machine::Machine::rehearsal_state`]). Never restored.
    pub fn blank(id: u8, cpuid_entries: usize, msrs: &[u32]) -> Self {
        VcpuState {
            format_1_0_version: Format10PartVersion,
            id,
            apic_id: Some(u32::from(id)),
            cpuid: vec![kvm_cpuid_entry2::default(); cpuid_entries],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: Some(kvm_xsave::default()),
            xcrs: Some(kvm_xcrs::default()),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: msrs.iter().map(|&m| (m, 0)).collect(),
            vcpu_events: kvm_vcpu_events::default(),
        }
    }
}

/// See [`Vcpu::parked_parts`]. Nothing changes these while no vCPU of the
/// machine runs: an INIT or SIPI comes from another vCPU, an NMI from a
/// running device or vCPU.
#[derive(Clone, Copy)]
pub(super) struct ParkedParts {
    mp_state: kvm_mp_state,
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    vcpu_events: kvm_vcpu_events,
}

impl ParkedParts {
    pub(super) fn of(s: &VcpuState) -> Self {
        ParkedParts {
            mp_state: s.mp_state,
            xcrs: s.xcrs,
            debugregs: s.debugregs,
            vcpu_events: s.vcpu_events,
        }
    }
}

/// The parts of a vCPU's state that pass through kvm_run
/// (`KVM_CAP_SYNC_REGS`): what the KVM_RUN that parks a vCPU leaves there
/// for a save, and what a restore leaves there for the next KVM_RUN.
pub(super) const KVM_RUN_REGS: [SyncReg; 3] = [
    SyncReg::Register,
    SyncReg::SystemRegister,
    SyncReg::VcpuEvents,
];

/// [`KVM_RUN_REGS`] as the bits `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)`
/// answers.
const SYNC_REGS_ALL: i32 = KVM_RUN_REGS[0] as i32 | KVM_RUN_REGS[1] as i32 | KVM_RUN_REGS[2] as i32;

/// What saving a vCPU's state needs to know of KVM, asked once.
#[derive(Debug, Clone, Default)]
pub struct VcpuCaps {
    /// MSRs carried in the state ([`Vcpu::saveable_msrs`]).
    pub msrs: Vec<u32>,
    pub xsave: bool,
    pub xcrs: bool,
    /// The machine has other vCPUs, which may still run after this one
    /// parked: an NMI or SIPI one of them sends changes this vCPU's
    /// events, so a save reads them once all are parked, not from the
    /// snapshot taken at its park.
    pub several: bool,
    /// KVM takes registers, special registers and events through kvm_run
    /// (`KVM_CAP_SYNC_REGS`): a restore leaves them there for the vCPU's
    /// next KVM_RUN to apply, instead of two or three set ioctls.
    pub sync_regs: bool,
}

impl VcpuCaps {
    pub fn of(kvm: &Kvm) -> Result<Self, VcpuError> {
        Ok(VcpuCaps {
            msrs: Vcpu::saveable_msrs(kvm)?,
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            several: false,
            sync_regs: kvm.check_extension_int(Cap::SyncRegs) & SYNC_REGS_ALL == SYNC_REGS_ALL,
        })
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    /// What KVM can save of a vCPU, asked once for all of them.
    type Context<'a> = &'a VcpuCaps;
    type Error = VcpuError;

    /// Reads the whole vCPU state. The vCPU must not be running.
    fn save(&self, caps: &VcpuCaps) -> Result<VcpuState, VcpuError> {
        let msr_indices = &caps.msrs;
        let mp_state = self.fd.get_mp_state().map_err(kvm_err("get MP state"))?;
        // KVM_GET_MP_STATE first: it lets KVM act on an INIT or SIPI
        // another vCPU sent after this one parked, which resets its
        // registers; the snapshot taken at the park is then stale.
        let started_over = caps.several
            && !matches!(
                mp_state.mp_state,
                KVM_MP_STATE_RUNNABLE | KVM_MP_STATE_HALTED
            );
        let (regs, sregs, snapshot_events) = match self.in_kvm_run {
            // A restore left them for a KVM_RUN that has not come yet (no
            // vCPU of the machine ran since: nothing changed them).
            InKvmRun::Restored => {
                let s = self.fd.sync_regs();
                (s.regs, s.sregs, Some(s.events))
            }
            InKvmRun::Parked if !started_over => {
                let s = self.fd.sync_regs();
                (s.regs, s.sregs, Some(s.events).filter(|_| !caps.several))
            }
            _ => (
                self.fd.get_regs().map_err(kvm_err("get registers"))?,
                self.fd.get_sregs().map_err(kvm_err("get sregs"))?,
                None,
            ),
        };
        let vcpu_events = match snapshot_events {
            Some(e) => e,
            None => self
                .fd
                .get_vcpu_events()
                .map_err(kvm_err("get vCPU events"))?,
        };
        let xsave = if caps.xsave {
            Some(self.fd.get_xsave().map_err(kvm_err("get xsave"))?)
        } else {
            None
        };
        let xcrs = if caps.xcrs {
            Some(self.fd.get_xcrs().map_err(kvm_err("get xcrs"))?)
        } else {
            None
        };
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(kvm_err("get debug regs"))?;
        // The MSRs before the LAPIC: a TSC-deadline timer that expires in
        // between then shows both as still armed (MSR) and as fired (IRR),
        // and the guest gets one spurious timer interrupt; the other order
        // would lose that interrupt.
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VcpuError::Msrs(format!("{e:?}")))?;
        let read = self.fd.get_msrs(&mut msrs).map_err(kvm_err("get MSRs"))?;
        if read != entries.len() {
            return Err(VcpuError::Msrs(format!(
                "KVM read {read} of {} MSRs",
                entries.len()
            )));
        }
        let lapic = self.fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
        let known = self.cpuid.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cpuid = if known.is_empty() {
            self.fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("get CPUID"))?
                .as_slice()
                .to_vec()
        } else {
            known
        };
        let state = VcpuState {
            format_1_0_version: Format10PartVersion,
            id: self.id,
            apic_id: Some(self.apic_id()),
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            vcpu_events,
        };
        self.parked_parts.set(Some(ParkedParts::of(&state)));
        self.activity.saw_mp_state(state.mp_state.mp_state);
        Ok(state)
    }

    /// Writes a saved state into this (fresh) vCPU. With sync registers,
    /// the registers, special registers and events go into kvm_run, and
    /// the vCPU's next KVM_RUN applies them before it enters the guest:
    /// after the LAPIC and the MSRs, which is safe for a state KVM saved
    /// (the APIC base and EFER in the special registers are the values the
    /// MSRs already set; only EFER.LMA, which an MSR write keeps, comes
    /// from them), and should KVM still refuse them, that vCPU fails with
    /// its documented exit once the guest is this process's.
    fn restore(&mut self, caps: &VcpuCaps, s: &VcpuState) -> Result<(), VcpuError> {
        let apic_id = s.apic_id.unwrap_or(u32::from(s.id));
        if s.id != self.id || apic_id != self.apic_id() {
            return Err(VcpuError::Identity {
                index: self.id,
                id: s.id,
                apic_id,
            });
        }
        self.in_kvm_run = InKvmRun::Nothing;
        let same = {
            let key =
                |e: &kvm_cpuid_entry2| (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx);
            let set = self.cpuid.lock().unwrap_or_else(|p| p.into_inner());
            set.len() == s.cpuid.len() && set.iter().map(key).eq(s.cpuid.iter().map(key))
        };
        if !same {
            self.set_cpuid(&s.cpuid)?;
        }
        let known = self.parked_parts.take();
        let has = |same: fn(&ParkedParts, &VcpuState) -> bool| known.is_some_and(|k| same(&k, s));
        if !has(|k, s| crate::kvm_blob::same(&k.mp_state, &s.mp_state)) {
            self.fd
                .set_mp_state(s.mp_state)
                .map_err(kvm_err("set MP state"))?;
        }
        // Not for a vCPU waiting for INIT or SIPI: KVM_RUN then waits
        // before it applies kvm_run's registers, and would apply them over
        // the ones the SIPI sets.
        let in_kvm_run = caps.sync_regs
            && matches!(
                s.mp_state.mp_state,
                KVM_MP_STATE_RUNNABLE | KVM_MP_STATE_HALTED
            );
        if !in_kvm_run {
            self.fd
                .set_regs(&s.regs)
                .map_err(kvm_err("set registers"))?;
            self.fd.set_sregs(&s.sregs).map_err(kvm_err("set sregs"))?;
        }
        if let Some(x) = &s.xsave {
            // SAFETY: the buffer came from KVM_GET_XSAVE on a vCPU with the
            // same CPUID, so its size matches what KVM_SET_XSAVE reads.
            unsafe { self.fd.set_xsave(x) }.map_err(kvm_err("set xsave"))?;
        }
        if let Some(x) = &s.xcrs
            && !has(|k, s| {
                k.xcrs
                    .zip(s.xcrs)
                    .is_some_and(|(a, b)| crate::kvm_blob::same(&a, &b))
            })
        {
            self.fd.set_xcrs(x).map_err(kvm_err("set xcrs"))?;
        }
        if !has(|k, s| crate::kvm_blob::same(&k.debugregs, &s.debugregs)) {
            self.fd
                .set_debug_regs(&s.debugregs)
                .map_err(kvm_err("set debug regs"))?;
        }
        self.fd.set_lapic(&s.lapic).map_err(kvm_err("set LAPIC"))?;
        let n = self.set_msr_list(&s.msrs)?;
        if n != s.msrs.len() {
            return Err(VcpuError::Msrs(format!(
                "KVM restored {n} of {} MSRs",
                s.msrs.len()
            )));
        }
        if in_kvm_run {
            let r = self.fd.sync_regs_mut();
            r.regs = s.regs;
            r.sregs = s.sregs;
            r.events = s.vcpu_events;
            for reg in KVM_RUN_REGS {
                self.fd.set_sync_dirty_reg(reg);
            }
            self.in_kvm_run = InKvmRun::Restored;
        } else if !has(|k, s| crate::kvm_blob::same(&k.vcpu_events, &s.vcpu_events)) {
            self.fd
                .set_vcpu_events(&s.vcpu_events)
                .map_err(kvm_err("set vCPU events"))?;
        }
        self.parked_parts.set(Some(ParkedParts::of(s)));
        self.activity.saw_mp_state(s.mp_state.mp_state);
        Ok(())
    }
}
