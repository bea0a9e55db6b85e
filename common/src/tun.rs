//! The TUN/TAP kernel interface (<linux/if_tun.h>), shared by netd, which
//! creates TAPs, and the vmm, which gets their queue fds from netd or from a
//! migration source: one definition of each ioctl number and flag, and
//! [`check_tap_queue`], the one rule for "this fd is the TAP queue we
//! expect", whoever sent it.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use crate::netd::VNET_HDR_LEN;

pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
pub const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

pub const IFF_TUN: u16 = 0x0001;
pub const IFF_TAP: u16 = 0x0002;
pub const IFF_MULTI_QUEUE: u16 = 0x0100;
pub const IFF_ATTACH_QUEUE: u16 = 0x0200;
pub const IFF_DETACH_QUEUE: u16 = 0x0400;
pub const IFF_PERSIST: u16 = 0x0800;
pub const IFF_NO_PI: u16 = 0x1000;
pub const IFF_VNET_HDR: u16 = 0x4000;
/// Fail with EBUSY instead of attaching to an existing device of that name.
pub const IFF_TUN_EXCL: u16 = 0x8000;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// /dev/net/tun is misc character device 10:200 (TUN_MINOR); an fd opened
/// from it reports that device in fstat, so no path is opened to check.
pub const TUN_DEV: (u64, u64) = (10, 200);

/// Linux's IFNAMSIZ minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// A syntactically valid Linux interface name that is safe to log and to pass
/// to the kernel: 1..=15 bytes of ASCII letters, digits, '-', '_' and '.',
/// and not "." or "..". Excluding '%' matters: the kernel treats "vm%d" in
/// TUNSETIFF as a template and picks a free name itself.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `struct ifreq`: a 16-byte interface name and a 24-byte union. The one
/// layout behind every TUN and SIOC* interface ioctl of netd, the vmm and
/// the tests.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    /// An ifreq naming `name` (cut at [`MAX_IFNAME_LEN`] bytes), union zeroed.
    pub fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        let n = name.len().min(MAX_IFNAME_LEN);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    /// The interface name the kernel wrote (up to its NUL).
    pub fn name(&self) -> String {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..len]).into_owned()
    }

    /// `ifr_flags` (a short): IFF_* of TUNSETIFF/TUNGETIFF/TUNSETQUEUE,
    /// or the link flags of SIOCGIFFLAGS/SIOCSIFFLAGS.
    pub fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_flags(&mut self, v: u16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    /// `ifr_ifindex` / `ifr_ivalue` (an int).
    pub fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// `ifr_hwaddr`: an Ethernet address (`struct sockaddr`, ARPHRD_ETHER).
    pub fn set_ether(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }

    /// `ifr_addr` / `ifr_netmask`: an IPv4 `struct sockaddr_in`.
    pub fn set_ipv4(&mut self, a: std::net::Ipv4Addr) {
        // family, port (BE), address (BE).
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&a.octets());
    }
}

