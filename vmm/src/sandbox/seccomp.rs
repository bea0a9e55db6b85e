//! Per-thread seccomp filters. One allow-list per thread kind lives in
//! `policy/seccomp/<kind>.json` (seccompiler's Firecracker-style format),
//! embedded here at build time. Filters stack: a thread created by a
//! filtered thread inherits its filter, and installing its own narrows it
//! further (the kernel applies the strictest verdict). So the `setup`
//! filter, installed on the main thread before any other thread exists,
//! must allow everything the later threads need, and each thread then
//! installs its own as its first action.

use std::collections::HashMap;

use seccompiler::{BpfProgram, TargetArch};

/// What a syscall outside the allow-list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the whole process (SIGSYS). The default.
    #[default]
    Kill,
    /// Debugging only: let the call through and log it to the kernel log
    /// (`dmesg`, `type=1326`), to find what a filter is missing.
    Log,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("invalid --seccomp '{s}': expected kill or log")),
        }
    }
}

/// The kinds of threads of vmm, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread while it builds the VM and starts the other threads
    /// (inherited by them until they install their own).
    Setup,
    /// The main thread once everything runs: waits, cleans up, exits.
    Main,
    /// A vCPU thread: KVM_RUN and the device emulation of its exits.
    Vcpu,
    /// A virtio device event loop (epoll on ioeventfds and TAP fds).
    Device,
    /// The control socket (vmctl).
    Api,
    /// A migration: the source's sending thread, and the target's main
    /// thread from Ready until the guest runs.
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Setup,
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Migration,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Setup => "setup",
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
        }
    }

    /// The embedded policy file.
    pub fn policy(self) -> &'static str {
        match self {
            ThreadKind::Setup => include_str!("../../../policy/seccomp/setup.json"),
            ThreadKind::Main => include_str!("../../../policy/seccomp/main.json"),
            ThreadKind::Vcpu => include_str!("../../../policy/seccomp/vcpu.json"),
            ThreadKind::Device => include_str!("../../../policy/seccomp/device.json"),
            ThreadKind::Api => include_str!("../../../policy/seccomp/api.json"),
            ThreadKind::Migration => include_str!("../../../policy/seccomp/migration.json"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp policy {kind}: {message}")]
    Policy { kind: &'static str, message: String },
    #[error("cannot install the {kind} seccomp filter: {err}")]
    Apply {
        kind: &'static str,
        err: seccompiler::Error,
    },
}

/// Compiles one thread kind's filter with the given default action.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let err = |message: String| SeccompError::Policy {
        kind: kind.name(),
        message,
    };
    let mut doc: serde_json::Value =
        serde_json::from_str(kind.policy()).map_err(|e| err(e.to_string()))?;
    let filter = doc
        .get_mut(kind.name())
        .ok_or_else(|| err(format!("no filter named {}", kind.name())))?;
    if mode == SeccompMode::Log {
        filter["default_action"] = serde_json::Value::from("log");
    }
    let text = doc.to_string();
    let mut map = seccompiler::compile_from_json(text.as_bytes(), TargetArch::x86_64)
        .map_err(|e| err(e.to_string()))?;
    map.remove(kind.name())
        .ok_or_else(|| err(format!("no filter named {}", kind.name())))
}

/// Every kind's filter, compiled once before the first is installed (the
/// compiler allocates and parses; installing is one syscall).
pub struct Filters {
    mode: SeccompMode,
    programs: HashMap<ThreadKind, BpfProgram>,
}

impl Filters {
    pub fn compile(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, mode)?);
        }
        Ok(Filters { mode, programs })
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (sets no_new_privs
    /// too, which the kernel requires of an unprivileged caller).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let prog = self.programs.get(&kind).ok_or(SeccompError::Policy {
            kind: kind.name(),
            message: "not compiled".into(),
        })?;
        seccompiler::apply_filter(prog).map_err(|err| SeccompError::Apply {
            kind: kind.name(),
            err,
        })
    }

    /// The compiled program (tests apply it in a forked child).
    pub fn program(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.programs.get(&kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_compiles_in_both_modes() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let f = Filters::compile(mode).unwrap();
            for kind in ThreadKind::ALL {
                assert!(!f.program(kind).unwrap().is_empty(), "{kind:?}");
            }
        }
    }

    /// The ioctl numbers in the JSON files carry their names as comments;
    /// check the ones the code relies on against the crates' definitions.
    #[test]
    fn ioctl_numbers_match_their_names() {
        use crate::devices::virtio::net::tap::DEVICE_THREAD_IOCTLS;
        let doc: serde_json::Value = serde_json::from_str(ThreadKind::Device.policy()).unwrap();
        let allowed: Vec<u64> = doc["device"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["syscall"] == "ioctl")
            .map(|r| r["args"][0]["val"].as_u64().unwrap())
            .collect();
        for n in DEVICE_THREAD_IOCTLS {
            assert!(allowed.contains(n), "{n:#x} missing");
        }
        let vcpu: serde_json::Value = serde_json::from_str(ThreadKind::Vcpu.policy()).unwrap();
        let kvm_run = vcpu["vcpu"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["comment"] == "KVM_RUN")
            .unwrap();
        // _IO(KVMIO, 0x80)
        assert_eq!(kvm_run["args"][0]["val"].as_u64(), Some(0xae80));
    }

    /// The device filter covers what the virtio-net device says its
    /// threads call (a new entry there must come here too).
    #[test]
    fn device_policy_covers_the_device_threads_syscalls() {
        use crate::devices::virtio::net::event_handler::DEVICE_THREAD_SYSCALLS;
        let names: &[(libc::c_long, &str)] = &[
            (libc::SYS_epoll_create1, "epoll_create1"),
            (libc::SYS_epoll_ctl, "epoll_ctl"),
            (libc::SYS_epoll_wait, "epoll_wait"),
            (libc::SYS_epoll_pwait, "epoll_pwait"),
            (libc::SYS_read, "read"),
            (libc::SYS_write, "write"),
            (libc::SYS_readv, "readv"),
            (libc::SYS_writev, "writev"),
            (libc::SYS_ioctl, "ioctl"),
            (libc::SYS_futex, "futex"),
            (libc::SYS_close, "close"),
            (libc::SYS_fcntl, "fcntl"),
            (libc::SYS_sched_yield, "sched_yield"),
            (libc::SYS_mmap, "mmap"),
            (libc::SYS_munmap, "munmap"),
            (libc::SYS_mprotect, "mprotect"),
            (libc::SYS_madvise, "madvise"),
            (libc::SYS_brk, "brk"),
            (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
            (libc::SYS_sigaltstack, "sigaltstack"),
            (libc::SYS_exit, "exit"),
        ];
        let doc: serde_json::Value = serde_json::from_str(ThreadKind::Device.policy()).unwrap();
        let listed: Vec<&str> = doc["device"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["syscall"].as_str())
            .collect();
        for nr in DEVICE_THREAD_SYSCALLS {
            let name = names
                .iter()
                .find(|(n, _)| n == nr)
                .map(|(_, name)| *name)
                .unwrap_or_else(|| panic!("syscall {nr} is new: add it to device.json and here"));
            assert!(listed.contains(&name), "{name} missing in device.json");
        }
    }

    #[test]
    fn mode_parses() {
        assert_eq!("kill".parse(), Ok(SeccompMode::Kill));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("off".parse::<SeccompMode>().is_err());
    }
}
