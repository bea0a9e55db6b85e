//! vmctl: the control client of a running vmm (`--api-socket`).
//!
//! `vmctl --api-socket PATH {status|pause|resume|shutdown|migrate --to PATH
//! [--no-backend-transfer] [--downtime-limit-ms N]} [--json]`, `vmctl
//! --version`, `vmctl --help` (the definition: `cli::vmctl::Args`).
//! Exit code 0 on success, 1 when the vmm reports an error or cannot be
//! reached, 2 for bad usage.

use std::os::unix::net::UnixStream;
use std::process::exit;
use std::time::Duration;

use clap::CommandFactory;
use cli::UsageError;
use cli::vmctl::{Command, USAGE};
use common::api::{API_VERSION, ApiRequest, ApiResponse};
use common::codec::{self, DEFAULT_MAX_FRAME};

/// Migration can take a while; everything else answers at once.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    socket: String,
    request: ApiRequest,
    json: bool,
}

/// What the command line asks for.
enum Invocation {
    Call(Args),
    /// `--help` or `--version`: print this to stdout.
    Print(String),
}

/// clap's refusal in vmctl's words.
fn usage_message(e: UsageError) -> String {
    match e {
        UsageError::NeedsValue(o) => match o.as_str() {
            "--downtime-limit-ms" => format!("{o} needs a number"),
            _ => format!("{o} needs a path"),
        },
        // An unknown option, a second command, or a command that is not one.
        UsageError::Unknown(a) => format!("unexpected argument '{a}'"),
        UsageError::Invalid { arg, value, .. } if arg == "COMMAND" => {
            format!("unexpected argument '{value}'")
        }
        e => e.to_string(),
    }
}

/// Reads the command line (args after the program name) into a request.
fn parse(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Invocation, String> {
    let a: cli::vmctl::Args = match cli::parse(cli::vmctl::Args::command(), args) {
        Ok(cli::Parsed::Args(a)) => a,
        Ok(cli::Parsed::Print(text)) => return Ok(Invocation::Print(text)),
        Err(e) => return Err(usage_message(e)),
    };
    let socket = a.api_socket.ok_or("--api-socket is required")?;
    if (a.to.is_some() || a.downtime_limit_ms.is_some()) && a.command != Some(Command::Migrate) {
        return Err("--to and --downtime-limit-ms are only valid with migrate".into());
    }
    let request = match a.command {
        Some(Command::Status) => ApiRequest::Status,
        Some(Command::Pause) => ApiRequest::Pause,
        Some(Command::Resume) => ApiRequest::Resume,
        Some(Command::Shutdown) => ApiRequest::Shutdown,
        Some(Command::Migrate) => ApiRequest::Migrate {
            to: a.to.ok_or("migrate needs --to PATH")?,
            backend_transfer: !a.no_backend_transfer,
            downtime_limit_ms: a.downtime_limit_ms,
        },
        None => return Err("no command given".into()),
    };
    Ok(Invocation::Call(Args {
        socket,
        request,
        json: a.json,
    }))
}

fn call(socket: &str, request: &ApiRequest) -> Result<ApiResponse, String> {
    let s = UnixStream::connect(socket).map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let hello = ApiRequest::Hello {
        version: API_VERSION,
    };
    // The vmm may refuse before reading (not its uid): its answer is still
    // there to read when the send fails.
    let sent = codec::send(&s, &hello, &[]);
    let hello_reply = codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0);
    let reply = match (sent, hello_reply) {
        (_, Ok(r)) => r,
        (Err(e), Err(_)) => return Err(format!("send: {e}")),
        (Ok(()), Err(e)) => return Err(format!("receive: {e}")),
    };
    match reply.msg {
        ApiResponse::Hello { .. } => {}
        ApiResponse::Error { message } => return Err(message),
        other => return Err(format!("unexpected answer to Hello: {other:?}")),
    }
    codec::send(&s, request, &[]).map_err(|e| format!("send: {e}"))?;
    Ok(codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0)
        .map_err(|e| format!("receive: {e}"))?
        .msg)
}

