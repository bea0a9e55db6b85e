//! One vCPU: CPUID, MSRs and registers for a PVH entry, its thread running
//! KVM_RUN and dispatching port and MMIO exits to the buses, and its state
//! for migration ([`VcpuState`], through [`Persist`]).

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_cpuid_entry2, kvm_debugregs,
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::pvh::PvhEntry;
use crate::control::RunControl;
use crate::devices::bus::Bus;
use crate::memory::GuestMemoryMmap;
use crate::persist::{Format10PartVersion, Persist};
use crate::sandbox::ThreadKind;
use crate::vm::{ExitReason, ExitSender};

mod activity;
pub use activity::VcpuActivity;

/// A boot GDT in low RAM (below the PVH start info), as the PVH ABI expects
/// flat 32-bit code and data segments.
const BOOT_GDT_ADDR: u64 = 0x500;
const BOOT_IDT_ADDR: u64 = 0x520;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 0x10;

const VCPU_STACK_SIZE: usize = 256 * 1024;

/// MSRs initialised at boot (index, value), as a PC BIOS would leave them.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

/// MSRs carried in the vCPU state, where KVM lists them as saveable.
const SAVED_MSRS: &[u32] = &[
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

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM: {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot write the boot GDT: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    #[error("MSR list: {0}")]
    Msrs(String),
    #[error("CPUID: {0}")]
    Cpuid(String),
    #[error("cannot start the vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "the state of vCPU {id} (APIC ID {apic_id}) does not fit this machine's vCPU {index} (APIC ID {index})"
    )]
    Identity { index: u8, id: u8, apic_id: u32 },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Kvm { what, err }
}

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

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    /// The CPUID last set: it never changes while the guest runs, so saving
    /// a state needs no KVM_GET_CPUID2, and a restore skips KVM_SET_CPUID2
    /// when the target already set the same (both are on the downtime path).
    cpuid: Mutex<Vec<kvm_cpuid_entry2>>,
    /// The parts of the state that only running changes, as last read or
    /// written while the vCPU was parked; forgotten when it runs. A
    /// migration target's rehearsal reads them, and the restore then skips
    /// each set whose value is already there (7 us per vCPU ioctl here).
    parked_parts: Cell<Option<ParkedParts>>,
    /// Registers, special registers and events are in kvm_run, stored by
    /// the KVM_RUN that finished the vCPU's last exit before it parked
    /// ([`finish_for_park`]); false once it runs again.
    snapshot: bool,
    /// What the API reports of this vCPU while its thread holds it.
    pub activity: Arc<VcpuActivity>,
}

/// See [`Vcpu::parked_parts`]. Nothing changes these while no vCPU of the
/// machine runs: an INIT or SIPI comes from another vCPU, an NMI from a
/// running device or vCPU.
#[derive(Clone, Copy)]
struct ParkedParts {
    mp_state: kvm_mp_state,
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    vcpu_events: kvm_vcpu_events,
}

impl ParkedParts {
    fn of(s: &VcpuState) -> Self {
        ParkedParts {
            mp_state: s.mp_state,
            xcrs: s.xcrs,
            debugregs: s.debugregs,
            vcpu_events: s.vcpu_events,
        }
    }
}

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
}

impl VcpuCaps {
    pub fn of(kvm: &Kvm) -> Result<Self, VcpuError> {
        Ok(VcpuCaps {
            msrs: Vcpu::saveable_msrs(kvm)?,
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            several: false,
        })
    }
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(selector: u16, type_: u8, s: u8, db: u8, limit: u32, g: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l: 0,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create vCPU"))?;
        Ok(Vcpu {
            id,
            fd,
            cpuid: Mutex::new(Vec::new()),
            parked_parts: Cell::new(None),
            snapshot: false,
            activity: Arc::new(VcpuActivity::new(id)),
        })
    }

    /// vCPU i has APIC ID i (CPUID, MADT, MP table).
    pub fn apic_id(&self) -> u32 {
        u32::from(self.id)
    }

    /// The vCPU is about to run: what it held while parked may change.
    fn forget_parked_parts(&mut self) {
        self.parked_parts.set(None);
        self.snapshot = false;
    }

