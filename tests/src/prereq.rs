//! What a test needs from the host beyond KVM and root, and what happens
//! when it is missing: the test fails where the prerequisite is promised
//! (`REQUIRE_<NAME>=1`, which `.ci/run` sets for everything its host has),
//! and elsewhere it is skipped loudly, never silently.
//!
//! A skip is written straight to the process's stderr (fd 2), which the test
//! harness does not capture, so it shows even for a test reported `ok`; and
//! appended to the file named by `TESTS_SKIP_LOG` when that is set, so that
//! `.ci/run` can list every skip of a run.

use std::io::Write;
use std::process::{Command, Stdio};

/// ACPICA's compiler and disassembler.
pub const IASL: &str = "iasl";

/// A host feature some tests depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prerequisite {
    /// `qemu-system-x86_64` (the reference VMM) is installed.
    Qemu,
    /// `/dev/vhost-net` exists (CONFIG_VHOST_NET); the project's CI host has
    /// none (HOST.md), so CI does not promise it.
    VhostNet,
    /// uid 65534 may create a user namespace (vmm empties its capability
    /// bounding set inside one when started unprivileged).
    UserNamespaces,
    /// The previous release's `vmm` and `vmctl`, built by `.ci/run` and
    /// named by `PREVIOUS_VMM` and `PREVIOUS_VMCTL` (the upgrade test).
    PreviousRelease,
    /// ACPICA's `iasl` (Debian's acpica-tools), which checks the ACPI
    /// tables the vmm builds.
    Iasl,
}

/// The previous release's binaries, from `PREVIOUS_VMM` and
/// `PREVIOUS_VMCTL`.
#[derive(Clone, Debug)]
pub struct PreviousRelease {
    pub vmm: std::path::PathBuf,
    pub vmctl: std::path::PathBuf,
}

impl PreviousRelease {
    /// Both binaries, or why they are not there.
    pub fn from_env() -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let exe = |var: &str| {
            let p = std::env::var_os(var).ok_or_else(|| {
                format!(
                    "{var} is not set (build the previous release's vmm and vmctl \
                     as .ci/run does and name them in PREVIOUS_VMM and PREVIOUS_VMCTL)"
                )
            })?;
            let p = std::path::PathBuf::from(p);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(p),
                Ok(_) => Err(format!("{var}={} is not an executable file", p.display())),
                Err(e) => Err(format!("{var}={}: {e}", p.display())),
            }
        };
        Ok(PreviousRelease {
            vmm: exe("PREVIOUS_VMM")?,
            vmctl: exe("PREVIOUS_VMCTL")?,
        })
    }
}

impl Prerequisite {
    /// The environment variable that promises it.
    pub fn env(self) -> &'static str {
        match self {
            Self::Qemu => "REQUIRE_QEMU",
            Self::VhostNet => "REQUIRE_VHOST_NET",
            Self::UserNamespaces => "REQUIRE_USERNS",
            Self::PreviousRelease => "REQUIRE_PREVIOUS",
            Self::Iasl => "REQUIRE_IASL",
        }
    }

    /// Why it is missing on this host, or `None` when it is there.
    pub fn missing(self) -> Option<String> {
        match self {
            Self::Qemu => {
                let ok = Command::new(crate::net_guest::QEMU)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                (!ok).then(|| {
                    format!(
                        "{} is not installed (apt-get install qemu-system-x86)",
                        crate::net_guest::QEMU
                    )
                })
            }
            Self::VhostNet => (!std::path::Path::new("/dev/vhost-net").exists()).then(|| {
                "/dev/vhost-net is absent (kernel without CONFIG_VHOST_NET): \
                 the vhost-net backend is not verified on this host"
                    .to_string()
            }),
            Self::UserNamespaces => {
                let ok = Command::new("setpriv")
                    .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                    .args(["unshare", "-U", "true"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                (!ok).then(|| "uid 65534 may not create a user namespace here".to_string())
            }
            Self::PreviousRelease => PreviousRelease::from_env().err(),
            Self::Iasl => {
                // `iasl -v` prints its banner and exits 0.
                let ok = Command::new(IASL)
                    .arg("-v")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                (!ok).then(|| format!("{IASL} is not installed (apt-get install acpica-tools)"))
            }
        }
    }

    /// Whether this run promised it (`REQUIRE_<NAME>=1`).
    pub fn promised(self) -> bool {
        std::env::var(self.env()).is_ok_and(|v| v == "1")
    }
}

/// True when `p` is available. Otherwise: panics when the run promised it,
/// else reports the skip of `what` (the test, or the part of it that cannot
/// run) loudly and returns false, so that the caller skips that part.
pub fn require_or_skip(p: Prerequisite, what: &str) -> bool {
    let Some(reason) = p.missing() else {
        return true;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string();
    assert!(
        !p.promised(),
        "{test}: {what} needs {p:?}, which {}=1 promises, but {reason}",
        p.env()
    );
    report_skip(&format!(
        "{test}: {what}: {reason} (set {}=1 to make this a failure)",
        p.env()
    ));
    false
}

/// Writes `SKIP <line>` where the harness does not hide it (fd 2) and to
/// `$TESTS_SKIP_LOG`.
pub fn report_skip(line: &str) {
    let line = format!("SKIP {line}\n");
    // Not eprintln!: the harness captures that for passing tests.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("TESTS_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!("cannot append to TESTS_SKIP_LOG {path:?}: {e}");
        }
    }
}
