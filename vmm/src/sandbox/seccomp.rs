//! Per-thread seccomp filters. One allow-list per thread kind lives in
//! `policy/seccomp/<kind>.json` (seccompiler's Firecracker-style format),
//! compiled to BPF by build.rs (a binary search on the syscall number, see
//! [`super::bpf_tree`]) and embedded; the JSON is embedded too, for tests. Filters stack: a thread created by a
//! filtered thread inherits its filter, and installing its own narrows it
//! further (the kernel applies the strictest verdict). So the `setup`
//! filter, installed on the main thread before any other thread exists,
//! must allow everything the later threads need, and each thread then
//! installs its own as its first action.

use std::collections::HashMap;

use seccompiler::BpfProgramRef;

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
    /// A vhost-user NIC's relay thread: a device thread that also keeps
    /// (and re-makes) the connection to the backend process.
    VhostUserRelay,
    /// A migration: the source's sending thread, and the target's main
    /// thread from just before Ready until the guest runs.
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Setup,
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Api,
        ThreadKind::Migration,
        ThreadKind::VhostUserRelay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Setup => "setup",
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
            ThreadKind::VhostUserRelay => "vhost-user-relay",
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
            ThreadKind::VhostUserRelay => {
                include_str!("../../../policy/seccomp/vhost-user-relay.json")
            }
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

mod programs {
    include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));
}

/// One thread kind's filter with the given default action, compiled by
/// build.rs (see [`super::bpf_tree`]).
pub fn program(
    kind: ThreadKind,
    mode: SeccompMode,
) -> Result<BpfProgramRef<'static>, SeccompError> {
    jail::programs::find(programs::PROGRAMS, kind.name(), mode == SeccompMode::Log).ok_or(
        SeccompError::Policy {
            kind: kind.name(),
            message: "not compiled".into(),
        },
    )
}

/// Every kind's filter, looked up once before the first is installed
/// (built at compile time: nothing is parsed at start-up).
pub struct Filters {
    mode: SeccompMode,
    programs: HashMap<ThreadKind, BpfProgramRef<'static>>,
}

impl Filters {
    pub fn compile(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        for kind in ThreadKind::ALL {
            programs.insert(kind, program(kind, mode)?);
        }
        Ok(Filters { mode, programs })
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (sets no_new_privs
    /// too, which the kernel requires of an unprivileged caller).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let prog = *self.programs.get(&kind).ok_or(SeccompError::Policy {
            kind: kind.name(),
            message: "not compiled".into(),
        })?;
        seccompiler::apply_filter(prog).map_err(|err| SeccompError::Apply {
            kind: kind.name(),
            err,
        })
    }

    /// The compiled program (tests apply it in a forked child).
    pub fn program(&self, kind: ThreadKind) -> Option<BpfProgramRef<'static>> {
        self.programs.get(&kind).copied()
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

    /// A classic-BPF interpreter for what seccompiler and the tree emit
    /// (loads of `seccomp_data` words, AND, forward jumps, returns).
    /// Returns the verdict and how many instructions ran.
    fn run(prog: &[seccompiler::sock_filter], data: &[u8; 64]) -> (u32, usize) {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        for steps in 1.. {
            let i = &prog[pc];
            pc += 1;
            let jump = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                0x20 => {
                    let k = i.k as usize;
                    a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                0x54 => a &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += jump(a == i.k),
                0x25 => pc += jump(a > i.k),
                0x35 => pc += jump(a >= i.k),
                0x45 => pc += jump(a & i.k != 0),
                0x06 => return (i.k, steps),
                c => panic!("instruction {c:#x} at {}", pc - 1),
            }
        }
        unreachable!()
    }

    fn seccomp_data(nr: u32, arch: u32, args: [u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&nr.to_ne_bytes());
        d[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, v) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_ne_bytes());
        }
        d
    }

    /// The build-time binary-search programs give seccompiler's verdict for
    /// every syscall number, with argument values taken from the rules
    /// (each, one off, with other bits set) and pseudo-random ones.
    #[test]
    fn tree_programs_match_seccompiler() {
        const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                let log = mode == SeccompMode::Log;
                let linear = jail::bpf_tree::linear(kind.policy(), kind.name(), log).unwrap();
                let tree = program(kind, mode).unwrap();
                let doc: serde_json::Value = serde_json::from_str(kind.policy()).unwrap();
                let mut vals: Vec<u64> = vec![0, 1, u64::MAX, 0xffff_ffff, 1 << 32];
                for r in doc[kind.name()]["filter"].as_array().unwrap() {
                    for a in r["args"].as_array().into_iter().flatten() {
                        let v = a["val"].as_u64().unwrap();
                        vals.extend([v, v.wrapping_add(1), v.wrapping_sub(1), v | 1 << 40]);
                        if let Some(m) = a["op"]["masked_eq"].as_u64() {
                            vals.extend([m, v | m, !m]);
                        }
                    }
                }
                let mut seed = 0x9e37_79b9_7f4a_7c15u64;
                let mut rng = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let (mut checked, mut tree_steps, mut linear_steps) = (0, 0, 0);
                for nr in (0..=600).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                    for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386] {
                        let mut cases: Vec<[u64; 6]> = vals.iter().map(|&v| [v; 6]).collect();
                        for _ in 0..8 {
                            let pick = |r: u64| vals[(r % vals.len() as u64) as usize];
                            cases.push(std::array::from_fn(|_| pick(rng())));
                            cases.push(std::array::from_fn(|_| rng()));
                        }
                        for args in cases {
                            let d = seccomp_data(nr, arch, args);
                            let (t, l) = (run(tree, &d), run(&linear, &d));
                            assert_eq!(
                                t.0, l.0,
                                "{kind:?} {mode:?} nr {nr} arch {arch:#x} args {args:x?}"
                            );
                            checked += 1;
                            tree_steps += t.1;
                            linear_steps += l.1;
                        }
                    }
                }
                assert!(checked > 1000);
                // The point of the tree: fewer steps to a verdict.
                assert!(
                    tree_steps * 2 < linear_steps,
                    "{kind:?}: {tree_steps} steps, linear {linear_steps}"
                );
            }
        }
    }

    /// The ioctl numbers in the JSON files carry their names as comments;
    /// check the ones the code relies on against the crates' definitions.
    #[test]
    fn ioctl_numbers_match_their_names() {
        use net_datapath::tap::DATAPATH_IOCTLS as DEVICE_THREAD_IOCTLS;
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
