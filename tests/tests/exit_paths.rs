//! Every way a VM ends, under the real seccomp filters: guest power-off
//! through port 0x501, the i8042 reset, `vmctl shutdown`, SIGTERM and a vCPU
//! failure, each with no NIC, one queue pair and two, each started as uid
//! 65534 (group kvm) and as root with `--user 65534:65534`. Each run must
//! end with its documented exit code (never a signal), its TAP gone from
//! netd's namespace and its API socket removed.
//!
//! Also, in forked or fresh processes: the allocator cause of the SIGSYS at
//! power-off with a NIC, the main thread's teardown under its own filter, and
//! why that teardown must not pause a vhost device.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use tests::bin;
use tests::net_guest::{RunAs, ScratchDir, guest_ip, guest_mac};
use tests::netd_harness::{NOBODY, Netd, TEST_POLICY, wait_for};
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess, as_nobody_with_kvm};
use vmm::sandbox::{Filters, SeccompMode, ThreadKind};

/// Time for an exit once triggered, and for the kernel to drop the TAP.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// VMs run at once: the guests idle in `hlt`, the host has 2 cores.
const PARALLEL: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// `testguest.exit`: isa-debug-exit (port 0x501).
    DebugExitPort,
    /// `testguest.reset`: the i8042 reset alone.
    I8042Reset,
    VmctlShutdown,
    Sigterm,
    /// `testguest.fault`: a deliberate triple fault.
    VcpuFailure,
}

impl Ending {
    const ALL: [Ending; 5] = [
        Ending::DebugExitPort,
        Ending::I8042Reset,
        Ending::VmctlShutdown,
        Ending::Sigterm,
        Ending::VcpuFailure,
    ];

    /// The test guest's command-line key that makes the guest end this way.
    fn guest_key(self) -> Option<&'static str> {
        match self {
            Ending::DebugExitPort => Some("testguest.exit"),
            Ending::I8042Reset => Some("testguest.reset"),
            Ending::VcpuFailure => Some("testguest.fault"),
            Ending::VmctlShutdown | Ending::Sigterm => None,
        }
    }

    /// README: 0 for every orderly end, 1 for a vCPU failure.
    fn exit_code(self) -> i32 {
        match self {
            Ending::VcpuFailure => 1,
            _ => 0,
        }
    }
}

#[derive(Debug)]
struct Case {
    ending: Ending,
    /// None: no NIC.
    queues: Option<u8>,
    run_as: RunAs,
    /// Whether vmm has an API socket (an extra thread: it changed whether
    /// the old power-off SIGSYS showed, so both ways are run).
    api: bool,
    /// Unique per case: TAP name suffix, guest IP and MAC.
    n: u8,
}

impl Case {
    fn tap(&self) -> String {
        format!("vmx{}", self.n)
    }

    fn command(&self, netd: &Netd, api: &Path) -> Command {
        let vmm = bin("vmm");
        let mut c = match self.run_as {
            RunAs::RootWithUserOption => {
                let mut c = Command::new(&vmm);
                c.args(["--user", &format!("{NOBODY}:{NOBODY}")]);
                c
            }
            RunAs::Nobody => as_nobody_with_kvm(&vmm),
        };
        let mut cmdline = Vec::new();
        if self.queues.is_some() {
            cmdline.push(format!("testguest.ip={}/24", guest_ip(self.n)));
        }
        cmdline.extend(self.ending.guest_key().map(String::from));
        c.arg("--kernel")
            .arg(tests::guest_elf())
            .arg("--cmdline")
            .arg(cmdline.join(" "));
        if self.api {
            c.arg("--api-socket").arg(api);
        }
        if let Some(q) = self.queues {
            c.arg("--net").arg(format!(
                "netd={},id={},mac={},queues={q}",
                netd.socket.display(),
                self.tap(),
                guest_mac(self.n)
            ));
        }
        // A user's RUST_BACKTRACE/RUST_LOG must not change what is tested.
        c.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
        c
    }

