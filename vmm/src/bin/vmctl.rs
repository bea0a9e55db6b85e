//! vmctl: the control client of a running vmm (`--api-socket`).
//!
//! `vmctl --api-socket PATH {status|pause|resume|shutdown|migrate --to PATH
//! [--no-backend-transfer]} [--json]`, `vmctl --version`, `vmctl --help`.
//! Exit code 0 on success, 1 when the vmm reports an error or cannot be
//! reached, 2 for bad usage.

use std::os::unix::net::UnixStream;
use std::process::exit;
use std::time::Duration;

use common::api::{API_VERSION, ApiRequest, ApiResponse};
use common::codec::{self, DEFAULT_MAX_FRAME};
use common::migration::MAX_DOWNTIME_LIMIT_MS;

const USAGE: &str = "usage: vmctl --api-socket PATH {status|pause|resume|shutdown|migrate --to PATH [--no-backend-transfer] [--downtime-limit-ms N]} [--json] | --version | --help";
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
    Help,
    Version,
}

/// The arguments as text: a socket path given to vmctl must be UTF-8 (it
/// travels in requests as a string); anything else is a usage error, not a
/// panic.
fn text_args(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Vec<String>, String> {
    args.map(|a| {
        a.into_string()
            .map_err(|a| format!("argument '{}' is not valid UTF-8", a.to_string_lossy()))
    })
    .collect()
}

fn parse(args: Vec<String>) -> Result<Invocation, String> {
    let mut socket = None;
    let mut command = None;
    let mut to = None;
    let mut backend_transfer = true;
    let mut downtime_limit_ms = None;
    let mut json = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--api-socket" => socket = Some(it.next().ok_or("--api-socket needs a path")?),
            "--help" | "-h" => return Ok(Invocation::Help),
            "--version" | "-V" => return Ok(Invocation::Version),
            "--json" => json = true,
            "--to" => to = Some(it.next().ok_or("--to needs a path")?),
            "--no-backend-transfer" => backend_transfer = false,
            "--downtime-limit-ms" => {
                let v = it.next().ok_or("--downtime-limit-ms needs a number")?;
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| (1..=MAX_DOWNTIME_LIMIT_MS).contains(ms))
                    .ok_or_else(|| {
                        format!(
                            "--downtime-limit-ms: '{v}' is not a number of ms from 1 to {MAX_DOWNTIME_LIMIT_MS}"
                        )
                    })?;
                downtime_limit_ms = Some(ms);
            }
            "status" | "pause" | "resume" | "shutdown" | "migrate" if command.is_none() => {
                command = Some(a)
            }
            _ if a.starts_with("--api-socket=") => {
                socket = Some(a["--api-socket=".len()..].to_string())
            }
            _ => return Err(format!("unexpected argument '{a}'")),
        }
    }
    let socket = socket.ok_or("--api-socket is required")?;
    if (to.is_some() || downtime_limit_ms.is_some()) && command.as_deref() != Some("migrate") {
        return Err("--to and --downtime-limit-ms are only valid with migrate".into());
    }
    let request = match command.as_deref() {
        Some("status") => ApiRequest::Status,
        Some("pause") => ApiRequest::Pause,
        Some("resume") => ApiRequest::Resume,
        Some("shutdown") => ApiRequest::Shutdown,
        Some("migrate") => ApiRequest::Migrate {
            to: to.ok_or("migrate needs --to PATH")?,
            backend_transfer,
            downtime_limit_ms,
        },
        _ => return Err("no command given".into()),
    };
    Ok(Invocation::Call(Args {
        socket,
        request,
        json,
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
                        "\nnet {}: tap {} mac {} queues {} vhost {}{}",
                        n.id,
                        n.tap,
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
    let args = match text_args(std::env::args_os().skip(1)).and_then(parse) {
        Ok(Invocation::Call(a)) => a,
        Ok(Invocation::Help) => {
            println!("{USAGE}");
            exit(0);
        }
        Ok(Invocation::Version) => {
            println!("vmctl {}", env!("CARGO_PKG_VERSION"));
            exit(0);
        }
        Err(e) => {
            eprintln!("vmctl: {e} ({USAGE})");
            exit(2);
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
