//! The test guest on QEMU microvm: a VMM nobody here wrote checks that the
//! guest follows PVH, virtio-mmio (modern) and virtio-net, so that our own
//! vmm is not only tested against a guest that shares its mistakes.
//!
//! Without qemu-system-x86_64 each test fails where `REQUIRE_QEMU=1` (CI
//! sets it) and is otherwise skipped loudly (`tests::prereq`).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tests::net_guest::{QEMU, QEMU_MICROVM_ARGS, grow_receive_buffer, in_netns, qemu_available};
use tests::{NetNs, guest_elf};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const HOST_CIDR: &str = "10.0.1.1/24";
const GUEST_MAC: &str = "52:54:00:a1:b2:c3";
/// Generous: the CI machine has 2 cores shared with parallel tests.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The serial console of a running guest, collected line by line.
#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Console {
    /// Waits until some line satisfies `pred`; returns that line.
    fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().expect("console lock");
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("console lock")
                .0;
        }
    }

    fn collect(self: &Arc<Self>, from: impl std::io::Read + Send + 'static, prefix: &'static str) {
        let c = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                c.lines
                    .lock()
                    .expect("console lock")
                    .push(format!("{prefix}{line}"));
                c.changed.notify_all();
            }
        });
    }

    fn text(&self) -> String {
        self.lines.lock().expect("console lock").join("\n")
    }
}

/// A QEMU process killed on drop, with its serial output on a Console.
struct Qemu {
    child: Child,
    console: Arc<Console>,
    /// Just before the spawn: nothing the guest prints can be older.
    spawned: Instant,
}

