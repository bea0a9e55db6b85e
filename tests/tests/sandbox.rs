//! The vmm sandbox: every thread of a running vmm holds no capability, has
//! no_new_privs and a seccomp filter; Landlock keeps it away from
//! /dev/net/tun; each compiled filter kills the process on a forbidden call
//! and lets allowed calls through; and the VMM's own paths (boot, serial,
//! vmctl, power-off, a bad request, a vCPU failure) work under the filters
//! with RUST_BACKTRACE=1 set.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::api::{API_VERSION, ApiRequest, ApiResponse};
use common::codec;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use tests::prereq::{Prerequisite, require_or_skip};
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess, as_nobody_with_kvm};
use tests::{bin, guest_elf, trivial_elf};
use vmm::config::VmConfig;
use vmm::sandbox::landlock::restrict;
use vmm::sandbox::{Filters, Plan, SeccompMode, ThreadKind};

/// A scratch directory uid 65534 can write to, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vmm-sandbox-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        Scratch(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// vmm as root dropping to 65534, with RUST_BACKTRACE=1 (error paths must
/// not try to capture a backtrace under the filters).
fn vmm_as_root(args: &[&str]) -> Command {
    let mut c = Command::new(bin("vmm"));
    c.env("RUST_BACKTRACE", "1")
        .args(["--user", "65534:65534"])
        .args(args);
    c
}

