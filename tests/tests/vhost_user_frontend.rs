//! The vmm as a vhost-user frontend of our `vhost-user-net` backend, with
//! real processes: netd hands the backend a TAP in a namespace of the
//! test's own; the sandboxed vmm boots the test guest with
//! `--net vhost-user=...`; ping and UDP echo go from the namespace through
//! the TAP, the backend and the guest's rings, never through the vmm.
//! Also: what each process holds, the backend killed under traffic and
//! restarted (1 s later, and 90 s later), and `vmctl status`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::migration_harness::vmctl;
use tests::net_guest::{GuestLink, guest_ip, guest_mac, ping, wait_ping};
use tests::netd_harness::{Netd, TEST_POLICY};
use tests::vhost_user::{Backend, vmm_frontend_command};
use tests::vmm_process::VmmProcess;
use tests::{TempDir, bin};
/// Generous: the CI machine has 2 cores shared with parallel tests.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The vmm (dropped to 65534) as the frontend of the backend at `sock`:
/// the test guest `n`, with an API socket.
fn start_vmm(sock: &Path, api: &Path, n: u8, queues: u16) -> VmmProcess {
    let mut c = vmm_frontend_command(sock, "n0", n, queues);
    c.arg("--api-socket").arg(api).env("RUST_LOG", "warn");
    let mut v = VmmProcess::spawn(c);
    v.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
    v
}

/// The fds' targets of process `pid`.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

/// The NIC's relay thread (which may reconnect) runs under its own filter
/// on top of the inherited one, without capabilities.
fn assert_relay_sandboxed(pid: u32) {
    let relay = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
        .find(|s| s.lines().any(|l| l == "Name:\tvhost-user-rela"))
        .expect("a vhost-user-relay thread");
    for want in [
        "Seccomp:\t2",
        "Seccomp_filters:\t2",
        "NoNewPrivs:\t1",
        "CapEff:\t0000000000000000",
    ] {
        assert!(relay.lines().any(|l| l == want), "{want} in\n{relay}");
    }
}

/// `vmctl status` as JSON.
fn status(api: &Path) -> serde_json::Value {
    let (code, json) = vmctl(api, &["status"]);
    assert_eq!(code, Some(0), "vmctl status: {json}");
    json
}

fn nic_connection(api: &Path) -> serde_json::Value {
    status(api)["nets"][0]["vhost_user"].clone()
}

