//! The test guest on a network: a guest (on vmm or on QEMU) behind a TAP
//! that netd made, and a UDP socket in netd's namespace that talks to it.
//! Shared by tests/tests/net_*.rs and the network benchmark.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::NetNs;
use crate::netd_harness::{NOBODY, Netd};
use crate::vmm_process::{VmmProcess, as_nobody_with_kvm, kvm_group};

/// The bridge's host address (TEST_POLICY / policy/netd.ron).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const QEMU: &str = "qemu-system-x86_64";
/// QEMU microvm as the reference peer: the PVH guest, serial on stdio, and
/// isa-debug-exit so that the guest's `out 0x501` ends QEMU.
pub const QEMU_MICROVM_ARGS: &[&str] = &[
    "-accel",
    "kvm",
    "-M",
    "microvm,acpi=off",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-device",
    "isa-debug-exit,iobase=0x501",
];

/// Guest `n` (1-based) of a test: its address and MAC.
pub fn guest_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 1 + n)
}

pub fn guest_mac(n: u8) -> String {
    format!("52:54:00:12:34:{:02x}", n)
}

pub fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, part) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("bad MAC {mac}"));
    }
    out
}

/// Runs `f` on a thread that entered `ns`'s network namespace; sockets made
/// there stay in that namespace.
pub fn in_netns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A big socket receive buffer (SO_RCVBUFFORCE: tests run as root), so that
/// a blast is not dropped by the host while the test thread is descheduled.
pub fn grow_receive_buffer(sock: &UdpSocket) {
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket we own with a pointer to a live c_int.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// The guest's stats reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStats {
    pub boot_id: String,
    pub rx: u64,
    pub tx: u64,
    pub echo: u64,
    /// `busy=<n>` of a guest booted with `testguest.busy`: passes of its
    /// busy loop so far.
    pub busy: Option<u64>,
    /// `cpus=<n>` of a guest with several CPUs: how many are up.
    pub cpus: Option<u64>,
}

impl GuestStats {
    pub fn parse(reply: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(reply).map_err(|_| format!("stats not text: {reply:?}"))?;
        let mut fields = text.split(' ').map(|f| f.split_once('='));
        let mut next = |key: &str| -> Result<String, String> {
            match fields.next() {
                Some(Some((k, v))) if k == key => Ok(v.to_string()),
                _ => Err(format!("bad stats reply {text:?} (expected {key}=)")),
            }
        };
        let boot_id = next("boot_id")?;
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("bad number in {text:?}"))
        };
        let (rx, tx, echo) = (num(next("rx")?)?, num(next("tx")?)?, num(next("echo")?)?);
        let (mut busy, mut cpus) = (None, None);
        for f in fields {
            match f {
                Some(("busy", v)) => busy = Some(num(v.to_string())?),
                Some(("cpus", v)) => cpus = Some(num(v.to_string())?),
                _ => {}
            }
        }
        Ok(GuestStats {
            boot_id,
            rx,
            tx,
            echo,
            busy,
            cpus,
        })
    }
}

/// A UDP socket on the bridge's address, talking to one guest.
pub struct GuestLink {
    pub ip: Ipv4Addr,
    pub sock: UdpSocket,
}

impl GuestLink {
    pub fn new(ns: &NetNs, ip: Ipv4Addr) -> Self {
        let sock = in_netns(ns, || {
            UdpSocket::bind((HOST_IP, 0)).expect("bind on the bridge address")
        });
        grow_receive_buffer(&sock);
        GuestLink { ip, sock }
    }

