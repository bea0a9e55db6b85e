//! A running vmm child for tests: its serial output (stdout) collected line by
//! line with arrival times, stderr kept, and the process killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous: the CI machine has 2 loaded cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct VmmProcess {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl VmmProcess {
    /// Spawns `cmd` with piped stdout/stderr.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let l2 = lines.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push((Instant::now(), line));
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let e2 = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            e2.lock().unwrap().push_str(&s);
        });
        VmmProcess {
            child,
            lines,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// After the process exited: waits (bounded) until both pipes reached
    /// end of file, so that everything it wrote has been collected.
    fn drain_pipes(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines seen so far.
    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    pub fn output(&self) -> String {
        let l = self.lines.lock().unwrap();
        l.iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`; panics with the output so far
    /// after `timeout`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some((_, l)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return l.clone();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                self.drain_pipes();
                if let Some((_, l)) = self.lines().iter().find(|(_, l)| l.contains(needle)) {
                    return l.clone();
                }
                panic!(
                    "vmm exited ({st}) before printing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.output(),
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "no line {needle:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.output(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.drain_pipes();
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "vmm did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.output(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn group_id(name: &str) -> Option<u32> {
    let group = std::fs::read_to_string("/etc/group").ok()?;
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

/// The `kvm` group's gid, after checking that /dev/kvm is usable by it
/// (what distributions' udev rules set up; `.ci/run` does the same). Tests
/// never change /etc/group or /dev/kvm themselves: a host without that
/// set-up fails here, with the commands that fix it.
pub fn kvm_group() -> u32 {
    use std::os::unix::fs::MetadataExt;
    const FIX: &str =
        "set up the host as .ci/run does: groupadd -f kvm; chgrp kvm /dev/kvm; chmod 660 /dev/kvm";
    let gid = group_id("kvm").unwrap_or_else(|| panic!("there is no kvm group: {FIX}"));
    let m = std::fs::metadata("/dev/kvm").unwrap_or_else(|e| panic!("/dev/kvm: {e}"));
    assert!(
        m.gid() == gid && m.mode() & 0o060 == 0o060,
        "/dev/kvm is gid {} mode {:o}, not read-write for group kvm ({gid}): {FIX}",
        m.gid(),
        m.mode() & 0o7777
    );
    gid
}

/// A command that runs `program` as uid/gid 65534 with the kvm group.
pub fn as_nobody_with_kvm(program: &std::path::Path) -> Command {
    let gid = kvm_group();
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        &format!("--groups={gid}"),
        "--",
    ])
    .arg(program);
    c
}

/// VmRSS of a process in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A vmm that refused its input: exit 2, one line on stderr naming
/// `needle`, no panic (a signal would mean a panic/abort or seccomp).
pub fn assert_refused(what: &str, st: std::process::ExitStatus, stderr: &str, needle: &str) {
    assert_eq!(
        st.code(),
        Some(2),
        "{what}: {st} (a signal: panic/abort or seccomp); stderr: {stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: not one line: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{what}: {stderr:?} lacks {needle:?}"
    );
}

/// A FIFO at `p` that uid 65534 may open (mkfifo applies the umask).
pub fn mkfifo(p: &std::path::Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("a path has no NUL");
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0, "mkfifo");
    let st = std::process::Command::new("chmod")
        .arg("666")
        .arg(p)
        .status()
        .expect("run chmod");
    assert!(st.success());
}
