//! Network benchmark: the same test guest on vmm and on QEMU microvm
//! (userspace virtio-net, vhost=off), each on a TAP from a real netd that
//! this program starts in a namespace of its own; plus the rate of a plain
//! host loop writing frames to a TAP, as the ceiling. Prints a table.
//!
//! bench_net [--burst-ms N] [--bursts N] [--echoes N] [--pings N] [--skip-qemu]
//!
//! Run as root after `cargo build --release --workspace`. Guest code that
//! runs for more than ~20 ms without idling drops into slow instruction
//! emulation on this nested KVM, so host->guest floods are split into short
//! bursts with idle gaps, and blasts are sized to last well under a second.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::net_guest::{
    GuestLink, RunAs, guest_ip, ping, qemu_available, qemu_command, start_vmm_guest, vmm_command,
    wait_ping,
};
use tests::netd_harness::{Netd, TEST_POLICY};
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};
use tests::{bin, guest_elf};
use vmm::net::netd_client::{DEFAULT_TIMEOUT, NetdClient};

struct Opts {
    burst: Duration,
    bursts: u32,
    echoes: u32,
    pings: u32,
    qemu: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        burst: Duration::from_millis(100),
        bursts: 10,
        echoes: 2000,
        pings: 200,
        qemu: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} takes a number"))
        };
        match a.as_str() {
            "--burst-ms" => o.burst = Duration::from_millis(num("--burst-ms")),
            "--bursts" => o.bursts = num("--bursts") as u32,
            "--echoes" => o.echoes = num("--echoes") as u32,
            "--pings" => o.pings = num("--pings") as u32,
            "--skip-qemu" => o.qemu = false,
            _ => {
                eprintln!(
                    "usage: bench_net [--burst-ms N] [--bursts N] [--echoes N] [--pings N] [--skip-qemu]"
                );
                std::process::exit(2);
            }
        }
    }
    o
}

/// How a table row reads its number from a guest's results.
type Metric = fn(&Row) -> f64;

/// One guest's numbers.
#[derive(Default, Clone)]
struct Row {
    h2g_64: f64,
    h2g_64_sent: f64,
    h2g_1400: f64,
    h2g_1400_sent: f64,
    g2h_64: f64,
    g2h_1400: f64,
    echo_rps: f64,
    ping_p50: f64,
    ping_p99: f64,
    lost: String,
}

