//! Landlock: after start-up the VMM may touch only the files it was told
//! about. Reading is limited to the kernel image (and /proc/meminfo, for the
//! host memory check), writing to the serial file, and the API socket's
//! directory may get the socket and lose it again at exit. No TCP at all,
//! no abstract UNIX sockets, no signals to other processes. Best effort: on a
//! kernel without Landlock (or an older ABI) this logs what is not enforced.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};

/// The ABI whose rights are handled. Fixed (not "the newest the crate
/// knows"): a newer ABI adds rights such as connecting to named UNIX
/// sockets, which vmm needs for netd and which no rule here grants.
const HANDLED_ABI: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("Landlock ruleset: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What the running VMM may still touch on the filesystem.
#[derive(Debug, Default, Clone)]
pub struct FsPlan {
    /// Regular files it reads (the kernel image).
    pub read_files: Vec<PathBuf>,
    /// Regular files it writes (the serial file). Created empty here when
    /// missing, so the rule can name the file itself, not its directory.
    pub write_files: Vec<PathBuf>,
    /// UNIX sockets it creates and removes (the API socket): their
    /// directories get MakeSock and RemoveFile.
    pub sockets: Vec<PathBuf>,
}

/// How far the restriction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockStatus {
    Full,
    Partial,
    NotSupported,
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Restricts the calling thread and every thread it creates later; call it
/// while the process is single-threaded.
pub fn restrict(plan: &FsPlan) -> Result<LandlockStatus, LandlockError> {
    let read = AccessFs::ReadFile;
    let write: BitFlags<AccessFs> = AccessFs::WriteFile | AccessFs::Truncate;
    let socket_dir: BitFlags<AccessFs> = AccessFs::MakeSock | AccessFs::RemoveFile;

    let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
    for f in &plan.read_files {
        rules.push((f.clone(), read.into()));
    }
    // The host memory check reads it after the sandbox is up.
    rules.push((PathBuf::from("/proc/meminfo"), read.into()));
    for f in &plan.write_files {
        // O_CREAT without O_TRUNC: an existing file keeps its content until
        // the serial device opens it for real.
        // Non-blocking and kind-checked: a FIFO must not hang start-up.
        if let Err(e) = crate::inputs::open_serial(f, false) {
            log::debug!("cannot pre-create {}: {e}", f.display());
        }
        rules.push((f.clone(), write));
    }
    for s in &plan.sockets {
        rules.push((parent_dir(s), socket_dir));
    }

    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED_ABI))?
        .handle_access(AccessNet::from_all(HANDLED_ABI))?
        .scope(Scope::from_all(HANDLED_ABI))?
        .create()?;
    for (path, access) in rules {
        // A path that does not exist cannot be used later either: the
        // operation fails with its own clear error (ENOENT) then.
        match PathFd::new(&path) {
            Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?,
            Err(e) => log::debug!("Landlock: no rule for {}: {e}", path.display()),
        }
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::Full,
        RulesetStatus::PartiallyEnforced => {
            log::info!("Landlock is only partly enforced by this kernel");
            LandlockStatus::Partial
        }
        RulesetStatus::NotEnforced => {
            log::info!("Landlock is not supported by this kernel: no filesystem sandbox");
            LandlockStatus::NotSupported
        }
    })
}