    fn recv_from_guest(&self, port: u16, buf: &mut [u8], timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("set timeout");
            match self.sock.recv_from(buf) {
                Ok((n, from)) if from == SocketAddrV4::new(self.ip, port).into() => {
                    return Some(n);
                }
                Ok(_) => continue, // a late reply of another exchange
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// One request/reply with a UDP service, tried `tries` times (the first
    /// datagram may wait for ARP).
    pub fn call(&self, port: u16, req: &[u8], tries: u32, timeout: Duration) -> Option<Vec<u8>> {
        let to = SocketAddrV4::new(self.ip, port);
        let mut buf = vec![0u8; 2048];
        for _ in 0..tries {
            self.sock.send_to(req, to).expect("send");
            if let Some(n) = self.recv_from_guest(port, &mut buf, timeout) {
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }

    pub fn stats(&self) -> Result<GuestStats, String> {
        let reply = self
            .call(5000, b"", 5, Duration::from_secs(3))
            .ok_or_else(|| format!("no stats reply from {}", self.ip))?;
        GuestStats::parse(&reply)
    }

    /// Sends one datagram (no reply expected).
    pub fn send(&self, port: u16, payload: &[u8]) {
        self.sock
            .send_to(payload, SocketAddrV4::new(self.ip, port))
            .expect("send");
    }

    /// `n` echo round trips, each sent once (no retry) and waited for up to
    /// `timeout`. Returns the number that came back intact.
    pub fn echo_round_trips(&self, n: u32, size: usize, timeout: Duration) -> u32 {
        let mut buf = vec![0u8; 2048];
        let mut ok = 0;
        for i in 0..n {
            let mut req = vec![0xA5u8; size.max(8)];
            req[..4].copy_from_slice(&i.to_be_bytes());
            req[4..8].copy_from_slice(b"echo");
            self.send(7, &req);
            // Skip stale replies of earlier requests (none expected).
            let deadline = Instant::now() + timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match self.recv_from_guest(7, &mut buf, left) {
                    Some(len) if buf.get(..len) == Some(&req[..]) => {
                        ok += 1;
                        break;
                    }
                    Some(_) => continue,
                    None => break,
                }
            }
        }
        ok
    }

    /// Asks the guest (port 5001) for `count` datagrams of `size` bytes and
    /// collects them until `idle` passes with none. Returns the sequence
    /// numbers seen (each once) and the elapsed time to the last one.
    pub fn blast(&self, count: u32, size: usize, idle: Duration) -> (Vec<bool>, Duration) {
        let mut seen = vec![false; count as usize];
        let mut buf = vec![0u8; 2048];
        self.send(5001, format!("{count} {size}").as_bytes());
        let t0 = Instant::now();
        let mut last = t0;
        let mut got = 0;
        while got < count {
            let Some(n) = self.recv_from_guest(5001, &mut buf, idle) else {
                break;
            };
            last = Instant::now();
            if n != size || n < 4 {
                continue;
            }
            let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            let body_ok = buf[4..n]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == ((i + 4) % 256) as u8);
            if let Some(s) = seen.get_mut(seq)
                && !*s
                && body_ok
            {
                *s = true;
                got += 1;
            }
        }
        (seen, last - t0)
    }
}

/// Pings `ip` from `ns`: (sent, received, round-trip times in ms).
pub fn ping(
    ns: &NetNs,
    ip: Ipv4Addr,
    count: u32,
    interval: &str,
    wait_s: u32,
) -> (u32, u32, Vec<f64>) {
    let out = ns
        .command(&[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            &wait_s.to_string(),
            &ip.to_string(),
        ])
        .output()
        .expect("run ip netns exec ... ping");
    // ping exits 0 (all answered) or 1 (some lost); anything else means it
    // did not run (not installed: `ip netns exec` cannot exec it) or failed.
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "ping did not run ({}): {} (apt-get install iputils-ping)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    (count, rtts.len() as u32, rtts)
}

/// Polls with single pings until one answers or `timeout` passes.
pub fn wait_ping(ns: &NetNs, ip: Ipv4Addr, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if ping(ns, ip, 1, "1", 1).1 == 1 {
            return true;
        }
    }
    false
}

/// How vmm is started in a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// As root with `--user 65534:65534` (vmm drops itself).
    RootWithUserOption,
    /// Already uid 65534 with the kvm group (setpriv).
    Nobody,
}

/// A scratch directory anyone may write (the API socket of a vmm that runs
/// as 65534 goes there), removed on drop.
pub use crate::TempDir as ScratchDir;

/// The release vmm's command line for the test guest `n` on `tap` from
/// `netd`.
pub fn vmm_command(
    netd: &Netd,
    tap: &str,
    n: u8,
    net_extra: &str,
    api_socket: Option<&Path>,
    run_as: RunAs,
) -> Command {
    vmm_command_with_cmdline(netd, tap, n, net_extra, api_socket, run_as, "")
}

