//! Running under systemd, with real processes:
//!
//! - netd given its listening socket the systemd way (the test holds the
//!   socket, as systemd does, and starts netd with it as fd 3 and
//!   `LISTEN_FDS`/`LISTEN_PID`): it serves a vmm whose guest answers ping,
//!   tells READY/RELOADING/STOPPING on `NOTIFY_SOCKET`, leaves the socket
//!   file alone when it stops; a vmm that connects while no netd runs waits
//!   in the backlog and is served by the next netd on the same fd.
//! - netd refuses, with exit 2 and one line, an fd 3 that is not a
//!   listening AF_UNIX stream socket.
//! - `dist/install.sh` installs what it says, and `systemd-analyze verify`
//!   accepts every shipped unit (and the check catches a broken one).
//! - The upgrade recipe under a real systemd: /lib/systemd/systemd runs as
//!   PID 1 of a pid, mount and cgroup namespace of the test's own (in a
//!   network namespace of its own), with the installed units: netd.socket
//!   activates netd.service, vmm@test runs a guest, `vmm-upgrade test`
//!   moves it to a newly installed vmm binary under a 2 ms ping with no
//!   reply lost, the unit's MainPID is then the new vmm, and `systemctl
//!   stop` ends it through `vmctl shutdown` with the unit's result
//!   "success".

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::migration_harness::{PingResult, Proc, Vm};
use tests::net_guest::{guest_ip, guest_mac};
use tests::netd_harness::TEST_POLICY;
use tests::prereq::PreviousRelease;
use tests::vmm_process::BOOT_TIMEOUT;
use tests::{NetNs, TempDir, bin, guest_elf, output_within, target_dir, wait_for, workspace_root};

const SETTLE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// netd started the systemd way, without systemd

/// Starts netd in `ns` with `fd` (if any) as its fd 3 and `LISTEN_FDS=1`,
/// `LISTEN_PID` = its own pid (`sh` sets it to `$$`, then execs netd, which
/// keeps the pid), logging at info.
fn spawn_activated(
    ns: &NetNs,
    fd: Option<RawFd>,
    listen_pid: &str,
    listen_fds: &str,
    notify: Option<&Path>,
    args: &[&str],
) -> Proc {
    let netd = bin("netd");
    let mut c = ns.command(&[
        "sh",
        "-c",
        "LISTEN_PID=${PID_FOR:-$$} LISTEN_FDS=$FDS exec \"$0\" \"$@\"",
        netd.to_str().expect("utf-8 path"),
    ]);
    c.args(args)
        .env("FDS", listen_fds)
        .env("RUST_LOG", "info")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET");
    if listen_pid != "$$" {
        c.env("PID_FOR", listen_pid);
    }
    if let Some(n) = notify {
        c.env("NOTIFY_SOCKET", n);
    }
    // SAFETY: the closure only calls dup2/fcntl/close, which are
    // async-signal-safe, between fork and exec.
    unsafe {
        c.pre_exec(move || {
            match fd {
                Some(3) => {
                    // Already fd 3: only clear close-on-exec.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Some(fd) => {
                    if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                None => {
                    libc::close(3);
                }
            }
            Ok(())
        })
    };
    Proc::spawn(c)
}

/// The next notification netd sends, within `SETTLE`.
fn next_notification(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(SETTLE)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification from netd");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The test guest `n` on a TAP named `tap` from the netd at `netd_sock`,
/// as uid 65534; not waited for.
fn spawn_guest(dir: &TempDir, netd_sock: &Path, n: u8, tap: &str) -> Vm {
    let serial = dir.join(&format!("serial-{n}"));
    let mut c = Command::new(bin("vmm"));
    c.args(["--user", "65534:65534", "--memory", "64M", "--kernel"])
        .arg(guest_elf())
        .args(["--cmdline", &format!("testguest.ip={}/24", guest_ip(n))])
        .arg("--net")
        .arg(format!(
            "netd={},id={tap},mac={}",
            netd_sock.display(),
            guest_mac(n)
        ))
        .arg("--serial")
        .arg(&serial);
    Vm {
        proc: Proc::spawn(c),
        serial,
    }
}

fn ping_ok(ns: &NetNs, n: u8) {
    ns.exec(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        &guest_ip(n).to_string(),
    ]);
}

fn sigterm_and_wait(p: &mut Proc) -> Option<i32> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    p.wait_exit(SETTLE).code()
}

