//! The `--net` option of vmm, in one of two forms:
//! - `netd=SOCK,id=ID[,mac=MAC][,queues=N][,vhost=on|off][,backend-transfer=on|off]`:
//!   the vmm's own virtio-net device on a TAP from netd. `id` is the TAP
//!   interface name asked of netd (the policy decides which names a tenant
//!   may use, e.g. `vm0`).
//! - `vhost-user=PATH,id=ID[,mac=MAC][,queues=N]`: the datapath runs in a
//!   vhost-user backend (e.g. `vhost-user-net`) listening on PATH; `id`
//!   names the NIC. Its connection always moves with a local migration.

use std::path::{Path, PathBuf};

/// Most queues the option accepts; netd's policy usually allows fewer.
pub const MAX_NET_QUEUES: u16 = 16;

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// A TAP that netd (listening on this socket) opens for the tenant.
    Netd(PathBuf),
    /// A vhost-user backend listening on this socket.
    VhostUser(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackendSpec,
    /// TAP interface name for netd (also the device's id); the NIC's name
    /// for vhost-user.
    pub id: String,
    /// Guest MAC; `None` lets the VMM pick one.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (one TAP fd per queue); default 1.
    pub queues: u16,
    /// Ask netd for vhost-net fds; default off (netd only).
    pub vhost: bool,
    /// On local migration, hand the TAP fds to the target (default on); off
    /// makes the target ask netd itself.
    pub backend_transfer: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("--net: missing `{0}=`")]
    Missing(&'static str),
    #[error(
        "--net: unknown key {0:?} (known: netd, vhost-user, id, mac, queues, vhost, backend-transfer)"
    )]
    UnknownKey(String),
    #[error("--net: `{0}=` is for netd NICs, not vhost-user ones")]
    NotForVhostUser(&'static str),
    #[error("--net: give one of `netd=` and `vhost-user=`")]
    TwoBackends,
    #[error("--net: `{0}` given twice")]
    Duplicate(String),
    #[error("--net: item {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("--net: {key}={value:?}: {reason}")]
    BadValue {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

fn on_off(key: &'static str, v: &str) -> Result<bool, NetConfigError> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(NetConfigError::BadValue {
            key,
            value: v.to_string(),
            reason: "expected on or off",
        }),
    }
}

/// A socket path value: anything but empty.
fn socket_path(key: &'static str, v: &str) -> Result<PathBuf, NetConfigError> {
    if v.is_empty() {
        return Err(NetConfigError::BadValue {
            key,
            value: String::new(),
            reason: "empty socket path",
        });
    }
    Ok(PathBuf::from(v))
}

/// Parses `aa:bb:cc:dd:ee:ff` (a unicast, non-zero address).
pub fn parse_mac(v: &str) -> Result<[u8; 6], NetConfigError> {
    let bad = |reason| NetConfigError::BadValue {
        key: "mac",
        value: v.to_string(),
        reason,
    };
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for b in mac.iter_mut() {
        let p = parts
            .next()
            .ok_or_else(|| bad("expected six hex bytes aa:bb:cc:dd:ee:ff"))?;
        if p.len() != 2 {
            return Err(bad("expected six hex bytes aa:bb:cc:dd:ee:ff"));
        }
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| bad("expected six hex bytes aa:bb:cc:dd:ee:ff"))?;
    }
    if parts.next().is_some() {
        return Err(bad("expected six hex bytes aa:bb:cc:dd:ee:ff"));
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(bad("must be a unicast, non-zero address"));
    }
    Ok(mac)
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<Self, NetConfigError> {
        let mut netd = None;
        let mut vhost_user = None;
        let mut id = None;
        let mut mac = None;
        let mut queues = None;
        let mut vhost = None;
        let mut backend_transfer = None;
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(item.to_string()))?;
            fn set<T>(slot: &mut Option<T>, k: &str, v: T) -> Result<(), NetConfigError> {
                if slot.replace(v).is_some() {
                    return Err(NetConfigError::Duplicate(k.to_string()));
                }
                Ok(())
            }
            match k {
                "netd" => set(&mut netd, k, socket_path("netd", v)?)?,
                "vhost-user" => set(&mut vhost_user, k, socket_path("vhost-user", v)?)?,
                "id" => {
                    let ok = !v.is_empty()
                        && v.len() <= 15
                        && v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                    if !ok {
                        return Err(NetConfigError::BadValue {
                            key: "id",
                            value: v.to_string(),
                            reason: "an interface name: 1..15 characters of [A-Za-z0-9._-]",
                        });
                    }
                    set(&mut id, k, v.to_string())?
                }
                "mac" => set(&mut mac, k, parse_mac(v)?)?,
                "queues" => {
                    let n = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=MAX_NET_QUEUES).contains(n))
                        .ok_or(NetConfigError::BadValue {
                            key: "queues",
                            value: v.to_string(),
                            reason: "expected 1..=16",
                        })?;
                    set(&mut queues, k, n)?
                }
                "vhost" => set(&mut vhost, k, on_off("vhost", v)?)?,
                "backend-transfer" => {
                    set(&mut backend_transfer, k, on_off("backend-transfer", v)?)?
                }
                _ => return Err(NetConfigError::UnknownKey(k.to_string())),
            }
        }
        let backend = match (netd, vhost_user) {
            (Some(_), Some(_)) => return Err(NetConfigError::TwoBackends),
            (Some(sock), None) => NetBackendSpec::Netd(sock),
            (None, Some(sock)) => {
                if vhost.is_some() {
                    return Err(NetConfigError::NotForVhostUser("vhost"));
                }
                if backend_transfer.is_some() {
                    return Err(NetConfigError::NotForVhostUser("backend-transfer"));
                }
                NetBackendSpec::VhostUser(sock)
            }
            (None, None) => return Err(NetConfigError::Missing("netd")),
        };
        Ok(NetConfig {
            backend,
            id: id.ok_or(NetConfigError::Missing("id"))?,
            mac,
            queues: queues.unwrap_or(1),
            vhost: vhost.unwrap_or(false),
            backend_transfer: backend_transfer.unwrap_or(true),
        })
    }
}

