//! The workspace's `vhost-user-net` backend as tests and benchmarks start
//! it (on a TAP that netd hands it, dropped to uid 65534), and the command
//! lines of its two frontends: QEMU microvm (guest RAM in a shared memfd)
//! and the vmm (`--net vhost-user=`). One definition for
//! tests/tests/vhost_user_net.rs and bench_net.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::migration_harness::Proc;
use crate::net_guest::{QEMU, QEMU_MICROVM_ARGS, guest_ip, guest_mac};
use crate::netd_harness::{NOBODY, Netd};
use crate::vmm_process::{VmmProcess, kvm_group};
use crate::{bin, guest_elf};

/// Until the backend logs that it serves its TAP.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running backend (killed on drop), its socket and its log (stderr).
pub struct Backend {
    p: Proc,
    pub sock: PathBuf,
}

impl Backend {
    /// `vhost-user-net` as root with `--user 65534:65534`, on TAP `tap`
    /// from `netd`, serving `dir/<tap>.sock`; returns once it serves.
    pub fn start(netd: &Netd, dir: &Path, tap: &str, queues: u16) -> Backend {
        let b = Backend::spawn(netd, dir, tap, queues);
        b.wait_serving();
        b
    }

    /// [`Backend::start`] without waiting (a caller that must note the pid
    /// first, then calls [`Backend::wait_serving`]).
    pub fn spawn(netd: &Netd, dir: &Path, tap: &str, queues: u16) -> Backend {
        let sock = dir.join(format!("{tap}.sock"));
        let mut c = Command::new(bin("vhost-user-net"));
        c.arg("--socket")
            .arg(&sock)
            .args([
                "--net",
                &format!("netd={},id={tap},queues={queues}", netd.socket.display()),
                "--user",
                &format!("{NOBODY}:{NOBODY}"),
            ])
            // Connections and refusals only: nothing per frame.
            // `VU_LOG=debug` raises it for a failing test.
            .env("RUST_LOG", std::env::var("VU_LOG").unwrap_or("info".into()));
        Backend {
            p: Proc::spawn(c),
            sock,
        }
    }

    /// Waits until the backend has its TAP and listens on its socket.
    pub fn wait_serving(&self) {
        self.wait_log("serving TAP", START_TIMEOUT);
    }

    pub fn pid(&self) -> u32 {
        self.p.pid()
    }

    pub fn log(&self) -> String {
        self.p.stderr()
    }

    /// Whether the process runs (exited but not reaped counts as gone).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }

    /// Waits until the log has `needle`; panics with the log otherwise.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        self.wait_log_count(needle, 1, timeout);
    }

    /// Waits until `needle` appears `n` times in the log; panics with the
    /// log when the backend exits or `timeout` passes first.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        let t0 = Instant::now();
        while self.log().matches(needle).count() < n {
            assert!(
                self.alive(),
                "backend exited before logging {needle:?} {n} times:\n{}",
                self.log()
            );
            assert!(
                t0.elapsed() < timeout,
                "backend logged {needle:?} fewer than {n} times:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The targets of the backend's fds.
    pub fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("backend fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }
}

/// QEMU microvm as uid 65534 (kvm group) with the test guest `n`, RAM in
/// a shared memfd, its virtio-net device on the backend at `sock`
/// (`-chardev socket` + `-netdev vhost-user`; `mq=on` past one pair).
pub fn qemu_frontend_command(sock: &Path, n: u8, queues: u16) -> Command {
    let gid = kvm_group();
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        &format!("--groups={gid}"),
        "--",
        QEMU,
    ])
    .args(QEMU_MICROVM_ARGS);
    let (nq, mq) = if queues > 1 {
        (format!(",queues={queues}"), ",mq=on")
    } else {
        (String::new(), "")
    };
    c.args([
        "-machine",
        "memory-backend=mem",
        "-object",
        "memory-backend-memfd,id=mem,size=128M,share=on",
        "-m",
        "128M",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-chardev",
        &format!("socket,id=c0,path={}", sock.display()),
        "-netdev",
        &format!("vhost-user,id=n0,chardev=c0{nq}"),
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={}{mq}", guest_mac(n)),
        "-append",
        &format!("testguest.ip={}/24", guest_ip(n)),
        "-kernel",
    ])
    .arg(guest_elf());
    c
}

/// [`qemu_frontend_command`] started; returns once the guest is up.
pub fn start_qemu_frontend(sock: &Path, n: u8, queues: u16, timeout: Duration) -> VmmProcess {
    let mut q = VmmProcess::spawn(qemu_frontend_command(sock, n, queues));
    q.wait_for_line("testguest: up boot_id=", timeout);
    q
}

/// The release vmm, as root with `--user 65534:65534`, with the test guest
/// `n` and its NIC `id` on the backend at `sock` (`--net vhost-user=`).
pub fn vmm_frontend_command(sock: &Path, id: &str, n: u8, queues: u16) -> Command {
    let mut c = Command::new(bin("vmm"));
    let mut net = format!("vhost-user={},id={id},mac={}", sock.display(), guest_mac(n));
    if queues > 1 {
        net.push_str(&format!(",queues={queues}"));
    }
    c.args(["--user", &format!("{NOBODY}:{NOBODY}")])
        .arg("--kernel")
        .arg(guest_elf())
        .args(["--cmdline", &format!("testguest.ip={}/24", guest_ip(n))])
        .args(["--net", &net]);
    c
}
