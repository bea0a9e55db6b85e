//! The one owner of a running machine's run state. The API (pause, resume,
//! status, shutdown), the exit path and a migration all go through it, so
//! the order is the same everywhere: pause kicks the vCPUs, stops the
//! device threads while they park (frames wait in the TAP), then waits for
//! the vCPUs; resume restarts the devices first (the guest finds its queues
//! served, every queue kicked once), then the vCPUs. A migration target
//! wakes its vCPUs first, its devices right after ([`Runtime::arrive`]).
//! A migration holds the machine for its whole run, and other requests are
//! answered "busy" meanwhile.
//!
//! After a migration began, this process runs the guest's vCPUs again only
//! if it wins the migration's ownership word ([`common::ownership`]): the
//! source by taking the guest back, a target by taking it. The API is
//! served only while this process owns the guest ([`ApiGate`]).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use common::api::{RunState, VmStatus};
use common::migration::Timeline;
use common::ownership::{Owner, OwnerPage, process_gone};

use crate::api_gate::ApiGate;
use crate::control::{ControlError, RunControl};
use crate::machine::Machine;
use crate::persist::PersistError;
use crate::vm::ExitSender;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("devices: {0}")]
    Devices(#[from] PersistError),
    #[error("the VM is {0:?}: try again when that is over")]
    Busy(RunState),
}

pub struct Runtime {
    pub machine: Arc<Machine>,
    pub control: Arc<RunControl>,
    pub exit: ExitSender,
    pub started: Instant,
    /// A duplicate of the listening API socket, which a migration hands to
    /// a target started without `--api-socket`.
    pub api_listener: Option<OwnedFd>,
    /// Open while this process owns the guest and serves the API.
    pub api_gate: Arc<ApiGate>,
    state: Mutex<RunState>,
    /// The outgoing migration's ownership page, once a target said Ready.
    handover: Mutex<Option<Handover>>,
}

/// An outgoing migration as the exit path must know it.
struct Handover {
    page: Arc<OwnerPage>,
    /// The target serves the API socket once it owns the guest.
    takes_api_socket: bool,
}

impl Runtime {
    /// `state` is Running, or Paused for a machine whose vCPUs were
    /// created parked (a migrated guest that was paused).
    pub fn new(
        machine: Arc<Machine>,
        control: Arc<RunControl>,
        exit: ExitSender,
        started: Instant,
        api_listener: Option<OwnedFd>,
        api_gate: Arc<ApiGate>,
        state: RunState,
    ) -> Self {
        Runtime {
            machine,
            control,
            exit,
            started,
            api_listener,
            api_gate,
            state: Mutex::new(state),
            handover: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> RunState {
        *self.lock()
    }

    /// A migration target that took the guest: it runs, or stays paused as
    /// it was at the source; the API opens. `answer` runs first (the source waits for it: anything woken
    /// before it, a vCPU or a device thread, could take this thread's CPU),
    /// then the vCPUs wake, then the devices (every queue kicked once, so
    /// nothing the guest notified meanwhile is missed).
    pub fn arrive(&self, paused: bool, answer: impl FnOnce()) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        answer();
        let run = if paused {
            *st = RunState::Paused;
            Ok(())
        } else {
            self.control.resume();
            *st = RunState::Running;
            self.start_devices()
        };
        drop(st);
        // Last: it wakes the API threads.
        self.api_gate.open();
        run
    }

    /// `vmctl shutdown`: refused while a migration holds the guest.
    pub fn begin_shutdown(&self) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        match *st {
            RunState::Migrating | RunState::Migrated => Err(RuntimeError::Busy(*st)),
            _ => {
                *st = RunState::ShuttingDown;
                Ok(())
            }
        }
    }

    /// The exit path: if an outgoing migration is in flight, takes the
    /// guest back so that a target can no longer take it (the guest stops
    /// with this process). Returns true when the target owns the guest,
    /// lives, and serves the API socket (which must then stay).
    pub fn settle_for_exit(&self) -> bool {
        let h = self.handover.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = h.as_ref() else {
            return false;
        };
        match h.page.take_back() {
            Ok(()) => false,
            Err(Owner::Target { pid }) => h.takes_api_socket && !process_gone(pid),
            Err(_) => false,
        }
    }

