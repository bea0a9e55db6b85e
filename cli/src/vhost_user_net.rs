//! `vhost-user-net`'s command line. `--net` is the vmm's option
//! (`common::net_config`) less the keys that only mean something to an
//! in-process device (`mac`: the frontend's device owns the MAC; `vhost`;
//! `backend-transfer`).

use std::path::PathBuf;

use clap::Parser;
use common::net_config::{NetConfig, NetConfigError};

use crate::vmm::SeccompMode;

/// The one-line usage the errors end with.
pub const USAGE: &str = "usage: vhost-user-net --socket PATH --net netd=SOCK,id=ID[,queues=N] \
[--user UID:GID] [--seccomp kill|log] | --version | --help";

/// The virtio-net datapath as a sandboxed vhost-user backend process: it
/// gets the TAP's queue fds from netd as its own user, sandboxes itself,
/// and serves one vhost-user frontend at a time (the vmm, QEMU's -netdev
/// vhost-user) on its socket. A frontend may reconnect after it restarts.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "vhost-user-net",
    version,
    after_help = "Exit status: 0 on SIGTERM/SIGINT; 2 on bad usage (one line on stderr); \
1 when it cannot start or serve (one line on stderr)."
)]
pub struct Args {
    /// The vhost-user socket to serve on (created 0600; a frontend of
    /// another uid than this process's, or root's, is refused)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub socket: PathBuf,
    /// The TAP to serve, from netd: netd=SOCK,id=ID[,queues=N] (queue
    /// pairs, 1 to 16)
    #[arg(long, value_name = "netd=SOCK,id=ID[,queues=N]", value_parser = backend_net, allow_hyphen_values = true)]
    pub net: NetConfig,
    /// Run as this uid and gid (needed when started as root; the TAP is
    /// asked of netd as this user)
    #[arg(long, value_name = "UID:GID", value_parser = crate::vmm::user, allow_hyphen_values = true)]
    pub user: Option<(u32, u32)>,
    /// What a thread's seccomp filter does on a system call not on its
    /// list: kill the process, or log it and let it through (debugging)
    #[arg(long, value_name = "kill|log", default_value = "kill", value_parser = crate::vmm::seccomp, allow_hyphen_values = true)]
    pub seccomp: SeccompMode,
}

/// Why a `--net` value does not suit a backend.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendNetError {
    #[error("{0}")]
    Net(#[from] NetConfigError),
    #[error("--net: `{0}=` is not for a vhost-user backend (the frontend's device owns it)")]
    NotForBackend(&'static str),
    #[error("--net: a backend takes its TAP from netd: `netd=SOCK`, not `vhost-user=`")]
    NotNetd,
}

/// `--net` for a backend: the vmm's option without `mac`, `vhost` and
/// `backend-transfer`.
pub fn backend_net(v: &str) -> Result<NetConfig, BackendNetError> {
    let cfg = NetConfig::parse(v)?;
    if cfg.netd_socket().is_none() {
        return Err(BackendNetError::NotNetd);
    }
    for (key, given) in [
        ("mac", v.split(',').any(|i| i.starts_with("mac="))),
        ("vhost", cfg.vhost),
        ("backend-transfer", !cfg.backend_transfer),
    ] {
        if given {
            return Err(BackendNetError::NotForBackend(key));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn in_vmm_keys_are_refused() {
        assert!(backend_net("netd=/n,id=vm0,queues=2").is_ok());
        for (v, key) in [
            ("netd=/n,id=vm0,mac=52:54:00:00:00:01", "mac"),
            ("netd=/n,id=vm0,vhost=on", "vhost"),
            ("netd=/n,id=vm0,backend-transfer=off", "backend-transfer"),
        ] {
            assert_eq!(
                backend_net(v),
                Err(BackendNetError::NotForBackend(key)),
                "{v}"
            );
        }
    }
}
