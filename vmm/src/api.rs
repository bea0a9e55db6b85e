//! The `--api-socket` server: vmctl's requests (common::api) on a UNIX
//! socket created 0600 whatever the umask, for the vmm's own uid and root
//! only (checked by SO_PEERCRED before anything is read).
//!
//! A few API threads (each under the api seccomp filter, started while
//! thread creation is still allowed) accept connections, so that a client
//! that stalls does not keep the others waiting; each connection has a read
//! timeout and an overall deadline. What a request does to the machine goes
//! through [`Runtime`], which orders pause, resume and a migration (a status
//! is answered while a migration runs; pause, resume, shutdown and a second
//! migrate answer "busy").
//!
//! Only the process that owns the guest answers: the threads accept through
//! an [`ApiGate`] (`api_gate.rs`).

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::api::{API_VERSION, ApiRequest, ApiResponse};
use common::codec::{self, CodecError, DEFAULT_MAX_FRAME};
use common::listener::{ConnLimits, Connection, ListenError, Listener, PeerCred};
use common::migration::{DEFAULT_DOWNTIME_LIMIT_MS, MAX_DOWNTIME_LIMIT_MS};

use crate::api_gate::ApiGate;
use crate::migration::source::MigrationWorker;
use crate::runtime::Runtime;
use crate::vm::ExitReason;

const API_STACK_SIZE: usize = 128 * 1024;
/// Connections served at once (one thread each).
pub const API_THREADS: usize = 4;
/// Longest wait for the peer in one read or write.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may take to send its requests, however it paces
/// its bytes. (A migration's reply may come later: the deadline bounds
/// what the peer sends, not how long a request takes.)
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on API socket {}: {err}", path.display())]
    Bind { path: PathBuf, err: ListenError },
    #[error("the API socket taken over from the source: {0}")]
    Adopt(std::io::Error),
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
    #[error("the API socket: {0}")]
    Nonblocking(std::io::Error),
}

/// What the API reports and acts on.
pub struct ApiContext {
    pub runtime: Arc<Runtime>,
    /// Runs `migrate` requests on its own thread.
    pub migration: Arc<MigrationWorker>,
}

/// What the API threads share.
struct Server {
    listener: Listener,
    ctx: ApiContext,
    /// The uid the vmm runs as: with root, the only peer served.
    owner: u32,
}

/// Binds the socket now, so errors reach the user at start.
pub fn bind(path: &Path) -> Result<Listener, ApiError> {
    Listener::bind_replacing_stale(path, 0o600).map_err(|err| ApiError::Bind {
        path: path.to_path_buf(),
        err,
    })
}

/// The listening socket a migration source handed over.
pub fn adopt(listener: UnixListener) -> Result<Listener, ApiError> {
    Listener::adopt(listener).map_err(ApiError::Adopt)
}

/// Serves `listener` from [`API_THREADS`] threads, through the runtime's
/// gate. The listener becomes non-blocking: a connection that another
/// thread (or the other vmm sharing the socket) took first is not waited for.
pub fn spawn(listener: Listener, ctx: ApiContext) -> Result<(), ApiError> {
    listener
        .set_nonblocking(true)
        .map_err(ApiError::Nonblocking)?;
    let server = Arc::new(Server {
        listener,
        ctx,
        owner: nix::unistd::geteuid().as_raw(),
    });
    for _ in 0..API_THREADS {
        let server = Arc::clone(&server);
        crate::thread_start::spawn(
            std::thread::Builder::new()
                .name("api".into())
                .stack_size(API_STACK_SIZE),
            || crate::sandbox::enter_thread_or_exit(crate::sandbox::ThreadKind::Api),
            move |()| server.serve(),
        )
        .map_err(ApiError::Thread)?;
    }
    Ok(())
}

