//! The receiving side of a local migration (`vmm --incoming PATH`): one
//! explicit state machine, each state holding what it needs.
//!
//! ```text
//! Listening ──a peer of this uid says Hello──────────► Greeted    (listener closed)
//! Greeted ──versions, shape and fds fit; machine built─► Prepared   (Ready sent)
//! Prepared ──State restored────────────────────────────► Loaded     (protocol 1-2: Loaded sent)
//! Loaded ──protocol 1-2: Commit; 3: nothing to await──► Committed
//! Committed ──owner page: take() wins──────────────────► Owned
//! Owned ──Resumed sent; vCPUs, devices, API run here───► Resumed
//! Resumed ──classic path: RARP for each NIC────────────► done
//! ```
//!
//! A peer of another uid is refused and logged, and one that does not
//! manage a Hello by its deadline is forgotten: the target keeps listening
//! for the real source. Once a source said Hello, the target listens no
//! more, every step has an absolute deadline, and any failure ends the
//! target (the caller exits non-zero) without it ever running the guest:
//! it runs a vCPU only after winning the ownership word, so a source that
//! gave up in the meantime (and took the guest back) keeps it.
//! [`crate::builder::IncomingShell`] builds the machine; this module speaks
//! the protocol and checks what the source sent before anything uses it.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::codec::{self, CodecError};
use common::listener::{ListenError, Listener, PeerCred};
use common::migration::{
    FdRole, MIGRATION_MAX_FDS, MIGRATION_MAX_FRAME, MIGRATION_PROTOCOL_VERSION, MachineShape,
    OLDEST_SOURCE_PROTOCOL, SourceMsg, TargetMsg, Timeline, marks, monotonic_ns,
};
use common::ownership::{Owner, OwnerPage, process_gone};
use nix::sys::socket::{getsockopt, sockopt};

use super::{HELLO_TIMEOUT, STEP_TIMEOUT, announce, shape_mismatch};
use crate::builder::{Arrived, ArrivedNet, BuildError, IncomingShell, Vmm};
use crate::config::VmConfig;
use crate::persist::{FdTable, MachineState, check_format};
use crate::sandbox::{self, ThreadKind};
use crate::thread_start;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot listen on {path}: {err}")]
    Bind { path: PathBuf, err: ListenError },
    #[error("accept on the incoming socket: {0}")]
    Accept(std::io::Error),
    #[error("refused the source: {0}")]
    Refused(String),
    #[error("{step}: {err}")]
    Wire { step: &'static str, err: CodecError },
    #[error("{step}: the source sent {got}")]
    Unexpected { step: &'static str, got: String },
    #[error("the source gave up: {0}")]
    Aborted(String),
    #[error("cannot load the state: {0}")]
    Load(String),
    #[error("the guest was not taken: it is {0}; this vmm never ran it")]
    NotOwner(Owner),
    #[error("{err}; {fate}; this vmm never ran it")]
    Gave { err: Box<TargetError>, fate: String },
    #[error("{0}")]
    Build(#[from] BuildError),
}

impl TargetError {
    /// Bad input from the user is 2 (as for a boot); everything else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            TargetError::Bind { .. } => 2,
            TargetError::Build(e) => e.exit_code(),
            TargetError::Gave { err, .. } => err.exit_code(),
            _ => 1,
        }
    }
}

/// The listening `--incoming` socket.
pub struct Incoming {
    listener: Listener,
}

/// What the source said in its Hello.
pub struct Hello {
    pub protocol: u32,
    pub vmm_version: String,
    pub shape: MachineShape,
    pub backend_transfer: bool,
    pub paused: bool,
    pub fds: FdTable,
}

/// A source that said Hello, and the fds that came with it.
pub struct Source {
    sock: UnixStream,
    pub hello: Hello,
    fds: Vec<Option<OwnedFd>>,
    /// This side's moments of the switch-over, reported in Resumed.
    timeline: Timeline,
}

