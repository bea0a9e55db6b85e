//! Network benchmark: the same test guest on vmm and on QEMU microvm
//! (userspace virtio-net, vhost=off), each on a TAP from a real netd that
//! this program starts in a namespace of its own; plus the rate of a plain
//! host loop writing frames to a TAP, as the ceiling. Prints a table.
//!
//! bench_net [--burst-ms N] [--bursts N] [--echoes N] [--pings N] [--rounds N] [--skip-qemu]
//!
//! Run as root after `cargo build --release --workspace`. Guest code that
//! runs for more than ~20 ms without idling drops into slow instruction
//! emulation on this nested KVM, so host->guest floods are split into short
//! bursts with idle gaps (each timed until the guest has drained it), and
//! blasts are sized to last well under a second. The host's 2 cores are
//! shared with whatever else runs: compare vmm and QEMU within one run.

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
    rounds: u32,
    qemu: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        burst: Duration::from_millis(20),
        bursts: 20,
        echoes: 2000,
        pings: 200,
        rounds: 3,
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
            "--rounds" => o.rounds = (num("--rounds") as u32).max(1),
            "--skip-qemu" => o.qemu = false,
            _ => {
                eprintln!(
                    "usage: bench_net [--burst-ms N] [--bursts N] [--echoes N] [--pings N] [--rounds N] [--skip-qemu]"
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

/// The stats request sent right after a burst queues behind the burst's
/// frames in the TAP (FIFO), so its reply marks the moment the guest has
/// taken everything before it. Short per-try timeout: when the TAP queue was
/// full the request itself may have been dropped. Returns (rx, tries).
fn stats_after_burst(link: &GuestLink) -> (u64, u64) {
    for tries in 1..=200u64 {
        if let Some(reply) = link.call(5000, b"", 1, Duration::from_millis(20))
            && let Ok(st) = tests::net_guest::GuestStats::parse(&reply)
        {
            return (st.rx, tries);
        }
    }
    panic!("no stats reply after a burst");
}

/// Floods port 9 (discard) in bursts; each burst is timed from its first
/// datagram to the stats reply queued behind its last, so frames still
/// waiting in the TAP when sending stops count only once taken. Returns
/// (frames the guest took per second, datagrams the host sent per second).
fn host_to_guest(link: &GuestLink, size: usize, o: &Opts) -> (f64, f64) {
    let payload = vec![0x5au8; size];
    let to = std::net::SocketAddrV4::new(link.ip, 9);
    let (mut taken, mut sent) = (0u64, 0u64);
    let (mut busy, mut sending) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..o.bursts {
        let (before, _) = stats_after_burst(link);
        let t0 = Instant::now();
        while t0.elapsed() < o.burst {
            // A full socket buffer (ENOBUFS) is the host's limit: go on.
            if link.sock.send_to(&payload, to).is_ok() {
                sent += 1;
            }
        }
        sending += t0.elapsed();
        let (after, tries) = stats_after_burst(link);
        busy += t0.elapsed();
        // Each stats request is a received frame too.
        taken += after.saturating_sub(before).saturating_sub(tries);
        // Idle gap: the guest goes back to hlt.
        std::thread::sleep(Duration::from_millis(100));
    }
    (
        taken as f64 / busy.as_secs_f64(),
        sent as f64 / sending.as_secs_f64(),
    )
}

/// Blast from the guest: datagrams per second received by the host
/// (request to last datagram), and how many were lost.
fn guest_to_host(link: &GuestLink, count: u32, size: usize) -> (f64, u32) {
    let (seen, took) = link.blast(count, size, Duration::from_secs(3));
    let got = seen.iter().filter(|s| **s).count() as u32;
    (f64::from(got) / took.as_secs_f64().max(1e-6), count - got)
}

/// Each metric's median over the rounds; losses of all rounds.
fn median_row(rows: &[Row]) -> Row {
    let med = |f: Metric| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 0.5)
    };
    let lost: Vec<&str> = rows
        .iter()
        .map(|r| r.lost.as_str())
        .filter(|l| *l != "none")
        .collect();
    Row {
        h2g_64: med(|r| r.h2g_64),
        h2g_64_sent: med(|r| r.h2g_64_sent),
        h2g_1400: med(|r| r.h2g_1400),
        h2g_1400_sent: med(|r| r.h2g_1400_sent),
        g2h_64: med(|r| r.g2h_64),
        g2h_1400: med(|r| r.g2h_1400),
        echo_rps: med(|r| r.echo_rps),
        ping_p50: med(|r| r.ping_p50),
        ping_p99: med(|r| r.ping_p99),
        lost: if lost.is_empty() {
            "none".into()
        } else {
            lost.join("; ")
        },
    }
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

    std::thread::sleep(Duration::from_millis(500));
    (r.h2g_64, r.h2g_64_sent) = host_to_guest(&link, 64, o);
    std::thread::sleep(Duration::from_millis(500));
    (r.h2g_1400, r.h2g_1400_sent) = host_to_guest(&link, 1400, o);

    // Let the guest settle in hlt after the floods.
    std::thread::sleep(Duration::from_secs(1));
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

    // Both guests run at once (the idle one sits in hlt) and are measured
    // in turns, round after round: load from elsewhere on the host then
    // hits both alike, and the medians are compared.
    let (vm, _) = start_vmm_guest(
        vmm_command(&netd, "vm1", 1, "", None, RunAs::RootWithUserOption),
        BOOT_TIMEOUT,
    );
    let qemu = if o.qemu && qemu_available() {
        let mut q = VmmProcess::spawn(qemu_command(
            &bin("netd_probe"),
            &guest_elf(),
            &netd,
            "vm2",
            2,
        ));
        q.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
        Some(q)
    } else {
        eprintln!("bench_net: QEMU skipped");
        None
    };
    let mut vmm_rows = Vec::new();
    let mut qemu_rows = Vec::new();
    for round in 1..=o.rounds {
        eprintln!("bench_net: round {round}/{}: vmm", o.rounds);
        let r = measure(&netd, 1, &o);
        if r.lost != "none" {
            eprintln!(
                "bench_net: vmm guest console:\n{}\n{}",
                vm.output(),
                vm.stderr()
            );
        }
        vmm_rows.push(r);
        if qemu.is_some() {
            eprintln!("bench_net: round {round}/{}: QEMU", o.rounds);
            qemu_rows.push(measure(&netd, 2, &o));
        }
    }
    drop(vm);
    drop(qemu);
    let vmm_row = median_row(&vmm_rows);
    let qemu_row = (!qemu_rows.is_empty()).then(|| median_row(&qemu_rows));

    let cpu = Command::new("nproc")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "bench_net: same test guest, netd TAP on a bridge, {cpu} host CPUs; medians of {} rounds; host->guest floods in {} bursts of {:?}",
        o.rounds, o.bursts, o.burst
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
