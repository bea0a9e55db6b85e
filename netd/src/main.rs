//! netd: the only privileged process of the project. It accepts local clients
//! on a UNIX socket, identifies them by SO_PEERCRED, checks each request
//! against a RON policy, creates the TAP (and opens vhost-net), writes an audit
//! line, hands the fds over with SCM_RIGHTS and closes its own copies.
//!
//! `netd --socket PATH --policy FILE [--audit-log FILE]`, or
//! `netd --check-policy FILE` to validate a policy without serving.
//! SIGHUP reloads the policy file; SIGTERM/SIGINT stop netd.

mod activation;
mod audit;
mod iface;
mod policy;
mod server;
mod slots;
mod taps;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::listener::Listener;
use common::notify::Notifier;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::policy::{Cidr, Policy};
use crate::server::{Limits, Server};

const USAGE: &str = "usage: netd --socket PATH --policy FILE [--audit-log FILE] \
[--read-timeout-ms N] [--client-deadline-ms N] [--max-clients N] [--max-clients-per-uid N] \
[--tenant-reserve N] | --check-policy FILE | --version | --help";

/// Exit code of `--check-policy` on a policy with problems.
const EXIT_BAD_POLICY: u8 = 2;

static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

struct Args {
    socket: Option<PathBuf>,
    policy: PathBuf,
    audit_log: Option<PathBuf>,
    limits: Limits,
}

/// What the command line asks for.
enum Invocation {
    Serve(Args),
    CheckPolicy(PathBuf),
    Help,
    Version,
}

fn parse_args() -> Result<Invocation, String> {
    let mut socket = None;
    let mut policy = None;
    let mut audit_log = None;
    let mut limits = Limits {
        read_timeout: Duration::from_secs(5),
        client_deadline: Duration::from_secs(30),
        max_clients: 128,
        max_clients_per_uid: 32,
        tenant_reserve: 8,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        if a == "--help" || a == "-h" {
            return Ok(Invocation::Help);
        }
        if a == "--version" || a == "-V" {
            return Ok(Invocation::Version);
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = |v: &std::ffi::OsStr| -> Result<u64, String> {
            v.to_str()
                .and_then(|s| s.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{a} takes a positive number"))
        };
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(v)),
            "--policy" => policy = Some(PathBuf::from(v)),
            "--audit-log" => audit_log = Some(PathBuf::from(v)),
            "--check-policy" => return Ok(Invocation::CheckPolicy(PathBuf::from(v))),
            "--read-timeout-ms" => limits.read_timeout = Duration::from_millis(num(&v)?),
            "--client-deadline-ms" => limits.client_deadline = Duration::from_millis(num(&v)?),
            "--max-clients" => {
                limits.max_clients = usize::try_from(num(&v)?).map_err(|e| e.to_string())?
            }
            "--max-clients-per-uid" => {
                limits.max_clients_per_uid = usize::try_from(num(&v)?).map_err(|e| e.to_string())?
            }
            "--tenant-reserve" => {
                limits.tenant_reserve = usize::try_from(num(&v)?).map_err(|e| e.to_string())?
            }
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    Ok(Invocation::Serve(Args {
        socket,
        policy: policy.ok_or_else(|| format!("--policy is required\n{USAGE}"))?,
        audit_log,
        limits,
    }))
}

/// Binds the socket (mode 0666: any local user may connect; who they are
/// comes from SO_PEERCRED), replacing a stale one but never a live netd's
/// socket or a file that is not a socket.
fn bind(path: &Path) -> Result<Listener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("another server is listening on {}", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    Listener::bind(path, 0o666).map_err(|e| e.to_string())
}

/// `--check-policy`: the same load and validation netd does before serving,
/// and nothing else (no socket, no network, no privileges needed).
fn check_policy(path: &Path) -> ExitCode {
    match Policy::load(path) {
        Ok(p) => {
            println!("policy {} is valid", path.display());
            for line in p.summary() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_error(&e.to_string());
            ExitCode::from(EXIT_BAD_POLICY)
        }
    }
}

/// One `netd: ` line per line of `e` (a policy can have several problems).
fn print_error(e: &str) {
    for line in e.lines() {
        eprintln!("netd: {line}");
    }
}

fn run(args: Args, activated: Option<common::activation::Activated>) -> Result<(), String> {
    let policy = Policy::load(&args.policy).map_err(|e| e.to_string())?;
    for b in &policy.bridges {
        let addr = b
            .address
            .as_deref()
            .map(Cidr::parse)
            .transpose()
            .map_err(|e| format!("bridge {}: {e}", b.name))?;
        match iface::ensure_bridge(&b.name, addr) {
            Ok(true) => log::info!("created bridge {}", b.name),
            Ok(false) => log::info!("bridge {} exists; using it as it is", b.name),
            Err(e) => return Err(format!("cannot set up bridge {}: {e}", b.name)),
        }
    }
    let audit = audit::AuditLog::open(args.audit_log.as_deref()).map_err(|e| {
        format!(
            "cannot open audit log {}: {e}",
            args.audit_log.as_deref().unwrap_or(Path::new("")).display()
        )
    })?;
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        unsafe { sigaction(sig, &handler) }.map_err(|e| format!("sigaction {sig}: {e}"))?;
    }
    let notify = Notifier::from_env().map_err(|e| e.to_string())?;
    // A socket from the manager is the manager's: left in place at exit.
    let (listener, own_path) = activation::serve_on(activated, args.socket.as_deref(), bind)?;
    let server = Arc::new(Server::new(policy, args.policy, audit, args.limits));
    let result = server
        .run(listener, &STOP, &RELOAD, &notify)
        .map_err(|e| format!("accept loop: {e}"));
    if let Some(p) = own_path {
        let _ = std::fs::remove_file(p);
    }
    log::info!("stopped");
    result
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match parse_args() {
        Ok(Invocation::CheckPolicy(path)) => return check_policy(&path),
        Ok(Invocation::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("netd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Serve(args)) => args,
        Err(e) => {
            print_error(&e);
            return ExitCode::FAILURE;
        }
    };
    let activated = match common::activation::listener_from_env() {
        Ok(a) => a,
        Err(e) => {
            print_error(&e.to_string());
            return ExitCode::from(activation::EXIT_BAD_ACTIVATION);
        }
    };
    match run(args, activated) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}
