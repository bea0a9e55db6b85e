//! KVM's supported CPUID, asked once per process. The ioctl costs about
//! 0.4 ms here and its answer does not change while the process runs: a
//! boot asks it on another thread while the VM is built
//! ([`crate::boot_helper`]), and
//! a migration target with several vCPUs asks it once, not once per vCPU.
//! The answers of two calls differ only in the APIC ID of the host CPU that
//! asked (leaf 1 EBX bits 31:24, leaves 0xB and 0x1F EDX), which
//! [`crate::vcpu::Vcpu::configure_cpuid`] replaces with the vCPU's own.

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

static SUPPORTED: OnceLock<CpuId> = OnceLock::new();

/// KVM_GET_SUPPORTED_CPUID, from the process's copy once one succeeded.
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_asked_on_another_thread_is_what_kvm_says() {
        let kvm = Kvm::new().unwrap();
        // KVM fills in the APIC ID of the host CPU that asked (leaf 1 EBX
        // bits 31:24, leaves 0xB and 0x1F EDX); the vCPU set-up replaces it.
        let per_cpu = |c: CpuId| -> Vec<_> {
            c.as_slice()
                .iter()
                .map(|e| {
                    let mut e = *e;
                    match e.function {
                        1 => e.ebx &= 0x00ff_ffff,
                        0xb | 0x1f => e.edx = 0,
                        _ => {}
                    }
                    e
                })
                .collect()
        };
        // Asked on another thread, as a boot does.
        std::thread::scope(|s| {
            s.spawn(|| supported(&kvm).unwrap());
        });
        let direct = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        assert!(SUPPORTED.get().is_some());
        assert_eq!(per_cpu(supported(&kvm).unwrap()), per_cpu(direct));
    }
}
