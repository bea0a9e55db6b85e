//! netd: the only privileged process of the project. It accepts local clients
//! on a UNIX socket, identifies them by SO_PEERCRED, checks each request
//! against a RON policy, creates the TAP (and opens vhost-net), writes an audit
//! line, hands the fds over with SCM_RIGHTS and closes its own copies.
//!
//! `netd --socket PATH --policy FILE [--audit-log FILE]`, or
//! `netd --check-policy FILE` to validate a policy without serving (the
//! definition: `cli::netd::Args`).
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

use clap::CommandFactory;
use cli::UsageError;
use cli::netd::USAGE;
use common::listener::Listener;
use common::notify::Notifier;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::policy::{Cidr, Policy};
use crate::server::{Limits, Server};

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
    /// `--help` or `--version`: print this to stdout.
    Print(String),
}

/// Reads the command line (the definition is `cli::netd::Args`). A
/// refusal is one line.
fn parse_args() -> Result<Invocation, String> {
    let a: cli::netd::Args =
        match cli::parse(cli::netd::Args::command(), std::env::args_os().skip(1)) {
            Ok(cli::Parsed::Args(a)) => a,
            Ok(cli::Parsed::Print(text)) => return Ok(Invocation::Print(text)),
            Err(e) => return Err(format!("{} ({USAGE})", usage_message(e))),
        };
    if let Some(path) = a.check_policy {
        return Ok(Invocation::CheckPolicy(path));
    }
    Ok(Invocation::Serve(Args {
        // Optional: socket activation may pass the listening socket.
        socket: a.socket,
        policy: a
            .policy
            .ok_or_else(|| format!("--policy is required ({USAGE})"))?,
        audit_log: a.audit_log,
        limits: Limits {
            read_timeout: Duration::from_millis(a.read_timeout_ms),
            client_deadline: Duration::from_millis(a.client_deadline_ms),
            max_clients: a.max_clients,
            max_clients_per_uid: a.max_clients_per_uid,
            tenant_reserve: a.tenant_reserve,
        },
    }))
}

/// clap's refusal in netd's words.
fn usage_message(e: UsageError) -> String {
    match e {
        UsageError::Unknown(a) => format!("unknown option {a}"),
        UsageError::NeedsValue(o) => format!("{o} needs a value"),
        // The numeric limits: "--max-clients takes a positive number".
        UsageError::Invalid { arg, message, .. } => format!("{arg} {message}"),
        e => e.to_string(),
    }
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
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Serve(args)) => args,
        Err(e) => {
            print_error(&e);
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let activated = match common::activation::listener_from_env() {
        Ok(a) => a,
        Err(e) => {
            print_error(&e.to_string());
            return ExitCode::from(activation::EXIT_BAD_ACTIVATION);
        }
    };
    if activated.is_none() && args.socket.is_none() {
        print_error(&format!(
            "--socket is required unless netd is socket-activated (LISTEN_FDS) ({USAGE})"
        ));
        return ExitCode::from(cli::EXIT_USAGE);
    }
    match run(args, activated) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}
