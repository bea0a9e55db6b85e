//! The two slow KVM calls of a boot that the main thread need not wait
//! for, made on one short-lived thread while it builds the VM: the
//! supported CPUID (about 0.4 ms here, [`kvm_cpuid::supported`]) and, as
//! soon as the VM exists, its PIT (KVM starts a kernel thread for it, from
//! 0.03 ms to several ms with the host's load).
//!
//! One thread for both, not one each: on this 2-core host a third runnable
//! thread beside the main thread and the first one only waits for a CPU,
//! and each spawn costs the main thread about 50 µs. The thread inherits
//! the caller's sandbox (the `setup` filter), runs no code a guest or a
//! peer can influence, and ends before any vCPU runs.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use kvm_ioctls::{Kvm, VmFd};

use crate::kvm_cpuid;
use crate::vm::{self, VmError};

/// The thread, asking the CPUID.
pub struct BootHelper {
    cpuid_asked: Receiver<()>,
    vm: SyncSender<Arc<VmFd>>,
    thread: JoinHandle<Result<(), VmError>>,
}

/// The thread, once it was given the VM: asking the CPUID, then creating
/// the PIT.
pub struct PitPending {
    cpuid_asked: Receiver<()>,
    thread: JoinHandle<Result<(), VmError>>,
}

impl BootHelper {
    /// Starts the CPUID query on a duplicate of `kvm`'s fd.
    pub fn start(kvm: &Kvm) -> std::io::Result<Self> {
        // SAFETY: `kvm` keeps its fd open for the whole borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(kvm.as_raw_fd()) }.try_clone_to_owned()?;
        // SAFETY: `fd` is a fresh duplicate of the /dev/kvm fd that nothing
        // else owns; the Kvm takes it over and closes it.
        let dup = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
        let (asked_tx, cpuid_asked) = mpsc::sync_channel(1);
        let (vm, vm_rx) = mpsc::sync_channel::<Arc<VmFd>>(1);
        let thread = std::thread::Builder::new()
            .name("boot-helper".into())
            .stack_size(64 << 10)
            .spawn(move || {
                // A failure is asked again, and reported, by the next caller.
                let _ = kvm_cpuid::supported(&dup);
                drop(dup);
                let _ = asked_tx.send(());
                match vm_rx.recv() {
                    Ok(fd) => vm::create_pit(&fd),
                    // The build failed before it had a VM.
                    Err(_) => Ok(()),
                }
            })?;
        Ok(BootHelper {
            cpuid_asked,
            vm,
            thread,
        })
    }

    /// Has the thread create `vm`'s PIT once the query is done.
    pub fn create_pit(self, vm: &Arc<VmFd>) -> PitPending {
        // Only fails if the thread is gone, which its join reports.
        let _ = self.vm.send(vm.clone());
        PitPending {
            cpuid_asked: self.cpuid_asked,
            thread: self.thread,
        }
    }
}

impl PitPending {
    /// Waits until the CPUID query is done (the answer is then in
    /// [`kvm_cpuid::supported`]'s copy).
    pub fn wait_cpuid(&self) {
        let _ = self.cpuid_asked.recv();
    }

    /// Waits for the PIT: its creation's outcome, or the thread's panic.
    pub fn wait_pit(self) -> std::thread::Result<Result<(), VmError>> {
        self.thread.join()
    }
}