/// Where an incoming migration stands.
enum Step {
    Listening {
        shell: IncomingShell,
        incoming: Incoming,
    },
    Greeted {
        shell: IncomingShell,
        source: Source,
    },
    Prepared {
        source: Source,
        vmm: Vmm,
        page: Option<Arc<OwnerPage>>,
    },
    Loaded {
        source: Source,
        vmm: Vmm,
        page: Option<Arc<OwnerPage>>,
    },
    Committed {
        source: Source,
        vmm: Vmm,
        page: Option<Arc<OwnerPage>>,
    },
    Owned {
        source: Source,
        vmm: Vmm,
    },
    Resumed {
        source: Source,
        vmm: Vmm,
    },
}

/// Takes a running guest from a source vmm: listens on `cfg.incoming`,
/// builds the machine once a source says Hello (while its guest still
/// runs), restores the state it sends after pausing, and runs the guest
/// once it committed and this process won the guest.
pub fn receive(cfg: &VmConfig, started: Instant) -> Result<Vmm, TargetError> {
    let shell = IncomingShell::new(cfg, started)?;
    let path = cfg.incoming.clone().unwrap_or_default();
    let incoming = Incoming::bind(&path)?;
    shell.signals.remove_on_early_exit(&path);
    log::info!("waiting for a migration on {}", path.display());
    let own_api = shell.own_api_socket().map(Path::to_path_buf);
    let mut step = Step::Listening { shell, incoming };
    // The page a source offered: a failure then says where the guest is.
    let mut offered: Option<Arc<OwnerPage>> = None;
    loop {
        if let Step::Prepared { page: Some(p), .. } | Step::Loaded { page: Some(p), .. } = &step {
            offered.get_or_insert_with(|| p.clone());
        }
        step = match advance(cfg, step) {
            Ok(Ok(next)) => next,
            Ok(Err(vmm)) => return Ok(vmm),
            Err(e) => {
                // The guest never ran here: an API socket of this process's
                // own would be stale (an adopted one is the source's).
                if let Some(p) = &own_api {
                    let _ = std::fs::remove_file(p);
                }
                return Err(match offered {
                    Some(page) => e.with_fate(&page),
                    None => e,
                });
            }
        };
    }
}

/// How long a failed target waits for a source that went away to either
/// take the guest back or be seen gone, to say which in its last line.
const FATE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a target waits for its new threads' start-up before Ready;
/// past it, it says Ready all the same (the switch-over is only slower).
const THREADS_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl TargetError {
    /// This failure, after the source offered the guest, with where the
    /// guest is now: a source that died before the commit took it along.
    fn with_fate(self, page: &OwnerPage) -> TargetError {
        if matches!(self, TargetError::NotOwner(_)) {
            return self;
        }
        // A source's socket closes a moment before its pid is seen gone.
        let t = Instant::now();
        let owner = loop {
            match page.owner() {
                Owner::Offered { by } if !process_gone(by) && t.elapsed() < FATE_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                o => break o,
            }
        };
        let fate = match owner {
            Owner::Target { .. } => return self,
            Owner::Offered { by } if process_gone(by) => {
                format!(
                    "the guest is lost with its source (pid {by}), which ended before the commit"
                )
            }
            o => format!("the guest is {o}"),
        };
        TargetError::Gave {
            err: Box::new(self),
            fate,
        }
    }
}

