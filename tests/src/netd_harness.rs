//! A real netd in a network namespace of its own, for tests and benchmarks:
//! temporary socket, policy and audit log; SIGTERM on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::NetNs;

/// The uid/gid of unprivileged test clients ("nobody"/"nogroup").
pub const NOBODY: u32 = 65534;

/// A policy like the default one (uid 65534, prefix "vm", bridge vmbr0),
/// plus root as tenant "s" (for in-process soak clients) and gid 4343 as a
/// tenant without vhost.
pub const TEST_POLICY: &str = r#"(
    bridges: [(name: "vmbr0", address: Some("10.0.1.1/24"))],
    tenants: [
        (who: Uid(65534), names: Prefix("vm"), max_queues: 4, vhost: true, attach: Bridge("vmbr0")),
        (who: Uid(0), names: Prefix("s"), max_queues: 4, vhost: true, attach: Bridge("vmbr0")),
        (who: Gid(4343), names: Pattern("nv*"), max_queues: 1, vhost: false, attach: Routed("10.0.9.1/30")),
    ],
)"#;

pub struct Netd {
    pub ns: NetNs,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub audit: PathBuf,
    child: Child,
    /// Removes `dir` after netd has stopped (fields drop after `drop`).
    _tmp: crate::TempDir,
}

impl Netd {
    /// Starts `netd_bin` with `policy` and `extra` options in a new namespace
    /// and waits until its socket accepts connections.
    pub fn start(netd_bin: &Path, tag: &str, policy: &str, extra: &[&str]) -> Netd {
        let ns = NetNs::new(tag);
        // Removed on drop, also when netd fails to start.
        let tmp = crate::TempDir::new(&format!("netd-{tag}"));
        let dir = tmp.0.clone();
        let socket = dir.join("netd.sock");
        let audit = dir.join("audit.log");
        let policy_path = dir.join("policy.ron");
        std::fs::write(&policy_path, policy).expect("write policy");
        let mut cmd = ns.command(&[netd_bin.to_str().expect("utf-8 path")]);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(&policy_path)
            .arg("--audit-log")
            .arg(&audit)
            .args(extra)
            .stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn netd");
        let mut netd = Netd {
            ns,
            dir,
            socket,
            audit,
            child,
            _tmp: tmp,
        };
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&netd.socket).is_err() {
            if let Ok(Some(st)) = netd.child.try_wait() {
                panic!("netd exited early: {st}");
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "netd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        netd
    }

    /// netd's pid (`ip netns exec` execs it, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The targets of netd's open fds.
    pub fn fd_targets(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&dir)
            .expect("read netd's fd table")
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }

    /// Interface names in netd's namespace.
    pub fn links(&self) -> Vec<String> {
        self.ns
            .exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Sends SIGTERM and returns netd's exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Copies a binary into a directory uid 65534 can reach (the build tree may
/// not be).
pub fn world_exec_copy(bin: &Path, dir: &Path) -> PathBuf {
    let name = bin.file_name().expect("binary has a name");
    let dst = dir.join(name);
    if !dst.exists() {
        crate::copy_executable(bin, &dst);
    }
    dst
}

/// A running `netd_probe tap ... hold`: holds the TAP until dropped or
/// released.
pub struct HeldTap {
    pub reply: serde_json::Value,
    child: Child,
    stdin: Option<ChildStdin>,
    _stdout: BufReader<ChildStdout>,
}

impl HeldTap {
    /// Closes the probe's stdin, making it drop its fds and exit; kills it
    /// if it has not exited within 20 s.
    pub fn release(mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Drop kills it if it is still there.
    }
}

impl Drop for HeldTap {
    fn drop(&mut self) {
        self.stdin.take();
        crate::kill_and_reap(&mut self.child);
    }
}

/// Runs the probe as `uid`:`gid` and returns its JSON line.
pub fn probe(probe_bin: &Path, uid: u32, gid: u32, args: &[&str]) -> serde_json::Value {
    use std::os::unix::process::CommandExt;
    let out = Command::new(probe_bin)
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("run netd_probe");
    assert!(
        out.status.success(),
        "netd_probe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("probe output {text:?}: {e}"))
}

/// Runs `netd_probe tap NET hold` as `uid`:`gid` and waits for its reply.
pub fn probe_hold(probe_bin: &Path, uid: u32, gid: u32, net: &str) -> HeldTap {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(probe_bin)
        .args(["tap", net, "hold"])
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn netd_probe");
    let stdin = child.stdin.take();
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read probe reply");
    let reply =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("probe output {line:?}: {e}"));
    HeldTap {
        reply,
        child,
        stdin,
        _stdout: stdout,
    }
}

pub use crate::wait_for;

/// Says Hello on a fresh netd connection and checks netd's Hello answer
/// (this protocol version).
pub fn hello(s: &std::os::unix::net::UnixStream) {
    use common::codec;
    use common::netd::{NETD_MAX_FRAME, NETD_PROTOCOL_VERSION, NetdRequest, NetdResponse};
    codec::send(
        s,
        &NetdRequest::Hello {
            version: NETD_PROTOCOL_VERSION,
        },
        &[],
    )
    .expect("send Hello");
    let r: codec::Received<NetdResponse> =
        codec::recv(s, NETD_MAX_FRAME, 0).expect("netd's Hello answer");
    assert_eq!(
        r.msg,
        NetdResponse::Hello {
            version: NETD_PROTOCOL_VERSION
        }
    );
}
