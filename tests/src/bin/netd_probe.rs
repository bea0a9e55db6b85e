//! A netd client for tests, run as an unprivileged uid. It goes through the
//! VMM's own `--net` parser and netd client, prints one JSON line with the
//! outcome, and with `hold` keeps the fds until stdin closes.
//!
//! netd_probe tap NET_OPTION [hold]   (NET_OPTION as vmm's --net takes it)
//! netd_probe vhost SOCKET QUEUES
//! netd_probe status SOCKET
//! netd_probe exec NET_OPTION -- PROGRAM ARGS...   (execs PROGRAM with the
//!   first TAP fd inherited; `{fd}` in ARGS becomes its number, e.g. QEMU's
//!   `-netdev tap,fd={fd}`)

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use vmm::net::config::NetConfig;
use vmm::net::netd_client::{self, NetdClient, NetdClientError};

fn refusal(e: &NetdClientError) -> serde_json::Value {
    match e {
        NetdClientError::Refused { kind, message } => {
            json!({"ok": false, "kind": format!("{kind:?}"), "message": message})
        }
        other => json!({"ok": false, "kind": "Client", "message": other.to_string()}),
    }
}

fn run(args: &[String]) -> Result<serde_json::Value, String> {
    match args {
        [cmd, opt, rest @ ..] if cmd == "tap" => {
            let cfg = NetConfig::parse(opt).map_err(|e| e.to_string())?;
            match netd_client::open_tap_for(&cfg) {
                Ok(t) => {
                    let names: Vec<String> = t
                        .taps
                        .iter()
                        .map(|fd| {
                            common::tun::tun_info(fd)
                                .map(|i| i.name)
                                .unwrap_or_default()
                        })
                        .collect();
                    let v = json!({"ok": true, "name": t.name, "taps": t.taps.len(),
                        "vhost": t.vhost.len(), "tun_names": names});
                    if rest.first().is_some_and(|h| h == "hold") {
                        println!("{v}");
                        // Hold the fds until the test closes our stdin.
                        let mut sink = Vec::new();
                        let _ = std::io::stdin().read_to_end(&mut sink);
                        drop(t);
                        return Ok(json!({"released": true}));
                    }
                    Ok(v)
                }
                Err(e) => Ok(refusal(&e)),
            }
        }
        [cmd, sock, queues] if cmd == "vhost" => {
            let q: u16 = queues
                .parse()
                .map_err(|_| "QUEUES is a number".to_string())?;
            let r = NetdClient::connect(Path::new(sock), netd_client::DEFAULT_TIMEOUT)
                .and_then(|mut c| c.open_vhost(q));
            Ok(match r {
                Ok(fds) => json!({"ok": true, "vhost": fds.len()}),
                Err(e) => refusal(&e),
            })
        }
        [cmd, opt, sep, program, rest @ ..] if cmd == "exec" && sep == "--" => {
            let cfg = NetConfig::parse(opt).map_err(|e| e.to_string())?;
            let t = netd_client::open_tap_for(&cfg).map_err(|e| refusal(&e).to_string())?;
            let fd = t.taps.first().ok_or("netd sent no TAP fd")?.as_raw_fd();
            // SAFETY: fcntl on an fd we own; clearing FD_CLOEXEC so that the
            // program inherits it.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                return Err(format!(
                    "cannot clear FD_CLOEXEC: {}",
                    std::io::Error::last_os_error()
                ));
            }
            let args: Vec<String> = rest
                .iter()
                .map(|a| a.replace("{fd}", &fd.to_string()))
                .collect();
            let err = std::process::Command::new(program).args(&args).exec();
            Err(format!("cannot exec {program}: {err}"))
        }
        [cmd, sock] if cmd == "status" => {
            let r = NetdClient::connect(Path::new(sock), netd_client::DEFAULT_TIMEOUT)
                .and_then(|mut c| c.status());
            Ok(match r {
                Ok(s) => json!({"ok": true, "status": format!("{s:?}")}),
                Err(e) => refusal(&e),
            })
        }
        _ => Err(
            "usage: netd_probe tap NET_OPTION [hold] | vhost SOCKET QUEUES | status SOCKET | exec NET_OPTION -- PROGRAM ARGS..."
                .into(),
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("netd_probe: {e}");
            ExitCode::from(2)
        }
    }
}
