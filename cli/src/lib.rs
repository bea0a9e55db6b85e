//! The command lines of the shipped binaries, in one place: the clap
//! definitions of `vmm` ([`vmm`]), `vmctl` ([`vmctl`]), `netd` ([`netd`])
//! and `vhost-user-net` ([`vhost_user_net`]), the value parsers of their structured values (`--net`,
//! `--memory`, `--user`, ...), and [`parse`], which turns clap's
//! several-line errors into one [`UsageError`] each binary words as the one
//! line its README documents (exit code [`EXIT_USAGE`]).
//!
//! The build scripts of vmm, netd and vhost-user-net use the same definitions ([`assets`])
//! to write man pages and shell completions.

pub mod assets;
pub mod netd;
mod usage;
pub mod vhost_user_net;
pub mod vmctl;
pub mod vmm;

pub use usage::{EXIT_USAGE, Parsed, UsageError, parse};