/// One transition; `Ok(Err(vmm))` once the guest runs here.
fn advance(cfg: &VmConfig, step: Step) -> Result<Result<Step, Vmm>, TargetError> {
    Ok(Ok(match step {
        Step::Listening { shell, incoming } => {
            let source = incoming.accept()?;
            // One source at a time: others are refused now (their connect
            // fails), not left waiting in the backlog.
            shell.signals.forget_on_early_exit(incoming.listener.path());
            drop(incoming);
            Step::Greeted { shell, source }
        }
        Step::Greeted { shell, mut source } => {
            let t = Instant::now();
            let (arrived, page) = match source.check(cfg, &shell) {
                Ok(x) => x,
                Err(reason) => return Err(source.refuse(reason)),
            };
            if let Some(p) = &page {
                shell.signals.incoming(p.clone());
            }
            let vmm = match shell.build(cfg, arrived) {
                Ok(v) => v,
                Err(e) => return Err(source.refuse(e.to_string())),
            };
            let rehearsed = match rehearse(&vmm.runtime.machine) {
                Ok(text) => Some(text),
                Err(e) => {
                    // Only slower: the switch-over runs cold.
                    log::warn!("incoming: rehearsing the restore failed: {e}");
                    None
                }
            };
            // The source pauses right after Ready: nothing of this process
            // may still need a CPU then, which on 2 cores the source's
            // kicked vCPU thread waited for. So every thread the build
            // spawned is through its start-up first (4-6 of them, each
            // installing its filter), and this thread's own work until the
            // State comes is done before Ready too.
            if !thread_start::all_started(THREADS_START_TIMEOUT) {
                log::warn!(
                    "incoming: threads still starting after {THREADS_START_TIMEOUT:?}; the switch-over may be slower"
                );
            }
            log::info!("incoming: prepared in {:?}", t.elapsed());
            // From here the guest's state arrives: only the migration list
            // applies.
            sandbox::enter_thread(ThreadKind::Migration).map_err(BuildError::from)?;
            super::first_touch::stack_and_heap();
            // Once more just before Ready: the State's decode then finds
            // code and heap warmer than after the rehearsal milliseconds ago
            // (decode 69-71 -> 57-62 us p50 on this host).
            if let Some(text) = &rehearsed {
                drop(codec::decode::<SourceMsg<MachineState>>(text.as_bytes()));
            }
            source
                .ready(vmm.takes_api_socket())
                .map_err(|e| match &page {
                    Some(p) => e.with_fate(p),
                    None => e,
                })?;
            Step::Prepared { source, vmm, page }
        }
        Step::Prepared {
            mut source,
            vmm,
            page,
        } => {
            let machine = vmm.runtime.machine.clone();
            let fds = source
                .hello
                .backend_transfer
                .then(|| source.hello.fds.clone());
            source.load(|state, tl| {
                machine
                    .restore_marked(state, fds.as_ref(), tl)
                    .map_err(|e| e.to_string())
            })?;
            Step::Loaded { source, vmm, page }
        }
        Step::Loaded {
            mut source,
            vmm,
            page,
        } => {
            source.await_commit()?;
            Step::Committed { source, vmm, page }
        }
        Step::Committed {
            mut source,
            vmm,
            page,
        } => {
            let exit = vmm.runtime.exit.clone();
            match &page {
                Some(p) => vmm
                    .signals()
                    .take_guest(p, exit)
                    .map_err(TargetError::NotOwner)?,
                // Protocol 1 (release 0.1.0): the Commit hands it over.
                None => vmm.signals().deliver_to(exit),
            }
            source.timeline.mark("target: guest taken");
            log::info!("incoming: the guest is ours");
            Step::Owned { source, vmm }
        }
        Step::Owned { mut source, vmm } => {
            let paused = source.hello.paused;
            vmm.runtime
                .arrive(paused, || {
                    if let Err(e) = source.resumed() {
                        // The guest runs here either way.
                        log::warn!("incoming: could not tell the source: {e}");
                    }
                })
                .map_err(|e| TargetError::Load(e.to_string()))?;
            Step::Resumed { source, vmm }
        }
        Step::Resumed { source, vmm } => {
            if !source.hello.backend_transfer {
                for n in &vmm.runtime.machine.nets {
                    if let Some(io) = n.frame_ios().first() {
                        announce::announce(&**io, n.mac, common::netd::VNET_HDR_LEN as usize);
                    }
                }
            }
            sandbox::enter_thread(ThreadKind::Main).map_err(BuildError::from)?;
            log::info!(
                "incoming: guest running after {:?}",
                vmm.runtime.started.elapsed()
            );
            return Ok(Err(vmm));
        }
    }))
}

