//! Helpers shared by the integration tests and benchmarks: where the built
//! binaries and the test guest are, and network namespaces that clean up.

pub mod guest_lines;
pub mod prereq;
pub mod vmm_process;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The workspace root (the folder holding the top Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target directory this crate was built into.
pub fn target_dir() -> PathBuf {
    PathBuf::from(env!("TESTS_TARGET_DIR"))
}

/// A release binary of the workspace (`vmm`, `netd`, `vmctl`). The README's
/// test command builds them first; a missing binary, or one older than a
/// source file it was built from (cargo's dep-info `<name>.d` beside it), is a
/// setup error: a plain `cargo test` must not run stale binaries.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("release").join(name);
    const BUILD: &str =
        "run `cargo build --release --workspace` first (the README's test command does)";
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}: {BUILD}", p.display()));
    if let Some(newer) = stale_because(&p.with_extension("d"), built) {
        panic!("{} is older than {}: {BUILD}", p.display(), newer.display());
    }
    p
}

/// The first source named in the dep-info file `dep_info` that changed after
/// `built` (a source that vanished counts as changed).
fn stale_because(dep_info: &Path, built: std::time::SystemTime) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dep_info).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (cargo writes it with the binary)",
            dep_info.display()
        )
    });
    let first = text.lines().next().unwrap_or_default();
    let deps = first.split_once(": ").map_or("", |(_, d)| d);
    // Paths are separated by spaces; a space inside a path is `\ `.
    let deps = deps.replace("\\ ", "\u{0}");
    deps.split(' ')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d.replace('\u{0}', " ")))
        .find(|d| {
            std::fs::metadata(d)
                .and_then(|m| m.modified())
                .map_or(true, |t| t > built)
        })
}

/// The test guest ELF, built by this crate's build script.
pub fn guest_elf() -> PathBuf {
    target_dir().join("guest").join("testguest.elf")
}

/// The all-assembly PVH guest (tests/guest/trivial.rs): one serial byte at
/// entry, long mode, a line, power-off through port 0x501.
pub fn trivial_elf() -> PathBuf {
    target_dir().join("guest").join("trivial.elf")
}

static TEMP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A scratch directory of the test's own under the system temp dir, mode
/// 0777 (a vmm running as uid 65534 puts its API socket and serial log
/// there), removed on drop, so also when the test fails.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vmmtest-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the executable `src` to `dst` with mode 0755, in a child
/// process (`install`), so that this process never holds a writable fd on
/// it: a child another test thread forks meanwhile would inherit that fd
/// until its exec, and running `dst` in that window fails with ETXTBSY
/// ("Text file busy"; CI failed once on it).
pub fn copy_executable(src: &Path, dst: &Path) {
    let status = Command::new("install")
        .args(["-m", "0755"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run install: {e}"));
    assert!(
        status.success(),
        "install {} {}: {status}",
        src.display(),
        dst.display()
    );
}

/// Runs `cmd` (stdin closed, output collected) and waits at most `timeout`:
/// past it the child is killed and the test fails with what it printed.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    // Pipes drained on threads of their own, so that a chatty child cannot
    // block on a full pipe and stall past the deadline.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                kill_and_reap(&mut child);
                panic!(
                    "{cmd:?} did not finish within {timeout:?}; stdout: {} stderr: {}",
                    String::from_utf8_lossy(&out.join().unwrap_or_default()),
                    String::from_utf8_lossy(&err.join().unwrap_or_default())
                );
            }
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Kills `child` (if still running) and reaps it; for Drop guards.
pub fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes;
/// returns whether it held.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace of the test's own, deleted on drop (also on panic).
/// Names are unique per process and test, so parallel tests never collide.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let n = NETNS_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}-{}-{}", std::process::id(), tag, n);
        let st = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(st.is_ok_and(|s| s.success()), "ip netns add {name} failed");
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and asserts it succeeded.
    pub fn exec(&self, argv: &[&str]) -> String {
        let out = self
            .command(argv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
/// `name --version` prints exactly `version_line` and exits 0; `name
/// --help` exits 0 and lists each of `flags` (and `--version`).
pub fn assert_version_and_help(name: &str, version_line: &str, flags: &[&str]) {
    let run = |arg: &str| {
        let out = Command::new(bin(name)).arg(arg).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{name} {arg}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(run("--version"), format!("{version_line}\n"));
    let help = run("--help");
    for flag in flags.iter().chain(&["--version"]) {
        assert!(help.contains(flag), "{name} --help lacks {flag}: {help}");
    }
}

pub mod echo_stream;
pub mod hostile;
pub mod leftovers;
pub mod migration_harness;
pub mod net_guest;
pub mod netd_harness;
pub mod qmp;
pub mod relay;
pub mod rng;
pub mod stats;
pub mod vhost_user;