    /// Pauses a running guest (a paused one stays so).
    pub fn pause(&self) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        match *st {
            RunState::Running => {
                self.quiesce(&mut Timeline::default())?;
                *st = RunState::Paused;
                Ok(())
            }
            RunState::Paused => Ok(()),
            other => Err(RuntimeError::Busy(other)),
        }
    }

    /// Resumes a paused guest (a running one runs on).
    pub fn resume(&self) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        match *st {
            RunState::Paused => {
                self.unquiesce()?;
                *st = RunState::Running;
                Ok(())
            }
            RunState::Running => Ok(()),
            other => Err(RuntimeError::Busy(other)),
        }
    }

    /// vCPUs and devices together: the vCPUs are kicked, the device
    /// threads stopped while they park, then the vCPUs waited for. A
    /// driver write that raced the device pause is handled under the
    /// device's lock like any other; should it have started a device again
    /// (a reset and re-activation in those microseconds), the second
    /// `pause_devices` (a no-op on paused devices) stops it. `tl` notes
    /// when each was stopped.
    fn quiesce(&self, tl: &mut Timeline) -> Result<(), RuntimeError> {
        self.control.request_pause()?;
        let devices = self.machine.pause_devices();
        tl.mark("source: devices stopped");
        let vcpus = self.control.wait_parked();
        tl.mark("source: vcpus parked");
        let stopped = vcpus
            .map_err(RuntimeError::from)
            .and(devices.map_err(RuntimeError::from))
            .and_then(|()| self.machine.pause_devices().map_err(RuntimeError::from));
        if let Err(e) = stopped {
            // Half paused helps nobody: give the guest everything back.
            let _ = self.machine.resume_devices();
            self.control.resume();
            return Err(e);
        }
        Ok(())
    }

    /// The PIT restarted, devices (each queue kicked once: a notification
    /// the guest sent while they were stopped, or before a migration, is
    /// not lost), then vCPUs.
    fn unquiesce(&self) -> Result<(), RuntimeError> {
        // Paused time does not count: the PIT does not catch up on it.
        if let Err(e) = self.machine.vm.restart_pit() {
            log::warn!("resume: {e}");
        }
        let devices = self.start_devices();
        self.control.resume();
        devices
    }

    /// Restarts the device threads, every queue kicked once.
    fn start_devices(&self) -> Result<(), RuntimeError> {
        let devices = self.machine.resume_devices();
        for n in &self.machine.nets {
            n.kick_all_queues();
        }
        devices.map_err(RuntimeError::from)
    }

    pub fn status(&self) -> VmStatus {
        VmStatus {
            state: self.state(),
            pid: std::process::id(),
            vcpus: self.machine.vcpus.len() as u8,
            memory_bytes: self.machine.vm.ram.size,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            nets: self.machine.nets.iter().map(|n| n.status()).collect(),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            format: Some(crate::persist::MACHINE_STATE_FORMAT.to_string()),
            vcpu_list: Some(
                self.machine
                    .vcpu_activity
                    .iter()
                    .map(|a| a.status())
                    .collect(),
            ),
        }
    }

    /// Takes the machine for a migration (it runs on until
    /// [`Migrating::stop`]). Records whether the user had paused it (the
    /// target then keeps it paused).
    pub fn begin_migration(&self) -> Result<Migrating<'_>, RuntimeError> {
        let mut st = self.lock();
        let was_paused = match *st {
            RunState::Running => false,
            RunState::Paused => true,
            other => return Err(RuntimeError::Busy(other)),
        };
        *st = RunState::Migrating;
        Ok(Migrating {
            rt: self,
            was_paused,
            stopped: false,
            page: None,
            done: false,
        })
    }
}

/// A machine held by a migration. Dropped without [`Migrating::handed_over`],
/// it gives the guest back as it was (running again unless the user had
/// paused it) — but only if this process wins the ownership word back:
/// if the target took the guest, this process never runs it again.
pub struct Migrating<'a> {
    rt: &'a Runtime,
    pub was_paused: bool,
    stopped: bool,
    page: Option<Arc<OwnerPage>>,
    done: bool,
}

impl Migrating<'_> {
    /// The migration's ownership page, offered to a target that said
    /// Ready and will serve the API socket (`takes_api_socket`) once it
    /// owns the guest.
    pub fn offered(&mut self, page: Arc<OwnerPage>, takes_api_socket: bool) {
        self.page = Some(page.clone());
        *self.rt.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some(Handover {
            page,
            takes_api_socket,
        });
    }

    /// Stops vCPUs and devices (a paused guest already is).
    pub fn stop(&mut self, tl: &mut Timeline) -> Result<(), RuntimeError> {
        if !self.was_paused && !self.stopped {
            self.rt.quiesce(tl)?;
            self.stopped = true;
        }
        Ok(())
    }

    /// The target owns the guest: this process never runs it again nor
    /// answers on the API socket.
    pub fn handed_over(mut self) {
        self.done = true;
        *self.rt.lock() = RunState::Migrated;
        self.rt.api_gate.retire();
    }
}

impl Drop for Migrating<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.rt.lock();
        if let Some(page) = &self.page
            && let Err(owner) = page.take_back()
        {
            // The target owns it: never run it here again.
            log::error!("migration: the guest is {owner}; not resuming it here");
            *st = RunState::Migrated;
            self.rt.api_gate.retire();
            return;
        }
        *self.rt.handover.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.stopped
            && let Err(e) = self.rt.unquiesce()
        {
            log::error!("migration failed and the guest did not resume cleanly: {e}");
        }
        *st = if self.was_paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        drop(st);
        self.rt.api_gate.open();
    }
}