/// One compact line of a NIC's counters for `status`.
fn counters_line(id: &str, c: &common::api::NetCounters) -> String {
    let d = &c.drops;
    format!(
        "\nnet {id}: rx {} pkts {} B, tx {} pkts {} B, drops {} (no rx buffer {}, tap errors {}, bad chains {}), irqs {} ({} saved by event idx)",
        c.rx_packets,
        c.rx_bytes,
        c.tx_packets,
        c.tx_bytes,
        d.total(),
        d.no_rx_buffer,
        d.rx_tap_errors + d.tx_tap_errors,
        d.rx_bad_chains + d.tx_bad_chains + d.ctrl_bad_chains,
        c.interrupts,
        c.interrupts_saved_by_event_idx
    )
}

/// A vhost-user NIC's connection, for the text status.
fn vhost_user_line(v: &common::api::VhostUserStatus) -> String {
    format!(
        "vhost-user {} {} (connections {}{})",
        v.socket,
        if v.connected {
            "connected"
        } else {
            "reconnecting"
        },
        v.connections,
        v.last_error
            .as_deref()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default()
    )
}

fn print(resp: &ApiResponse, json: bool) -> bool {
    let (ok, text, value) = match resp {
        ApiResponse::Ok | ApiResponse::Hello { .. } => {
            (true, "ok".to_string(), serde_json::json!({"result": "ok"}))
        }
        ApiResponse::Status(s) => (
            true,
            format!(
                "state: {:?}\npid: {}\nversion: {}\nformat: {}\nvcpus: {}{}\nmemory_bytes: {}\nuptime_ms: {}\nnets: {}{}",
                s.state,
                s.pid,
                s.version.as_deref().unwrap_or("unknown (before 0.2.0)"),
                s.format.as_deref().unwrap_or("unknown (before 0.2.0)"),
                s.vcpus,
                s.vcpu_list
                    .iter()
                    .flatten()
                    .map(|v| format!(
                        "\nvcpu {}: apic id {} {:?}, {:?}",
                        v.id, v.apic_id, v.run, v.mp_state
                    ))
                    .collect::<String>(),
                s.memory_bytes,
                s.uptime_ms,
                s.nets.len(),
                s.nets
                    .iter()
                    .map(|n| format!(
                        "\nnet {}: {} mac {} queues {} vhost {}{}",
                        n.id,
                        match &n.vhost_user {
                            Some(v) => vhost_user_line(v),
                            None => format!("tap {}", n.tap),
                        },
                        n.mac,
                        n.queues,
                        if n.vhost { "on" } else { "off" },
                        n.counters
                            .map(|c| counters_line(&n.id, &c))
                            .unwrap_or_default()
                    ))
                    .collect::<String>()
            ),
            serde_json::to_value(s).unwrap_or_default(),
        ),
        ApiResponse::Migrated(r) => (
            r.result == "ok",
            format!(
                "result: {}\ndowntime_us: {}\ntotal_us: {}",
                r.result, r.downtime_us, r.total_us
            ),
            serde_json::to_value(r).unwrap_or_default(),
        ),
        ApiResponse::Error { message } => (
            false,
            format!("error: {message}"),
            serde_json::json!({"result": "error", "error": message}),
        ),
    };
    if json {
        println!("{value}");
    } else if ok {
        println!("{text}");
    } else {
        eprintln!("vmctl: {text}");
    }
    ok
}

fn main() {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Call(a)) => a,
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            exit(0);
        }
        Err(e) => {
            eprintln!("vmctl: {e} ({USAGE})");
            exit(cli::EXIT_USAGE.into());
        }
    };
    match call(&args.socket, &args.request) {
        Ok(resp) => exit(if print(&resp, args.json) { 0 } else { 1 }),
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({"result": "error", "error": e}));
            }
            eprintln!("vmctl: {e}");
            exit(1);
        }
    }
}
