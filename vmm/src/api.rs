//! The `--api-socket` server: vmctl's requests (common::api) on a UNIX
//! socket created 0600 whatever the umask, for the vmm's own uid and root
//! only (checked by SO_PEERCRED before anything is read).
//!
//! A few API threads (each under the api seccomp filter, started while
//! thread creation is still allowed) accept connections, so that a client
//! that stalls does not keep the others waiting; each connection has a read
//! timeout and an overall deadline. Requests themselves run one at a time.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api::{API_VERSION, ApiRequest, ApiResponse, RunState, VmStatus};
use common::codec::{self, CodecError, DEFAULT_MAX_FRAME};
use common::listener::{ConnLimits, Connection, ListenError, Listener, PeerCred};

use crate::control::RunControl;
use crate::persist::Machine;
use crate::vm::{ExitReason, ExitSender};

const API_STACK_SIZE: usize = 128 * 1024;
/// Connections served at once (one thread each).
pub const API_THREADS: usize = 4;
/// Longest wait for the peer in one read or write.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may take to send its requests, however it paces
/// its bytes.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on API socket {}: {err}", path.display())]
    Bind { path: PathBuf, err: ListenError },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// What the API reports and acts on.
pub struct ApiContext {
    pub control: Arc<RunControl>,
    pub exit: ExitSender,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub started: Instant,
    /// For snapshots (migration): save/restore while paused.
    pub machine: Arc<Machine>,
}

/// What the API threads share.
struct Server {
    listener: Listener,
    ctx: ApiContext,
    /// The uid the vmm runs as: with root, the only peer served.
    owner: u32,
    /// Requests act one at a time (pause, resume, migrate...).
    acting: Mutex<()>,
}

/// Binds the socket now (so errors reach the user at start) and serves it
/// from [`API_THREADS`] threads.
pub fn start(path: &Path, ctx: ApiContext) -> Result<(), ApiError> {
    let listener = Listener::bind(path, 0o600).map_err(|err| ApiError::Bind {
        path: path.to_path_buf(),
        err,
    })?;
    let server = Arc::new(Server {
        listener,
        ctx,
        owner: nix::unistd::geteuid().as_raw(),
        acting: Mutex::new(()),
    });
    for _ in 0..API_THREADS {
        let server = Arc::clone(&server);
        std::thread::Builder::new()
            .name("api".into())
            .stack_size(API_STACK_SIZE)
            .spawn(move || {
                crate::sandbox::enter_thread_or_exit(crate::sandbox::ThreadKind::Api);
                server.serve()
            })
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
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::debug!("API accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
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
            let (resp, shutdown) = {
                let _one_at_a_time = self.acting.lock().unwrap_or_else(|e| e.into_inner());
                respond(req, &self.ctx)
            };
            conn.send(&resp, &[])?;
            if shutdown {
                self.ctx.exit.send(ExitReason::ApiShutdown);
                return Ok(());
            }
        }
    }
}

fn respond(req: ApiRequest, ctx: &ApiContext) -> (ApiResponse, bool) {
    let resp = match req {
        ApiRequest::Hello { .. } => ApiResponse::Error {
            message: "Hello was already exchanged".into(),
        },
        ApiRequest::Status => ApiResponse::Status(VmStatus {
            state: if ctx.control.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            },
            pid: std::process::id(),
            vcpus: ctx.vcpus,
            memory_bytes: ctx.memory_bytes,
            uptime_ms: ctx.started.elapsed().as_millis() as u64,
            nets: ctx.machine.nets.iter().map(|n| n.status()).collect(),
        }),
        // vCPUs first, so no driver write races the device pause; frames
        // arriving meanwhile wait in the TAP queues.
        ApiRequest::Pause => match ctx.control.pause() {
            Ok(()) => match ctx.machine.pause_devices() {
                Ok(()) => ApiResponse::Ok,
                Err(e) => ApiResponse::Error {
                    message: e.to_string(),
                },
            },
            Err(e) => ApiResponse::Error {
                message: e.to_string(),
            },
        },
        // Devices first, so the guest finds its queues served.
        ApiRequest::Resume => {
            let devices = ctx.machine.resume_devices();
            ctx.control.resume();
            match devices {
                Ok(()) => ApiResponse::Ok,
                Err(e) => ApiResponse::Error {
                    message: e.to_string(),
                },
            }
        }
        ApiRequest::Shutdown => return (ApiResponse::Ok, true),
        ApiRequest::Migrate { .. } => ApiResponse::Error {
            message: "migration is not supported yet".into(),
        },
    };
    (resp, false)
}