/// Runs the switch-over's own work once, on this machine's own state,
/// while the source's guest still runs: the save, the RON round trip of a
/// State message, and the restore of the VM and vCPUs into themselves (no
/// change). A fresh process does everything for the first time, and the
/// first RON decode and KVM restore cost about twice the next ones (code
/// and heap paged in, caches cold): rehearsed, the real ones run warm
/// inside the downtime. Returns the rehearsal's State message, decoded
/// once more just before Ready.
fn rehearse(machine: &crate::machine::Machine) -> Result<String, String> {
    let state = machine
        .save(&FdTable::default())
        .map_err(|e| e.to_string())?;
    let text = codec::encode(&SourceMsg::State(&state)).map_err(|e| e.to_string())?;
    let back = match codec::decode::<SourceMsg<MachineState>>(text.as_bytes()) {
        Ok(SourceMsg::State(s)) => s,
        Ok(_) => return Err("the rehearsal decoded another message".into()),
        Err(e) => return Err(e.to_string()),
    };
    machine
        .restore_vm_and_vcpus(&back, &mut Timeline::default())
        .map_err(|e| e.to_string())?;
    Ok(text)
}

impl Incoming {
    /// Listens on `path`, a socket only this uid (and root) can connect to:
    /// mode 0600 whatever the umask.
    pub fn bind(path: &Path) -> Result<Self, TargetError> {
        let listener =
            Listener::bind_replacing_stale(path, 0o600).map_err(|err| TargetError::Bind {
                path: path.to_path_buf(),
                err,
            })?;
        Ok(Incoming { listener })
    }

    /// Waits for the source: a peer of this uid (or root) that says a
    /// Hello of a protocol this vmm takes. Strangers are refused and
    /// logged; peers that do not manage a Hello by its deadline are
    /// dropped; both are forgotten.
    pub fn accept(&self) -> Result<Source, TargetError> {
        loop {
            let (sock, peer) = self.listener.accept().map_err(TargetError::Accept)?;
            if let Some(s) = greet(sock, peer)? {
                return Ok(s);
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // The socket is this process's; a stale one would block a restart.
        let _ = std::fs::remove_file(self.listener.path());
    }
}

/// `Ok(None)`: not the source (refused or silent), keep listening.
fn greet(sock: UnixStream, peer: PeerCred) -> Result<Option<Source>, TargetError> {
    let me = nix::unistd::getuid().as_raw();
    if !peer.is_owner_or_root(me) {
        log::warn!(
            "incoming: refused a peer of uid {} (pid {}): only uid {me} may migrate in",
            peer.uid,
            peer.pid
        );
        let _ = sock.set_write_timeout(Some(STEP_TIMEOUT));
        let _ = codec::send(
            &sock,
            &TargetMsg::Refused {
                reason: format!("uid {} may not migrate into this vmm", peer.uid),
            },
            &[],
        );
        return Ok(None);
    }
    if sock.set_read_timeout(Some(HELLO_TIMEOUT)).is_err()
        || sock.set_write_timeout(Some(STEP_TIMEOUT)).is_err()
    {
        return Ok(None);
    }
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let mut r = match codec::recv_until::<_, SourceMsg<()>>(
        &sock,
        MIGRATION_MAX_FRAME,
        MIGRATION_MAX_FDS,
        deadline,
    ) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("incoming: a peer left without a valid Hello: {e}");
            return Ok(None);
        }
    };
    let SourceMsg::Hello {
        protocol,
        format,
        vmm_version,
        shape,
        backend_transfer,
        paused,
        fds,
    } = r.msg
    else {
        log::warn!("incoming: a peer spoke before saying Hello");
        return Ok(None);
    };
    let received = std::mem::take(&mut r.fds);
    let mut source = Source {
        sock,
        hello: Hello {
            protocol,
            vmm_version,
            shape,
            backend_transfer,
            paused,
            fds: FdTable { roles: fds },
        },
        fds: received.into_iter().map(Some).collect(),
        timeline: Timeline::default(),
    };
    if !(OLDEST_SOURCE_PROTOCOL..=MIGRATION_PROTOCOL_VERSION).contains(&protocol) {
        return Err(source.refuse(format!(
            "migration protocol {protocol}, this vmm takes {OLDEST_SOURCE_PROTOCOL} to {MIGRATION_PROTOCOL_VERSION}"
        )));
    }
    if let Err(e) = check_format(format) {
        return Err(source.refuse(e.to_string()));
    }
    if let Err(reason) = source.check_fd_roles() {
        return Err(source.refuse(reason));
    }
    log::info!(
        "incoming: source vmm {} (protocol {protocol}) says Hello ({} fds)",
        source.hello.vmm_version,
        source.fds.len()
    );
    Ok(Some(source))
}