/// An ioctl taking a `struct ifreq` (the TUN ioctls on a /dev/net/tun fd,
/// the SIOC* ones on any socket).
pub fn ifreq_ioctl(fd: &impl AsFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, writable ifreq (40 bytes, the size every
    // one of these requests reads or writes); `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req, ifr as *mut IfReq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An ioctl taking a pointer to one int (TUNSETVNETHDRSZ, TUNGETVNETHDRSZ).
fn int_ioctl(fd: &impl AsFd, req: libc::c_ulong, v: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: the request reads or writes one int through the pointer,
    // which is live and writable; `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), req, v as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Which step of [`open_queue`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {err}")]
pub struct OpenQueueError {
    pub op: &'static str,
    pub err: io::Error,
}

/// Opens one queue of TUN/TAP `name` (creating the device, or attaching to
/// it as another queue, as `flags` and the device's state decide) and sets
/// its vnet header length when `vnet_hdr_len` is given. Close-on-exec.
pub fn open_queue(
    name: &str,
    flags: u16,
    vnet_hdr_len: Option<i32>,
) -> Result<std::fs::File, OpenQueueError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|err| OpenQueueError {
            op: "open /dev/net/tun",
            err,
        })?;
    let mut ifr = IfReq::new(name);
    ifr.set_flags(flags);
    ifreq_ioctl(&f, TUNSETIFF, &mut ifr).map_err(|err| OpenQueueError {
        op: "TUNSETIFF",
        err,
    })?;
    if let Some(mut len) = vnet_hdr_len {
        int_ioctl(&f, TUNSETVNETHDRSZ, &mut len).map_err(|err| OpenQueueError {
            op: "TUNSETVNETHDRSZ",
            err,
        })?;
    }
    Ok(f)
}

/// Attaches (`true`) or detaches a queue of a multiqueue TAP
/// (TUNSETQUEUE), so the kernel steers frames only to attached queues.
/// Attaching an attached queue (or detaching a detached one), which the
/// kernel answers with EINVAL, succeeds.
pub fn set_queue_attached(fd: &impl AsFd, attach: bool) -> io::Result<()> {
    let mut ifr = IfReq::new("");
    ifr.set_flags(if attach {
        IFF_ATTACH_QUEUE
    } else {
        IFF_DETACH_QUEUE
    });
    match ifreq_ioctl(fd, TUNSETQUEUE, &mut ifr) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// Sets the offloads (TUN_F_*) the TAP may hand the reader (TUNSETOFFLOAD).
pub fn set_offload(fd: &impl AsFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; nothing is
    // written; `fd` is open for the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What TUNGETIFF says about a TUN/TAP fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunInfo {
    pub name: String,
    pub flags: u16,
}

/// The TAP queue a receiver expects: the interface, how many queues it
/// has (IFF_MULTI_QUEUE exactly when more than one), and whether it
/// carries the virtio-net header (of [`VNET_HDR_LEN`] bytes).
#[derive(Debug, Clone, Copy)]
pub struct ExpectedTap<'a> {
    pub name: &'a str,
    pub queues: u16,
    pub vnet_hdr: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TapCheckError {
    #[error("fstat: {0}")]
    Stat(io::Error),
    #[error("the fd is {0}, not a /dev/net/tun queue")]
    NotTun(String),
    #[error("TUNGETIFF: {0} (a /dev/net/tun fd attached to no interface?)")]
    GetIff(io::Error),
    #[error("the fd is a queue of {found:?}, expected TAP {expected:?}")]
    Name { found: String, expected: String },
    #[error("{0} is a TUN (layer 3) device, not a TAP")]
    Tun(String),
    #[error("{name}: {flag} is {}, expected {}", on_off(*found), on_off(*expected))]
    Flag {
        name: String,
        flag: &'static str,
        found: bool,
        expected: bool,
    },
    #[error("{name}: TUNGETVNETHDRSZ: {err}")]
    GetVnetHdr { name: String, err: io::Error },
    #[error("{name}: vnet header length {found}, expected {expected}")]
    VnetHdrLen {
        name: String,
        found: i32,
        expected: i32,
    },
}

fn on_off(b: bool) -> &'static str {
    if b { "set" } else { "not set" }
}

/// Reads the interface name and flags of a /dev/net/tun fd.
pub fn tun_info(fd: &impl AsFd) -> io::Result<TunInfo> {
    let mut ifr = IfReq::new("");
    ifreq_ioctl(fd, TUNGETIFF, &mut ifr)?;
    Ok(TunInfo {
        name: ifr.name(),
        flags: ifr.flags(),
    })
}

/// The vnet header length of a TAP (TUNGETVNETHDRSZ).
pub fn vnet_hdr_len(fd: &impl AsFd) -> io::Result<i32> {
    let mut len: libc::c_int = 0;
    int_ioctl(fd, TUNGETVNETHDRSZ, &mut len)?;
    Ok(len)
}

/// What fstat says an fd is, for a refusal.
fn describe(st: &libc::stat) -> String {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => "a pipe".into(),
        libc::S_IFSOCK => "a socket".into(),
        libc::S_IFREG => "a regular file".into(),
        libc::S_IFDIR => "a directory".into(),
        libc::S_IFCHR => {
            let (ma, mi) = (
                nix::sys::stat::major(st.st_rdev),
                nix::sys::stat::minor(st.st_rdev),
            );
            format!("character device {ma}:{mi}")
        }
        libc::S_IFBLK => "a block device".into(),
        other => format!("a file of type {other:o}"),
    }
}