#[test]
fn netd_serves_on_the_socket_systemd_passes_and_a_restart_loses_no_client() {
    let ns = NetNs::new("sdact");
    let dir = TempDir::new("sdact");
    let policy = dir.join("policy.ron");
    std::fs::write(&policy, TEST_POLICY).unwrap();
    let audit = dir.join("audit.log");
    let sock = dir.join("netd.sock");
    // What systemd does for netd.socket: bind, listen, hold.
    let listener = UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let args = [
        "--policy",
        policy.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    let fd = Some(listener.as_raw_fd());

    let mut netd1 = spawn_activated(&ns, fd, "$$", "1", Some(&notify_path), &args);
    assert_eq!(next_notification(&notify), "READY=1", "{}", netd1.stderr());
    assert!(
        netd1.wait_for_stderr(
            "serving on the socket passed by the service manager (fd 3",
            SETTLE
        ),
        "{}",
        netd1.stderr()
    );
    // No LISTEN_* left for what netd starts (it starts nothing, but its
    // environment tells): /proc/PID/environ is the exec-time one, so look
    // at the variables through netd's log instead: it bound nothing.
    assert!(!netd1.stderr().contains("bound and serving"));

    let mut vm1 = spawn_guest(&dir, &sock, 1, "vm1");
    vm1.wait_serial("testguest: up boot_id=", BOOT_TIMEOUT);
    ping_ok(&ns, 1);

    // SIGHUP: a policy reload, told to the manager around it.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(netd1.pid() as i32, libc::SIGHUP) };
    let r = next_notification(&notify);
    assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
    assert_eq!(next_notification(&notify), "READY=1");
    assert!(wait_for(SETTLE, || std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .contains("event=reload")));

    assert_eq!(sigterm_and_wait(&mut netd1), Some(0), "{}", netd1.stderr());
    assert_eq!(next_notification(&notify), "STOPPING=1");
    // The socket is systemd's (here: the test's): netd leaves its file.
    assert!(
        std::fs::symlink_metadata(&sock).is_ok(),
        "netd removed the passed socket's file"
    );

    // No netd runs: a vmm connects, and waits in the socket's backlog.
    let mut vm2 = spawn_guest(&dir, &sock, 2, "vm2");
    std::thread::sleep(Duration::from_secs(1));
    assert!(vm2.try_exit().is_none(), "{}", vm2.proc.stderr());
    assert!(!vm2.serial_text().contains("testguest: up"));

    let mut netd2 = spawn_activated(&ns, fd, "$$", "1", Some(&notify_path), &args);
    assert_eq!(next_notification(&notify), "READY=1", "{}", netd2.stderr());
    vm2.wait_serial("testguest: up boot_id=", BOOT_TIMEOUT);
    ping_ok(&ns, 2);
    // The first guest's TAP outlives the netd that made it.
    ping_ok(&ns, 1);
    let text = std::fs::read_to_string(&audit).unwrap();
    let served = text.lines().filter(|l| {
        l.contains(&format!("pid={} ", vm2.pid()))
            && l.contains("OpenTap")
            && l.contains("result=granted")
    });
    assert_eq!(served.count(), 1, "{text}");
    assert_eq!(sigterm_and_wait(&mut netd2), Some(0), "{}", netd2.stderr());
    assert_eq!(next_notification(&notify), "STOPPING=1");
}

#[test]
fn netd_refuses_a_passed_fd_that_is_not_a_listening_unix_stream_socket() {
    let ns = NetNs::new("sdbad");
    let dir = TempDir::new("sdbad");
    let policy = dir.join("policy.ron");
    std::fs::write(&policy, TEST_POLICY).unwrap();
    let args = ["--policy", policy.to_str().unwrap()];

    let dgram = UnixDatagram::bind(dir.join("dgram.sock")).unwrap();
    // A stream socket bound but not listening.
    let bound = {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            fd.as_raw_fd(),
            &UnixAddr::new(&dir.join("bound.sock")).unwrap(),
        )
        .unwrap();
        fd
    };
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let file = std::fs::File::open(&policy).unwrap();
    let (a, _b) = UnixStream::pair().unwrap();

    let cases: [(&str, Option<RawFd>, &str, &str); 7] = [
        ("a datagram socket", Some(dgram.as_raw_fd()), "$$", "1"),
        (
            "a stream socket not listening",
            Some(bound.as_raw_fd()),
            "$$",
            "1",
        ),
        ("a listening TCP socket", Some(tcp.as_raw_fd()), "$$", "1"),
        ("a connected stream socket", Some(a.as_raw_fd()), "$$", "1"),
        ("a regular file", Some(file.as_raw_fd()), "$$", "1"),
        ("no fd 3 at all", None, "$$", "1"),
        (
            "a LISTEN_FDS that is no count",
            Some(dgram.as_raw_fd()),
            "$$",
            "one",
        ),
    ];
    for (what, fd, pid, fds) in cases {
        let mut p = spawn_activated(&ns, fd, pid, fds, None, &args);
        let st = p.wait_exit(SETTLE);
        let err = p.stderr();
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("netd: ")).collect();
        assert_eq!(st.code(), Some(2), "{what}: {err}");
        assert_eq!(lines.len(), 1, "{what}: {err}");
        assert!(
            lines[0].starts_with("netd: socket activation: "),
            "{what}: {err}"
        );
    }

    // Variables meant for another process are not taken: netd then binds
    // its own socket, and without --socket it has none: a usage error.
    let mut p = spawn_activated(&ns, Some(dgram.as_raw_fd()), "1", "1", None, &args);
    let st = p.wait_exit(SETTLE);
    assert_eq!(st.code(), Some(2), "{}", p.stderr());
    assert!(
        p.stderr().contains("--socket is required"),
        "{}",
        p.stderr()
    );
    assert!(!p.stderr().contains("socket activation"), "{}", p.stderr());
}