impl Server {
    fn serve(&self) {
        let limits = ConnLimits {
            io_timeout: PEER_TIMEOUT,
            lifetime: CONNECTION_DEADLINE,
        };
        let gate = &self.ctx.runtime.api_gate;
        while gate.wait_open() {
            let accepted = self.wait_and_accept(gate);
            let (stream, peer) = match accepted {
                Some(Ok(c)) => c,
                None => continue,
                Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Some(Err(e)) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::debug!("API accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            // (On Linux an accepted socket does not inherit the listener's
            // O_NONBLOCK: it blocks, with the connection's timeouts.)
            if !peer.is_owner_or_root(self.owner) {
                self.refuse_peer(stream, peer);
                continue;
            }
            let conn = match Connection::new(stream, peer, limits) {
                Ok(c) => c,
                Err(e) => {
                    log::info!("API connection: {e}");
                    continue;
                }
            };
            if let Err(e) = self.handle_connection(&conn) {
                log::info!("API connection ended: {e}");
            }
        }
        // Park: the process exits shortly; the target accepts from now on.
        loop {
            std::thread::park();
        }
    }

    /// Waits for a connection, and accepts it if the gate is still open.
    fn wait_and_accept(&self, gate: &ApiGate) -> Option<std::io::Result<(UnixStream, PeerCred)>> {
        let mut fd = libc::pollfd {
            fd: self.listener.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count passed.
        let n = unsafe { libc::poll(&mut fd, 1, -1) };
        if n <= 0 || fd.revents & libc::POLLIN == 0 || !gate.begin_accept() {
            return None;
        }
        let r = self.listener.accept();
        gate.end_accept();
        Some(r)
    }

    /// One short answer, without reading and barely waiting, then the
    /// connection closes.
    fn refuse_peer(&self, stream: UnixStream, peer: PeerCred) {
        log::info!("API: refused uid {} (pid {})", peer.uid, peer.pid);
        // A short send timeout (setsockopt; FIONBIO is not in the api filter).
        if stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .is_ok()
        {
            let message = format!(
                "uid {} may not use this API: only uid {} and root may",
                peer.uid, self.owner
            );
            let _ = codec::send(&stream, &ApiResponse::Error { message }, &[]);
        }
    }

    /// Receives a request; requests carry no fds. Well-formed RON that is
    /// not a request, and fds, are answered with an error (`Ok(None)` when
    /// the connection can go on).
    fn next_request(&self, conn: &Connection) -> Result<Option<ApiRequest>, CodecError> {
        match conn.recv::<ApiRequest>(DEFAULT_MAX_FRAME, 0) {
            Ok(r) => Ok(Some(r.msg)),
            Err(CodecError::Unexpected(detail)) => {
                let message = format!(
                    "not a request of API version {API_VERSION}: {}",
                    detail.chars().take(160).collect::<String>()
                );
                conn.send(&ApiResponse::Error { message }, &[])?;
                Ok(None)
            }
            Err(e @ (CodecError::TooManyFds { .. } | CodecError::FdsTruncated)) => {
                let message = format!("{e}: API requests carry no file descriptors");
                let _ = conn.send(&ApiResponse::Error { message }, &[]);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn handle_connection(&self, conn: &Connection) -> Result<(), CodecError> {
        match self.next_request(conn)? {
            Some(ApiRequest::Hello { version }) if version == API_VERSION => {
                conn.send(
                    &ApiResponse::Hello {
                        version: API_VERSION,
                    },
                    &[],
                )?;
            }
            Some(other) => {
                let message =
                    format!("expected Hello with API version {API_VERSION}, got {other:?}");
                return conn.send(&ApiResponse::Error { message }, &[]);
            }
            // Answered already; only Hello may come first.
            None => return Ok(()),
        }
        loop {
            let req = match self.next_request(conn) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(CodecError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            // A connection made before the guest went to another vmm gets
            // no answer from this one.
            if self.ctx.runtime.api_gate.is_retired() {
                return Ok(());
            }
            let (resp, then) = respond(req, &self.ctx);
            let sent = conn.send(&resp, &[]);
            // The reason to exit goes out even when vmctl left early.
            if let Some(reason) = then {
                // (A migration that handed the guest over retired the gate.)
                self.ctx.runtime.exit.send(reason);
                return sent;
            }
            sent?;
        }
    }
}

fn error(e: impl ToString) -> ApiResponse {
    ApiResponse::Error {
        message: e.to_string(),
    }
}

/// The answer, and how this process ends after sending it (if it does).
fn respond(req: ApiRequest, ctx: &ApiContext) -> (ApiResponse, Option<ExitReason>) {
    let rt = &ctx.runtime;
    let resp = match req {
        ApiRequest::Hello { .. } => error("Hello was already exchanged"),
        ApiRequest::Status => ApiResponse::Status(rt.status()),
        ApiRequest::Pause => rt.pause().map_or_else(error, |()| ApiResponse::Ok),
        ApiRequest::Resume => rt.resume().map_or_else(error, |()| ApiResponse::Ok),
        ApiRequest::Shutdown => {
            return match rt.begin_shutdown() {
                Ok(()) => (ApiResponse::Ok, Some(ExitReason::ApiShutdown)),
                Err(e) => (error(e), None),
            };
        }
        ApiRequest::Migrate {
            to,
            backend_transfer,
            downtime_limit_ms,
        } => {
            let limit =
                Duration::from_millis(downtime_limit_ms.unwrap_or(DEFAULT_DOWNTIME_LIMIT_MS));
            if downtime_limit_ms.is_some_and(|ms| !(1..=MAX_DOWNTIME_LIMIT_MS).contains(&ms)) {
                return (
                    error(format!(
                        "downtime limit must be 1 to {MAX_DOWNTIME_LIMIT_MS} ms"
                    )),
                    None,
                );
            }
            let out = ctx
                .migration
                .migrate(Path::new(&to), backend_transfer, limit);
            return (ApiResponse::Migrated(out.report), out.exit);
        }
    };
    (resp, None)
}