    /// CPUID from KVM's supported set for this vCPU of a machine of
    /// `count` ([`crate::cpuid::for_vcpu`]).
    pub fn configure_cpuid(&self, kvm: &Kvm, count: u8) -> Result<(), VcpuError> {
        let supported = crate::kvm_cpuid::supported(kvm).map_err(kvm_err("get supported CPUID"))?;
        self.set_cpuid(&crate::cpuid::for_vcpu(
            supported.as_slice(),
            self.id,
            count,
        ))
    }

    /// An application processor of a machine of `count` vCPUs: its CPUID
    /// and boot MSRs. KVM leaves it in the MP state UNINITIALIZED, where
    /// KVM_RUN waits until the guest's INIT and SIPI start it in real mode,
    /// as on hardware; its registers are the reset ones until then.
    pub fn configure_ap(&self, kvm: &Kvm, count: u8) -> Result<(), VcpuError> {
        self.configure_cpuid(kvm, count)?;
        self.configure_msrs()
    }

    fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(entries).map_err(|e| VcpuError::Cpuid(format!("{e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        *self.cpuid.lock().unwrap_or_else(|p| p.into_inner()) = entries.to_vec();
        Ok(())
    }

    /// Writes (index, value) MSRs; returns how many KVM took (it stops at
    /// the first it refuses).
    fn set_msr_list(&self, list: &[(u32, u64)]) -> Result<usize, VcpuError> {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Msrs(format!("{e:?}")))?;
        self.fd.set_msrs(&msrs).map_err(kvm_err("set MSRs"))
    }

    fn configure_msrs(&self) -> Result<(), VcpuError> {
        let set = self.set_msr_list(BOOT_MSRS)?;
        if set != BOOT_MSRS.len() {
            // KVM stops at the first MSR it refuses; the rest are optional.
            log::debug!(
                "KVM accepted {set} of {} boot MSRs (refused {:#x})",
                BOOT_MSRS.len(),
                BOOT_MSRS.get(set).map_or(0, |e| e.0)
            );
        }
        Ok(())
    }

    /// LINT0 as ExtINT (the 8259 behind it) and LINT1 as NMI, as a PC
    /// firmware leaves the boot CPU's local APIC (an AP's stay masked, as
    /// at reset: the guest programs them).
    fn configure_lapic(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DELIVERY_EXTINT: u32 = 0x7;
        const DELIVERY_NMI: u32 = 0x4;
        let mut lapic = self.fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
        let set = |regs: &mut [std::os::raw::c_char], off: usize, mode: u32| {
            let Some(r) = regs.get_mut(off..off + 4) else {
                return;
            };
            let mut b = [0u8; 4];
            for (d, s) in b.iter_mut().zip(r.iter()) {
                *d = *s as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (d, s) in r.iter_mut().zip(v.to_le_bytes()) {
                *d = s as std::os::raw::c_char;
            }
        };
        set(&mut lapic.regs, APIC_LVT0, DELIVERY_EXTINT);
        set(&mut lapic.regs, APIC_LVT1, DELIVERY_NMI);
        self.fd.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))
    }

    /// Registers for the PVH entry: 32-bit protected mode, paging off, flat
    /// segments from a GDT in guest RAM, EBX = start info.
    pub fn configure_pvh(
        &self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        entry: PvhEntry,
        count: u8,
    ) -> Result<(), VcpuError> {
        self.configure_cpuid(kvm, count)?;
        self.configure_msrs()?;
        self.configure_lapic()?;

        let gdt = [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ];
        for (i, e) in gdt.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
                .map_err(VcpuError::Gdt)?;
        }
        mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
            .map_err(VcpuError::Gdt)?;