/// Checks that `fd` is a queue of the TAP `want` describes: a /dev/net/tun
/// fd (fstat, before any TUN ioctl reaches another driver), attached to
/// the interface of that name, IFF_TAP | IFF_NO_PI, IFF_VNET_HDR with a
/// header of [`VNET_HDR_LEN`] bytes when asked, IFF_MULTI_QUEUE exactly
/// when more than one queue, and not IFF_PERSIST (a TAP that outlives its
/// fds is not one netd made). Returns what TUNGETIFF said.
pub fn check_tap_queue(fd: &impl AsFd, want: &ExpectedTap<'_>) -> Result<TunInfo, TapCheckError> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| TapCheckError::Stat(e.into()))?;
    let is_tun = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && (
            nix::sys::stat::major(st.st_rdev),
            nix::sys::stat::minor(st.st_rdev),
        ) == TUN_DEV;
    if !is_tun {
        return Err(TapCheckError::NotTun(describe(&st)));
    }
    let info = tun_info(fd).map_err(TapCheckError::GetIff)?;
    if info.name != want.name {
        return Err(TapCheckError::Name {
            found: info.name,
            expected: want.name.to_string(),
        });
    }
    if info.flags & IFF_TUN != 0 {
        return Err(TapCheckError::Tun(info.name));
    }
    let rules = [
        (IFF_TAP, true, "IFF_TAP"),
        (IFF_NO_PI, true, "IFF_NO_PI"),
        (IFF_VNET_HDR, want.vnet_hdr, "IFF_VNET_HDR"),
        (IFF_MULTI_QUEUE, want.queues > 1, "IFF_MULTI_QUEUE"),
        (IFF_PERSIST, false, "IFF_PERSIST"),
    ];
    for (bit, expected, flag) in rules {
        let found = info.flags & bit != 0;
        if found != expected {
            return Err(TapCheckError::Flag {
                name: info.name,
                flag,
                found,
                expected,
            });
        }
    }
    if want.vnet_hdr {
        let found = vnet_hdr_len(fd).map_err(|err| TapCheckError::GetVnetHdr {
            name: info.name.clone(),
            err,
        })?;
        if found != VNET_HDR_LEN {
            return Err(TapCheckError::VnetHdrLen {
                name: info.name,
                found,
                expected: VNET_HDR_LEN,
            });
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};

    const TAP: ExpectedTap<'static> = ExpectedTap {
        name: "ctap0",
        queues: 1,
        vnet_hdr: true,
    };

    #[test]
    fn what_is_not_a_tun_fd_is_refused_before_any_ioctl() {
        let devnull = File::open("/dev/null").unwrap();
        let e = check_tap_queue(&devnull, &TAP).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the fd is character device 1:3, not a /dev/net/tun queue"
        );
        let (r, _w) = nix::unistd::pipe().unwrap();
        let e = check_tap_queue(&r, &TAP).unwrap_err();
        assert_eq!(e.to_string(), "the fd is a pipe, not a /dev/net/tun queue");
        let e = check_tap_queue(&File::open("/proc/self/stat").unwrap(), &TAP).unwrap_err();
        assert!(matches!(e, TapCheckError::NotTun(_)), "{e}");
    }

    /// Needs CAP_NET_ADMIN and a network namespace of its own (the suite
    /// runs as root); a reported skip otherwise, a failure where
    /// REQUIRE_NETNS=1.
    #[test]
    fn only_the_expected_tap_queue_passes() {
        std::thread::spawn(check_real_devices_in_own_netns)
            .join()
            .unwrap();
    }

    fn unavailable(what: &str, e: impl std::fmt::Display) {
        assert!(
            std::env::var("REQUIRE_NETNS").as_deref() != Ok("1"),
            "{what} failed although REQUIRE_NETNS=1 promises it: {e}"
        );
        eprintln!("SKIP tun::tests: {what}: {e} (set REQUIRE_NETNS=1 to make this a failure)");
    }

    fn check_real_devices_in_own_netns() {
        // The namespace (and every device made in it) belongs to this
        // thread and goes away with it.
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            return unavailable("unshare(CLONE_NEWNET)", e);
        }
        let tap = match open_queue("ctap0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, Some(12)) {
            Ok(f) => f,
            Err(e) => return unavailable("a TAP on /dev/net/tun", e),
        };
        let info = check_tap_queue(&tap, &TAP).unwrap();
        assert_eq!(info.name, "ctap0");

        let e = check_tap_queue(
            &tap,
            &ExpectedTap {
                name: "ctap1",
                ..TAP
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the fd is a queue of \"ctap0\", expected TAP \"ctap1\""
        );
        let e = check_tap_queue(&tap, &ExpectedTap { queues: 2, ..TAP }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ctap0: IFF_MULTI_QUEUE is not set, expected set"
        );

        let tun = open_queue("ctun0", IFF_TUN | IFF_NO_PI | IFF_VNET_HDR, Some(12)).unwrap();
        let e = check_tap_queue(
            &tun,
            &ExpectedTap {
                name: "ctun0",
                ..TAP
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "ctun0 is a TUN (layer 3) device, not a TAP");

        let plain = open_queue("cplain0", IFF_TAP | IFF_NO_PI, None).unwrap();
        let want = ExpectedTap {
            name: "cplain0",
            ..TAP
        };
        let e = check_tap_queue(&plain, &want).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cplain0: IFF_VNET_HDR is not set, expected set"
        );
        check_tap_queue(
            &plain,
            &ExpectedTap {
                vnet_hdr: false,
                ..want
            },
        )
        .unwrap();

        // The kernel's default header (10 bytes) is not virtio 1.x's.
        let short = open_queue("cshort0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, None).unwrap();
        let e = check_tap_queue(
            &short,
            &ExpectedTap {
                name: "cshort0",
                ..TAP
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "cshort0: vnet header length 10, expected 12");

        // A /dev/net/tun fd attached to nothing.
        let bare = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let e = check_tap_queue(&bare, &TAP).unwrap_err();
        assert!(matches!(e, TapCheckError::GetIff(_)), "{e}");

        let mq: Vec<File> = (0..2)
            .map(|_| {
                open_queue(
                    "cmq0",
                    IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
                    Some(12),
                )
                .unwrap()
            })
            .collect();
        let want = ExpectedTap {
            name: "cmq0",
            queues: 2,
            vnet_hdr: true,
        };
        for q in &mq {
            check_tap_queue(q, &want).unwrap();
        }
        let e = check_tap_queue(&mq[0], &ExpectedTap { queues: 1, ..want }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cmq0: IFF_MULTI_QUEUE is set, expected not set"
        );
    }
}
