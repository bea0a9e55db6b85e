//! What the API tells of a vCPU (`vmctl status`) while its thread holds
//! it: whether the thread runs, is parked or ended, and the vCPU's MP state
//! as last seen. Atomics written by the vCPU's own thread (and by a save
//! or restore, with the thread parked); the API never takes the vCPU from
//! its thread, nor makes a vCPU ioctl.

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use common::api::{VcpuMpState, VcpuRun, VcpuStatus};
use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};

const RUNNING: u8 = 0;
const PARKED: u8 = 1;
const ENDED: u8 = 2;

pub struct VcpuActivity {
    id: u8,
    thread: AtomicU8,
    mp_state: AtomicU32,
}

impl VcpuActivity {
    /// A vCPU whose thread has not started: KVM makes vCPU 0 runnable and
    /// the others wait for INIT and SIPI.
    pub fn new(id: u8) -> Self {
        VcpuActivity {
            id,
            thread: AtomicU8::new(PARKED),
            mp_state: AtomicU32::new(if id == 0 {
                KVM_MP_STATE_RUNNABLE
            } else {
                KVM_MP_STATE_UNINITIALIZED
            }),
        }
    }

    pub fn saw_mp_state(&self, mp_state: u32) {
        self.mp_state.store(mp_state, Ordering::Relaxed);
    }

    /// The vCPU exited to userspace from guest code: it runs.
    pub fn saw_guest_exit(&self) {
        if self.mp_state.load(Ordering::Relaxed) != KVM_MP_STATE_RUNNABLE {
            self.saw_mp_state(KVM_MP_STATE_RUNNABLE);
        }
    }

    pub fn running(&self) {
        self.thread.store(RUNNING, Ordering::Relaxed);
    }

    pub fn parked(&self) {
        self.thread.store(PARKED, Ordering::Relaxed);
    }

    pub fn ended(&self) {
        self.thread.store(ENDED, Ordering::Relaxed);
    }

    pub fn status(&self) -> VcpuStatus {
        VcpuStatus {
            id: self.id,
            apic_id: u32::from(self.id),
            run: match self.thread.load(Ordering::Relaxed) {
                RUNNING => VcpuRun::Running,
                PARKED => VcpuRun::Paused,
                _ => VcpuRun::Ended,
            },
            mp_state: match self.mp_state.load(Ordering::Relaxed) {
                KVM_MP_STATE_RUNNABLE => VcpuMpState::Runnable,
                KVM_MP_STATE_UNINITIALIZED => VcpuMpState::WaitingForInit,
                KVM_MP_STATE_INIT_RECEIVED => VcpuMpState::WaitingForSipi,
                KVM_MP_STATE_SIPI_RECEIVED => VcpuMpState::SipiReceived,
                KVM_MP_STATE_HALTED => VcpuMpState::Halted,
                other => VcpuMpState::Other(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ap_waits_until_it_is_seen_running() {
        let a = VcpuActivity::new(3);
        assert_eq!(a.status().mp_state, VcpuMpState::WaitingForInit);
        assert_eq!(a.status().run, VcpuRun::Paused);
        a.running();
        a.saw_mp_state(KVM_MP_STATE_INIT_RECEIVED);
        assert_eq!(a.status().mp_state, VcpuMpState::WaitingForSipi);
        a.saw_guest_exit();
        let s = a.status();
        assert_eq!(
            (s.id, s.apic_id, s.run, s.mp_state),
            (3, 3, VcpuRun::Running, VcpuMpState::Runnable)
        );
        a.ended();
        assert_eq!(a.status().run, VcpuRun::Ended);
        assert_eq!(
            VcpuActivity::new(0).status().mp_state,
            VcpuMpState::Runnable
        );
    }
}