    /// Runs the case; Err describes what went wrong.
    fn run(&self, netd: &Netd) -> Result<(), String> {
        let dir = ScratchDir::new(&format!("exit{}", self.n));
        let api = dir.0.join("api.sock");
        let mut vm = VmmProcess::spawn(self.command(netd, &api));
        // The banner comes once the network is up (or at once without NIC).
        vm.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
        // The NIC was there: netd's audit log names the TAP it opened (a
        // guest that ends by itself may be gone before we could look).
        if self.queues.is_some() && !netd.audit_text().contains(&self.tap()) {
            return Err(format!("netd never opened TAP {}", self.tap()));
        }
        if self.ending.guest_key().is_none()
            && self.queues.is_some()
            && !netd.links().contains(&self.tap())
        {
            return Err(format!("TAP {} missing while the VM runs", self.tap()));
        }
        match self.ending {
            Ending::VmctlShutdown => {
                let out = Command::new(bin("vmctl"))
                    .arg("--api-socket")
                    .arg(&api)
                    .arg("shutdown")
                    .uid(NOBODY)
                    .gid(NOBODY)
                    .output()
                    .map_err(|e| format!("run vmctl: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "vmctl shutdown: {} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Ending::Sigterm => {
                // SAFETY: kill(2) on our own child (setpriv execs vmm).
                unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
            }
            _ => {}
        }
        let st = vm.wait_exit(EXIT_TIMEOUT);
        let stderr = vm.stderr();
        if st.code() != Some(self.ending.exit_code()) {
            return Err(format!(
                "exit status {st} (a signal means a filter killed it), expected code {}; stderr: {stderr}",
                self.ending.exit_code()
            ));
        }
        let expected_stderr_lines = usize::from(self.ending == Ending::VcpuFailure);
        if stderr.lines().count() != expected_stderr_lines
            || (self.ending == Ending::VcpuFailure && !stderr.starts_with("vmm: vCPU 0: "))
        {
            return Err(format!("unexpected stderr: {stderr:?}"));
        }
        if self.api && api.exists() {
            return Err(format!("API socket {} left behind", api.display()));
        }
        if self.queues.is_some() && !wait_for(EXIT_TIMEOUT, || !netd.links().contains(&self.tap()))
        {
            return Err(format!("TAP {} still exists after exit", self.tap()));
        }
        Ok(())
    }
}

#[test]
fn every_exit_path_with_and_without_nics_as_nobody_and_with_user() {
    let netd = Netd::start(&bin("netd"), "exits", TEST_POLICY, &[]);
    let mut cases = Vec::new();
    for ending in Ending::ALL {
        for queues in [None, Some(1), Some(2)] {
            for run_as in [RunAs::Nobody, RunAs::RootWithUserOption] {
                for api in [true, false] {
                    if ending == Ending::VmctlShutdown && !api {
                        continue;
                    }
                    let n = 10 + u8::try_from(cases.len()).unwrap();
                    cases.push(Case {
                        ending,
                        queues,
                        run_as,
                        api,
                        n,
                    });
                }
            }
        }
    }
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    // A panic inside (a timeout) is a failure of this case.
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.run(&netd)))
                            .unwrap_or_else(|p| {
                                Err(p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .unwrap_or_else(|| "panicked".into()))
                            });
                    if let Err(e) = r {
                        failures.lock().unwrap().push(format!("{case:?}: {e}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} exit cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Nothing left in netd's namespace but its bridge (and lo).
    let leftover: Vec<String> = netd
        .links()
        .into_iter()
        .filter(|l| l.starts_with("vmx"))
        .collect();
    assert!(leftover.is_empty(), "TAPs left: {leftover:?}");
}

/// A second SIGTERM-stopped vmm can start on the same API socket path.
#[test]
fn after_sigterm_the_same_api_socket_path_serves_again() {
    let dir = ScratchDir::new("restart");
    let api = dir.0.join("api.sock");
    for round in 0..2 {
        let mut c = as_nobody_with_kvm(&bin("vmm"));
        c.arg("--kernel")
            .arg(tests::guest_elf())
            .arg("--api-socket")
            .arg(&api);
        let mut vm = VmmProcess::spawn(c);
        vm.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
        assert!(api.exists(), "round {round}: no API socket");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
        let st = vm.wait_exit(EXIT_TIMEOUT);
        assert_eq!(st.code(), Some(0), "round {round}: {st}: {}", vm.stderr());
        assert!(!api.exists(), "round {round}: API socket left behind");
    }
}

/// The root cause of the SIGSYS at power-off with a NIC, in a fresh
/// process each time (glibc caches the probe): freeing another thread's
/// memory under the `main` filter opens a file unless the vmm's allocator
/// setting is applied first.
#[test]
fn freeing_another_threads_memory_under_the_main_filter() {
    let probe = env!("CARGO_BIN_EXE_malloc_trim_probe");
    let without = Command::new(probe).output().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&without.status),
        Some(libc::SIGSYS),
        "without the setting glibc's probe should be killed: {:?} (if this fails, the libc no longer opens a file there; the setting may be unneeded)",
        without.status
    );
    let with = Command::new(probe).arg("--with-fix").output().unwrap();
    assert_eq!(
        with.status.code(),
        Some(0),
        "with the setting: {:?} {}",
        with.status,
        String::from_utf8_lossy(&with.stderr)
    );
}

/// Runs `f` in a forked child; a seccomp kill shows as SIGSYS.
fn in_child(f: impl FnOnce() -> i32) -> WaitStatus {
    // SAFETY: the child runs `f` and leaves with _exit; `f` only uses data
    // prepared before the fork, threads it starts itself and raw syscalls.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = f();
            // SAFETY: _exit ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

/// The main thread's teardown (API socket removal, vCPU stop and wait) runs
/// under the compiled `main` filter with a registered, running vCPU thread.
#[test]
fn teardown_runs_under_the_main_filter() {
    let filters = Filters::compile(SeccompMode::Kill).unwrap();
    let dir = ScratchDir::new("teardown");
    let sock: PathBuf = dir.0.join("api.sock");
    let st = in_child(|| {
        use std::sync::Arc;
        use vmm::control::{self, RunControl};
        // What lock-down does before the filters.
        if !jail::malloc::no_lazy_file_opens() || control::install_kick_handler().is_err() {
            return 3;
        }
        let Ok(_listener) = std::os::unix::net::UnixListener::bind(&sock) else {
            return 4;
        };
        let ctl = Arc::new(RunControl::new());
        let c2 = ctl.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            let _ = tx.send(());
            // Stands in for KVM_RUN: sleeps until kicked out and stopped.
            while !c2.pending() || c2.park() {
                std::thread::sleep(Duration::from_millis(1));
            }
            c2.thread_exited();
        });
        ctl.register(std::os::unix::thread::JoinHandleExt::as_pthread_t(&vcpu));
        if rx.recv().is_err() {
            return 5;
        }
        if filters.apply(ThreadKind::Main).is_err() {
            return 6;
        }
        vmm::exit::teardown(Some(&sock), &ctl, std::slice::from_ref(&vcpu));
        if !vcpu.is_finished() {
            return 7;
        }
        0
    });
    assert!(
        matches!(st, WaitStatus::Exited(_, 0)),
        "child {st:?} (SIGSYS: the filter killed teardown; 7: vCPU thread not stopped)"
    );
    assert!(!sock.exists(), "teardown left the API socket");
}

/// Pausing a vhost-net device issues VHOST ioctls (VHOST_GET_VRING_BASE,
/// VHOST_SET_VRING_KICK...). The `main` filter forbids them, which is why
/// teardown must not pause devices: the forked child dies by SIGSYS.
#[test]
fn main_filter_kills_vhost_ioctls_so_teardown_must_not_pause_devices() {
    let filters = Filters::compile(SeccompMode::Kill).unwrap();
    // _IOWR(0xAF, 0x12, vhost_vring_state): VHOST_GET_VRING_BASE;
    // _IOW(0xAF, 0x20, vhost_vring_file): VHOST_SET_VRING_KICK.
    for (name, req) in [
        ("VHOST_GET_VRING_BASE", 0xc008_af12_u64),
        ("VHOST_SET_VRING_KICK", 0x4008_af20_u64),
    ] {
        let st = in_child(|| {
            if filters.apply(ThreadKind::Main).is_err() {
                return 3;
            }
            // SAFETY: an ioctl on fd -1 reads no memory (EBADF at most).
            unsafe { libc::syscall(libc::SYS_ioctl, -1, req, 0) };
            0
        });
        assert!(
            matches!(st, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{name} under the main filter: {st:?}"
        );
    }
}

/// The command of the report (issue 7, item 11), many times: as uid 65534,
/// one NIC, no API socket, the guest powers off at once. Before the fix
/// about half of such runs died by SIGSYS (exit status 159).
#[test]
fn power_off_with_a_nic_many_times() {
    const RUNS: u8 = 16;
    let netd = Netd::start(&bin("netd"), "poff", TEST_POLICY, &[]);
    let failures = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= usize::from(RUNS) {
                        break;
                    }
                    let mut c = as_nobody_with_kvm(&bin("vmm"));
                    c.arg("--kernel")
                        .arg(tests::guest_elf())
                        .args(["--cmdline", "testguest.ip=10.0.1.2/24 testguest.exit"])
                        .arg("--net")
                        .arg(format!("netd={},id=vmp{i}", netd.socket.display()))
                        .env_remove("RUST_LOG");
                    let mut vm = VmmProcess::spawn(c);
                    let st = vm.wait_exit(BOOT_TIMEOUT);
                    if st.code() != Some(0) || !vm.output().contains("testguest: up") {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("run {i}: {st}: {}", vm.stderr()));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {RUNS} power-offs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        wait_for(EXIT_TIMEOUT, || !netd
            .links()
            .iter()
            .any(|l| l.starts_with("vmp"))),
        "TAPs left: {:?}",
        netd.links()
    );
}

/// SIGTERM while vmm is still setting up (here: waiting for a netd that
/// accepted but never answers) ends it at once with the same code 0.
#[test]
fn sigterm_during_set_up_exits_0() {
    let dir = ScratchDir::new("earlyterm");
    let sock = dir.0.join("silent-netd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let st = Command::new("chmod")
        .arg("666")
        .arg(&sock)
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = as_nobody_with_kvm(&bin("vmm"));
    c.arg("--kernel")
        .arg(tests::guest_elf())
        .arg("--net")
        .arg(format!("netd={},id=vm0", sock.display()))
        .env_remove("RUST_LOG");
    let mut vm = VmmProcess::spawn(c);
    // vmm is in its netd handshake once it connected.
    let (_conn, _) = listener.accept().unwrap();
    // SAFETY: kill(2) on our own child (setpriv execs vmm).
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let st = vm.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        st.code(),
        Some(0),
        "{st} (0: stopped by SIGTERM; a netd timeout would be an error): {}",
        vm.stderr()
    );
    assert_eq!(vm.stderr(), "", "nothing to report on a requested stop");
}