impl NetConfig {
    /// netd's socket, for a NIC whose TAP comes from netd.
    pub fn netd_socket(&self) -> Option<&Path> {
        match &self.backend {
            NetBackendSpec::Netd(p) => Some(p),
            NetBackendSpec::VhostUser(_) => None,
        }
    }

    /// The backend's socket, for a vhost-user NIC.
    pub fn vhost_user_socket(&self) -> Option<&Path> {
        match &self.backend {
            NetBackendSpec::VhostUser(p) => Some(p),
            NetBackendSpec::Netd(_) => None,
        }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = NetConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NetConfig::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_full() {
        let c = NetConfig::parse("netd=/run/netd.sock,id=vm0").unwrap();
        assert_eq!(
            c,
            NetConfig {
                backend: NetBackendSpec::Netd("/run/netd.sock".into()),
                id: "vm0".into(),
                mac: None,
                queues: 1,
                vhost: false,
                backend_transfer: true,
            }
        );
        let c = NetConfig::parse(
            "id=vm1,netd=/s,mac=52:54:00:12:34:5a,queues=4,vhost=on,backend-transfer=off",
        )
        .unwrap();
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x5a]));
        assert_eq!(c.queues, 4);
        assert!(c.vhost);
        assert!(!c.backend_transfer);
    }

    #[test]
    fn vhost_user() {
        let c = NetConfig::parse("vhost-user=/run/vu.sock,id=n0,mac=52:54:00:12:34:5a,queues=2")
            .unwrap();
        assert_eq!(c.vhost_user_socket(), Some(Path::new("/run/vu.sock")));
        assert_eq!(c.netd_socket(), None);
        assert_eq!(c.queues, 2);
        assert!(c.backend_transfer && !c.vhost);
        use NetConfigError::*;
        assert_eq!(
            NetConfig::parse("vhost-user=/s,netd=/n,id=n0"),
            Err(TwoBackends)
        );
        assert_eq!(
            NetConfig::parse("vhost-user=/s,id=n0,vhost=on"),
            Err(NotForVhostUser("vhost"))
        );
        assert_eq!(
            NetConfig::parse("vhost-user=/s,id=n0,backend-transfer=off"),
            Err(NotForVhostUser("backend-transfer"))
        );
        assert!(matches!(
            NetConfig::parse("vhost-user=,id=n0"),
            Err(BadValue { .. })
        ));
    }

    #[test]
    fn errors() {
        use NetConfigError::*;
        assert_eq!(NetConfig::parse("id=vm0"), Err(Missing("netd")));
        assert_eq!(NetConfig::parse("netd=/s"), Err(Missing("id")));
        assert!(
            matches!(NetConfig::parse("netd=/s,id=vm0,foo=1"), Err(UnknownKey(k)) if k == "foo")
        );
        assert!(matches!(
            NetConfig::parse("netd=/s,id=vm0,id=vm1"),
            Err(Duplicate(_))
        ));
        assert!(matches!(
            NetConfig::parse("netd=/s,id=vm0,vhost"),
            Err(NotKeyValue(_))
        ));
        assert!(matches!(NetConfig::parse(""), Err(NotKeyValue(_))));
        for bad in [
            "netd=,id=vm0",
            "netd=/s,id=",
            "netd=/s,id=0123456789abcdef",
            "netd=/s,id=vm/0",
            "netd=/s,id=vm0,queues=0",
            "netd=/s,id=vm0,queues=17",
            "netd=/s,id=vm0,queues=x",
            "netd=/s,id=vm0,vhost=yes",
            "netd=/s,id=vm0,backend-transfer=1",
            "netd=/s,id=vm0,mac=52:54:00:12:34",
            "netd=/s,id=vm0,mac=52:54:00:12:34:5a:00",
            "netd=/s,id=vm0,mac=52:54:00:12:34:zz",
            "netd=/s,id=vm0,mac=01:00:5e:00:00:01",
            "netd=/s,id=vm0,mac=00:00:00:00:00:00",
            "netd=/s,id=vm0,mac=5:54:00:12:34:5a",
        ] {
            assert!(
                matches!(NetConfig::parse(bad), Err(BadValue { .. })),
                "{bad}"
            );
        }
    }
}