/// [`vmm_command`] with more guest command-line keys (e.g. `testguest.busy`).
pub fn vmm_command_with_cmdline(
    netd: &Netd,
    tap: &str,
    n: u8,
    net_extra: &str,
    api_socket: Option<&Path>,
    run_as: RunAs,
    cmdline_extra: &str,
) -> Command {
    let vmm = crate::bin("vmm");
    let vmm = vmm.as_path();
    let mut c = match run_as {
        RunAs::RootWithUserOption => {
            let mut c = Command::new(vmm);
            c.args(["--user", &format!("{NOBODY}:{NOBODY}")]);
            c
        }
        RunAs::Nobody => as_nobody_with_kvm(vmm),
    };
    let mut net = format!(
        "netd={},id={tap},mac={}",
        netd.socket.display(),
        guest_mac(n)
    );
    if !net_extra.is_empty() {
        net.push(',');
        net.push_str(net_extra);
    }
    c.arg("--kernel")
        .arg(crate::guest_elf())
        .args([
            "--cmdline",
            format!("testguest.ip={}/24 {cmdline_extra}", guest_ip(n)).trim_end(),
        ])
        .args(["--net", &net]);
    if let Some(p) = api_socket {
        c.arg("--api-socket").arg(p);
    }
    c
}

/// Starts vmm with the test guest and waits for its banner.
pub fn start_vmm_guest(cmd: Command, timeout: Duration) -> (VmmProcess, String) {
    let mut p = VmmProcess::spawn(cmd);
    let line = p.wait_for_line("testguest: up boot_id=", timeout);
    let id = line
        .trim()
        .trim_start_matches("testguest: up boot_id=")
        .to_string();
    (p, id)
}

/// Whether QEMU is installed: a test that needs it fails when the run
/// promised it (`REQUIRE_QEMU=1`) and is otherwise skipped loudly
/// (see [`crate::prereq`]).
pub fn qemu_available() -> bool {
    crate::prereq::require_or_skip(crate::prereq::Prerequisite::Qemu, "the whole test")
}

/// `qemu-system-x86_64` with [`QEMU_MICROVM_ARGS`], run as uid 65534 (kvm
/// group) by netd_probe, which asks netd for TAP `tap` and execs QEMU with
/// the fd inherited. The caller adds RAM, the guest and the netdev.
pub fn qemu_on_netd_tap(probe: &Path, netd: &Netd, tap: &str) -> Command {
    let gid = kvm_group();
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        &format!("--groups={gid}"),
        "--",
    ])
    .arg(probe)
    .args([
        "exec",
        &format!("netd={},id={tap}", netd.socket.display()),
        "--",
        QEMU,
    ])
    .args(QEMU_MICROVM_ARGS);
    c
}

/// QEMU microvm with the test guest `n` on a TAP that netd hands to
/// netd_probe running as uid 65534 (kvm group), which execs QEMU with the
/// fd inherited (`-netdev tap,fd=N`, userspace virtio-net: vhost=off).
pub fn qemu_command(probe: &Path, guest: &Path, netd: &Netd, tap: &str, n: u8) -> Command {
    let mut c = qemu_on_netd_tap(probe, netd, tap);
    c.args([
        "-m",
        "128M",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-netdev",
        "tap,id=n0,fd={fd},vhost=off",
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={}", guest_mac(n)),
        "-append",
        &format!("testguest.ip={}/24", guest_ip(n)),
        "-kernel",
    ])
    .arg(guest);
    c
}

/// Sends raw Ethernet frames out of `ifname` in `ns` (AF_PACKET); returns
/// how many were sent.
pub fn send_raw_frames(ns: &NetNs, ifname: &str, frames: Vec<Vec<u8>>) -> usize {
    let name = std::ffi::CString::new(ifname).expect("interface name");
    in_netns(ns, move || {
        // SAFETY: plain socket(2) call; the fd is closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex != 0, "no such interface {name:?}");
        let mut sent = 0;
        for f in &frames {
            // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: the frame and address outlive the call; lengths match.
            let r = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r == f.len() as isize {
                sent += 1;
            }
        }
        // SAFETY: fd is ours and not used after this.
        unsafe { libc::close(fd) };
        sent
    })
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    let sum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}
