//! `vmctl`'s command line: one command and its flags, in any order. The
//! socket paths are text: they travel in the API's requests as strings.

use clap::{Parser, ValueEnum};
use common::migration::MAX_DOWNTIME_LIMIT_MS;

/// The one-line usage the errors end with.
pub const USAGE: &str = "usage: vmctl --api-socket PATH {status|pause|resume|shutdown|migrate --to PATH [--no-backend-transfer] [--downtime-limit-ms N]} [--json] | --version | --help";

/// The control client of a running vmm.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "vmctl",
    version,
    override_usage = "vmctl --api-socket PATH [--json] COMMAND\n       vmctl --api-socket PATH [--json] migrate --to PATH [--no-backend-transfer] [--downtime-limit-ms N]",
    args_override_self = true,
    after_help = "Exit status: 0 on success, 1 when the vmm reports an error or cannot be \
reached, 2 on bad usage."
)]
pub struct Args {
    /// The vmm's control socket (its --api-socket). Required
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub api_socket: Option<String>,
    /// What to ask the vmm. Required
    #[arg(value_enum, value_name = "COMMAND")]
    pub command: Option<Command>,
    /// migrate: the target vmm's --incoming socket. Required with migrate
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub to: Option<String>,
    /// migrate: the target asks netd for TAPs of its own instead of taking
    /// the source's (default: the TAP fds are handed over)
    #[arg(long)]
    pub no_backend_transfer: bool,
    /// migrate: the longest the guest may be paused, 1 to 60000 ms (default:
    /// the vmm's, 1000 ms)
    #[arg(long, value_name = "N", value_parser = downtime_limit_ms, allow_hyphen_values = true)]
    pub downtime_limit_ms: Option<u64>,
    /// Print the answer as one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The VM's state, vCPUs, memory, uptime and NICs
    Status,
    /// Pause every vCPU
    Pause,
    /// Resume a paused VM
    Resume,
    /// Stop the VM; the vmm exits 0
    Shutdown,
    /// Hand the running guest to another vmm (--to); the source exits 0
    /// once the target owns it
    Migrate,
}

/// `--downtime-limit-ms`: 1 to [`MAX_DOWNTIME_LIMIT_MS`].
pub fn downtime_limit_ms(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|ms| (1..=MAX_DOWNTIME_LIMIT_MS).contains(ms))
        .ok_or_else(|| {
            format!(
                "--downtime-limit-ms: '{v}' is not a number of ms from 1 to {MAX_DOWNTIME_LIMIT_MS}"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_limits() {
        assert_eq!(downtime_limit_ms("1"), Ok(1));
        assert_eq!(downtime_limit_ms("60000"), Ok(60_000));
        for bad in ["0", "60001", "-1", "x", ""] {
            assert!(downtime_limit_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