impl Source {
    /// Whether the source speaks a protocol with the ownership page.
    fn has_owner_page(&self) -> bool {
        self.hello.protocol >= 2
    }

    /// The fd list must name exactly what the shape needs, and match what
    /// arrived: the RAM first, each TAP queue once (backend transfer
    /// only), the owner page once (protocol 2 on), at most one API socket.
    fn check_fd_roles(&self) -> Result<(), String> {
        let roles = &self.hello.fds.roles;
        if roles.len() != self.fds.len() {
            return Err(format!(
                "Hello names {} fds, {} arrived",
                roles.len(),
                self.fds.len()
            ));
        }
        let count = |role: &FdRole| roles.iter().filter(|r| *r == role).count();
        if roles.first() != Some(&FdRole::GuestRam) || count(&FdRole::GuestRam) != 1 {
            return Err("the guest RAM memfd must come first, once".into());
        }
        if count(&FdRole::ApiListener) > 1 {
            return Err("more than one API socket".into());
        }
        let pages = usize::from(self.has_owner_page());
        if count(&FdRole::OwnerPage) != pages {
            return Err(format!(
                "protocol {} sends {pages} ownership page(s), the Hello names {}",
                self.hello.protocol,
                count(&FdRole::OwnerPage)
            ));
        }
        let taps = roles
            .iter()
            .filter(|r| matches!(r, FdRole::TapQueue { .. }))
            .count();
        let queues = |n: &common::migration::NetShape| {
            if self.hello.backend_transfer && !n.vhost_user {
                n.queues
            } else {
                0
            }
        };
        let want: usize = self
            .hello
            .shape
            .nets
            .iter()
            .map(|n| usize::from(queues(n)))
            .sum();
        if taps != want {
            return Err(format!("{taps} TAP queue fds, the NICs need {want}"));
        }
        for n in &self.hello.shape.nets {
            for q in 0..queues(n) {
                if self.hello.fds.tap_queue(&n.id, q).is_none() {
                    return Err(format!("no fd for queue {q} of NIC {}", n.id));
                }
            }
        }
        // At most one connection per vhost-user NIC, and only for those.
        for r in roles {
            if let FdRole::VhostUser { net } = r {
                let ok = self
                    .hello
                    .shape
                    .nets
                    .iter()
                    .any(|n| n.vhost_user && &n.id == net);
                if !ok || count(r) != 1 {
                    return Err(format!("unexpected vhost-user connection for NIC {net:?}"));
                }
            }
        }
        Ok(())
    }

