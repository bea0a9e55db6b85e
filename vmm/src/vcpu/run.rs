//! The vCPU thread: KVM_RUN until power-off, failure or stop, port and
//! MMIO exits dispatched to the buses, and parking for a pause (the last
//! exit finished and the registers left in kvm_run first).

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::persist::KVM_RUN_REGS;
use super::{InKvmRun, Vcpu, VcpuActivity, VcpuError};
use crate::control::RunControl;
use crate::devices::bus::Bus;
use crate::sandbox::ThreadKind;
use crate::vm::{ExitReason, ExitSender};

const VCPU_STACK_SIZE: usize = 256 * 1024;

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
        for r in KVM_RUN_REGS {
            if sync {
                fd.set_sync_valid_reg(r);
            } else {
                fd.clear_sync_valid_reg(r);
            }
        }
        fd.set_kvm_immediate_exit(1);
        let r = fd.run().map(|_| ()).map_err(|e| e.errno());
        fd.set_kvm_immediate_exit(0);
        for r in KVM_RUN_REGS {
            fd.clear_sync_valid_reg(r);
        }
        r
    };
    let mut r = run(&mut v.fd, true);
    let synced = r != Err(libc::EINVAL);
    if !synced {
        // A KVM without these sync registers refuses the run: finish the
        // I/O without them.
        r = run(&mut v.fd, false);
    }
    v.in_kvm_run = if synced && r == Err(libc::EINTR) {
        InKvmRun::Parked
    } else {
        InKvmRun::Nothing
    };
    if r.is_ok() {
        log::debug!("vCPU {}: an exit while completing I/O", v.id);
    }
}

/// The vCPU thread body: run until power-off, failure or stop. It takes
/// its vCPU's lock only to run it: a thread parked at once (a migration
/// target's) never holds it before the state is restored.
fn run_loop(
    vcpu: Arc<Mutex<Vcpu>>,
    activity: &VcpuActivity,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    ctl: &RunControl,
    exit: ExitSender,
) {
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
    let thread_ctl = ctl.clone();
    let thread = crate::thread_start::spawn(
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(VCPU_STACK_SIZE),
        || crate::sandbox::enter_thread(ThreadKind::Vcpu),
        move |entered| {
            if let Err(e) = entered {
                exit.send(ExitReason::VcpuFailed {
                    vcpu: id,
                    message: e.to_string(),
                });
            } else {
                run_loop(vcpu, &activity, pio, mmio, &thread_ctl, exit);
                activity.ended();
            }
            thread_ctl.thread_exited();
        },
    )
    .map_err(VcpuError::Thread)?;
    ctl.register(thread.as_pthread_t());
    Ok(thread)
}