/// Waits until the NIC's vhost-user `connected` is `want`.
fn wait_connected(api: &Path, want: bool, timeout: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let c = nic_connection(api);
        if c["connected"] == want {
            return c;
        }
        assert!(t0.elapsed() < timeout, "connected never became {want}: {c}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    dir: TempDir,
    netd: Netd,
    api: PathBuf,
}

fn setup() -> Setup {
    let dir = TempDir::new("vu-frontend");
    let netd = Netd::start(&bin("netd"), "vuf", TEST_POLICY, &[]);
    let api = dir.join("api.sock");
    // The backend and the vmm both run as 65534: the dir must let them in.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    Setup { dir, netd, api }
}

fn assert_pings(s: &Setup, n: u8, what: &str, extra: impl Fn() -> String) {
    assert!(
        wait_ping(&s.netd.ns, guest_ip(n), BOOT_TIMEOUT),
        "{what}: no ping answer\n{}",
        extra()
    );
    let (sent, got, _) = ping(&s.netd.ns, guest_ip(n), 5, "0.2", 2);
    assert_eq!(got, sent, "{what}: lost pings\n{}", extra());
}

/// One and two queue pairs: ping and UDP echo through the backend; the
/// vmm holds no TAP, the backend no /dev/kvm; `vmctl status` shows the
/// connection.
#[test]
fn vmm_frontend_pings_through_the_backend() {
    for queues in [1u16, 2] {
        let s = setup();
        let b = Backend::start(&s.netd, s.dir.path(), "vm0", queues);
        let v = start_vmm(&b.sock, &s.api, 1, queues);
        let logs = || {
            format!(
                "backend:\n{}\nvmm:\n{}\n{}",
                b.log(),
                v.output(),
                v.stderr()
            )
        };
        assert_pings(&s, 1, &format!("queues={queues}"), logs);
        let link = GuestLink::new(&s.netd.ns, guest_ip(1));
        let echoed = link.echo_round_trips(50, 200, Duration::from_secs(2));
        assert_eq!(echoed, 50, "UDP echo through the backend\n{}", logs());

        let vmm_fds = fd_targets(v.pid());
        assert!(
            !vmm_fds.iter().any(|t| t.contains("tun")),
            "the vmm holds a TAP: {vmm_fds:?}"
        );
        let b_fds = fd_targets(b.pid());
        assert!(
            !b_fds.iter().any(|t| t.contains("kvm")),
            "the backend holds KVM: {b_fds:?}"
        );
        assert!(b_fds.iter().any(|t| t.contains("tun")), "{b_fds:?}");

        assert_relay_sandboxed(v.pid());

        let c = nic_connection(&s.api);
        assert_eq!(c["connected"], true, "{c}");
        assert_eq!(c["connections"], 1, "{c}");
        assert_eq!(c["socket"], b.sock.display().to_string(), "{c}");
        let nic = &status(&s.api)["nets"][0];
        assert_eq!(nic["tap"], "", "{nic}");
        assert_eq!(nic["queues"], queues, "{nic}");
        // The text form too (vmctl without --json).
        let text = Command::new(bin("vmctl"))
            .arg("--api-socket")
            .arg(&s.api)
            .arg("status")
            .output()
            .expect("vmctl");
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(&format!(
                "net n0: vhost-user {} connected (connections 1)",
                b.sock.display()
            )),
            "{text}"
        );

        // Shutting down under the filters: the documented exit code 0.
        let (code, json) = vmctl(&s.api, &["shutdown"]);
        assert_eq!(code, Some(0), "{json}");
        let mut v = v;
        let st = v.wait_exit(Duration::from_secs(10));
        assert_eq!(st.code(), Some(0), "{}", v.stderr());
    }
}

/// The backend killed under traffic: the vmm stays up with the link down;
/// a new backend on the same path is reconnected to after `outage`, and
/// the same guest (same boot id) answers ping again.
fn backend_restart(outage: Duration) {
    let s = setup();
    let b = Backend::start(&s.netd, s.dir.path(), "vm0", 1);
    let mut v = start_vmm(&b.sock, &s.api, 1, 1);
    let boot_line = v.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
    assert_pings(&s, 1, "before", || b.log());

    // Traffic while the backend dies.
    std::thread::scope(|sc| {
        let pinger = sc.spawn(|| ping(&s.netd.ns, guest_ip(1), 30, "0.05", 1));
        std::thread::sleep(Duration::from_millis(500));
        drop(b);
        let down = wait_connected(&s.api, false, Duration::from_secs(10));
        assert!(down["last_error"].is_string(), "{down}");
        let _ = pinger.join();
    });
    assert!(
        !wait_ping(&s.netd.ns, guest_ip(1), Duration::from_secs(1)),
        "ping answered with no backend"
    );
    std::thread::sleep(outage);
    assert!(
        std::fs::read_to_string(format!("/proc/{}/stat", v.pid())).is_ok(),
        "the vmm died without its backend:\n{}",
        v.stderr()
    );

    let b2 = Backend::start(&s.netd, s.dir.path(), "vm0", 1);
    let up = wait_connected(&s.api, true, Duration::from_secs(10));
    assert_eq!(up["connections"], 2, "{up}");
    assert_pings(&s, 1, "after the restart", || {
        format!("backend:\n{}\nvmm:\n{}", b2.log(), v.stderr())
    });
    // The same boot: no guest reboot.
    let boots: Vec<_> = v
        .output()
        .lines()
        .filter(|l| l.contains("testguest: up boot_id="))
        .map(str::to_string)
        .collect();
    assert_eq!(boots.len(), 1, "{boots:?}");
    assert!(boot_line.contains(&boots[0]) || boots[0].contains(boot_line.trim()));
}

#[test]
fn backend_killed_and_restarted_after_1s() {
    backend_restart(Duration::from_secs(1));
}

#[test]
fn backend_killed_and_restarted_after_90s() {
    backend_restart(Duration::from_secs(90));
}