fn vmctl(sock: &Path, cmd: &str) -> std::process::Output {
    Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(sock)
        .args([cmd, "--json"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn vmctl_ok(sock: &Path, cmd: &str) -> String {
    let out = vmctl(sock, cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vmctl {cmd}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The sandbox fields of one thread's /proc status.
#[derive(Debug)]
struct ThreadSandbox {
    name: String,
    fields: Vec<(String, String)>,
}

impl ThreadSandbox {
    fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{key} missing for thread {}", self.name))
    }
}

fn threads_of(pid: u32) -> Vec<ThreadSandbox> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let mut name = String::new();
        let mut fields = Vec::new();
        for l in status.lines() {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim().to_string();
            if k == "Name" {
                name = v.clone();
            }
            fields.push((k.to_string(), v));
        }
        out.push(ThreadSandbox { name, fields });
    }
    out
}

const ZERO_CAPS: &str = "0000000000000000";

/// Checks every thread of `pid`; `bounding_zero` is false where the kernel
/// cannot empty the bounding set. Returns the thread names.
fn check_threads(pid: u32, bounding_zero: bool) -> Result<Vec<String>, String> {
    let threads = threads_of(pid);
    for t in &threads {
        let mut want = vec![
            ("CapEff", ZERO_CAPS),
            ("CapPrm", ZERO_CAPS),
            ("CapInh", ZERO_CAPS),
            ("CapAmb", ZERO_CAPS),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
        ];
        if bounding_zero {
            want.push(("CapBnd", ZERO_CAPS));
        }
        // vmm's own threads stack their kind's filter on the inherited
        // setup filter (KVM's kernel worker only inherits).
        let reports_filters = t.fields.iter().any(|(k, _)| k == "Seccomp_filters");
        if reports_filters && !t.name.starts_with("kvm-") {
            want.push(("Seccomp_filters", "2"));
        }
        for (key, value) in want {
            if t.get(key) != value {
                return Err(format!("{key} of thread {}: {t:?}", t.name));
            }
        }
    }
    Ok(threads.into_iter().map(|t| t.name).collect())
}

/// Polls [`check_threads`] (a thread just created installs its filter as
/// soon as it is scheduled, which may take a while on a loaded host).
fn assert_all_threads_sandboxed(pid: u32, bounding_zero: bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match check_threads(pid, bounding_zero) {
            Ok(names) => return names,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn every_thread_is_sandboxed_when_started_as_root() {
    let dir = Scratch::new("root");
    let sock = dir.path("api.sock");
    let mut cmd = vmm_as_root(&["--cmdline", "testguest.heartbeat=100", "--api-socket"]);
    cmd.arg(&sock).arg("--kernel").arg(guest_elf());
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 1", BOOT_TIMEOUT);
    let names = assert_all_threads_sandboxed(vm.pid(), true);
    for expected in ["vmm", "api", "vcpu0"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    // The threads still do their work under their filters.
    assert!(vmctl_ok(&sock, "status").contains("Running"));
    vmctl_ok(&sock, "pause");
    assert!(vmctl_ok(&sock, "status").contains("Paused"));
    vmctl_ok(&sock, "resume");
    let n = vm.lines().len();
    vm.wait_for_line(&format!("testguest: tick {}", n + 2), BOOT_TIMEOUT);
    vmctl_ok(&sock, "shutdown");
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert!(st.success(), "{st}: {}", vm.stderr());
    assert!(!sock.exists(), "the API socket is removed at exit");
}

#[test]
fn every_thread_is_sandboxed_when_started_unprivileged() {
    let dir = Scratch::new("nobody");
    let sock = dir.path("api.sock");
    let mut cmd = as_nobody_with_kvm(&bin("vmm"));
    cmd.env("RUST_BACKTRACE", "1")
        .arg("--kernel")
        .arg(guest_elf())
        .args(["--cmdline", "testguest.heartbeat=100", "--api-socket"])
        .arg(&sock);
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 1", BOOT_TIMEOUT);
    // Without CAP_SETPCAP vmm empties the bounding set inside a user
    // namespace of its own; only a host that forbids those keeps it (it then
    // matters only across execve, which no_new_privs and seccomp rule out).
    // That part is skipped loudly there, and fails where REQUIRE_USERNS=1.
    let bounding_zero = require_or_skip(Prerequisite::UserNamespaces, "the CapBnd check");
    assert_all_threads_sandboxed(vm.pid(), bounding_zero);
    vmctl_ok(&sock, "shutdown");
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert!(st.success(), "{st}: {}", vm.stderr());
}

/// Runs `f` in a forked child and returns how the child ended. The child
/// exits with `f`'s return value; a seccomp kill shows as SIGSYS.
fn in_child(f: impl FnOnce() -> i32) -> WaitStatus {
    // SAFETY: the child only runs `f` (prepared data, raw syscalls, no locks
    // held by other threads of the test harness) and leaves with _exit.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = f();
            // SAFETY: _exit is async-signal-safe and ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

fn killed_by_sigsys(st: &WaitStatus) -> bool {
    matches!(st, WaitStatus::Signaled(_, Signal::SIGSYS, _))
}

/// The forbidden calls a filter must kill, by name.
/// A forbidden syscall by name, made directly (not through a libc wrapper
/// that might call something else first).
type ForbiddenCall = (&'static str, Box<dyn Fn() -> i64 + Sync>);

fn forbidden_calls() -> Vec<ForbiddenCall> {
    vec![
        (
            "socket(AF_INET)",
            Box::new(|| {
                // SAFETY: raw syscall with integer arguments.
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) }
            }),
        ),
        (
            "execve",
            Box::new(|| {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                // SAFETY: NUL-terminated path and argument/environment arrays
                // that outlive the call.
                unsafe {
                    libc::syscall(
                        libc::SYS_execve,
                        path.as_ptr(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                    )
                }
            }),
        ),
        (
            "ptrace(PTRACE_TRACEME)",
            Box::new(|| {
                // SAFETY: raw syscall with integer arguments.
                unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) }
            }),
        ),
        (
            "mmap(PROT_EXEC)",
            Box::new(|| {
                // SAFETY: an anonymous private mapping at a kernel-chosen
                // address touches no existing memory.
                unsafe {
                    libc::syscall(
                        libc::SYS_mmap,
                        0,
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                }
            }),
        ),
        (
            "ioctl(TUNSETIFF)",
            Box::new(|| {
                // SAFETY: an ioctl on fd -1 reads no memory (EBADF at most).
                unsafe { libc::syscall(libc::SYS_ioctl, -1, 0x400454ca_u64, 0) }
            }),
        ),
    ]
}

#[test]
fn each_compiled_filter_kills_forbidden_calls_and_allows_its_own() {
    let filters = Filters::compile(SeccompMode::Kill).unwrap();
    let calls = forbidden_calls();
    for kind in ThreadKind::ALL {
        let prog = filters.program(kind).unwrap();
        for (what, call) in &calls {
            let st = in_child(|| {
                if seccompiler::apply_filter(prog).is_err() {
                    return 3;
                }
                call();
                // Still alive: the filter let it through.
                0
            });
            assert!(
                killed_by_sigsys(&st),
                "{what} under the {kind:?} filter: {st:?}"
            );
        }
        // Only the setup filter may open files.
        if kind != ThreadKind::Setup {
            let st = in_child(|| {
                if seccompiler::apply_filter(prog).is_err() {
                    return 3;
                }
                // SAFETY: a NUL-terminated path; the fd (if any) is dropped
                // by _exit.
                unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
                0
            });
            assert!(killed_by_sigsys(&st), "open under {kind:?}: {st:?}");
        }
        // Allowed: write to a pipe, then exit normally.
        let (mut rd, wr) = std::io::pipe().unwrap();
        let st = in_child(|| {
            use std::os::fd::AsRawFd;
            if seccompiler::apply_filter(prog).is_err() {
                return 3;
            }
            // SAFETY: writes 2 bytes from a static buffer to an open pipe.
            let n = unsafe { libc::write(wr.as_raw_fd(), b"ok".as_ptr().cast(), 2) };
            if n == 2 { 0 } else { 4 }
        });
        drop(wr);
        assert_eq!(st, WaitStatus::Exited(pid_of(&st), 0), "{kind:?}");
        let mut got = String::new();
        rd.read_to_string(&mut got).unwrap();
        assert_eq!(got, "ok", "{kind:?}");
    }
}

fn pid_of(st: &WaitStatus) -> nix::unistd::Pid {
    st.pid().expect("a child status has a pid")
}

#[test]
fn only_vcpu_threads_may_run_kvm_and_only_setup_may_create_threads() {
    let filters = Filters::compile(SeccompMode::Kill).unwrap();
    // KVM_RUN on fd -1: EBADF where allowed, SIGSYS where not.
    for (kind, allowed) in [
        (ThreadKind::Vcpu, true),
        (ThreadKind::Api, false),
        (ThreadKind::Device, false),
        (ThreadKind::VhostUserRelay, false),
        (ThreadKind::Main, false),
    ] {
        let prog = filters.program(kind).unwrap();
        let st = in_child(|| {
            if seccompiler::apply_filter(prog).is_err() {
                return 3;
            }
            // SAFETY: an ioctl on fd -1 touches no memory.
            let r = unsafe { libc::syscall(libc::SYS_ioctl, -1, 0xae80_u64, 0) };
            if r == -1 { 0 } else { 5 }
        });
        if allowed {
            assert!(matches!(st, WaitStatus::Exited(_, 0)), "{kind:?}: {st:?}");
        } else {
            assert!(killed_by_sigsys(&st), "KVM_RUN under {kind:?}: {st:?}");
        }
    }
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Device,
        ThreadKind::Main,
    ] {
        let prog = filters.program(kind).unwrap();
        let st = in_child(|| {
            if seccompiler::apply_filter(prog).is_err() {
                return 3;
            }
            // SAFETY: clone3 with a NULL argument fails (EFAULT) if allowed.
            unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
            0
        });
        assert!(killed_by_sigsys(&st), "clone3 under {kind:?}: {st:?}");
    }
}

#[test]
fn abort_after_a_panic_is_not_a_seccomp_kill() {
    // panic=abort ends in abort(): raise(SIGABRT) through rt_sigprocmask,
    // getpid, gettid and tgkill. Each runtime filter must let it through so
    // that a panic shows as SIGABRT (with its message), not as SIGSYS.
    let filters = Filters::compile(SeccompMode::Kill).unwrap();
    for kind in ThreadKind::ALL {
        let prog = filters.program(kind).unwrap();
        let st = in_child(|| {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setrlimit reads the struct above; no core file is
            // left behind by the abort.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            if seccompiler::apply_filter(prog).is_err() {
                return 3;
            }
            std::process::abort()
        });
        assert!(
            matches!(st, WaitStatus::Signaled(_, Signal::SIGABRT, _)),
            "abort under {kind:?}: {st:?}"
        );
    }
}

#[test]
fn landlock_denies_dev_net_tun_even_to_root() {
    // The same restriction vmm applies to itself, in a child that is still
    // root (CAP_DAC_OVERRIDE): the open fails because of Landlock alone.
    let tun = Path::new("/dev/net/tun");
    assert!(tun.exists(), "this host has /dev/net/tun (HOST.md)");
    let dir = Scratch::new("landlock");
    let allowed = dir.path("serial.log");
    // Exactly the plan vmm derives from such a command line.
    let args = [
        "--kernel".into(),
        trivial_elf().display().to_string(),
        "--serial".into(),
        allowed.display().to_string(),
        "--api-socket".into(),
        dir.path("api.sock").display().to_string(),
    ];
    let cfg = VmConfig::parse(args).unwrap().run().unwrap();
    let plan = Plan::for_config(&cfg).fs;
    let st = in_child(|| {
        if restrict(&plan).is_err() {
            return 3;
        }
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun");
        match opened {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
            _ => return 4,
        }
        if std::fs::read("/etc/hostname").is_ok() {
            return 5;
        }
        // What the plan names still works.
        if std::fs::read(trivial_elf()).is_err() {
            return 6;
        }
        if std::fs::File::create(&allowed)
            .and_then(|mut f| f.write_all(b"x"))
            .is_err()
        {
            return 7;
        }
        0
    });
    assert!(
        matches!(st, WaitStatus::Exited(_, 0)),
        "child status {st:?} (3: restrict failed, 4: tun opened, 5: other file read, 6/7: allowed file refused)"
    );
}

fn first_instruction_replaced(dir: &Scratch, code: [u8; 2]) -> PathBuf {
    let mut elf = std::fs::read(trivial_elf()).unwrap();
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let off = u64::from_le_bytes(elf[phoff + 8..phoff + 16].try_into().unwrap()) as usize;
    elf[off..off + 2].copy_from_slice(&code);
    let p = dir.path("int3.elf");
    std::fs::write(&p, elf).unwrap();
    p
}

fn assert_exited_with(st: ExitStatus, code: i32, vm: &VmmProcess) {
    assert_eq!(
        st.code(),
        Some(code),
        "{st} (a signal means a filter killed it)\nstdout: {}\nstderr: {}",
        vm.output(),
        vm.stderr()
    );
}

#[test]
fn error_and_power_off_paths_work_under_the_filters() {
    let dir = Scratch::new("paths");

    // Power-off through port 0x501, serial to a file.
    let log = dir.path("serial.log");
    let mut cmd = vmm_as_root(&["--serial"]);
    cmd.arg(&log).arg("--kernel").arg(trivial_elf());
    let mut vm = VmmProcess::spawn(cmd);
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 0, &vm);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "Trivial: long mode\n"
    );

    // The test guest's own power-off, serial to stdout.
    let mut cmd = vmm_as_root(&["--cmdline", "testguest.exit", "--kernel"]);
    cmd.arg(guest_elf());
    let mut vm = VmmProcess::spawn(cmd);
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 0, &vm);
    assert!(vm.output().contains("testguest: up boot_id="));

    // A vCPU failure (int3 is not emulated here: internal error; elsewhere a
    // triple fault): exit 1 with a reason, not a seccomp kill.
    let bad = first_instruction_replaced(&dir, [0xcc, 0x90]);
    let mut cmd = vmm_as_root(&["--kernel"]);
    cmd.arg(&bad);
    let mut vm = VmmProcess::spawn(cmd);
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 1, &vm);
    assert!(vm.stderr().contains("vCPU 0"), "{}", vm.stderr());

    // Bad input after the sandbox is up (the kernel is read under it).
    let not_elf = dir.path("not-elf");
    std::fs::write(&not_elf, "not a kernel").unwrap();
    let mut cmd = vmm_as_root(&["--kernel"]);
    cmd.arg(&not_elf);
    let mut vm = VmmProcess::spawn(cmd);
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 2, &vm);
    assert_eq!(vm.stderr().lines().count(), 1, "{}", vm.stderr());
}

