//! The command line: `vhost-user-net --socket PATH --net netd=SOCK,id=ID[,queues=N]
//! [--user UID:GID] [--seccomp kill|log]`. `--net` is the vmm's option
//! (`common::net_config`), less the keys that only mean something to an
//! in-process device (`mac`: the frontend's device owns the MAC; `vhost`;
//! `backend-transfer`).

use std::ffi::OsString;
use std::path::PathBuf;

use common::net_config::{NetConfig, NetConfigError};

use crate::sandbox::SeccompMode;

pub const USAGE: &str = "\
usage: vhost-user-net --socket PATH --net netd=SOCK,id=ID[,queues=N] [--user UID:GID]
                      [--seccomp kill|log]
       vhost-user-net --version | --help

Gets the TAP ID's queue fds from netd (as its own user), sandboxes itself,
and serves one vhost-user frontend (the vmm, QEMU's -netdev vhost-user) on
PATH (a socket of mode 0600). A frontend may reconnect after it restarts.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub socket: PathBuf,
    pub net: NetConfig,
    pub user: Option<(u32, u32)>,
    pub seccomp: SeccompMode,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run(Args),
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("{0}")]
    Net(#[from] NetConfigError),
    #[error("--net: `{0}=` is not for a vhost-user backend (the frontend's device owns it)")]
    NotForBackend(&'static str),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0} given twice")]
    Duplicate(&'static str),
    #[error("{0} needs a value")]
    NoValue(String),
    #[error("--user {0:?}: expected UID:GID")]
    BadUser(String),
    #[error("--seccomp {0:?}: expected kill or log")]
    BadSeccomp(String),
    #[error("unknown argument {0:?} (see --help)")]
    Unknown(String),
}

fn parse_user(v: &str) -> Result<(u32, u32), ArgsError> {
    let bad = || ArgsError::BadUser(v.to_string());
    let (u, g) = v.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn set<T>(slot: &mut Option<T>, name: &'static str, v: T) -> Result<(), ArgsError> {
    if slot.replace(v).is_some() {
        return Err(ArgsError::Duplicate(name));
    }
    Ok(())
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, ArgsError> {
    let mut socket = None;
    let mut net = None;
    let mut user = None;
    let mut seccomp = None;
    let mut it = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| ArgsError::NoValue(flag.clone()))
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(Invocation::Help),
            "--version" | "-V" => return Ok(Invocation::Version),
            "--socket" => set(&mut socket, "--socket", PathBuf::from(value()?))?,
            "--net" => {
                let v = value()?;
                let cfg = NetConfig::parse(&v)?;
                for (key, given) in [
                    ("mac", v.split(',').any(|i| i.starts_with("mac="))),
                    ("vhost", cfg.vhost),
                    ("backend-transfer", !cfg.backend_transfer),
                ] {
                    if given {
                        return Err(ArgsError::NotForBackend(key));
                    }
                }
                set(&mut net, "--net", cfg)?
            }
            "--user" => set(&mut user, "--user", parse_user(&value()?)?)?,
            "--seccomp" => {
                let v = value()?;
                let mode = match v.as_str() {
                    "kill" => SeccompMode::Kill,
                    "log" => SeccompMode::Log,
                    _ => return Err(ArgsError::BadSeccomp(v)),
                };
                set(&mut seccomp, "--seccomp", mode)?
            }
            _ => return Err(ArgsError::Unknown(a)),
        }
    }
    Ok(Invocation::Run(Args {
        socket: socket.ok_or(ArgsError::Missing("--socket PATH"))?,
        net: net.ok_or(ArgsError::Missing("--net netd=SOCK,id=ID"))?,
        user,
        seccomp: seccomp.unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Invocation, ArgsError> {
        parse(s.split_whitespace().map(OsString::from))
    }

    #[test]
    fn full_and_minimal() {
        let Invocation::Run(a) =
            p("--socket /run/v.sock --net netd=/run/netd.sock,id=vm0,queues=2 --user 65534:65534")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(a.socket, PathBuf::from("/run/v.sock"));
        assert_eq!(a.net.id, "vm0");
        assert_eq!(a.net.queues, 2);
        assert_eq!(a.user, Some((65534, 65534)));
        assert_eq!(a.seccomp, SeccompMode::Kill);
        assert!(matches!(
            p("--socket=/s --net=netd=/n,id=vm1").unwrap(),
            Invocation::Run(Args { user: None, .. })
        ));
        assert_eq!(p("--help").unwrap(), Invocation::Help);
    }

    #[test]
    fn errors() {
        use ArgsError::*;
        assert_eq!(p("--net netd=/n,id=vm0"), Err(Missing("--socket PATH")));
        assert_eq!(p("--socket /s"), Err(Missing("--net netd=SOCK,id=ID")));
        assert_eq!(
            p("--socket /s --net netd=/n,id=vm0,mac=52:54:00:00:00:01"),
            Err(NotForBackend("mac"))
        );
        assert_eq!(
            p("--socket /s --net netd=/n,id=vm0,vhost=on"),
            Err(NotForBackend("vhost"))
        );
        assert!(matches!(p("--socket /s --net id=vm0"), Err(Net(_))));
        assert!(matches!(p("--socket /s --socket /t"), Err(Duplicate(_))));
        assert!(matches!(p("--socket"), Err(NoValue(_))));
        assert!(matches!(p("--socket /s --user 1"), Err(BadUser(_))));
        assert!(matches!(p("--bogus"), Err(Unknown(_))));
    }
}
