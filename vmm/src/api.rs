//! The `--api-socket` server: vmctl's requests (common::api) on a UNIX
//! socket, one thread, one connection at a time (requests are quick).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::{API_VERSION, ApiRequest, ApiResponse, RunState, VmStatus};
use common::codec::{self, CodecError, DEFAULT_MAX_FRAME};

use crate::control::RunControl;
use crate::persist::Machine;
use crate::vm::{ExitReason, ExitSender};

const API_STACK_SIZE: usize = 128 * 1024;
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on API socket {path}: {err}")]
    Bind { path: PathBuf, err: std::io::Error },
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

/// Binds the socket now (so errors reach the user at start) and serves it
/// from a thread.
pub fn start(path: &Path, ctx: ApiContext) -> Result<(), ApiError> {
    let listener = UnixListener::bind(path).map_err(|err| ApiError::Bind {
        path: path.to_path_buf(),
        err,
    })?;
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(API_STACK_SIZE)
        .spawn(move || {
            crate::sandbox::enter_thread_or_exit(crate::sandbox::ThreadKind::Api);
            serve(listener, ctx)
        })
        .map_err(ApiError::Thread)?;
    Ok(())
}

fn serve(listener: UnixListener, ctx: ApiContext) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                if let Err(e) = handle_connection(&s, &ctx) {
                    log::info!("API connection ended: {e}");
                }
            }
            Err(e) => log::warn!("API accept failed: {e}"),
        }
    }
}

fn handle_connection(sock: &UnixStream, ctx: &ApiContext) -> Result<(), CodecError> {
    sock.set_read_timeout(Some(PEER_TIMEOUT))?;
    sock.set_write_timeout(Some(PEER_TIMEOUT))?;
    let hello = codec::recv::<_, ApiRequest>(sock, DEFAULT_MAX_FRAME)?;
    match hello.msg {
        ApiRequest::Hello { version } if version == API_VERSION => {
            codec::send(
                sock,
                &ApiResponse::Hello {
                    version: API_VERSION,
                },
                &[],
            )?;
        }
        other => {
            let message = format!("expected Hello with API version {API_VERSION}, got {other:?}");
            return codec::send(sock, &ApiResponse::Error { message }, &[]);
        }
    }
    loop {
        let req = match codec::recv::<_, ApiRequest>(sock, DEFAULT_MAX_FRAME) {
            Ok(r) => r.msg,
            Err(CodecError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let (resp, shutdown) = respond(req, ctx);
        codec::send(sock, &resp, &[])?;
        if shutdown {
            ctx.exit.send(ExitReason::ApiShutdown);
            return Ok(());
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