#[test]
fn bad_api_requests_are_answered_and_the_vm_keeps_running() {
    let dir = Scratch::new("api");
    let sock = dir.path("api.sock");
    let mut cmd = vmm_as_root(&["--cmdline", "testguest.heartbeat=100", "--api-socket"]);
    cmd.arg(&sock).arg("--kernel").arg(guest_elf());
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 1", BOOT_TIMEOUT);

    // A wrong protocol version: an error reply.
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    codec::send(&s, &ApiRequest::Hello { version: 9999 }, &[]).unwrap();
    let r = codec::recv::<_, ApiResponse>(&s, codec::DEFAULT_MAX_FRAME, 0).unwrap();
    assert!(matches!(r.msg, ApiResponse::Error { .. }), "{:?}", r.msg);
    drop(s);

    // Garbage in a frame, then an oversized length: the connection ends.
    for frame in [
        {
            let mut f = 9u32.to_le_bytes().to_vec();
            f.extend_from_slice(b"(garbage!");
            f
        },
        u32::MAX.to_le_bytes().to_vec(),
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&frame).unwrap();
        // The vmm ends the connection (EOF, or a reset when it left bytes
        // unread) well before the read timeout; at most an error comes back.
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the vmm did not end the connection after {frame:?}: {e}"),
        }
        assert!(
            rest.is_empty() || String::from_utf8_lossy(&rest).contains("Error"),
            "reply to {frame:?}: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    // A good client after them is answered.
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    codec::send(
        &s,
        &ApiRequest::Hello {
            version: API_VERSION,
        },
        &[],
    )
    .unwrap();
    let r = codec::recv::<_, ApiResponse>(&s, codec::DEFAULT_MAX_FRAME, 0).unwrap();
    assert!(matches!(r.msg, ApiResponse::Hello { .. }), "{:?}", r.msg);
    drop(s);
    assert!(vmctl_ok(&sock, "status").contains("Running"));

    // A migration request to a target that does not exist reaches the vmm
    // and is answered under the API thread's filter with a reason (today
    // "not supported yet"; with migration, the target cannot be reached).
    let target = dir.path("nonexistent").join("target.sock");
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(&sock)
        .arg("migrate")
        .arg("--to")
        .arg(&target)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Exit 2 would be vmctl's usage error; its own failures to reach or
    // hear the vmm are "vmctl: cannot connect"/"send:"/"receive:".
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("vmctl: error: ") || err.starts_with("vmctl: result: "),
        "not an answer of the vmm: {err}"
    );
    assert!(
        err.trim().len() > "vmctl: error: ".len(),
        "no reason: {err}"
    );
    // The same over the wire: one reply, not a dropped connection.
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    codec::send(
        &s,
        &ApiRequest::Hello {
            version: API_VERSION,
        },
        &[],
    )
    .unwrap();
    codec::recv::<_, ApiResponse>(&s, codec::DEFAULT_MAX_FRAME, 0).unwrap();
    codec::send(
        &s,
        &ApiRequest::Migrate {
            to: target.display().to_string(),
            backend_transfer: true,
            downtime_limit_ms: None,
        },
        &[],
    )
    .unwrap();
    let r = codec::recv::<_, ApiResponse>(&s, codec::DEFAULT_MAX_FRAME, 0).unwrap();
    match &r.msg {
        ApiResponse::Error { message } => assert!(!message.is_empty()),
        ApiResponse::Migrated(m) => assert_ne!(m.result, "ok", "{m:?}"),
        other => panic!("migrating to {target:?}: {other:?}"),
    }
    drop(s);
    // The VM was not paused or stopped by the failed request.
    assert!(vmctl_ok(&sock, "status").contains("Running"));

    let n = vm.lines().len();
    vm.wait_for_line(&format!("testguest: tick {}", n + 1), BOOT_TIMEOUT);
    vmctl_ok(&sock, "shutdown");
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 0, &vm);
}

