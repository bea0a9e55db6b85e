//! The `--api-socket` server: vmctl's requests (common::api) on a UNIX
//! socket, one thread, one connection at a time (requests are quick).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::api::{API_VERSION, ApiRequest, ApiResponse};
use common::codec::{self, CodecError, DEFAULT_MAX_FRAME};

use crate::migration::source::MigrationWorker;
use crate::runtime::Runtime;
use crate::vm::ExitReason;

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
    pub runtime: Arc<Runtime>,
    /// Runs `migrate` requests on its own thread.
    pub migration: Arc<MigrationWorker>,
}

/// Binds the socket now, so errors reach the user at start.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    UnixListener::bind(path).map_err(|err| ApiError::Bind {
        path: path.to_path_buf(),
        err,
    })
}

/// Serves `listener` (bound here, or taken over from a migration source)
/// from the API thread.
pub fn spawn(listener: UnixListener, ctx: ApiContext) -> Result<(), ApiError> {
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
            Ok(s) => match handle_connection(&s, &ctx) {
                Ok(Served::Continue) => {}
                // The guest is gone to another vmm, which serves this
                // socket from now on: accept nothing more here.
                Ok(Served::Migrated) => return,
                Err(e) => log::info!("API connection ended: {e}"),
            },
            Err(e) => log::warn!("API accept failed: {e}"),
        }
    }
}

enum Served {
    Continue,
    Migrated,
}

fn handle_connection(sock: &UnixStream, ctx: &ApiContext) -> Result<Served, CodecError> {
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
            codec::send(sock, &ApiResponse::Error { message }, &[])?;
            return Ok(Served::Continue);
        }
    }
    loop {
        let req = match codec::recv::<_, ApiRequest>(sock, DEFAULT_MAX_FRAME) {
            Ok(r) => r.msg,
            Err(CodecError::Closed) => return Ok(Served::Continue),
            Err(e) => return Err(e),
        };
        let (resp, then) = respond(req, ctx);
        let sent = codec::send(sock, &resp, &[]);
        // The reason to exit goes out even when vmctl left early.
        if let Some(reason) = then {
            let migrated = matches!(reason, ExitReason::Migrated { .. });
            ctx.runtime.exit.send(reason);
            sent?;
            return Ok(if migrated {
                Served::Migrated
            } else {
                Served::Continue
            });
        }
        sent?;
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
        ApiRequest::Shutdown => return (ApiResponse::Ok, Some(ExitReason::ApiShutdown)),
        ApiRequest::Migrate {
            to,
            backend_transfer,
        } => {
            let out = ctx
                .migration
                .migrate(std::path::Path::new(&to), backend_transfer);
            return (ApiResponse::Migrated(out.report), out.exit);
        }
    };
    (resp, None)
}