        let mut sregs = self.fd.get_sregs().map_err(kvm_err("get sregs"))?;
        sregs.cs = segment(CODE_SELECTOR, 0xb, 1, 1, 0xffff_ffff, 1);
        let data = segment(DATA_SELECTOR, 0x3, 1, 1, 0xffff_ffff, 1);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment(TSS_SELECTOR, 0xb, 0, 0, 0x67, 0);
        sregs.gdt.base = BOOT_GDT_ADDR;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = BOOT_IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err("set FPU"))?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry.entry,
            rbx: entry.start_info,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kvm_err("set registers"))
    }

    /// The MSRs to save: the architectural and kvmclock MSRs this VMM
    /// migrates, where KVM says it can save them.
    pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("get MSR index list"))?;
        let list = list.as_slice();
        Ok(SAVED_MSRS
            .iter()
            .copied()
            .filter(|m| list.contains(m))
            .collect())
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
        let (regs, sregs, snapshot_events) = if self.snapshot && !started_over {
            let s = self.fd.sync_regs();
            (s.regs, s.sregs, Some(s.events).filter(|_| !caps.several))
        } else {
            (
                self.fd.get_regs().map_err(kvm_err("get registers"))?,
                self.fd.get_sregs().map_err(kvm_err("get sregs"))?,
                None,
            )
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

    /// Writes a saved state into this (fresh) vCPU.
    fn restore(&mut self, _: &VcpuCaps, s: &VcpuState) -> Result<(), VcpuError> {
        let apic_id = s.apic_id.unwrap_or(u32::from(s.id));
        if s.id != self.id || apic_id != self.apic_id() {
            return Err(VcpuError::Identity {
                index: self.id,
                id: s.id,
                apic_id,
            });
        }
        self.snapshot = false;
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
        self.fd
            .set_regs(&s.regs)
            .map_err(kvm_err("set registers"))?;
        self.fd.set_sregs(&s.sregs).map_err(kvm_err("set sregs"))?;
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
        if !has(|k, s| crate::kvm_blob::same(&k.vcpu_events, &s.vcpu_events)) {
            self.fd
                .set_vcpu_events(&s.vcpu_events)
                .map_err(kvm_err("set vCPU events"))?;
        }
        self.parked_parts.set(Some(ParkedParts::of(s)));
        self.activity.saw_mp_state(s.mp_state.mp_state);
        Ok(())
    }
}

/// What the run loop does after an exit.
enum Next {
    Continue,
    /// KVM_EXIT_INTERNAL_ERROR: details are read from kvm_run afterwards.
    InternalError,
    Fail(String),
    Exit(ExitReason),
}

fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                log::trace!("unhandled port write {port:#x}");
            }
            Next::Continue
        }
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                log::trace!("unhandled port read {port:#x}");
            }
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                log::debug!("unhandled MMIO read {addr:#x}");
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                log::debug!("unhandled MMIO write {addr:#x}");
            }
            Next::Continue
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            Next::Exit(ExitReason::PowerOff { code: 0 })
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Next::Exit(ExitReason::Reset),
        VcpuExit::Shutdown => Next::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Next::Fail(format!(
            "KVM entry failure (hardware reason {reason:#x}, cpu {cpu})"
        )),
        VcpuExit::Hlt => Next::Fail("guest halted with no interrupt source".into()),
        other => Next::Fail(format!("unhandled exit {other:?}")),
    }
}