impl Qemu {
    /// Starts QEMU (optionally inside `ns`) with the test guest and `extra` args.
    fn start(ns: Option<&NetNs>, cmdline: &str, extra: &[&str]) -> Qemu {
        let elf = guest_elf();
        assert!(
            elf.exists(),
            "{} is missing (tests/build.rs builds it)",
            elf.display()
        );
        let elf = elf.to_str().expect("utf-8 path").to_owned();
        let mut args = vec![QEMU];
        args.extend_from_slice(QEMU_MICROVM_ARGS);
        args.extend_from_slice(&["-m", "128M", "-kernel", &elf, "-append", cmdline]);
        args.extend_from_slice(extra);
        let mut cmd = match ns {
            Some(ns) => ns.command(&args),
            None => {
                let mut c = Command::new(QEMU);
                c.args(&args[1..]);
                c
            }
        };
        let spawned = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
        let console = Arc::new(Console::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        console.collect(stdout, "");
        // QEMU's own messages land on the console too (prefixed), so that a
        // failure shows them beside the guest's output.
        console.collect(stderr, "qemu: ");
        Qemu {
            child,
            console,
            spawned,
        }
    }

    /// Waits for the banner and returns its boot_id (checked: 16 lowercase hex).
    fn wait_banner(&self) -> String {
        let line = self
            .console
            .wait_line(BOOT_TIMEOUT, |l| l.starts_with("testguest: up boot_id="))
            .unwrap_or_else(|| panic!("no banner; console:\n{}", self.console.text()));
        let id = line.trim_start_matches("testguest: up boot_id=").to_owned();
        assert!(
            id.len() == 16
                && id
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
            "bad banner {line:?}"
        );
        id
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn boots_and_powers_off_on_qemu() {
    if !qemu_available() {
        return;
    }
    let mut q = Qemu::start(None, "testguest.exit", &[]);
    let id = q.wait_banner();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let status = loop {
        if let Some(s) = q.child.try_wait().expect("wait for qemu") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "guest did not power off:\n{}",
            q.console.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // isa-debug-exit: QEMU exits with (value << 1) | 1; the guest writes 0.
    assert_eq!(status.code(), Some(1), "console:\n{}", q.console.text());
    let text = q.console.text();
    assert_eq!(text.matches("testguest: up boot_id=").count(), 1, "{text}");
    // A second boot gets another boot_id.
    let q2 = Qemu::start(None, "testguest.exit", &[]);
    assert_ne!(q2.wait_banner(), id, "boot_id repeats across boots");
}

#[test]
fn heartbeat_ticks_on_qemu() {
    if !qemu_available() {
        return;
    }
    let q = Qemu::start(None, "testguest.heartbeat=100", &[]);
    q.wait_banner();
    q.console
        .wait_line(BOOT_TIMEOUT, |l| l == "testguest: tick 5")
        .unwrap_or_else(|| panic!("no tick 5; console:\n{}", q.console.text()));
    // Timer-driven 100 ms ticks: the fifth comes at least 500 ms after the
    // guest started, which was after the spawn, and is seen after it was
    // printed; so this lower bound holds however late the test looks (a
    // busy loop printing as fast as it can would break it).
    let since_spawn = q.spawned.elapsed();
    assert!(
        since_spawn >= Duration::from_millis(450),
        "five ticks {since_spawn:?} after QEMU was spawned: too fast"
    );
    let text = q.console.text();
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("testguest: tick "))
        .map(|n| n.parse().expect("tick number"))
        .collect();
    assert_eq!(ticks.get(..5), Some(&[1, 2, 3, 4, 5][..]), "{text}");
}

static TAP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A TAP name unique per process and test, within IFNAMSIZ.
fn tap_name() -> String {
    format!(
        "vq{}x{}",
        std::process::id() % 100_000,
        TAP_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The guest on QEMU behind a TAP in a namespace of the test's own.
struct NetGuest {
    qemu: Qemu,
    tap: String,
    boot_id: String,
    sock: UdpSocket,
    _ns: NetNs,
}

impl NetGuest {
    fn start(tag: &str, extra_cmdline: &str) -> NetGuest {
        let ns = NetNs::new(tag);
        let tap = tap_name();
        let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no");
        let device = format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}");
        let qemu = Qemu::start(
            Some(&ns),
            &format!("testguest.ip={GUEST_IP}/24 {extra_cmdline}"),
            &[
                "-global",
                "virtio-mmio.force-legacy=false",
                "-netdev",
                &netdev,
                "-device",
                &device,
            ],
        );
        let boot_id = qemu.wait_banner();
        ns.exec(&["ip", "addr", "add", HOST_CIDR, "dev", &tap]);
        ns.exec(&["ip", "link", "set", &tap, "up"]);
        let sock = in_netns(&ns, || {
            UdpSocket::bind("10.0.1.1:0").expect("bind in namespace")
        });
        sock.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
        grow_receive_buffer(&sock);
        NetGuest {
            qemu,
            tap,
            boot_id,
            sock,
            _ns: ns,
        }
    }

    fn ns(&self) -> &NetNs {
        &self._ns
    }

    /// One request/reply exchange with a UDP service; retried a few times
    /// (the first datagram may wait for ARP).
    fn call(&self, port: u16, req: &[u8]) -> Vec<u8> {
        let to = SocketAddrV4::new(GUEST_IP, port);
        let mut buf = vec![0u8; 2048];
        for _ in 0..5 {
            self.sock.send_to(req, to).expect("send");
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, to.into(), "reply from the wrong address");
                    buf.truncate(n);
                    return buf;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        panic!(
            "no reply from port {port}; console:\n{}",
            self.qemu.console.text()
        );
    }

    /// The parsed stats reply: (boot_id, rx, tx, echo).
    fn stats(&self) -> (String, u64, u64, u64) {
        let reply = String::from_utf8(self.call(5000, b"")).expect("stats are text");
        let fields: Vec<(&str, &str)> = reply
            .split(' ')
            .map(|f| {
                f.split_once('=')
                    .unwrap_or_else(|| panic!("bad stats {reply:?}"))
            })
            .collect();
        let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["boot_id", "rx", "tx", "echo"], "bad stats {reply:?}");
        let num = |i: usize| {
            fields[i]
                .1
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("bad stats {reply:?}"))
        };
        (fields[0].1.to_owned(), num(1), num(2), num(3))
    }
}

#[test]
fn ping_and_udp_services_on_qemu() {
    if !qemu_available() {
        return;
    }
    let g = NetGuest::start("gq", "");

    let out = g
        .ns()
        .command(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "5",
            &GUEST_IP.to_string(),
        ])
        .output()
        .expect("run ping");
    assert!(
        out.status.success(),
        "ping failed: {}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stdout),
        g.qemu.console.text()
    );

    // UDP echo, including an empty and a maximal datagram.
    for i in 0..50 {
        let msg = format!("echo request {i}");
        assert_eq!(g.call(7, msg.as_bytes()), msg.as_bytes());
    }
    assert_eq!(g.call(7, b""), b"");
    let big: Vec<u8> = (0..1472u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(g.call(7, &big), big);

    // Discard answers nothing.
    let mut buf = [0u8; 64];
    g.sock
        .send_to(b"drop me", SocketAddrV4::new(GUEST_IP, 9))
        .expect("send");
    g.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(g.sock.recv_from(&mut buf).is_err(), "discard replied");
    g.sock
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");

    // Stats: our boot, and at least what we just did.
    let (id, rx, tx, echo) = g.stats();
    assert_eq!(id, g.boot_id);
    assert!(echo >= 3 + 52, "echo={echo}");
    assert!(rx > 3 + 52 && tx >= echo, "rx={rx} tx={tx} echo={echo}");
    let (_, rx2, tx2, echo2) = g.stats();
    assert!(
        rx2 > rx && tx2 > tx && echo2 == echo,
        "counters did not move sensibly"
    );
}

/// Asks the guest for `count` datagrams of `size` bytes and checks that all
/// of them arrive, each once, with the documented payload.
fn check_blast(g: &NetGuest, count: u32, size: usize) {
    let (_, _, tx_before, _) = g.stats();
    g.sock
        .send_to(
            format!("{count} {size}").as_bytes(),
            SocketAddrV4::new(GUEST_IP, 5001),
        )
        .expect("send");
    let mut seen = vec![false; count as usize];
    let mut buf = [0u8; 2048];
    for got in 0..count {
        let (n, from) = g.sock.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "blast: {got} of {count} datagrams, then {e}; console:\n{}",
                g.qemu.console.text()
            )
        });
        assert_eq!(from, SocketAddrV4::new(GUEST_IP, 5001).into());
        assert_eq!(n, size);
        let seq = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
        assert!(
            seq < count && !seen[seq as usize],
            "bad or repeated sequence number {seq}"
        );
        seen[seq as usize] = true;
        assert!(
            buf[4..n]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i + 4) as u8),
            "bad payload"
        );
    }
    let (_, _, tx_after, _) = g.stats();
    assert!(
        tx_after > tx_before + u64::from(count),
        "tx {tx_before} -> {tx_after}"
    );
    // Nothing more than asked for.
    g.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        g.sock.recv_from(&mut buf).is_err(),
        "more datagrams than requested"
    );
    g.sock
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");
}

