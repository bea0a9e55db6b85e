//! Per-thread seccomp filters of the backend, compiled by build.rs from
//! policy/seccomp/vhost-user-net/<kind>.json. Filters stack: a thread
//! keeps its creator's and can only narrow it.

use seccompiler::BpfProgramRef;

/// What a syscall outside the allow-list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the whole process (SIGSYS). The default.
    #[default]
    Kill,
    /// Debugging only: allow and log to the kernel log.
    Log,
}

/// The backend's thread kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread from lock-down until serving (inherited by workers).
    Setup,
    /// The main thread accepting frontends (inherited by each frontend thread).
    Main,
    /// The thread handling one frontend's vhost-user messages.
    Frontend,
    /// A queue pair's vring worker (the datapath).
    Worker,
}

impl ThreadKind {
    #[cfg(test)]
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Setup,
        ThreadKind::Main,
        ThreadKind::Frontend,
        ThreadKind::Worker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Setup => "setup",
            ThreadKind::Main => "main",
            ThreadKind::Frontend => "frontend",
            ThreadKind::Worker => "worker",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp policy {0} was not compiled")]
    Missing(&'static str),
    #[error("cannot install the {kind} seccomp filter: {err}")]
    Apply {
        kind: &'static str,
        err: seccompiler::Error,
    },
}

mod programs {
    include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));
}

/// `kind`'s compiled filter.
pub fn program(
    kind: ThreadKind,
    mode: SeccompMode,
) -> Result<BpfProgramRef<'static>, SeccompError> {
    let log = mode == SeccompMode::Log;
    programs::PROGRAMS
        .iter()
        .find(|(name, m, _)| *name == kind.name() && *m == log)
        .map(|(_, _, p)| *p)
        .ok_or(SeccompError::Missing(kind.name()))
}

/// Installs `kind`'s filter on the calling thread.
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program(kind, mode)?).map_err(|err| SeccompError::Apply {
        kind: kind.name(),
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_compiled_in_both_modes() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                assert!(!program(kind, mode).unwrap().is_empty(), "{kind:?}");
            }
        }
    }
}
