//! Capabilities: the bounding set is cut while the process still holds
//! CAP_SETPCAP (before the uid drop), every other set after it.

use caps::CapSet;

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot clear the {set} capability set: {err}")]
    Clear {
        set: &'static str,
        err: caps::errors::CapsError,
    },
    #[error("capabilities still held after clearing them: {0}")]
    StillHeld(String),
}

/// Drops every capability from the bounding set, so that no later execve
/// or file capability can bring one back. Needs CAP_SETPCAP: call it while
/// still root. Returns how many could not be dropped (0 when all went, or
/// all of them when started unprivileged, where the kernel refuses).
pub fn drop_bounding_set() -> usize {
    let mut refused = 0;
    // The kernel answers EINVAL past its last capability.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ/DROP take an integer capability number and
        // touch no memory of ours.
        let held = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if held < 0 {
            break;
        }
        if held == 0 {
            continue;
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            refused += 1;
        }
    }
    if refused > 0 {
        log::debug!("{refused} capabilities stay in the bounding set (no CAP_SETPCAP)");
    }
    refused
}

/// How many capabilities the bounding set still holds.
pub fn bounding_set_len() -> usize {
    (0..64)
        // SAFETY: PR_CAPBSET_READ takes an integer and touches no memory.
        .map(|cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) })
        .take_while(|&r| r >= 0)
        .filter(|&r| r == 1)
        .count()
}

/// Started unprivileged, the bounding set can only be emptied from inside a
/// user namespace of our own, where we hold CAP_SETPCAP over ourselves. The
/// namespace maps our uid and gid to themselves (so files, netd's
/// SO_PEERCRED and /proc show the same ids); the capabilities it grants are
/// cleared right after by [`clear_all`]. Must run single-threaded. Best
/// effort: hosts may forbid unprivileged user namespaces.
pub fn drop_bounding_set_in_user_namespace() -> std::io::Result<()> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare takes flags only; the process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    match drop_bounding_set() {
        0 => Ok(()),
        n => Err(std::io::Error::other(format!(
            "{n} capabilities stay in the bounding set"
        ))),
    }
}

/// Clears the ambient, inheritable, effective and permitted sets of the
/// calling thread (the process is still single-threaded here) and checks
/// that nothing is left. An unprivileged process may always lower them.
pub fn clear_all() -> Result<(), CapsError> {
    for (set, name) in [
        (CapSet::Ambient, "ambient"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
    ] {
        caps::clear(None, set).map_err(|err| CapsError::Clear { set: name, err })?;
    }
    let mut left = Vec::new();
    for (set, name) in [
        (CapSet::Ambient, "ambient"),
        (CapSet::Inheritable, "inheritable"),
        (CapSet::Effective, "effective"),
        (CapSet::Permitted, "permitted"),
    ] {
        match caps::read(None, set) {
            Ok(s) if s.is_empty() => {}
            Ok(s) => left.push(format!("{name}: {s:?}")),
            Err(e) => left.push(format!("{name}: unreadable ({e})")),
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(CapsError::StillHeld(left.join("; ")))
    }
}
