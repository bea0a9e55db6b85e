//! The sending side of a local migration. It runs on its own thread,
//! created at start-up (later threads may not create threads) under the
//! `migration` seccomp list; the API thread hands it a request and waits
//! for the report.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::{MigrationPhases, MigrationReport};
use common::codec::{self, CodecError};
use common::migration::{
    FdRole, MIGRATION_MAX_FRAME, MIGRATION_PROTOCOL_VERSION, SourceMsg, TargetMsg, monotonic_ns,
};

use super::{PREPARE_TIMEOUT, STEP_TIMEOUT, shape_of};
use crate::devices::virtio::net::FrameIo;
use crate::persist::{MACHINE_STATE_FORMAT, PersistError};
use crate::runtime::{Runtime, RuntimeError};
use crate::sandbox::{self, ThreadKind};
use crate::vm::ExitReason;

const WORKER_STACK_SIZE: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to the target at {path}: {err}")]
    Connect { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("cannot save the machine: {0}")]
    Save(#[from] PersistError),
    #[error("target refused: {0}")]
    Refused(String),
    #[error("target failed to load the state: {0}")]
    Failed(String),
    #[error("{step}: {err}")]
    Wire { step: &'static str, err: CodecError },
    #[error("{step}: unexpected answer {got}")]
    Unexpected { step: &'static str, got: String },
    #[error("socket: {0}")]
    Socket(std::io::Error),
}

/// What came of a migration: the report for vmctl, and how this process
/// ends (`None`: the guest runs on here).
pub struct Outcome {
    pub report: MigrationReport,
    pub exit: Option<ExitReason>,
}

struct Job {
    to: PathBuf,
    backend_transfer: bool,
    reply: mpsc::Sender<Outcome>,
}

/// The migration thread of a running vmm.
pub struct MigrationWorker {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl MigrationWorker {
    /// Starts the thread; it waits for requests until the process ends.
    pub fn spawn(rt: Arc<Runtime>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("migration".into())
            .stack_size(WORKER_STACK_SIZE)
            .spawn(move || {
                sandbox::enter_thread_or_exit(ThreadKind::Migration);
                while let Ok(job) = rx.recv() {
                    let out = migrate(&rt, &job.to, job.backend_transfer);
                    let _ = job.reply.send(out);
                }
            })?;
        Ok(MigrationWorker {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs one migration to the target listening on `to`.
    pub fn migrate(&self, to: &Path, backend_transfer: bool) -> Outcome {
        let (reply, out) = mpsc::channel();
        let job = Job {
            to: to.to_path_buf(),
            backend_transfer,
            reply,
        };
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        match sent.ok().and_then(|()| out.recv().ok()) {
            Some(o) => o,
            None => Outcome {
                report: report_with("the migration thread is gone".into(), backend_transfer),
                exit: None,
            },
        }
    }
}

fn report_with(result: String, backend_transfer: bool) -> MigrationReport {
    MigrationReport {
        result,
        downtime_us: 0,
        total_us: 0,
        memory_bytes: 0,
        state_bytes: 0,
        fds_passed: 0,
        backend_transfer,
        phases: MigrationPhases::default(),
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// The whole migration; on any failure before the commit the guest runs
/// on here as it was.
pub fn migrate(rt: &Runtime, to: &Path, backend_transfer: bool) -> Outcome {
    let start = Instant::now();
    let mut report = report_with(String::new(), backend_transfer);
    report.memory_bytes = rt.machine.vm.ram.size;
    let r = run(rt, to, backend_transfer, &mut report);
    report.total_us = us(start.elapsed());
    let exit = match r {
        Ok(Finished::Committed { takes_api_socket }) => {
            report.result = "ok".into();
            log::info!(
                "migrated to {}: downtime {} us",
                to.display(),
                report.downtime_us
            );
            Some(ExitReason::Migrated {
                keep_api_socket: takes_api_socket,
            })
        }
        Ok(Finished::Lost(reason)) => {
            report.result =
                format!("the target failed after the commit, the guest is lost with it: {reason}");
            Some(ExitReason::MigrationLost { reason })
        }
        Err(e) => {
            report.result = e.to_string();
            log::warn!("migration to {} failed: {e}", to.display());
            None
        }
    };
    Outcome { report, exit }
}

enum Finished {
    Committed {
        takes_api_socket: bool,
    },
    /// Committed, but the target never said it resumed.
    Lost(String),
}

fn wire(step: &'static str) -> impl FnOnce(CodecError) -> SourceError {
    move |err| SourceError::Wire { step, err }
}

fn recv(sock: &UnixStream, step: &'static str) -> Result<TargetMsg, SourceError> {
    let r = codec::recv::<_, TargetMsg>(sock, MIGRATION_MAX_FRAME, 0).map_err(wire(step))?;
    if !r.fds.is_empty() {
        return Err(SourceError::Unexpected {
            step,
            got: format!("{} fds", r.fds.len()),
        });
    }
    Ok(r.msg)
}

fn unexpected(step: &'static str, m: &TargetMsg) -> SourceError {
    let mut got = format!("{m:?}");
    got.truncate(200);
    SourceError::Unexpected { step, got }
}

fn run(
    rt: &Runtime,
    to: &Path,
    backend_transfer: bool,
    report: &mut MigrationReport,
) -> Result<Finished, SourceError> {
    let t = Instant::now();
    let sock = UnixStream::connect(to).map_err(|err| SourceError::Connect {
        path: to.to_path_buf(),
        err,
    })?;
    sock.set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(SourceError::Socket)?;
    sock.set_read_timeout(Some(PREPARE_TIMEOUT))
        .map_err(SourceError::Socket)?;
    report.phases.connect_us = us(t.elapsed());

    let mut held = rt.begin_migration()?;
    let machine = &rt.machine;

    // Every fd goes with Hello, while the guest runs: RAM, TAP queues, API.
    let mut table = machine.fd_table(backend_transfer);
    let ios: Vec<Arc<dyn FrameIo>> = if backend_transfer {
        machine.nets.iter().flat_map(|n| n.frame_ios()).collect()
    } else {
        Vec::new()
    };
    let mut fds: Vec<BorrowedFd<'_>> = vec![machine.vm.ram.memfd.as_fd()];
    // SAFETY: each FrameIo is a TAP queue fd owned by the device, which
    // lives (in `ios`) until after the send.
    fds.extend(
        ios.iter()
            .map(|io| unsafe { BorrowedFd::borrow_raw(io.as_raw_fd()) }),
    );
    if let Some(l) = &rt.api_listener {
        table.push(FdRole::ApiListener);
        fds.push(l.as_fd());
    }
    if fds.len() != table.roles.len() {
        return Err(SourceError::Unexpected {
            step: "Hello",
            got: format!("{} fds for {} roles", fds.len(), table.roles.len()),
        });
    }
    report.fds_passed = fds.len() as u32;
    let hello: SourceMsg<()> = SourceMsg::Hello {
        protocol: MIGRATION_PROTOCOL_VERSION,
        format: MACHINE_STATE_FORMAT,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        shape: shape_of(machine),
        backend_transfer,
        paused: held.was_paused,
        fds: table.roles.clone(),
    };
    let t = Instant::now();
    codec::send(&sock, &hello, &fds).map_err(wire("Hello"))?;
    drop(fds);
    let takes_api_socket = match recv(&sock, "Hello")? {
        TargetMsg::Ready {
            takes_api_socket, ..
        } => takes_api_socket,
        TargetMsg::Refused { reason } => return Err(SourceError::Refused(reason)),
        m => return Err(unexpected("Hello", &m)),
    };
    report.phases.prepare_us = us(t.elapsed());

    // Downtime starts here.
    let paused_at = monotonic_ns();
    let t = Instant::now();
    held.stop()?;
    report.phases.pause_us = us(t.elapsed());
    let t = Instant::now();
    let state = machine.save(&table)?;
    let payload = codec::encode(&SourceMsg::State(&state)).map_err(wire("State"))?;
    report.phases.save_us = us(t.elapsed());
    report.state_bytes = payload.len() as u64;
    let t = Instant::now();
    sock.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(SourceError::Socket)?;
    codec::send_encoded(&sock, &payload, &[]).map_err(wire("State"))?;
    match recv(&sock, "State")? {
        TargetMsg::Loaded { restore_us } => report.phases.restore_us = restore_us,
        TargetMsg::Failed { reason } => return Err(SourceError::Failed(reason)),
        m => return Err(unexpected("State", &m)),
    }
    report.phases.load_us = us(t.elapsed());

    // A Commit that cannot be sent never reached the target, which then
    // never runs the guest: resuming here is safe.
    let t = Instant::now();
    codec::send(&sock, &SourceMsg::<()>::Commit, &[]).map_err(wire("Commit"))?;
    held.committed();
    let resumed = recv(&sock, "Commit");
    report.phases.resume_us = us(t.elapsed());
    match resumed {
        Ok(TargetMsg::Resumed { at_ns }) => {
            report.downtime_us = at_ns.saturating_sub(paused_at) / 1000;
            Ok(Finished::Committed { takes_api_socket })
        }
        Ok(m) => Ok(Finished::Lost(unexpected("Commit", &m).to_string())),
        Err(e) => Ok(Finished::Lost(e.to_string())),
    }
}
