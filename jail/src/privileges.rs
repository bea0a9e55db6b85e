//! Who an unprivileged process runs as. It refuses to run as root unless
//! told which user to become (`--user UID:GID`); it then drops to that user
//! as soon as it holds what only root could open (the vmm: /dev/kvm) and
//! before any guest- or peer-influenced work. The sandbox (capabilities,
//! no_new_privs, seccomp, Landlock) is layered around this.

use nix::unistd::{Gid, Uid, getgid, getuid, setgid, setgroups, setuid};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("refusing to run as root: pass --user UID:GID to run the VM as that user")]
    RootWithoutUser,
    #[error("refusing --user 0:0: the VM must run as an unprivileged user")]
    RootTarget,
    #[error("cannot drop to {uid}:{gid}: {what}: {err}")]
    Drop {
        uid: u32,
        gid: u32,
        what: &'static str,
        err: nix::Error,
    },
}

/// Checks the invocation before anything is opened.
pub fn check_invocation(user: Option<(u32, u32)>) -> Result<(), PrivilegeError> {
    match user {
        Some((0, _)) | Some((_, 0)) => Err(PrivilegeError::RootTarget),
        Some(_) => Ok(()),
        None if getuid().is_root() => Err(PrivilegeError::RootWithoutUser),
        None => Ok(()),
    }
}

/// Becomes `uid:gid` for good: no supplementary groups, then gid, then uid
/// (after setuid the other two would no longer be allowed). Verifies it.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    // Started unprivileged as that very user already: nothing to drop.
    if !getuid().is_root() && getuid().as_raw() == uid && getgid().as_raw() == gid {
        return Ok(());
    }
    let err = |what| {
        move |err| PrivilegeError::Drop {
            uid,
            gid,
            what,
            err,
        }
    };
    setgroups(&[]).map_err(err("setgroups"))?;
    setgid(Gid::from_raw(gid)).map_err(err("setgid"))?;
    setuid(Uid::from_raw(uid)).map_err(err("setuid"))?;
    if getuid().as_raw() != uid || getgid().as_raw() != gid || setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::Drop {
            uid,
            gid,
            what: "verify",
            err: nix::Error::EPERM,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_target_is_refused() {
        assert!(matches!(
            check_invocation(Some((0, 0))),
            Err(PrivilegeError::RootTarget)
        ));
        assert!(check_invocation(Some((65534, 65534))).is_ok());
    }
}