// ---------------------------------------------------------------------------
// The units and their install step

/// A directory under the target dir (not /tmp: the units' PrivateTmp would
/// hide it from the services), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        // The units' PrivateTmp=yes hides /tmp and /var/tmp from the
        // services: a checkout there (a CI clone in /tmp) keeps the scratch
        // tree, binaries and kernel included, in /var/lib instead.
        let target = target_dir();
        let base = if target.starts_with("/tmp") || target.starts_with("/var/tmp") {
            PathBuf::from("/var/lib")
        } else {
            target
        };
        let p = base.join(format!("vmm-systemd-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dist/install.sh` with `PREFIX=root`, `SYSCONFDIR=root/etc`.
fn install(root: &Path, env: &[(&str, &Path)]) {
    let mut c = Command::new(workspace_root().join("dist/install.sh"));
    c.env("PREFIX", root)
        .env("SYSCONFDIR", root.join("etc"))
        .env_remove("DESTDIR")
        .env("CARGO_TARGET_DIR", target_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = output_within(c, SETTLE);
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const UNITS: [&str; 3] = ["netd.socket", "netd.service", "vmm@.service"];

/// `systemd-analyze verify` on `unit` in `dir`: Ok when it exits 0 and
/// says nothing (an unknown key or a bad value is only a warning).
fn verify(dir: &Path, unit: &str) -> Result<(), String> {
    let mut c = Command::new("systemd-analyze");
    c.args(["verify", "--man=no", unit])
        .current_dir(dir)
        .env("SYSTEMD_LOG_COLOR", "0");
    let out = output_within(c, SETTLE);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() && err.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {err}", out.status))
    }
}

#[test]
fn install_puts_everything_in_place_and_every_unit_verifies() {
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "systemd-analyze is missing (apt-get install systemd)"
    );
    let s = Scratch::new("verify");
    let root = s.0.join("usr");
    install(&root, &[]);
    let units = root.join("lib/systemd/system");
    for b in ["netd", "vmm", "vmctl", "vhost-user-net", "vmm-upgrade"] {
        let m = std::fs::metadata(root.join("bin").join(b)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o755, "{b}");
    }
    assert!(root.join("lib/sysusers.d/vmm.conf").is_file());
    assert!(root.join("etc/netd/policy.ron").is_file());
    assert!(root.join("etc/vmm/example.conf").is_file());
    // The units name the installed paths.
    let vmm_unit = std::fs::read_to_string(units.join("vmm@.service")).unwrap();
    assert!(vmm_unit.contains(&format!("ExecStart={}/bin/vmm ", root.display())));
    assert!(vmm_unit.contains(&format!(
        "EnvironmentFile={}/etc/vmm/%i.conf",
        root.display()
    )));
    assert!(!vmm_unit.contains("/usr/local"), "{vmm_unit}");

    // An instance of the template, as systemd would load it.
    std::os::unix::fs::symlink("vmm@.service", units.join("vmm@test.service")).unwrap();
    for u in ["netd.socket", "netd.service", "vmm@test.service"] {
        verify(&units, u).unwrap_or_else(|e| panic!("{u}: {e}"));
    }
    // The check catches a broken unit: a missing binary, an unknown key.
    let good = std::fs::read_to_string(units.join("netd.service")).unwrap();
    let broken = good.replace("/bin/netd ", "/bin/netd-missing ");
    std::fs::write(units.join("netd.service"), broken).unwrap();
    assert!(verify(&units, "netd.service").is_err());
    let broken = good.replace("Type=notify", "Type=notify\nRestrictAdressFamilies=AF_UNIX");
    std::fs::write(units.join("netd.service"), broken).unwrap();
    assert!(verify(&units, "netd.service").is_err());
    std::fs::write(units.join("netd.service"), good).unwrap();
    verify(&units, "netd.service").unwrap();

    // Man pages and completions are installed when the build made them.
    let fake = s.0.join("target");
    let assets = fake.join("release/assets");
    for b in ["netd", "vmm", "vmctl", "vhost-user-net"] {
        let p = fake.join("release").join(b);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let files = [
        ("man/vmm.1", "share/man/man1/vmm.1"),
        ("man/netd.1", "share/man/man1/netd.1"),
        (
            "completions/bash/vmctl.bash",
            "share/bash-completion/completions/vmctl.bash",
        ),
        ("completions/zsh/_vmctl", "share/zsh/site-functions/_vmctl"),
        (
            "completions/fish/vmctl.fish",
            "share/fish/vendor_completions.d/vmctl.fish",
        ),
    ];
    for (src, _) in files {
        let p = assets.join(src);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, src).unwrap();
    }
    let dest = s.0.join("destdir");
    let mut c = Command::new(workspace_root().join("dist/install.sh"));
    c.env("DESTDIR", &dest)
        .env("PREFIX", "/usr")
        .env("CARGO_TARGET_DIR", &fake);
    let out = output_within(c, SETTLE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (src, dst) in files {
        let got = std::fs::read_to_string(dest.join("usr").join(dst)).unwrap();
        assert_eq!(got, src);
    }
    // DESTDIR is left out of the paths the units name.
    let unit = std::fs::read_to_string(dest.join("usr/lib/systemd/system/vmm@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/vmm "), "{unit}");
    assert!(unit.contains("EnvironmentFile=/etc/vmm/%i.conf"), "{unit}");
    for u in UNITS {
        assert!(dest.join("usr/lib/systemd/system").join(u).is_file(), "{u}");
    }
}

// ---------------------------------------------------------------------------
// A real systemd

/// /lib/systemd/systemd as PID 1 of a pid, mount and cgroup namespace of
/// its own, inside the network namespace `ns`, on the unit directory
/// `units` only (plus the few targets it needs). Its cgroups live below a
/// cgroup of the test's own in each hierarchy, removed on drop after the
/// manager (and so every process of its namespace) is killed.
struct Manager {
    child: Child,
    /// The manager's pid in the test's namespace.
    pid: u32,
    cgroups: Vec<PathBuf>,
}

/// A launcher: moves itself into a fresh cgroup (named `$1`) of every
/// hierarchy it can (cpuset refuses a task in a cgroup without cpus; it is
/// left alone), then becomes the new namespaces' systemd. /run and /var/log
/// are private tmpfs, so the manager's state and netd's audit log stay in
/// the namespace.
const LAUNCH: &str = r#"
set -e
name=$1; ns=$2; units=$3
while IFS=: read -r id ctrl path; do
    case $ctrl in
        "") h=/sys/fs/cgroup/unified ;;
        name=systemd) h=/sys/fs/cgroup/systemd ;;
        cpuset|name=*) continue ;;
        *) h=/sys/fs/cgroup/$ctrl ;;
    esac
    [ -d "$h" ] || continue
    d="$h${path%/}/$name"
    mkdir "$d"
    echo "$d" >&2
    echo $$ > "$d/cgroup.procs"
