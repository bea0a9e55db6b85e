//! One vCPU: CPUID, MSRs and registers for a PVH entry or an application
//! processor; its thread running KVM_RUN and dispatching port and MMIO
//! exits to the buses ([`run`]); its state for migration ([`VcpuState`],
//! through [`crate::persist::Persist`], in [`persist`]); what the API sees
//! of it ([`activity`]).

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::pvh::PvhEntry;
use crate::memory::GuestMemoryMmap;

mod activity;
mod persist;
mod run;
pub use activity::VcpuActivity;
pub use persist::{VcpuCaps, VcpuState};
pub use run::spawn;

use persist::{ParkedParts, SAVED_MSRS};

/// A boot GDT in low RAM (below the PVH start info), as the PVH ABI expects
/// flat 32-bit code and data segments.
const BOOT_GDT_ADDR: u64 = 0x500;
const BOOT_IDT_ADDR: u64 = 0x520;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 0x10;

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

/// What kvm_run's registers, special registers and events (the
/// `KVM_CAP_SYNC_REGS` area) are, for a save to read instead of asking KVM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InKvmRun {
    /// Nothing a save may use.
    Nothing,
    /// Stored by the KVM_RUN that finished the vCPU's last exit before it
    /// parked ([`finish_for_park`]).
    Parked,
    /// Written by a restore for the next KVM_RUN to apply
    /// (`VcpuCaps::sync_regs`): until it runs, KVM's own copy is stale.
    Restored,
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
    /// Whose registers, special registers and events kvm_run holds; back
    /// to [`InKvmRun::Nothing`] once the vCPU runs again.
    in_kvm_run: InKvmRun,
    /// What the API reports of this vCPU while its thread holds it.
    pub activity: Arc<VcpuActivity>,
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
            in_kvm_run: InKvmRun::Nothing,
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
        self.in_kvm_run = InKvmRun::Nothing;
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
