//! The receiving side of a local migration (`vmm --incoming PATH`), as an
//! explicit state machine over one connection:
//!
//! ```text
//! Listening ──accept, same uid, Hello parses──► Greeted
//! Greeted ──shape and fds fit, machine built──► Prepared   (Ready sent)
//! Prepared ──State restored──────────────────► Loaded     (Loaded sent)
//! Loaded ──Commit──────────────────────────────► Committed
//! Committed ──vCPUs released───────────────────► Resumed    (Resumed sent)
//! ```
//!
//! A peer of another uid is refused and logged, and one that does not
//! manage a Hello is forgotten: the target keeps listening for the real
//! source. Once a source said Hello, any failure ends the target (the
//! caller exits non-zero): the source then resumes the guest itself.
//! The machine is built by `builder`; this module speaks the protocol and
//! checks what the source sent before anything uses it.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::codec::{self, CodecError};
use common::listener::{ListenError, Listener, PeerCred};
use common::migration::{
    FdRole, MIGRATION_MAX_FDS, MIGRATION_MAX_FRAME, MIGRATION_PROTOCOL_VERSION, MachineShape,
    SourceMsg, TargetMsg, monotonic_ns,
};
use nix::sys::socket::{getsockopt, sockopt};

use super::{HELLO_TIMEOUT, STEP_TIMEOUT};
use crate::persist::{FdTable, MachineState, check_format};

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
    #[error("protocol step {0:?} out of order")]
    Order(Phase),
}

/// Where the conversation with the source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Greeted,
    Prepared,
    Loaded,
    Committed,
    Resumed,
}

/// The listening `--incoming` socket.
pub struct Incoming {
    listener: Listener,
}

