//! `netd`'s command line. Paths are taken as bytes (`PathBuf`).

use std::path::PathBuf;

use clap::Parser;

/// The one-line usage the errors end with.
pub const USAGE: &str = "usage: netd --socket PATH --policy FILE [--audit-log FILE] \
[--read-timeout-ms N] [--client-deadline-ms N] [--max-clients N] [--max-clients-per-uid N] \
[--tenant-reserve N] | --check-policy FILE | --version | --help";

/// The privileged TAP broker: checks each client's request against a
/// policy, creates the TAP and hands its fds over. SIGHUP reloads the
/// policy; SIGTERM and SIGINT stop netd (exit 0).
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "netd",
    version,
    override_usage = "netd --socket PATH --policy FILE [OPTIONS]\n       netd --check-policy FILE",
    args_override_self = true,
    after_help = "Exit status: 0 after SIGTERM/SIGINT or a valid --check-policy; 2 on bad \
usage or a policy --check-policy rejects; 1 when netd cannot start (one line per problem)."
)]
pub struct Args {
    /// The UNIX socket to serve on (created 0666; clients are told apart
    /// by SO_PEERCRED). Required to serve, unless a service manager
    /// passes the listening socket (socket activation: LISTEN_FDS)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub socket: Option<PathBuf>,
    /// The policy (RON) saying which uid/gid may open which TAPs. Required
    /// to serve
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    pub policy: Option<PathBuf>,
    /// Append one audit line per request to FILE (created 0600; without it,
    /// no audit log is written)
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    pub audit_log: Option<PathBuf>,
    /// Validate this policy, print what each tenant may do, and exit (0
    /// valid, 2 not) without serving, privileges or network
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    pub check_policy: Option<PathBuf>,
    /// Longest wait for one read from a client, in ms
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = positive_u64, allow_hyphen_values = true)]
    pub read_timeout_ms: u64,
    /// Longest a client connection may last, in ms
    #[arg(long, value_name = "N", default_value_t = 30_000, value_parser = positive_u64, allow_hyphen_values = true)]
    pub client_deadline_ms: u64,
    /// Most client connections at once
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = positive_usize, allow_hyphen_values = true)]
    pub max_clients: usize,
    /// Most client connections of one uid at once
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = positive_usize, allow_hyphen_values = true)]
    pub max_clients_per_uid: usize,
    /// Connections kept for each tenant that other tenants cannot take
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = positive_usize, allow_hyphen_values = true)]
    pub tenant_reserve: usize,
}

/// What the numeric options say when refused (after the option's name).
pub const NOT_POSITIVE: &str = "takes a positive number";

/// A number larger than zero.
pub fn positive_u64(v: &str) -> Result<u64, &'static str> {
    v.parse().ok().filter(|n| *n > 0).ok_or(NOT_POSITIVE)
}

/// A number larger than zero that fits a `usize`.
pub fn positive_usize(v: &str) -> Result<usize, &'static str> {
    positive_u64(v).and_then(|n| usize::try_from(n).map_err(|_| NOT_POSITIVE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_numbers() {
        assert_eq!(positive_u64("5"), Ok(5));
        assert_eq!(positive_usize("128"), Ok(128));
        for bad in ["0", "-1", "x", "", "99999999999999999999"] {
            assert_eq!(positive_u64(bad), Err(NOT_POSITIVE), "{bad}");
        }
    }

    #[test]
    fn definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
