//! The sending side of a local migration. It runs on its own thread,
//! created at start-up (later threads may not create threads) under the
//! `migration` seccomp list; the API thread hands it a request and waits
//! for the report.
//!
//! The source trusts only its own target: before anything is sent, the
//! peer's SO_PEERCRED uid must be this vmm's uid (and not this process).
//! Every step has an absolute deadline; once the guest is paused, every
//! step must end by the pause plus the downtime limit, or the source takes
//! the guest back. Whether it may run the guest again is decided by the
//! ownership word alone ([`common::ownership`]).

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::{MigrationPhases, MigrationReport, PhaseMark};
use common::codec::{self, CodecError};
use common::listener::PeerCred;
use common::migration::{
    FdRole, MIGRATION_MAX_FRAME, MIGRATION_PROTOCOL_VERSION, SourceMsg, TargetMsg, Timeline, marks,
    monotonic_ns,
};
use common::ownership::{Owner, OwnerPage, OwnershipError, process_gone};

use super::{PREPARE_TIMEOUT, shape_of};
use crate::persist::{MACHINE_STATE_FORMAT, PersistError};
use crate::runtime::{Migrating, Runtime, RuntimeError};
use crate::sandbox::{self, ThreadKind};
use crate::vm::ExitReason;

const WORKER_STACK_SIZE: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to the target at {path}: {err}")]
    Connect { path: PathBuf, err: std::io::Error },
    #[error(
        "the target at {path} runs as uid {uid} (pid {pid}), this vmm as uid {own}: nothing was sent"
    )]
    Stranger {
        path: PathBuf,
        uid: u32,
        pid: i32,
        own: u32,
    },
    #[error("{0} is this vmm's own socket: nothing was sent")]
    OwnSocket(PathBuf),
    #[error("another migration is in progress: busy")]
    Busy,
    #[error("{0}")]
    Ownership(#[from] OwnershipError),
    #[error("the target did not finish within the downtime limit of {0:?}")]
    DowntimeLimit(Duration),
    #[error("the target said Resumed but did not take the guest ({0})")]
    NotTaken(Owner),
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

/// What `vmctl migrate` asks for.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub to: PathBuf,
    pub backend_transfer: bool,
    /// Longest the guest may stay paused before the source takes it back.
    pub downtime_limit: Duration,
}

struct Job {
    req: MigrateRequest,
    reply: mpsc::Sender<Outcome>,
}

/// The migration thread of a running vmm.
pub struct MigrationWorker {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// A migration is queued or running: a second one is answered "busy"
    /// at once instead of waiting behind it.
    busy: AtomicBool,
}

impl MigrationWorker {
    /// Starts the thread; it waits for requests until the process ends.
    pub fn spawn(rt: Arc<Runtime>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        // Asked here: the migration list has no getuid.
        let own_uid = nix::unistd::geteuid().as_raw();
        crate::thread_start::spawn(
            std::thread::Builder::new()
                .name("migration".into())
                .stack_size(WORKER_STACK_SIZE),
            || sandbox::enter_thread_or_exit(ThreadKind::Migration),
            move |()| {
                while let Ok(job) = rx.recv() {
                    let out = migrate(&rt, &job.req, own_uid);
                    let _ = job.reply.send(out);
                }
            },
        )?;
        Ok(MigrationWorker {
            jobs: Mutex::new(tx),
            busy: AtomicBool::new(false),
        })
    }