done < /proc/self/cgroup
echo launched >&2
exec ip netns exec "$ns" unshare --pid --fork --mount --cgroup --mount-proc sh -c '
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/log
export container=other SYSTEMD_UNIT_PATH="$0"
exec /lib/systemd/systemd --unit=test.target --log-target=console --log-level=warning' "$units"
"#;

impl Manager {
    fn start(ns: &NetNs, units: &Path, name: &str) -> Manager {
        let mut child = Command::new("sh")
            .args(["-c", LAUNCH, "launch", name, &ns.name])
            .arg(units)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the launcher");
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut cgroups = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = std::io::BufRead::read_line(&mut err, &mut line).unwrap_or(0);
            let l = line.trim();
            if n == 0 || l == "launched" {
                break;
            }
            cgroups.push(PathBuf::from(l));
        }
        // Drain the rest (the manager's console) so it never blocks.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let mut m = Manager {
            child,
            pid: 0,
            cgroups,
        };
        // unshare --fork: the manager is the child of the launcher's pid.
        let launcher = m.child.id();
        let found = wait_for(SETTLE, || {
            let p = format!("/proc/{launcher}/task/{launcher}/children");
            let kids = std::fs::read_to_string(p).unwrap_or_default();
            match kids.split_whitespace().next().and_then(|k| k.parse().ok()) {
                Some(pid) => {
                    m.pid = pid;
                    std::fs::read_link(format!("/proc/{pid}/exe"))
                        .is_ok_and(|e| e.ends_with("systemd"))
                }
                None => false,
            }
        });
        assert!(found, "systemd did not start (cgroups {:?})", m.cgroups);
        assert!(
            wait_for(SETTLE, || m
                .systemctl(&["show", "-P", "Version"])
                .status
                .success()),
            "systemctl cannot reach the manager"
        );
        m
    }

    /// `cmd` run in the manager's pid and mount namespaces.
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "-p", "--"])
            .args(argv);
        c
    }

    fn run(&self, argv: &[&str]) -> std::process::Output {
        output_within(self.command(argv), Duration::from_secs(120))
    }

    fn systemctl(&self, args: &[&str]) -> std::process::Output {
        let mut argv = vec!["systemctl"];
        argv.extend_from_slice(args);
        self.run(&argv)
    }

    fn systemctl_ok(&self, args: &[&str]) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        let out = self.systemctl(&["show", "-P", prop, unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SAFETY: kill(2); the pid is the manager's, PID 1 of its
            // namespace: every process in it dies with it.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Deepest first; a cgroup empties once its tasks are reaped.
        for top in &self.cgroups {
            let mut dirs = Vec::new();
            collect_dirs(top, &mut dirs);
            for d in dirs.iter().rev() {
                let t0 = Instant::now();
                while std::fs::remove_dir(d).is_err() && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// ping every 2 ms from `ns`, replies collected until stopped.
struct Ping {
    child: Child,
    reader: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl Ping {
    fn start(ns: &NetNs, n: u8) -> Ping {
        let mut child = ns
            .command(&[
                "ping",
                "-n",
                "-i",
                "0.002",
                "-W",
                "2",
                &guest_ip(n).to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| {
                    l.split("icmp_seq=")
                        .nth(1)
                        .and_then(|r| r.split(' ').next())
                        .and_then(|n| n.parse().ok())
                })
                .collect()
        });
        Ping {
            child,
            reader: Some(reader),
        }
    }

    fn stop(mut self) -> PingResult {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let replies = self.reader.take().unwrap().join().unwrap();
        PingResult::of(&replies)
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `src` to `dst` through a new file renamed into place, as a
/// package manager installs: a running binary keeps its old inode.
fn install_binary(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    tests::copy_executable(src, &tmp);
    std::fs::rename(&tmp, dst).unwrap();
}

#[test]
fn upgrade_recipe_moves_a_running_instance_under_a_real_systemd() {
    let ns = NetNs::new("sdunit");
    let s = Scratch::new("unit");
    let root = s.0.clone();
    install(&root, &[]);
    let units = root.join("lib/systemd/system");
    // The test's tenant is uid 65534 (the shipped unit's is the sysusers
    // user vmm, which this host need not have).
    let unit = std::fs::read_to_string(units.join("vmm@.service"))
        .unwrap()
        .replace("\nUser=vmm\n", "\nUser=nobody\n")
        .replace("\nGroup=vmm\n", "\nGroup=nogroup\n");
    assert!(unit.contains("User=nobody") && unit.contains("Group=nogroup"));
    std::fs::write(units.join("vmm@.service"), unit).unwrap();
    // What a system has and these units rely on.
    for t in [
        "test",
        "sysinit",
        "basic",
        "shutdown",
        "sockets",
        "paths",
        "timers",
        "slices",
        "network",
        "multi-user",
        "local-fs",
    ] {
        std::fs::write(units.join(format!("{t}.target")), "[Unit]\n").unwrap();
    }
    std::fs::write(units.join("system.slice"), "[Unit]\n").unwrap();
    // No journald here: each service's output goes to a file the test reads.
    for u in ["vmm@", "netd"] {
        let d = units.join(format!("{u}.service.d"));
        std::fs::create_dir_all(&d).unwrap();
        let out = root.join(format!("{u}.out"));
        std::fs::write(
            d.join("test.conf"),
            format!(
                "[Service]\nStandardOutput=append:{o}\nStandardError=append:{o}\nEnvironment=RUST_LOG=info\n",
                o = out.display()
            ),
        )
        .unwrap();
    }
    std::fs::write(root.join("etc/netd/policy.ron"), TEST_POLICY).unwrap();
    let kernel = root.join("guest.elf");
    std::fs::copy(guest_elf(), &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        root.join("etc/vmm/test.conf"),
        format!(
            "VMM_KERNEL={}\nVMM_CMDLINE=\"testguest.ip={}/24 testguest.heartbeat=50\"\n\
             VMM_ARGS=\"--memory 128M --net netd=/run/netd.sock,id=vm0,mac={}\"\n",
            kernel.display(),
            guest_ip(1),
            guest_mac(1)
        ),
    )
    .unwrap();
    // The instance starts on the previous release's vmm when CI built it,
    // so the upgrade is one between releases; else on a copy of this one.
    let first = PreviousRelease::from_env()
        .map(|p| p.vmm)
        .unwrap_or_else(|_| bin("vmm"));
    install_binary(&first, &root.join("bin/vmm"));

    let m = Manager::start(
        &ns,
        &units,
        &format!("vmmtest-systemd-{}", std::process::id()),
    );
    m.systemctl_ok(&["start", "netd.socket", "vmm@test.service"]);
    let vmm_out = root.join("vmm@.out");
    let netd_out = root.join("netd.out");
    let logs = || {
        format!(
            "vmm@test: {}\nnetd: {}",
            std::fs::read_to_string(&vmm_out).unwrap_or_default(),
            std::fs::read_to_string(&netd_out).unwrap_or_default()
        )
    };
    assert!(
        wait_for(BOOT_TIMEOUT, || std::fs::read_to_string(&vmm_out)
            .unwrap_or_default()
            .contains("testguest: up boot_id=")),
        "{}",
        logs()
    );
    assert_eq!(
        m.show("netd.service", "ActiveState"),
        "active",
        "{}",
        logs()
    );
    assert!(
        std::fs::read_to_string(&netd_out)
            .unwrap_or_default()
            .contains("serving on the socket passed by the service manager"),
        "{}",
        logs()
    );
    ping_ok(&ns, 1);

    let api = "/run/vmm/test/api.sock";
    let vmctl = root.join("bin/vmctl");
    let status_pid = || -> String {
        let out = m.run(&[
            vmctl.to_str().unwrap(),
            "--api-socket",
            api,
            "status",
            "--json",
        ]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        v["pid"].to_string()
    };
    let exe_inode = |pid: &str| -> String {
        let out = m.run(&["stat", "-L", "-c", "%i", &format!("/proc/{pid}/exe")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let before = m.show("vmm@test.service", "MainPID");
    assert_ne!(before, "0");
    assert_eq!(status_pid(), before, "the unit's main process is the vmm");

    // A new vmm is installed; the running one keeps the old file.
    install_binary(&bin("vmm"), &root.join("bin/vmm"));
    let new_inode = std::fs::metadata(root.join("bin/vmm"))
        .unwrap()
        .ino()
        .to_string();
    assert_ne!(exe_inode(&before), new_inode);

    let ping = Ping::start(&ns, 1);
    assert!(wait_for(SETTLE, || ping_answered(&ns)), "no ping answers");
    std::thread::sleep(Duration::from_millis(500));
    let out = m.run(&[root.join("bin/vmm-upgrade").to_str().unwrap(), "test"]);
    assert!(
        out.status.success(),
        "vmm-upgrade: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    std::thread::sleep(Duration::from_secs(1));
    let pings = ping.stop();
    eprintln!(
        "upgrade from {}: {} ping: {pings:?}",
        first.display(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(pings.answered > 300, "{pings:?}");
    assert!(pings.missing.is_empty(), "ping replies lost: {pings:?}");

    let after = m.show("vmm@test.service", "MainPID");
    assert_eq!(
        m.show("vmm@test.service", "ActiveState"),
        "active",
        "{}",
        logs()
    );
    assert_ne!(after, "0");
    assert_ne!(after, before, "MainPID did not move to the new vmm");
    assert_eq!(
        status_pid(),
        after,
        "the unit tracks the vmm that owns the guest"
    );
    assert_eq!(
        exe_inode(&after),
        new_inode,
        "the new main process runs the new binary"
    );
    let gone = m.run(&["kill", "-0", &before]);
    assert!(
        !gone.status.success(),
        "the old vmm {before} is still there"
    );
    ping_ok(&ns, 1);

    // `systemctl reload netd`: the policy is read again; netd stays ready.
    m.systemctl_ok(&["reload", "netd.service"]);
    let audit = m.run(&["cat", "/var/log/netd/audit.log"]);
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("event=reload"),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    assert!(wait_for(SETTLE, || m.show("netd.service", "ActiveState") == "active"));

    // Stop: through `vmctl shutdown`, the vmm's exit 0, a clean result.
    m.systemctl_ok(&["stop", "vmm@test.service"]);
    assert_eq!(m.show("vmm@test.service", "ActiveState"), "inactive");
    assert_eq!(
        m.show("vmm@test.service", "Result"),
        "success",
        "{}",
        logs()
    );
    let text = std::fs::read_to_string(&vmm_out).unwrap();
    let upgraded_at = text.find("moved from pid").expect("the upgrade's line");
    eprintln!("{}", text[upgraded_at..].lines().next().unwrap_or(""));
    assert!(
        text[upgraded_at..].contains("VM stopped: ApiShutdown"),
        "the stop did not go through vmctl shutdown: {}",
        logs()
    );
    let gone = m.run(&["kill", "-0", &after]);
    assert!(!gone.status.success(), "the vmm {after} outlived its unit");
    m.systemctl_ok(&["stop", "netd.socket", "netd.service"]);
    assert_eq!(m.show("netd.service", "Result"), "success", "{}", logs());
}

fn ping_answered(ns: &NetNs) -> bool {
    ns.command(&["ping", "-c", "1", "-W", "1", &guest_ip(1).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
