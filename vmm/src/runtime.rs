//! The one owner of a running machine's run state. The API (pause, resume,
//! status, shutdown), the exit path and a migration all go through it, so
//! the order is the same everywhere: pause stops the vCPUs first, then the
//! device threads (no driver write races the device pause; frames wait in
//! the TAP); resume restarts the devices first (the guest finds its queues
//! served), then the vCPUs. A migration holds the machine for its whole
//! run, and other requests are answered "busy" meanwhile.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use common::api::{RunState, VmStatus};

use crate::control::{ControlError, RunControl};
use crate::persist::{Machine, PersistError};
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
    state: Mutex<RunState>,
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
        state: RunState,
    ) -> Self {
        Runtime {
            machine,
            control,
            exit,
            started,
            api_listener,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> RunState {
        *self.lock()
    }

    /// For the builder of a migration target: the guest arrived, running
    /// or paused.
    pub fn set_state(&self, state: RunState) {
        *self.lock() = state;
    }

    /// Pauses a running guest (a paused one stays so).
    pub fn pause(&self) -> Result<(), RuntimeError> {
        let mut st = self.lock();
        match *st {
            RunState::Running => {
                self.quiesce()?;
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

    /// vCPUs, then devices.
    fn quiesce(&self) -> Result<(), RuntimeError> {
        self.control.pause()?;
        if let Err(e) = self.machine.pause_devices() {
            // Half paused helps nobody: give the guest its vCPUs back.
            let _ = self.machine.resume_devices();
            self.control.resume();
            return Err(e.into());
        }
        Ok(())
    }

    /// Devices, then vCPUs.
    fn unquiesce(&self) -> Result<(), RuntimeError> {
        let devices = self.machine.resume_devices();
        self.control.resume();
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
        }
    }

    /// Takes the machine for a migration and stops it. Returns whether
    /// the user had paused it (the target then keeps it paused).
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
            done: false,
        })
    }
}

/// A machine held by a migration. Dropped without [`Migrating::committed`],
/// it gives the guest back as it was (running again unless the user had
/// paused it).
pub struct Migrating<'a> {
    rt: &'a Runtime,
    pub was_paused: bool,
    stopped: bool,
    done: bool,
}

impl Migrating<'_> {
    /// Stops vCPUs and devices (a paused guest already is).
    pub fn stop(&mut self) -> Result<(), RuntimeError> {
        if !self.was_paused && !self.stopped {
            self.rt.quiesce()?;
            self.stopped = true;
        }
        Ok(())
    }

    /// The target has the guest now: this process never runs it again.
    pub fn committed(mut self) {
        self.done = true;
        *self.rt.lock() = RunState::Migrated;
    }
}

impl Drop for Migrating<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.rt.lock();
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
    }
}