/// "KVM internal error (suberror N: what)" from the kvm_run page.
fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal`
    // member of the exit union; it is plain integers, any bits are valid.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal
        .data
        .iter()
        .take(n)
        .map(|d| format!("{d:#x}"))
        .collect();
    format!(
        "KVM internal error (suberror {}: {what}, data [{}])",
        internal.suberror,
        data.join(", ")
    )
}

/// Lets KVM finish the instruction of the last port or MMIO exit (an `in`
/// gets its value, RIP moves on) without running the guest further, so a
/// paused vCPU's saved registers are complete (KVM API: "userspace should
/// ensure that the operation is completed before performing a live
/// migration").
///
/// The same KVM_RUN, with `kvm_valid_regs`, leaves the registers, special
/// registers and events in the kvm_run page on its way out: a save reads
/// them there instead of making three vCPU ioctls (8 us each on this
/// nested KVM), and this runs on the vCPU's own thread while the pauser
/// stops the devices.
fn finish_for_park(vcpu: &Mutex<Vcpu>) {
    let mut v = vcpu.lock().unwrap_or_else(|p| p.into_inner());
    // With immediate_exit set KVM_RUN completes pending I/O, then returns
    // EINTR before entering the guest (storing the valid registers).
    let run = |fd: &mut VcpuFd, sync: bool| {
        for r in SNAPSHOT_REGS {
            if sync {
                fd.set_sync_valid_reg(r);
            } else {
                fd.clear_sync_valid_reg(r);
            }
        }
        fd.set_kvm_immediate_exit(1);
        let r = fd.run().map(|_| ()).map_err(|e| e.errno());
        fd.set_kvm_immediate_exit(0);
        for r in SNAPSHOT_REGS {
            fd.clear_sync_valid_reg(r);
        }
        r
    };
    let mut r = run(&mut v.fd, true);
    if r == Err(libc::EINVAL) {
        // A KVM without these sync registers refuses the run: finish the
        // I/O without them.
        r = run(&mut v.fd, false);
        v.snapshot = false;
    } else {
        v.snapshot = r == Err(libc::EINTR);
    }
    if r.is_ok() {
        log::debug!("vCPU {}: an exit while completing I/O", v.id);
    }
}

/// What [`finish_for_park`] leaves in kvm_run (`KVM_CAP_SYNC_REGS`).
const SNAPSHOT_REGS: [SyncReg; 3] = [
    SyncReg::Register,
    SyncReg::SystemRegister,
    SyncReg::VcpuEvents,
];

/// The vCPU thread body: run until power-off, failure or stop.
fn run_loop(
    vcpu: Arc<Mutex<Vcpu>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    ctl: Arc<RunControl>,
    exit: ExitSender,
) {
    ctl.register_current_thread();
    let activity = vcpu
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .activity
        .clone();
    // KVM_RUN entered once: before that there is nothing to finish (an
    // exit's instruction, which KVM completes only on the next KVM_RUN)
    // nor to snapshot, and a first KVM_RUN is best left to the guest.
    let mut has_run = false;
    loop {
        if ctl.pending() {
            if has_run {
                finish_for_park(&vcpu);
            }
            activity.parked();
            if !ctl.park() {
                return;
            }
            vcpu.lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget_parked_parts();
        }
        activity.running();
        has_run = true;
        // Held for one KVM_RUN and its exit: a pauser that has seen the
        // thread park can take the lock and save the state.
        let mut v = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let id = v.id;
        let next = match v.fd.run() {
            Ok(e) => {
                activity.saw_guest_exit();
                handle_exit(e, &pio, &mmio)
            }
            Err(e) if e.errno() == libc::EINTR => {
                v.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            // An application processor that was waiting for INIT or SIPI
            // got one: KVM returns to let userspace see the new MP state,
            // and the next KVM_RUN goes on.
            Err(e) if e.errno() == libc::EAGAIN => {
                v.fd.set_kvm_immediate_exit(0);
                if let Ok(mp) = v.fd.get_mp_state() {
                    activity.saw_mp_state(mp.mp_state);
                }
                Next::Continue
            }
            Err(e) => Next::Fail(format!("KVM_RUN failed: {e}")),
        };
        let next = match next {
            Next::InternalError => Next::Fail(internal_error_detail(&mut v.fd)),
            n => n,
        };
        match next {
            Next::Continue if exit.is_stopping() => return,
            Next::Continue | Next::InternalError => {}
            Next::Exit(reason) => {
                exit.send(reason);
                return;
            }
            Next::Fail(reason) => {
                let rip =
                    v.fd.get_regs()
                        .map_or_else(|e| format!("unknown ({e})"), |r| format!("{:#x}", r.rip));
                exit.send(ExitReason::VcpuFailed {
                    vcpu: id,
                    message: format!("{reason} at RIP {rip}"),
                });
                return;
            }
        }
    }
}

/// Starts the vCPU thread (small stack: the loop needs little).
pub fn spawn(
    vcpu: Arc<Mutex<Vcpu>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    ctl: Arc<RunControl>,
    exit: ExitSender,
) -> Result<JoinHandle<()>, VcpuError> {
    let (id, activity) = {
        let v = vcpu.lock().unwrap_or_else(|p| p.into_inner());
        (v.id, v.activity.clone())
    };
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .stack_size(VCPU_STACK_SIZE)
        .spawn(move || {
            if let Err(e) = crate::sandbox::enter_thread(ThreadKind::Vcpu) {
                exit.send(ExitReason::VcpuFailed {
                    vcpu: id,
                    message: e.to_string(),
                });
                return;
            }
            run_loop(vcpu, pio, mmio, ctl.clone(), exit);
            activity.ended();
            ctl.thread_exited();
        })
        .map_err(VcpuError::Thread)
}
