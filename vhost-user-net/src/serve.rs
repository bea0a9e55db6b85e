//! Start-up and the accept loop: netd's TAP fds, the socket, the sandbox,
//! then one `VhostUserDaemon` per frontend connection (a fresh device for
//! each: vhost-user-backend's handler keeps a frontend's ownership and
//! features, so a reconnecting frontend needs a new one).

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use common::listener::{ListenError, Listener, PeerCred};
use common::netd_client::NetdClientError;
use net_datapath::GuestMemoryMmap;
use net_datapath::tap::{TapError, TapQueue};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use crate::args::Args;
use crate::backend::{BackendError, NetBackend};
use crate::peer::{self, PeerGate};
use crate::sandbox::{self, SandboxError, ThreadKind};
use jail::privileges::{self, PrivilegeError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Privileges(#[from] PrivilegeError),
    #[error("netd: {0}")]
    Netd(#[from] NetdClientError),
    #[error("TAP from netd: {0}")]
    Tap(#[from] TapError),
    #[error("{0}")]
    Listen(#[from] ListenError),
    #[error("cannot duplicate the listening socket: {0}")]
    Dup(std::io::Error),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("vhost-user: {0}")]
    Daemon(String),
}

impl ServeError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Privileges(_) => 2,
            _ => 1,
        }
    }
}

pub fn run(args: &Args) -> Result<(), ServeError> {
    privileges::check_invocation(args.user)?;
    if let Some((uid, gid)) = args.user {
        sandbox::drop_bounding_set();
        privileges::drop_to(uid, gid)?;
    }
    // As the tenant: netd decides by our uid (SO_PEERCRED).
    // The vmm's `--net` request: the TAP with vnet header; `backend_net`
    // took no vhost and no MAC.
    let fds = common::netd_client::open_tap_for(&args.net)?;
    let taps = TapQueue::from_fds(&fds.name, fds.taps)?;
    let listener = Listener::bind_replacing_stale(&args.socket, 0o600)?;
    sandbox::lock_down(args.seccomp)?;
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let gate = Arc::new(PeerGate::default());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = NetBackend::new(taps, mem.clone(), gate.clone())?;
    let dup = listener
        .as_fd()
        .try_clone_to_owned()
        .map_err(ServeError::Dup)?;
    let mut vu_listener = vhost::vhost_user::Listener::from(UnixListener::from(dup));
    log::info!(
        "serving TAP {} ({} queue pairs) on {}",
        fds.name,
        args.net.queues,
        args.socket.display()
    );
    let mut narrowed = false;
    loop {
        let mut daemon =
            VhostUserDaemon::new("vhost-user-net".into(), backend.clone(), mem.clone())
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        backend.register(&daemon.get_epoll_handlers())?;
        if !narrowed {
            sandbox::enter_thread(ThreadKind::Main)?;
            narrowed = true;
        }
        gate.reset();
        let before = peer::connected_sockets();
        daemon
            .start(&mut vu_listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let peers = peer::new_peers(&before, &peer::connected_sockets());
        let allowed = !peers.is_empty() && peers.iter().all(|p| p.is_owner_or_root(me));
        gate.decide(allowed);
        let who = describe(&peers);
        if allowed {
            log::info!("frontend {who} connected");
        } else {
            log::warn!("refused frontend {who}: not uid {me} nor root");
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend {who} disconnected"),
            // A frontend that broke the protocol: one line, then the next.
            Err(e) => log::warn!("frontend {who}: connection ended: {e}"),
        }
        backend.disconnected();
    }
}

fn describe(peers: &[PeerCred]) -> String {
    match peers.first() {
        Some(p) => format!("pid {} uid {}", p.pid, p.uid),
        None => "(unidentified)".into(),
    }
}
