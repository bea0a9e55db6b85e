//! The CPUID a vCPU gets: KVM's supported set ([`crate::kvm_cpuid`]) with
//! the vCPU's APIC ID, a topology of one socket with one core per vCPU and
//! one thread per core, the hypervisor bit, and without what this vmm does
//! not give a guest (VMX, the architectural PMU, whose MSRs are not part of
//! the migrated state).
//!
//! The guest finds its CPUs in the firmware tables (MADT, MP table); the
//! topology leaves must agree with them, since Linux derives its package
//! and core numbering from them.

// kvm-bindings spells the kernel's KVM_CPUID_FLAG_SIGNIFCANT_INDEX as the
// kernel header does.
use kvm_bindings::{
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX as KVM_CPUID_FLAG_SIGNIFICANT_INDEX, kvm_cpuid_entry2,
};

/// Leaf 1 ECX: VMX (5) off, hypervisor (31) on.
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT, "EBX[23:16] is valid" (several logical processors).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB / 0x1F level types (ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits of an APIC ID that number `count` items (log2, rounded up).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// One subleaf of leaf 0xB or 0x1F for vCPU `apic_id` of `count`.
fn extended_topology(function: u32, index: u32, apic_id: u32, count: u32) -> kvm_cpuid_entry2 {
    let (eax, ebx, level) = match index {
        // One thread per core: the SMT level spans 0 bits.
        0 => (0, 1, LEVEL_SMT),
        // Cores make up the package.
        1 => (id_bits(count), count, LEVEL_CORE),
        // The subleaf after the last level is invalid (type 0).
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | (index & 0xff),
        edx: apic_id,
        ..Default::default()
    }
}

/// Rewrites KVM's supported CPUID for vCPU `id` (its APIC ID) of a
/// machine with `count` vCPUs.
pub fn for_vcpu(supported: &[kvm_cpuid_entry2], id: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(id);
    let n = u32::from(count.max(1));
    let mut out = Vec::with_capacity(supported.len() + 4);
    let mut extended = Vec::new();
    for e in supported {
        let mut e = *e;
        match e.function {
            1 => {
                // EBX[31:24] APIC ID, [23:16] logical processors in the package.
                let logical = n.next_power_of_two().min(0xff);
                e.ebx = (e.ebx & 0x0000_ffff) | (logical << 16) | (apic_id << 24);
                e.ecx = (e.ecx & !LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if e.eax & 0x1f != 0 => {
                // EAX[31:26] cores per package - 1; [25:14] logical
                // processors sharing this cache - 1: a core's own caches
                // (levels 1 and 2) are its alone, the last level is shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing.min(0xfff)) << 14) | ((n.min(64) - 1) << 26);
            }
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // Rebuilt below: KVM's own subleaves describe the host.
            0xb | 0x1f => {
                if !extended.contains(&e.function) {
                    extended.push(e.function);
                }
                continue;
            }
            _ => {}
        }
        out.push(e);
    }
    for function in extended {
        for index in 0..3 {
            out.push(extended_topology(function, index, apic_id, n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// What this host's KVM reports for the leaves that change.
    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0xa0671, 0x0102_0800, 0x8120_2020, 0x0f8b_fbff),
            entry(4, 0, 0x0400_0121, 0x02c0_003f, 0x3f, 0),
            entry(4, 3, 0x0400_4163, 0x03c0_003f, 0x77fff, 0),
            entry(4, 4, 0, 0, 0, 0),
            entry(0xa, 0, 0x0704_3404, 0, 0, 0x603),
            entry(0xb, 0, 0, 0, 0, 1),
            entry(0x1f, 0, 0, 0, 0, 1),
        ]
    }

    fn leaf(c: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_id_and_topology_agree_with_the_vcpu_count() {
        for (id, count) in [(0u8, 1u8), (0, 4), (3, 4), (31, 32), (254, 255)] {
            let c = for_vcpu(&host(), id, count);
            let l1 = leaf(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert!((l1.ebx >> 16) & 0xff >= u32::from(count).min(0xff));
            assert_eq!(l1.edx & LEAF1_EDX_HTT != 0, count > 1);
            assert_eq!(l1.ecx & LEAF1_ECX_VMX, 0);
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            for f in [0xb, 0x1f] {
                let smt = leaf(&c, f, 0);
                let core = leaf(&c, f, 1);
                let end = leaf(&c, f, 2);
                assert_eq!((smt.ebx, (smt.ecx >> 8) & 0xff), (1, LEVEL_SMT));
                assert_eq!(core.ebx, u32::from(count));
                assert_eq!((core.ecx >> 8) & 0xff, LEVEL_CORE);
                // Every APIC ID below count fits the core level's shift.
                assert!(u32::from(count) <= 1 << core.eax);
                assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
                for e in [smt, core, end] {
                    assert_eq!(e.edx, u32::from(id));
                    assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFICANT_INDEX);
                }
            }
            assert_eq!(c.iter().filter(|e| e.function == 0xb).count(), 3);
            let l4 = leaf(&c, 4, 0);
            assert_eq!(l4.eax >> 26, u32::from(count).min(64) - 1);
            assert_eq!((l4.eax >> 14) & 0xfff, 0);
            assert_eq!((leaf(&c, 4, 3).eax >> 14) & 0xfff, u32::from(count) - 1);
            assert_eq!(leaf(&c, 4, 4).eax, 0);
            assert_eq!(leaf(&c, 0xa, 0).eax, 0);
        }
    }

    #[test]
    fn no_extended_topology_leaf_is_invented() {
        let c: Vec<_> = host().into_iter().filter(|e| e.function != 0x1f).collect();
        assert!(!for_vcpu(&c, 1, 2).iter().any(|e| e.function == 0x1f));
    }
}