/// Local migration with a vhost-user NIC under a 1,000 pps UDP echo
/// stream: the source hands its backend connection to the target, which
/// hands the rings over again; the backend (same pid) never restarts and
/// not one datagram is lost.
#[test]
fn migration_keeps_the_backend_and_loses_nothing() {
    use tests::echo_stream::EchoStream;
    use tests::migration_harness::{
        GuestSpec, MigEnv, TargetSpec, migrate, start_source, start_target,
    };
    let env = MigEnv::new("vumig");
    let b = Backend::start(&env.netd, &env.dir.0, "vm0", 1);
    let sock = b.sock.clone();
    let n = 3;
    let spec = GuestSpec {
        nets: vec![format!(
            "vhost-user={},id=n0,mac={}",
            sock.display(),
            guest_mac(n)
        )],
        ..GuestSpec::one_nic(&env, n, "")
    };
    let api = env.path("api.sock");
    let mut src = start_source(&env, &spec, &api);
    assert!(
        wait_ping(&env.netd.ns, guest_ip(n), BOOT_TIMEOUT),
        "no ping before the migration\nbackend:\n{}",
        b.log()
    );
    let backend_pid = b.pid();
    let tgt = start_target(&env, &TargetSpec::like(&spec));
    let stream = EchoStream::start(&env.netd.ns, guest_ip(n), 1000, 1);
    assert!(stream.wait_more(200, Duration::from_secs(10)), "no echoes");
    let out = migrate(&api, &tgt.incoming, &[]);
    assert_eq!(
        out.result(),
        "ok",
        "{:?}\ntarget:\n{}\nsource:\n{}",
        out.json,
        tgt.vm.proc.stderr(),
        src.proc.stderr()
    );
    assert!(
        stream.wait_more(500, Duration::from_secs(10)),
        "no echoes after the migration\nstatus: {}\nbackend:\n{}\ntarget:\n{}\nsource:\n{}",
        status(&api),
        b.log(),
        tgt.vm.proc.stderr(),
        src.proc.stderr()
    );
    let r = stream.stop();
    assert!(
        r.missing().is_empty(),
        "{} of {} lost: {:?}\nbackend:\n{}\ntarget:\n{}",
        r.missing().len(),
        r.sent(),
        r.missing(),
        b.log(),
        tgt.vm.proc.stderr()
    );
    assert_eq!(b.pid(), backend_pid);
    assert!(
        std::fs::read_to_string(format!("/proc/{backend_pid}/stat")).is_ok(),
        "the backend is gone"
    );
    // The source is gone, the target serves the API and the connection.
    let st = src.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "source: {}", src.proc.stderr());
    let c = nic_connection(&api);
    assert_eq!(c["connected"], true, "{c}");
    assert_eq!(c["connections"], 1, "{c}");
    let tfds = fd_targets(tgt.vm.pid());
    assert!(!tfds.iter().any(|t| t.contains("tun")), "{tfds:?}");
    // The target took the source's connection: the backend saw one.
    assert_eq!(
        b.log().matches(" connected").count(),
        1,
        "the backend saw a new connection:\n{}",
        b.log()
    );
    eprintln!(
        "vhost-user migration: {} datagrams, 0 lost; report {}",
        r.sent(),
        out.json
    );
}

/// A backend that is not there, or one that accepts and never answers:
/// the vmm does not hang; it exits 1 with one line naming the NIC, within
/// the reply timeout.
#[test]
fn missing_or_silent_backend_fails_the_start_in_bounded_time() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("vu-silent");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();

    let none = dir.join("none.sock");
    let out = vmm_frontend_command(&none, "n0", 1, 1).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--net id=n0: cannot connect to the vhost-user backend"),
        "{err}"
    );

    let silent = dir.join("silent.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    std::fs::set_permissions(&silent, std::fs::Permissions::from_mode(0o777)).unwrap();
    let holder = std::thread::spawn(move || l.accept().map(|(s, _)| s));
    // Killed on drop, failing here, if it never ends.
    let mut v = VmmProcess::spawn(vmm_frontend_command(&silent, "n0", 1, 1));
    let st = v.wait_exit(Duration::from_secs(5));
    let err = v.stderr();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("--net id=n0: vhost-user"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    drop(holder.join());
}
