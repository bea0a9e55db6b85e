//! KVM's supported CPUID, asked once per process. The ioctl costs about
//! 0.4 ms here and its answer does not change while the process runs: a
//! boot asks it on another thread while the VM is built ([`Prefetch`]), and
//! a migration target with several vCPUs asks it once, not once per vCPU.
//! The answers of two calls differ only in the APIC ID of the host CPU that
//! asked (leaf 1 EBX bits 31:24, leaves 0xB and 0x1F EDX), which
//! [`crate::vcpu::Vcpu::configure_cpuid`] replaces with the vCPU's own.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::OnceLock;
use std::thread::JoinHandle;

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

/// [`supported`] running on a thread of its own. The thread inherits the
/// caller's sandbox (the `setup` filter), runs no code a guest or a peer
/// can influence, and ends after the one ioctl.
pub struct Prefetch(JoinHandle<()>);

impl Prefetch {
    /// Starts the query on a duplicate of `kvm`'s fd.
    pub fn start(kvm: &Kvm) -> std::io::Result<Self> {
        // SAFETY: `kvm` keeps its fd open for the whole borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(kvm.as_raw_fd()) }.try_clone_to_owned()?;
        // SAFETY: `fd` is a fresh duplicate of the /dev/kvm fd that nothing
        // else owns; the Kvm takes it over and closes it.
        let dup = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
        let thread = std::thread::Builder::new()
            .name("cpuid".into())
            .stack_size(64 << 10)
            .spawn(move || {
                // A failure is asked again, and reported, by the next caller.
                let _ = supported(&dup);
            })?;
        Ok(Prefetch(thread))
    }

    /// Waits until the query is done (the answer is then in the copy).
    pub fn wait(self) {
        let _ = self.0.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetched_cpuid_is_what_kvm_says() {
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
        Prefetch::start(&kvm).unwrap().wait();
        let direct = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        assert!(SUPPORTED.get().is_some());
        assert_eq!(per_cpu(supported(&kvm).unwrap()), per_cpu(direct));
    }
}