    /// Greeted → what the machine is built on: the shape must be this
    /// target's, and each fd what its role says.
    fn check(
        &mut self,
        cfg: &VmConfig,
        shell: &IncomingShell,
    ) -> Result<(Arrived, Option<Arc<OwnerPage>>), String> {
        let hello = &self.hello;
        if let Some(m) = shape_mismatch(
            &hello.shape,
            hello.backend_transfer,
            cfg.memory,
            cfg.vcpus,
            &shell.net_configs(),
        ) {
            return Err(m);
        }
        let page = if self.has_owner_page() {
            let fd = self.take(&FdRole::OwnerPage).ok_or("no ownership page")?;
            let page = OwnerPage::open(fd).map_err(|e| e.to_string())?;
            match page.owner() {
                Owner::Offered { .. } => Some(Arc::new(page)),
                other => return Err(format!("the guest is not offered: it is {other}")),
            }
        } else {
            None
        };
        let memfd = self.take_memfd()?;
        let api_listener = self.take_api_listener()?;
        let backend_transfer = self.hello.backend_transfer;
        let shape_nets = self.hello.shape.nets.clone();
        let mut nets = Vec::with_capacity(shape_nets.len());
        for s in shape_nets {
            if s.vhost_user {
                let conn = self.take(&FdRole::VhostUser { net: s.id.clone() });
                nets.push((s.mac, ArrivedNet::VhostUser(conn)));
                continue;
            }
            let taps = if backend_transfer {
                let mut taps = Vec::with_capacity(usize::from(s.queues));
                for q in 0..s.queues {
                    let role = FdRole::TapQueue {
                        net: s.id.clone(),
                        queue: q,
                    };
                    taps.push(
                        self.take(&role)
                            .ok_or_else(|| format!("no fd for {role:?}"))?,
                    );
                }
                Some(taps)
            } else {
                None
            };
            nets.push((
                s.mac,
                match taps {
                    Some(t) => ArrivedNet::Taps(t),
                    None => ArrivedNet::OwnTap,
                },
            ));
        }
        Ok((
            Arrived {
                memfd,
                nets,
                api_listener,
            },
            page,
        ))
    }

    /// Takes the fd of `role` (each only once).
    pub fn take(&mut self, role: &FdRole) -> Option<OwnedFd> {
        let i = self.hello.fds.index_of(role)?;
        self.fds.get_mut(i)?.take()
    }

    /// The guest RAM memfd, checked to be a regular file (a memfd) that
    /// holds every RAM region of the shape, sealed so that the source
    /// cannot shrink it under this process's mapping (protocol 2 on:
    /// release 0.1.0 did not seal its memfd).
    pub fn take_memfd(&mut self) -> Result<File, String> {
        let fd = self.take(&FdRole::GuestRam).ok_or("no guest RAM memfd")?;
        let f = File::from(fd);
        let meta = f.metadata().map_err(|e| format!("guest RAM fd: {e}"))?;
        if !meta.file_type().is_file() {
            return Err("the guest RAM fd is not a memfd or regular file".into());
        }
        let need = self
            .hello
            .shape
            .ram
            .iter()
            .map(|r| r.memfd_offset.checked_add(r.len))
            .try_fold(0u64, |m, end| end.map(|e| m.max(e)))
            .ok_or("RAM regions overflow")?;
        if meta.len() < need {
            return Err(format!(
                "the guest RAM memfd has {} bytes, the RAM regions need {need}",
                meta.len()
            ));
        }
        if self.has_owner_page() {
            crate::memory::check_ram_seals(&f).map_err(|e| e.to_string())?;
        } else {
            log::warn!(
                "incoming: a protocol {} source sent an unsealed guest RAM memfd",
                self.hello.protocol
            );
        }
        Ok(f)
    }

    /// The source's listening API socket, if it sent one, checked to be a
    /// listening socket.
    pub fn take_api_listener(&mut self) -> Result<Option<UnixListener>, String> {
        let Some(fd) = self.take(&FdRole::ApiListener) else {
            return Ok(None);
        };
        let f = File::from(fd);
        let is_socket = f.metadata().map(|m| m.file_type().is_socket());
        if !matches!(is_socket, Ok(true)) {
            return Err("the API socket fd is not a socket".into());
        }
        let fd = OwnedFd::from(f);
        match getsockopt(&fd, sockopt::AcceptConn) {
            Ok(true) => Ok(Some(UnixListener::from(fd))),
            _ => Err("the API socket fd is not a listening socket".into()),
        }
    }

    /// Tells the source why not, and returns the error that ends the target.
    pub fn refuse(&mut self, reason: String) -> TargetError {
        let _ = codec::send(
            &self.sock,
            &TargetMsg::Refused {
                reason: reason.clone(),
            },
            &[],
        );
        TargetError::Refused(reason)
    }