/// The guest's `testguest: blast ...` line for the last blast.
fn blast_waits(g: &NetGuest) -> u64 {
    let line = g
        .qemu
        .console
        .wait_line(REPLY_TIMEOUT, |l| l.starts_with("testguest: blast to "))
        .unwrap_or_else(|| panic!("no blast line:\n{}", g.qemu.console.text()));
    line.split(' ')
        .find_map(|w| w.strip_prefix("waits="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad blast line {line:?}"))
}

#[test]
fn udp_blast_on_qemu() {
    if !qemu_available() {
        return;
    }
    // With a heartbeat too: timer and device interrupts share the guest.
    let g = NetGuest::start("gb", "testguest.heartbeat=100");
    check_blast(&g, 300, 512);
    check_blast(&g, 100, 1472);

    let last_tick = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("testguest: tick "))
            .filter_map(|n| n.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    };
    let next = format!("testguest: tick {}", last_tick(&g.qemu.console.text()) + 2);
    assert!(
        g.qemu
            .console
            .wait_line(BOOT_TIMEOUT, |l| l == next)
            .is_some(),
        "heartbeat stopped after the blasts:\n{}",
        g.qemu.console.text()
    );
}

#[test]
fn udp_blast_waits_for_ring_space_on_qemu() {
    if !qemu_available() {
        return;
    }
    // Two tx descriptors: the blast must wait for the device again and
    // again, and still lose nothing.
    let g = NetGuest::start("gw", "testguest.txqueue=2");
    check_blast(&g, 200, 1000);
    assert!(
        blast_waits(&g) > 0,
        "the blast never waited:\n{}",
        g.qemu.console.text()
    );
}

/// Raw Ethernet frames onto the TAP (AF_PACKET), as if from a hostile peer.
fn send_raw_frames(ns: &NetNs, tap: &str, frames: Vec<Vec<u8>>) -> usize {
    let tap = std::ffi::CString::new(tap).expect("tap name");
    in_netns(ns, move || {
        // SAFETY: plain socket/sendto/close calls on a socket we own, with
        // pointers to live buffers of the given lengths.
        unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = libc::if_nametoindex(tap.as_ptr());
            assert!(ifindex != 0, "no such interface {tap:?}");
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex as i32;
            let mut sent = 0;
            for f in &frames {
                let r = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if r >= 0 {
                    sent += 1;
                }
                // Pace a little: the point is parsing, not overflowing queues.
                if sent % 64 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            libc::close(fd);
            sent
        }
    })
}

#[test]
fn survives_garbage_frames_on_qemu() {
    if !qemu_available() {
        return;
    }
    let g = NetGuest::start("gg", "");
    assert_eq!(g.call(7, b"before"), b"before");
    let (_, rx_before, _, _) = g.stats();

    let mac: Vec<u8> = GUEST_MAC
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("mac"))
        .collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut frames = Vec::new();
    for i in 0..1500 {
        let len = 14 + (rnd() % 1500) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        // Mostly to the guest (unicast or broadcast), with IPv4 or ARP
        // ethertypes so that the parsers behind them get exercised.
        if i % 2 == 0 {
            f[..6].copy_from_slice(&mac);
        } else {
            f[..6].fill(0xff);
        }
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        match i % 3 {
            0 => f[12..14].copy_from_slice(&[0x08, 0x00]),
            1 => f[12..14].copy_from_slice(&[0x08, 0x06]),
            _ => {}
        }
        if i % 3 == 0 && len > 34 {
            // A plausible IPv4 header to our address with random lengths/options.
            f[14] = 0x40 | (rnd() % 16) as u8;
            f[26..30].copy_from_slice(&[10, 0, 1, 1]);
            f[30..34].copy_from_slice(&GUEST_IP.octets());
        }
        frames.push(f);
    }
    let sent = send_raw_frames(g.ns(), &g.tap, frames);
    assert!(sent > 1000, "only {sent} raw frames could be sent");

    // Still alive and serving, and it saw the frames.
    assert_eq!(g.call(7, b"after"), b"after");
    let (_, rx_after, _, _) = g.stats();
    assert!(
        rx_after >= rx_before + (sent as u64) / 2,
        "rx {rx_before} -> {rx_after} after {sent} frames"
    );
    assert!(
        !g.qemu.console.text().contains("panic"),
        "{}",
        g.qemu.console.text()
    );
}
