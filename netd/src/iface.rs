//! Kernel interface set-up through ioctls only (no `ip`, no netlink): TAP
//! creation on /dev/net/tun, bridge creation and enslaving, addresses, link up.
//! Everything acts on the network namespace netd runs in.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use common::tun::{
    ExpectedTap, IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_TUN_EXCL, IFF_VNET_HDR, IfReq,
    TapCheckError, check_tap_queue, ifreq_ioctl, open_queue,
};

use crate::policy::Cidr;

// <linux/sockios.h>
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("interface {0:?} already exists")]
    Exists(String),
    #[error("{what} for {name:?}: {source}")]
    Sys {
        what: &'static str,
        name: String,
        source: io::Error,
    },
    #[error("/dev/vhost-net is not available on this host: {0}")]
    VhostUnavailable(io::Error),
    #[error("cannot open /dev/vhost-net: {0}")]
    Vhost(io::Error),
    #[error("the TAP {name:?} just created fails the client's check: {source}")]
    Check { name: String, source: TapCheckError },
}

fn sys(what: &'static str, name: &str) -> impl FnOnce(io::Error) -> IfaceError {
    let name = name.to_string();
    move |source| IfaceError::Sys { what, name, source }
}

/// A datagram socket for the SIOC* interface ioctls.
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before being owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether an interface of that name exists in netd's namespace.
pub fn exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The ifindex of an interface in netd's namespace.
pub fn index_of(name: &str) -> Result<u32, IfaceError> {
    let c = CString::new(name).map_err(|_| IfaceError::Sys {
        what: "if_nametoindex",
        name: name.to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(sys("if_nametoindex", name)(io::Error::last_os_error()));
    }
    Ok(i)
}

/// Whether an interface with this ifindex exists in netd's namespace.
pub fn index_exists(index: u32) -> bool {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into `buf`.
    let r = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if !r.is_null() {
        return true;
    }
    // ENXIO: no such interface. Any other failure (no socket left for the
    // query) must not free a place: count the TAP as still there.
    io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
}

/// Sets IFF_UP on an interface.
pub fn link_up(name: &str) -> Result<(), IfaceError> {
    let s = ctl_socket().map_err(sys("socket", name))?;
    let mut ifr = IfReq::new(name);
    ifreq_ioctl(&s, SIOCGIFFLAGS, &mut ifr).map_err(sys("SIOCGIFFLAGS", name))?;
    ifr.set_flags(ifr.flags() | libc::IFF_UP as u16);
    ifreq_ioctl(&s, SIOCSIFFLAGS, &mut ifr).map_err(sys("SIOCSIFFLAGS", name))
}

/// Puts an IPv4 address with its netmask on an interface.
pub fn set_address(name: &str, cidr: Cidr) -> Result<(), IfaceError> {
    let s = ctl_socket().map_err(sys("socket", name))?;
    let mut ifr = IfReq::new(name);
    ifr.set_ipv4(cidr.addr);
    ifreq_ioctl(&s, SIOCSIFADDR, &mut ifr).map_err(sys("SIOCSIFADDR", name))?;
    let mut ifr = IfReq::new(name);
    ifr.set_ipv4(cidr.netmask());
    ifreq_ioctl(&s, SIOCSIFNETMASK, &mut ifr).map_err(sys("SIOCSIFNETMASK", name))
}

/// Creates a bridge unless an interface of that name exists, then sets its
/// address (when given) and brings it up. Returns whether it was created.
pub fn ensure_bridge(name: &str, address: Option<Cidr>) -> Result<bool, IfaceError> {
    if exists(name) {
        return Ok(false);
    }
    let s = ctl_socket().map_err(sys("socket", name))?;
    let c = CString::new(name)
        .map_err(|_| sys("SIOCBRADDBR", name)(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: SIOCBRADDBR reads a NUL-terminated name from the pointer; `c`
    // outlives the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), SIOCBRADDBR, c.as_ptr()) };
    if r < 0 {
        return Err(sys("SIOCBRADDBR", name)(io::Error::last_os_error()));
    }
    // A bridge whose address was never set takes the lowest MAC of its
    // ports, so it would change as TAPs come and go (a migration onto a new
    // TAP, a VM started or stopped), and guests' ARP entries for the host
    // address would go stale. A fixed one, derived from the name, stays.
    let mut ifr = IfReq::new(name);
    ifr.set_ether(bridge_mac(name));
    ifreq_ioctl(&s, SIOCSIFHWADDR, &mut ifr).map_err(sys("SIOCSIFHWADDR", name))?;
    if let Some(a) = address {
        set_address(name, a)?;
    }
    link_up(name)?;
    Ok(true)
}

/// A locally administered unicast MAC for bridge `name` (FNV-1a of the
/// name): the same on every start, different per bridge.
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0x02, b[3], b[4], b[5], b[6], b[7]]
}

/// Enslaves `port` to `bridge`.
pub fn bridge_add_port(bridge: &str, port: &str) -> Result<(), IfaceError> {
    let s = ctl_socket().map_err(sys("socket", bridge))?;
    let idx = i32::try_from(index_of(port)?)
        .map_err(|_| sys("if_nametoindex", port)(io::Error::from(io::ErrorKind::InvalidData)))?;
    let mut ifr = IfReq::new(bridge);
    ifr.set_int(idx);
    ifreq_ioctl(&s, SIOCBRADDIF, &mut ifr).map_err(sys("SIOCBRADDIF", port))
}

/// Creates a non-persistent TAP with `queues` queues and returns one fd per
/// queue. The device disappears when the last of them is closed. An existing
/// interface of that name is never joined: the first TUNSETIFF uses
/// IFF_TUN_EXCL, which the kernel checks under the RTNL lock.
pub fn create_tap(name: &str, queues: u16, vnet_hdr: bool) -> Result<Vec<File>, IfaceError> {
    if exists(name) {
        return Err(IfaceError::Exists(name.to_string()));
    }
    let mut flags = IFF_TAP | IFF_NO_PI;
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    if queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    let mut fds = Vec::with_capacity(usize::from(queues));
    for q in 0..queues {
        let flags = if q == 0 { flags | IFF_TUN_EXCL } else { flags };
        let hdr = vnet_hdr.then_some(common::netd::VNET_HDR_LEN);
        let f = match open_queue(name, flags, hdr) {
            Ok(f) => f,
            Err(e)
                if q == 0 && e.op == "TUNSETIFF" && e.err.raw_os_error() == Some(libc::EBUSY) =>
            {
                return Err(IfaceError::Exists(name.to_string()));
            }
            Err(e) => return Err(sys(e.op, name)(e.err)),
        };
        fds.push(f);
    }
    // What every receiver checks (the vmm, a migration target after it):
    // a TAP that would fail there is netd's own error, not the client's.
    let want = ExpectedTap {
        name,
        queues,
        vnet_hdr,
    };
    for f in &fds {
        check_tap_queue(f, &want).map_err(|source| IfaceError::Check {
            name: name.to_string(),
            source,
        })?;
    }
    Ok(fds)
}

/// Opens `n` /dev/vhost-net fds. Absence of the device is its own error so
/// that the client learns the host cannot do vhost at all.
pub fn open_vhost(n: u16) -> Result<Vec<File>, IfaceError> {
    let mut v = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/vhost-net")
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => IfaceError::VhostUnavailable(e),
                _ if e.raw_os_error() == Some(libc::ENODEV) => IfaceError::VhostUnavailable(e),
                _ => IfaceError::Vhost(e),
            })?;
        v.push(f);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_macs_are_stable_local_unicast_and_per_name() {
        let a = bridge_mac("vmbr0");
        assert_eq!(a, bridge_mac("vmbr0"));
        assert_ne!(a, bridge_mac("vmbr1"));
        assert_eq!(a[0] & 1, 0, "unicast");
        assert_eq!(a[0] & 2, 2, "locally administered");
    }
}