/// What the source said in its Hello.
pub struct Hello {
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
    phase: Phase,
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
    /// Hello of this protocol version. Strangers are refused and logged;
    /// peers that do not manage a Hello are dropped; both are forgotten.
    pub fn accept(&self) -> Result<Source, TargetError> {
        loop {
            let (sock, peer) = self.listener.accept().map_err(TargetError::Accept)?;
            match greet(sock, peer) {
                Ok(Some(s)) => return Ok(s),
                Ok(None) => continue,
                Err(e) => return Err(e),
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
    let mut r = match codec::recv::<_, SourceMsg<()>>(&sock, MIGRATION_MAX_FRAME, MIGRATION_MAX_FDS)
    {
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
            vmm_version,
            shape,
            backend_transfer,
            paused,
            fds: FdTable { roles: fds },
        },
        fds: received.into_iter().map(Some).collect(),
        phase: Phase::Greeted,
    };
    if protocol != MIGRATION_PROTOCOL_VERSION {
        return Err(source.refuse(format!(
            "migration protocol {protocol}, this vmm speaks {MIGRATION_PROTOCOL_VERSION}"
        )));
    }
    if let Err(e) = check_format(format) {
        return Err(source.refuse(e.to_string()));
    }
    if let Err(reason) = source.check_fd_roles() {
        return Err(source.refuse(reason));
    }
    log::info!(
        "incoming: source vmm {} says Hello ({} fds)",
        source.hello.vmm_version,
        source.fds.len()
    );
    Ok(Some(source))
}

impl Source {
    /// The fd list must name exactly what the shape needs, and match what
    /// arrived: the RAM first, each TAP queue once (backend transfer
    /// only), at most one API socket.
    fn check_fd_roles(&self) -> Result<(), String> {
        let roles = &self.hello.fds.roles;
        if roles.len() != self.fds.len() {
            return Err(format!(
                "Hello names {} fds, {} arrived",
                roles.len(),
                self.fds.len()
            ));
        }
        if roles.first() != Some(&FdRole::GuestRam)
            || roles.iter().filter(|r| **r == FdRole::GuestRam).count() != 1
        {
            return Err("the guest RAM memfd must come first, once".into());
        }
        if roles.iter().filter(|r| **r == FdRole::ApiListener).count() > 1 {
            return Err("more than one API socket".into());
        }
        let taps = roles
            .iter()
            .filter(|r| matches!(r, FdRole::TapQueue { .. }))
            .count();
        let want: usize = if self.hello.backend_transfer {
            self.hello
                .shape
                .nets
                .iter()
                .map(|n| usize::from(n.queues))
                .sum()
        } else {
            0
        };
        if taps != want {
            return Err(format!("{taps} TAP queue fds, the NICs need {want}"));
        }
        for n in &self.hello.shape.nets {
            for q in 0..if self.hello.backend_transfer {
                n.queues
            } else {
                0
            } {
                if self.hello.fds.tap_queue(&n.id, q).is_none() {
                    return Err(format!("no fd for queue {q} of NIC {}", n.id));
                }
            }
        }
        Ok(())
    }

    /// Takes the fd of `role` (each only once).
    pub fn take(&mut self, role: &FdRole) -> Option<OwnedFd> {
        let i = self.hello.fds.index_of(role)?;
        self.fds.get_mut(i)?.take()
    }

    /// The guest RAM memfd, checked to be a regular file (a memfd) that
    /// holds every RAM region of the shape.
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

    fn expect(&self, phase: Phase) -> Result<(), TargetError> {
        if self.phase != phase {
            return Err(TargetError::Order(self.phase));
        }
        Ok(())
    }

    /// Greeted → Prepared: the machine is built; the source may pause.
    pub fn ready(&mut self, takes_api_socket: bool) -> Result<(), TargetError> {
        self.expect(Phase::Greeted)?;
        // The source pauses and saves now: the state must come quickly.
        self.sock
            .set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| TargetError::Wire {
                step: "Ready",
                err: e.into(),
            })?;
        codec::send(
            &self.sock,
            &TargetMsg::Ready {
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                takes_api_socket,
            },
            &[],
        )
        .map_err(|err| TargetError::Wire { step: "Ready", err })?;
        self.phase = Phase::Prepared;
        Ok(())
    }

    fn recv(&self, step: &'static str) -> Result<SourceMsg<MachineState>, TargetError> {
        let r = codec::recv::<_, SourceMsg<MachineState>>(&self.sock, MIGRATION_MAX_FRAME, 0)
            .map_err(|err| TargetError::Wire { step, err })?;
        if !r.fds.is_empty() {
            return Err(TargetError::Unexpected {
                step,
                got: format!("{} fds after Hello", r.fds.len()),
            });
        }
        match r.msg {
            SourceMsg::Abort { reason } => Err(TargetError::Aborted(reason)),
            m => Ok(m),
        }
    }

    /// Prepared → Loaded: receives the state and runs `load` on it (the
    /// restore into the built machine); tells the source how it went.
    pub fn load(
        &mut self,
        load: impl FnOnce(&MachineState) -> Result<(), String>,
    ) -> Result<(), TargetError> {
        self.expect(Phase::Prepared)?;
        let msg = self.recv("State");
        let t = Instant::now();
        let result = match msg {
            Ok(SourceMsg::State(state)) => load(&state).map_err(TargetError::Load),
            Ok(m) => Err(unexpected("State", &m)),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let _ = codec::send(
                &self.sock,
                &TargetMsg::Failed {
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(e);
        }
        codec::send(
            &self.sock,
            &TargetMsg::Loaded {
                restore_us: t.elapsed().as_micros() as u64,
            },
            &[],
        )
        .map_err(|err| TargetError::Wire {
            step: "Loaded",
            err,
        })?;
        self.phase = Phase::Loaded;
        Ok(())
    }

    /// Loaded → Committed: the guest is this process's from now on.
    pub fn await_commit(&mut self) -> Result<(), TargetError> {
        self.expect(Phase::Loaded)?;
        match self.recv("Commit")? {
            SourceMsg::Commit => {
                self.phase = Phase::Committed;
                Ok(())
            }
            m => Err(unexpected("Commit", &m)),
        }
    }

    /// Committed → Resumed: tells the source when the vCPUs were released.
    /// The guest runs here whatever happens to this message.
    pub fn resumed(&mut self) -> Result<(), TargetError> {
        self.expect(Phase::Committed)?;
        let at_ns = monotonic_ns();
        self.phase = Phase::Resumed;
        codec::send(&self.sock, &TargetMsg::Resumed { at_ns }, &[]).map_err(|err| {
            TargetError::Wire {
                step: "Resumed",
                err,
            }
        })
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
