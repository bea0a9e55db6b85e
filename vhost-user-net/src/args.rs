//! The command line; its definition is `cli::vhost_user_net::Args`
//! (shared with the man page and completions). A refusal is one line.

use std::ffi::OsString;

use clap::CommandFactory;
pub use cli::vhost_user_net::{Args, USAGE};
use cli::{Parsed, UsageError};

#[derive(Debug)]
pub enum Invocation {
    Run(Args),
    /// `--help` or `--version`: print this to stdout.
    Print(String),
}

/// Reads the command line (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, String> {
    match cli::parse(Args::command(), args) {
        Ok(Parsed::Args(a)) => Ok(Invocation::Run(a)),
        Ok(Parsed::Print(text)) => Ok(Invocation::Print(text)),
        Err(e) => Err(format!("{} ({USAGE})", message(e))),
    }
}

fn message(e: UsageError) -> String {
    match e {
        // The value parsers' own lines name the option already.
        UsageError::Invalid { message, .. } => message,
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cli::vmm::SeccompMode;
    use std::path::PathBuf;

    fn p(s: &str) -> Result<Invocation, String> {
        parse(s.split_whitespace().map(OsString::from))
    }

    #[test]
    fn full_and_minimal() {
        let Ok(Invocation::Run(a)) =
            p("--socket /run/v.sock --net netd=/run/netd.sock,id=vm0,queues=2 --user 65534:65534")
        else {
            panic!()
        };
        assert_eq!(a.socket, PathBuf::from("/run/v.sock"));
        assert_eq!(a.net.id, "vm0");
        assert_eq!(a.net.queues, 2);
        assert_eq!(a.user, Some((65534, 65534)));
        assert_eq!(a.seccomp, SeccompMode::Kill);
        assert!(matches!(
            p("--socket=/s --net=netd=/n,id=vm1"),
            Ok(Invocation::Run(Args { user: None, .. }))
        ));
    }

    #[test]
    fn refusals_are_one_line() {
        for (args, want) in [
            ("--net netd=/n,id=vm0", "--socket is required"),
            ("--socket /s", "--net is required"),
            (
                "--socket /s --net netd=/n,id=vm0,mac=52:54:00:00:00:01",
                "`mac=` is not for a vhost-user backend",
            ),
            (
                "--socket /s --net netd=/n,id=vm0 --user 1",
                "expected UID:GID",
            ),
            (
                "--socket /s --net netd=/n,id=vm0 --seccomp maybe",
                "expected kill or log",
            ),
            (
                "--socket /s --net netd=/n,id=vm0 --frob",
                "unknown option '--frob'",
            ),
        ] {
            let e = p(args).err().unwrap_or_else(|| panic!("{args}: accepted"));
            assert!(e.contains(want), "{args}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