/// Floods port 9 (discard) in bursts; returns (frames the guest took per
/// second of sending, datagrams sent per second).
fn host_to_guest(link: &GuestLink, size: usize, o: &Opts) -> (f64, f64) {
    let payload = vec![0x5au8; size];
    let before = link.stats().expect("stats before").rx;
    let mut sent = 0u64;
    let mut sending = Duration::ZERO;
    let to = std::net::SocketAddrV4::new(link.ip, 9);
    for _ in 0..o.bursts {
        let t0 = Instant::now();
        while t0.elapsed() < o.burst {
            // A full socket buffer (ENOBUFS) is the host's limit: go on.
            if link.sock.send_to(&payload, to).is_ok() {
                sent += 1;
            }
        }
        sending += t0.elapsed();
        // Idle gap: the guest drains its queue and goes back to hlt.
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = link.stats().expect("stats after").rx;
    // The stats request itself is one received frame.
    let took = after.saturating_sub(before).saturating_sub(1);
    let secs = sending.as_secs_f64();
    (took as f64 / secs, sent as f64 / secs)
}

/// Blast from the guest: datagrams per second received by the host
/// (request to last datagram), and how many were lost.
fn guest_to_host(link: &GuestLink, count: u32, size: usize) -> (f64, u32) {
    let (seen, took) = link.blast(count, size, Duration::from_secs(3));
    let got = seen.iter().filter(|s| **s).count() as u32;
    (f64::from(got) / took.as_secs_f64().max(1e-6), count - got)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn measure(netd: &Netd, n: u8, o: &Opts) -> Row {
    assert!(
        wait_ping(&netd.ns, guest_ip(n), Duration::from_secs(30)),
        "guest {n} does not answer ping"
    );
    let link = GuestLink::new(&netd.ns, guest_ip(n));
    // Warm-up: ARP, caches.
    link.echo_round_trips(50, 64, Duration::from_secs(2));
    let mut r = Row::default();
    let mut lost = Vec::new();

    let t0 = Instant::now();
    let ok = link.echo_round_trips(o.echoes, 64, Duration::from_secs(2));
    r.echo_rps = f64::from(ok) / t0.elapsed().as_secs_f64();
    if ok != o.echoes {
        lost.push(format!("echo {}", o.echoes - ok));
    }

    let (_, got, mut rtts) = ping(&netd.ns, guest_ip(n), o.pings, "0.01", 2);
    rtts.sort_by(|a, b| a.total_cmp(b));
    r.ping_p50 = percentile(&rtts, 0.5);
    r.ping_p99 = percentile(&rtts, 0.99);
    if got != o.pings {
        lost.push(format!("ping {}", o.pings - got));
    }

    (r.h2g_64, r.h2g_64_sent) = host_to_guest(&link, 64, o);
    (r.h2g_1400, r.h2g_1400_sent) = host_to_guest(&link, 1400, o);

    let (pps, l) = guest_to_host(&link, 1000, 64);
    r.g2h_64 = pps;
    if l > 0 {
        lost.push(format!("blast64 {l}"));
    }
    let (pps, l) = guest_to_host(&link, 300, 1400);
    r.g2h_1400 = pps;
    if l > 0 {
        lost.push(format!("blast1400 {l}"));
    }
    r.lost = if lost.is_empty() {
        "none".into()
    } else {
        lost.join(", ")
    };
    r
}

/// The ceiling: a host loop writing frames (vnet header + Ethernet + IPv4 +
/// UDP) to a netd TAP on the bridge, for `dur`. Frames go to an unknown
/// unicast MAC, so the bridge drops them after the TAP hands them over.
fn raw_tap_rate(netd: &Netd, name: &str, size: usize, dur: Duration) -> f64 {
    let mut c = NetdClient::connect(&netd.socket, DEFAULT_TIMEOUT).expect("connect to netd");
    let tap = c
        .open_tap(name, 1, true, false, None)
        .expect("netd gives root's tenant a TAP");
    let fd: &OwnedFd = tap.taps.first().expect("one TAP fd");
    let frame = tests::net_guest::udp_frame(
        [0x52, 0x54, 0x00, 0xee, 0xee, 0x01],
        [0x52, 0x54, 0x00, 0xee, 0xee, 0x02],
        (Ipv4Addr::new(10, 0, 1, 250), 9),
        (Ipv4Addr::new(10, 0, 1, 251), 9),
        &vec![0u8; size],
    );
    let mut buf = vec![0u8; 12]; // vnet header: no offload
    buf.extend_from_slice(&frame);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < dur {
        for _ in 0..64 {
            // SAFETY: write(2) from a live buffer to a TAP fd we own.
            let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if r == buf.len() as isize {
                n += 1;
            }
        }
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let o = parse_opts();
    let netd = Netd::start(&bin("netd"), "bn", TEST_POLICY, &[]);
    let ceiling_64 = raw_tap_rate(&netd, "s0", 64, Duration::from_millis(500));
    let ceiling_1400 = raw_tap_rate(&netd, "s1", 1400, Duration::from_millis(500));

    eprintln!("bench_net: vmm guest ...");
    let (vm, _) = start_vmm_guest(
        vmm_command(&netd, "vm1", 1, "", None, RunAs::RootWithUserOption),
        BOOT_TIMEOUT,
    );
    let vmm_row = measure(&netd, 1, &o);
    drop(vm); // killed: its TAP goes before the next guest starts

    let qemu_row = if o.qemu && qemu_available() {
        eprintln!("bench_net: QEMU guest ...");
        let mut q = VmmProcess::spawn(qemu_command(
            &bin("netd_probe"),
            &guest_elf(),
            &netd,
            "vm2",
            2,
        ));
        q.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
        let r = measure(&netd, 2, &o);
        drop(q);
        Some(r)
    } else {
        eprintln!("bench_net: QEMU skipped");
        None
    };

    let cpu = Command::new("nproc")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "bench_net: same test guest, netd TAP on a bridge, {cpu} host CPUs; host->guest floods in {} bursts of {:?}",
        o.bursts, o.burst
    );
    let _ = writeln!(
        out,
        "{:<34} {:>12} {:>12} {:>9}",
        "metric", "vmm", "qemu", "vmm/qemu"
    );
    let rows: [(&str, Metric); 9] = [
        ("host->guest 64B pps (taken)", |r| r.h2g_64),
        ("  (sent by host, pps)", |r| r.h2g_64_sent),
        ("host->guest 1400B pps (taken)", |r| r.h2g_1400),
        ("  (sent by host, pps)", |r| r.h2g_1400_sent),
        ("guest->host 64B pps (blast)", |r| r.g2h_64),
        ("guest->host 1400B pps (blast)", |r| r.g2h_1400),
        ("UDP echo round trips/s", |r| r.echo_rps),
        ("ping RTT p50 (ms, lower is better)", |r| r.ping_p50),
        ("ping RTT p99 (ms, lower is better)", |r| r.ping_p99),
    ];
    for (name, f) in rows {
        let v = f(&vmm_row);
        match &qemu_row {
            Some(q) => {
                let qv = f(q);
                let _ = writeln!(out, "{name:<34} {v:>12.2} {qv:>12.2} {:>9.2}", v / qv);
            }
            None => {
                let _ = writeln!(out, "{name:<34} {v:>12.2} {:>12} {:>9}", "-", "-");
            }
        }
    }
    let _ = writeln!(
        out,
        "{:<34} {:>12} {:>12}",
        "losses",
        vmm_row.lost,
        qemu_row.as_ref().map(|q| q.lost.as_str()).unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "ceiling: host loop writing frames to a TAP: 64B {ceiling_64:.0} pps, 1400B {ceiling_1400:.0} pps"
    );
}