    fn send(&self, step: &'static str, msg: &TargetMsg) -> Result<(), TargetError> {
        codec::send(&self.sock, msg, &[]).map_err(|err| TargetError::Wire { step, err })
    }

    /// Greeted → Prepared: the machine is built; the source may pause.
    fn ready(&self, takes_api_socket: bool) -> Result<(), TargetError> {
        self.send(
            "Ready",
            &TargetMsg::Ready {
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                takes_api_socket,
            },
        )
    }

    /// The source's next message, by `deadline` however it paces its bytes.
    fn recv(
        &mut self,
        step: &'static str,
        deadline: Instant,
    ) -> Result<SourceMsg<MachineState>, TargetError> {
        let wire = |err| TargetError::Wire { step, err };
        let (payload, fds) =
            codec::recv_frame_until(self.sock.as_fd(), MIGRATION_MAX_FRAME, 0, deadline)
                .map_err(wire)?;
        self.timeline.mark(marks::MESSAGE_RECEIVED);
        if !fds.is_empty() {
            return Err(TargetError::Unexpected {
                step,
                got: format!("{} fds after Hello", fds.len()),
            });
        }
        let msg = codec::decode::<SourceMsg<MachineState>>(&payload).map_err(wire)?;
        self.timeline.mark("target: message decoded");
        match msg {
            SourceMsg::Abort { reason } => Err(TargetError::Aborted(reason)),
            m => Ok(m),
        }
    }

    /// Prepared → Loaded: receives the state and runs `load` on it (the
    /// restore into the built machine); tells the source how it went.
    fn load(
        &mut self,
        load: impl FnOnce(&MachineState, &mut Timeline) -> Result<(), String>,
    ) -> Result<(), TargetError> {
        // The source pauses and saves right after Ready.
        let msg = self.recv("State", Instant::now() + STEP_TIMEOUT);
        let t = Instant::now();
        let result = match msg {
            Ok(SourceMsg::State(state)) => {
                let r = load(&state, &mut self.timeline).map_err(TargetError::Load);
                self.timeline.mark(marks::STATE_RESTORED);
                r
            }
            Ok(m) => Err(unexpected("State", &m)),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let _ = self.send(
                "Failed",
                &TargetMsg::Failed {
                    reason: e.to_string(),
                },
            );
            return Err(e);
        }
        if self.state_is_commit() {
            return Ok(());
        }
        self.send(
            "Loaded",
            &TargetMsg::Loaded {
                restore_us: t.elapsed().as_micros() as u64,
            },
        )
    }

    /// Protocol 3 on: the State is the commit (no Loaded, no Commit); the
    /// ownership word alone decides who runs the guest.
    fn state_is_commit(&self) -> bool {
        self.hello.protocol >= 3
    }

    /// Loaded → Committed: the source offers the guest for good (a
    /// protocol 3 source did with its State).
    fn await_commit(&mut self) -> Result<(), TargetError> {
        if self.state_is_commit() {
            return Ok(());
        }
        match self.recv("Commit", Instant::now() + STEP_TIMEOUT)? {
            SourceMsg::Commit => Ok(()),
            m => Err(unexpected("Commit", &m)),
        }
    }

    /// Owned → Resumed: tells the source the guest runs here.
    fn resumed(&mut self) -> Result<(), TargetError> {
        self.timeline.mark(marks::SENDING_RESUMED);
        // A source before protocol 3 refuses a field it does not know.
        let timeline = if self.hello.protocol >= 3 {
            std::mem::take(&mut self.timeline)
        } else {
            Timeline::default()
        };
        self.send(
            "Resumed",
            &TargetMsg::Resumed {
                at_ns: monotonic_ns(),
                timeline,
            },
        )
    }
}

fn unexpected<S>(step: &'static str, m: &SourceMsg<S>) -> TargetError {
    let got = match m {
        SourceMsg::Hello { .. } => "a second Hello",
        SourceMsg::State(_) => "State",
        SourceMsg::Commit => "Commit",
        SourceMsg::Abort { .. } => "Abort",
    };
    TargetError::Unexpected {
        step,
        got: got.into(),
    }
}