#[test]
fn seccomp_option() {
    // log mode (debugging) still boots; an unknown mode is bad input.
    let mut cmd = vmm_as_root(&["--seccomp", "log", "--kernel"]);
    cmd.arg(trivial_elf());
    let mut vm = VmmProcess::spawn(cmd);
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 0, &vm);
    assert!(vm.stderr().contains("log mode"), "{}", vm.stderr());

    let mut cmd = vmm_as_root(&["--seccomp", "off", "--kernel"]);
    cmd.arg(trivial_elf());
    let mut vm = VmmProcess::spawn(cmd);
    assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 2, &vm);
    assert!(vm.stderr().contains("--seccomp"), "{}", vm.stderr());
}

#[test]
fn with_net_every_thread_is_sandboxed_and_the_network_works() {
    use tests::net_guest::{GuestLink, RunAs, ScratchDir, guest_ip, vmm_command, wait_ping};
    use tests::netd_harness::{Netd, TEST_POLICY};
    let netd = Netd::start(&bin("netd"), "sbx", TEST_POLICY, &[]);
    let dir = ScratchDir::new("sbx");
    let sock = dir.0.join("api.sock");
    for queues in ["", "queues=2"] {
        let mut cmd = vmm_command(
            &netd,
            "vm0",
            1,
            queues,
            Some(&sock),
            RunAs::RootWithUserOption,
        );
        cmd.env("RUST_BACKTRACE", "1");
        let mut vm = VmmProcess::spawn(cmd);
        vm.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
        assert!(
            wait_ping(&netd.ns, guest_ip(1), Duration::from_secs(30)),
            "no ping reply\nstdout:\n{}\nstderr:\n{}",
            vm.output(),
            vm.stderr()
        );
        let link = GuestLink::new(&netd.ns, guest_ip(1));
        assert_eq!(link.echo_round_trips(50, 200, Duration::from_secs(5)), 50);
        let names = assert_all_threads_sandboxed(vm.pid(), true);
        assert!(
            names.iter().any(|n| n.starts_with("virtio-net")),
            "a device thread in {names:?}"
        );
        // Pause/resume stop and restart the device threads under the filters.
        vmctl_ok(&sock, "pause");
        assert!(vmctl_ok(&sock, "status").contains("Paused"));
        vmctl_ok(&sock, "resume");
        assert_eq!(link.echo_round_trips(10, 200, Duration::from_secs(5)), 10);
        vmctl_ok(&sock, "shutdown");
        assert_exited_with(vm.wait_exit(BOOT_TIMEOUT), 0, &vm);
    }
}