    /// Runs one migration (or answers "busy" at once if one runs).
    pub fn migrate(&self, to: &Path, backend_transfer: bool, downtime_limit: Duration) -> Outcome {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Outcome {
                report: report_with(SourceError::Busy.to_string(), backend_transfer),
                exit: None,
            };
        }
        let (reply, out) = mpsc::channel();
        let job = Job {
            req: MigrateRequest {
                to: to.to_path_buf(),
                backend_transfer,
                downtime_limit,
            },
            reply,
        };
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        let outcome = sent.ok().and_then(|()| out.recv().ok());
        self.busy.store(false, Ordering::SeqCst);
        match outcome {
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

/// The whole migration. On any failure the guest runs on here as it was,
/// if this process wins it back; otherwise the target owns it.
pub fn migrate(rt: &Runtime, req: &MigrateRequest, own_uid: u32) -> Outcome {
    let start = Instant::now();
    let mut report = report_with(String::new(), req.backend_transfer);
    report.memory_bytes = rt.machine.vm.ram.size;
    let mut offer = None;
    let r = run(rt, req, own_uid, &mut report, &mut offer);
    let exit = settle(r, offer, req, &mut report);
    report.total_us = us(start.elapsed());
    Outcome { report, exit }
}

/// The guest as offered to a target that said Ready.
struct Offer<'a> {
    hold: Migrating<'a>,
    page: Arc<OwnerPage>,
    takes_api_socket: bool,
    /// When the guest was paused for the switch-over.
    paused: Option<Instant>,
}

/// Where a migration's outcome leaves the guest: resumed here (`None`),
/// or with the target (this process exits).
fn settle(
    r: Result<(), SourceError>,
    offer: Option<Offer<'_>>,
    req: &MigrateRequest,
    report: &mut MigrationReport,
) -> Option<ExitReason> {
    let to = req.to.display();
    let Some(offer) = offer else {
        // Nothing was offered: the guest never stopped being ours.
        let err = match r {
            Err(e) => e.to_string(),
            Ok(()) => "no target took the guest".into(),
        };
        log::warn!("migration to {to} failed: {err}");
        report.result = err;
        return None;
    };
    let keep_api_socket = offer.takes_api_socket;
    let paused = offer.paused;
    let downtime = || paused.map_or(0, |p| us(p.elapsed()));
    let err = match r {
        Ok(()) => {
            offer.hold.handed_over();
            report.result = "ok".into();
            log::info!("migrated to {to}: downtime {} us", report.downtime_us);
            return Some(ExitReason::Migrated { keep_api_socket });
        }
        Err(e) => e,
    };
    match offer.page.take_back() {
        Ok(()) => {
            // Dropping the hold resumes the guest here.
            drop(offer.hold);
            report.downtime_us = downtime();
            log::warn!("migration to {to} failed, the guest runs on here: {err}");
            report.result = err.to_string();
            None
        }
        Err(Owner::Target { pid }) if process_gone(pid) => {
            offer.hold.handed_over();
            report.downtime_us = downtime();
            let reason = format!(
                "the target (pid {pid}) took the guest and exited, the guest is lost with it: {err}"
            );
            report.result = reason.clone();
            Some(ExitReason::MigrationLost { reason })
        }
        Err(owner) => {
            // The target owns the guest and lives: the guest is migrated,
            // though the target did not say so in time.
            offer.hold.handed_over();
            report.downtime_us = downtime();
            log::warn!("migration to {to}: the guest is {owner}, though {err}");
            report.result = "ok".into();
            Some(ExitReason::Migrated { keep_api_socket })
        }
    }
}

/// Both sides' moments, in order, as microseconds after the pause began.
fn marks_after(start_ns: u64, mut tl: Timeline) -> Vec<PhaseMark> {
    tl.0.sort_by_key(|(_, ns)| *ns);
    tl.0.into_iter()
        .map(|(what, ns)| PhaseMark {
            what,
            at_us: ns.saturating_sub(start_ns) / 1000,
        })
        .collect()
}

fn wire(step: &'static str) -> impl FnOnce(CodecError) -> SourceError {
    move |err| SourceError::Wire { step, err }
}

/// Receives the target's next message by `deadline`.
fn recv(
    sock: &UnixStream,
    step: &'static str,
    deadline: Instant,
) -> Result<TargetMsg, SourceError> {
    let r = codec::recv_until::<_, TargetMsg>(sock, MIGRATION_MAX_FRAME, 0, deadline)
        .map_err(wire(step))?;
    if !r.fds.is_empty() {
        return Err(SourceError::Unexpected {
            step,
            got: format!("{} fds", r.fds.len()),
        });
    }
    Ok(r.msg)
}

/// Sends `payload` by `deadline` (a peer that stops reading cannot hold
/// the send longer).
fn send(
    sock: &UnixStream,
    step: &'static str,
    payload: &str,
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
) -> Result<(), SourceError> {
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(SourceError::Wire {
            step,
            err: CodecError::Deadline,
        })?;
    sock.set_write_timeout(Some(left))
        .map_err(SourceError::Socket)?;
    codec::send_encoded(sock, payload, fds).map_err(wire(step))
}

fn encode<T: serde::Serialize>(step: &'static str, msg: &T) -> Result<String, SourceError> {
    codec::encode_unescaped(msg).map_err(wire(step))
}

fn unexpected(step: &'static str, m: &TargetMsg) -> SourceError {
    let mut got = format!("{m:?}");
    got.truncate(200);
    SourceError::Unexpected { step, got }
}

/// Connects to `to` by `deadline`. A listener whose backlog is full makes
/// a non-blocking connect fail with EAGAIN: retried until the deadline, so
/// a peer that never accepts cannot hold the caller.
fn connect(to: &Path, deadline: Instant) -> Result<UnixStream, SourceError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let err = |e: nix::Error| SourceError::Connect {
        path: to.to_path_buf(),
        err: e.into(),
    };
    let addr = UnixAddr::new(to).map_err(err)?;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(err)?;
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => {
                // Blocking again, with timeouts per send (fcntl: the
                // migration list has no FIONBIO).
                use nix::fcntl::{FcntlArg, OFlag, fcntl};
                let fl = fcntl(&fd, FcntlArg::F_GETFL).map_err(err)?;
                let fl = OFlag::from_bits_truncate(fl) - OFlag::O_NONBLOCK;
                fcntl(&fd, FcntlArg::F_SETFL(fl)).map_err(err)?;
                return Ok(UnixStream::from(fd));
            }
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

fn run<'a>(
    rt: &'a Runtime,
    req: &MigrateRequest,
    own_uid: u32,
    report: &mut MigrationReport,
    offer: &mut Option<Offer<'a>>,
) -> Result<(), SourceError> {
    let backend_transfer = req.backend_transfer;
    let t = Instant::now();
    let prepare_deadline = t + PREPARE_TIMEOUT;
    let sock = connect(&req.to, prepare_deadline)?;
    // Trust only a target of this uid, before a byte or an fd is sent.
    let peer = PeerCred::of(&sock).map_err(SourceError::Socket)?;
    if peer.pid == std::process::id() as i32 {
        return Err(SourceError::OwnSocket(req.to.clone()));
    }
    if peer.uid != own_uid {
        return Err(SourceError::Stranger {
            path: req.to.clone(),
            uid: peer.uid,
            pid: peer.pid,
            own: own_uid,
        });
    }
    report.phases.connect_us = us(t.elapsed());

    let mut hold = rt.begin_migration()?;
    let machine = &rt.machine;
    let page = Arc::new(OwnerPage::create()?);

    // Every fd goes with Hello, while the guest runs: RAM, TAP queues or
    // vhost-user connections, owner page, API.
    let (mut table, owned) = machine
        .handover(backend_transfer)
        .map_err(SourceError::Socket)?;
    table.push(FdRole::OwnerPage);
    let mut fds: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
    fds.push(page.as_fd());
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
        paused: hold.was_paused,
        fds: table.roles.clone(),
    };
    let t = Instant::now();
    send(
        &sock,
        "Hello",
        &encode("Hello", &hello)?,
        &fds,
        prepare_deadline,
    )?;
    drop(fds);
    // From the Hello on, the target holds the page: the guest is offered,
    // and the exit path settles it whatever happens next.
    hold.offered(page.clone(), false);
    let o = offer.insert(Offer {
        hold,
        page,
        takes_api_socket: false,
        paused: None,
    });
    // The target takes milliseconds to prepare: rehearse the encoding
    // meanwhile, so that the real one runs warm inside the downtime.
    let rehearsal = machine
        .rehearsal_state()
        .map_err(|e| log::debug!("migration: no rehearsal of the encoding: {e}"))
        .ok();
    let rehearse = || {
        if let Some(st) = &rehearsal {
            drop(encode("State", &SourceMsg::State(st)));
        }
    };
    rehearse();
    super::first_touch::stack_and_heap();
    let takes_api_socket = match recv(&sock, "Hello", prepare_deadline)? {
        TargetMsg::Ready {
            takes_api_socket, ..
        } => takes_api_socket,
        TargetMsg::Refused { reason } => return Err(SourceError::Refused(reason)),
        m => return Err(unexpected("Hello", &m)),
    };
    report.phases.prepare_us = us(t.elapsed());
    o.takes_api_socket = takes_api_socket;
    o.hold.offered(o.page.clone(), takes_api_socket);

    // Once more, just before the pause: the first rehearsal ran
    // milliseconds ago, and the encoding inside the downtime is about
    // 10 us faster for this one.
    rehearse();
    // Only the owner answers the API: stop accepting before the target
    // may take the guest (connections wait in the socket's backlog; the
    // gate opens again if this process keeps the guest).
    rt.api_gate.close();

    // Downtime starts here, and so does the switch-over limit.
    let paused = Instant::now();
    let paused_ns = monotonic_ns();
    let mut tl = Timeline::default();
    o.paused = Some(paused);
    let deadline = paused + req.downtime_limit;
    let limit = |e: SourceError| match e {
        SourceError::Wire {
            err: CodecError::Deadline | CodecError::Timeout,
            ..
        } => SourceError::DowntimeLimit(req.downtime_limit),
        e => e,
    };
    o.hold.stop(&mut tl)?;
    report.phases.pause_us = us(paused.elapsed());
    let t = Instant::now();
    let state = machine.save_marked(&table, &mut tl)?;
    let payload = encode("State", &SourceMsg::State(&state))?;
    tl.mark("source: state encoded");
    report.phases.save_us = us(t.elapsed());
    report.state_bytes = payload.len() as u64;
    // The State is the commit (protocol 3): the target takes the guest as
    // soon as it has restored it, unless this process took it back first.
    send(&sock, "State", &payload, &[], deadline).map_err(limit)?;
    tl.mark(marks::STATE_SENT);
    let answer = recv(&sock, "State", deadline).map_err(limit)?;
    tl.mark(marks::RESUMED_RECEIVED);
    // On this process's clock, not a timestamp the peer sends.
    report.downtime_us = us(paused.elapsed());
    match answer {
        TargetMsg::Resumed { timeline, .. } => tl.0.extend(timeline.0),
        TargetMsg::Failed { reason } => return Err(SourceError::Failed(reason)),
        m => return Err(unexpected("State", &m)),
    }
    report.phases.marks = marks_after(paused_ns, tl);
    let at = |what: &str| {
        report
            .phases
            .marks
            .iter()
            .find(|m| m.what == what)
            .map(|m| m.at_us)
    };
    let span = |from: &str, to: &str| at(to).zip(at(from)).map_or(0, |(b, a)| b.saturating_sub(a));
    report.phases.load_us = span(marks::STATE_SENT, marks::STATE_RESTORED);
    report.phases.restore_us = span(marks::MESSAGE_RECEIVED, marks::STATE_RESTORED);
    report.phases.resume_us = span(marks::STATE_RESTORED, marks::RESUMED_RECEIVED);
    match o.page.owner() {
        Owner::Target { .. } => Ok(()),
        other => Err(SourceError::NotTaken(other)),
    }
}
