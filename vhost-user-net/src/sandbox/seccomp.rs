//! Per-thread seccomp filters of the backend, compiled by build.rs from
//! policy/seccomp/vhost-user-net/<kind>.json. Filters stack: a thread
//! keeps its creator's and can only narrow it.

use seccompiler::BpfProgramRef;

/// What a syscall outside the allow-list does (`--seccomp`): kill the
/// whole process (SIGSYS, the default), or, for debugging only, allow it
/// and log to the kernel log.
pub use cli::vmm::SeccompMode;

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
    jail::programs::find(programs::PROGRAMS, kind.name(), mode == SeccompMode::Log)
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

    /// Runs `call` in a forked child under `kind`'s filter (kill mode):
    /// the signal that ended the child, or None when it exited normally.
    fn killed_by(kind: ThreadKind, call: fn()) -> Option<i32> {
        let prog = program(kind, SeccompMode::Kill).unwrap();
        // SAFETY: the child only installs the filter, makes raw system
        // calls and _exits: no allocation, no locks.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(prog).is_err() {
                // SAFETY: _exit ends the child without running anything else.
                unsafe { libc::_exit(3) };
            }
            call();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; writes one int.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFSIGNALED(status) {
            Some(libc::WTERMSIG(status))
        } else {
            assert_eq!(libc::WEXITSTATUS(status), 0, "filter not installed");
            None
        }
    }

    fn inet_socket() {
        // SAFETY: socket(2) with integer arguments.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }

    fn exec_true() {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated path and argument/environment arrays.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    }

    fn kvm_create_vm() {
        // SAFETY: ioctl on an invalid fd: no memory is passed.
        unsafe { libc::ioctl(-1, 0xAE01, 0) };
    }

    fn tun_set_offload() {
        // SAFETY: as above (EBADF when allowed).
        unsafe { libc::ioctl(-1, 0x4004_54d0, 0) };
    }

    /// Every thread kind kills on AF_INET sockets, execve and KVM ioctls,
    /// and lets the TAP offload ioctl through.
    #[test]
    fn filters_kill_on_inet_exec_and_kvm() {
        for kind in ThreadKind::ALL {
            for (what, call) in [
                ("socket(AF_INET)", inet_socket as fn()),
                ("execve", exec_true),
                ("ioctl(KVM_CREATE_VM)", kvm_create_vm),
            ] {
                assert_eq!(
                    killed_by(kind, call),
                    Some(libc::SIGSYS),
                    "{kind:?} allows {what}"
                );
            }
            assert_eq!(killed_by(kind, tun_set_offload), None, "{kind:?}");
        }
    }

    #[test]
    fn every_kind_is_compiled_in_both_modes() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                assert!(!program(kind, mode).unwrap().is_empty(), "{kind:?}");
            }
        }
    }
}
