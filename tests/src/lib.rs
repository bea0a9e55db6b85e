//! Helpers shared by the integration tests and benchmarks: where the built
//! binaries and the test guest are, and network namespaces that clean up.

pub mod vmm_process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

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
/// test command builds them first; a missing one is a setup error.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("release").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --workspace` first (the README's test command does)",
        p.display()
    );
    p
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
pub mod migration_harness;
pub mod net_guest;
pub mod netd_harness;
pub mod rng;
