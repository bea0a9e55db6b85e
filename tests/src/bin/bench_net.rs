//! Network benchmark: the same test guest on four network devices, each
//! on a TAP from a real netd that this program starts in a namespace of
//! its own, measured in one run:
//! - `vmm`: the vmm's in-process virtio-net;
//! - `vmm+vu`: the vmm as the frontend of this workspace's vhost-user-net
//!   backend (`--net vhost-user=`); shown as "-" with the vmm's reason
//!   while the vmm refuses that option;
//! - `qemu`: QEMU microvm's userspace virtio-net (vhost=off);
//! - `qemu+vu`: QEMU microvm as the frontend of the same backend.
//!
//! plus the rate of a plain host loop writing frames to a TAP, as the
//! ceiling. Prints a table with ratios: `backend/in-vmm` (vmm+vu / vmm,
//! the target: within 10%) and `qvu/qemu` (our backend against
//! QEMU's own userspace device, same frontend).
//!
//! bench_net [--burst-ms N] [--bursts N] [--echoes N] [--pings N] [--rounds N]
//!           [--skip-qemu] [--skip-vhost-user]
//!
//! Run as root after `cargo build --release --workspace`. Guest code that
//! runs for more than ~20 ms without idling drops into slow instruction
//! emulation on this nested KVM, so host->guest floods are split into short
//! bursts with idle gaps (each timed until the guest has drained it), and
//! blasts are sized to last well under a second. The host's 2 cores are
//! shared with whatever else runs: compare columns within one run.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::leftovers::{install_cleanup_on_panic, leftovers};
use tests::net_guest::{
    GuestLink, RunAs, guest_ip, ping, qemu_available, qemu_command, vmm_command, wait_ping,
};
use tests::netd_harness::{Netd, TEST_POLICY};
use tests::vhost_user::{Backend, qemu_frontend_command, vmm_frontend_command};
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};
use tests::{TempDir, bin, guest_elf};
use vmm::net::netd_client::{DEFAULT_TIMEOUT, NetdClient};

/// The test guest's line once its network is up.
const BANNER: &str = "testguest: up boot_id=";

const USAGE: &str = "usage: bench_net [--burst-ms N] [--bursts N] [--echoes N] [--pings N] [--rounds N] [--skip-qemu] [--skip-vhost-user]";

struct Opts {
    burst: Duration,
    bursts: u32,
    echoes: u32,
    pings: u32,
    rounds: u32,
    qemu: bool,
    vhost_user: bool,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        burst: Duration::from_millis(20),
        bursts: 20,
        echoes: 2000,
        pings: 200,
        rounds: 3,
        qemu: true,
        vhost_user: true,
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
            "--skip-vhost-user" => o.vhost_user = false,
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    o
}

// ------------------------------------------------------------ columns ---

/// A guest on one kind of network device: its column of the table.
struct Subject {
    /// Column header.
    name: &'static str,
    /// What the column is, for the legend.
    what: &'static str,
    /// Guest number (its address and MAC).
    n: u8,
    /// The running guest (and backend), or why there is none.
    run: Result<Running, String>,
    rows: Vec<Row>,
}

struct Running {
    guest: VmmProcess,
    /// Dropped after the guest (field order): the frontend goes first.
    backend: Option<Backend>,
}

impl Subject {
    fn new(name: &'static str, what: &'static str, n: u8, run: Result<Running, String>) -> Self {
        Subject {
            name,
            what,
            n,
            run,
            rows: Vec::new(),
        }
    }

    /// Guest `n` booted by `cmd` (a child the panic hook kills), on
    /// `backend` if any.
    fn booted(
        name: &'static str,
        what: &'static str,
        n: u8,
        cmd: Command,
        backend: Option<Backend>,
    ) -> Self {
        let mut guest = spawn(cmd);
        guest.wait_for_line(BANNER, BOOT_TIMEOUT);
        Subject::new(name, what, n, Ok(Running { guest, backend }))
    }

    fn skipped(name: &'static str, what: &'static str, n: u8, why: &str) -> Self {
        Subject::new(name, what, n, Err(why.to_string()))
    }

    fn median(&self) -> Option<Row> {
        (!self.rows.is_empty()).then(|| median_row(&self.rows))
    }
}

/// Spawns a vmm or QEMU child that the panic hook kills.
fn spawn(cmd: Command) -> VmmProcess {
    let p = VmmProcess::spawn(cmd);
    leftovers().pids.push(p.pid());
    p
}

/// Starts a backend (one the panic hook kills) on TAP `tap`.
fn start_backend(netd: &Netd, dir: &TempDir, tap: &str) -> Backend {
    let b = Backend::spawn(netd, dir.path(), tap, 1);
    leftovers().pids.push(b.pid());
    b.wait_serving();
    b
}

/// Whether `pid` has exited (a zombie not yet reaped counts as exited).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// The vmm as the backend's frontend. A vmm that exits before the guest is
/// up (today: the usage error for `--net vhost-user=`) or never boots it
/// gives the column's reason instead of a guest.
fn start_vmm_frontend(backend: Backend, n: u8) -> Result<Running, String> {
    let guest = spawn(vmm_frontend_command(&backend.sock, "vu0", n, 1));
    let pids = [guest.pid(), backend.pid()];
    let run = wait_vmm_frontend(guest, backend);
    if run.is_err() {
        // Both were reaped on the way out: their pids may be reused.
        leftovers().pids.retain(|p| !pids.contains(p));
    }
    run
}

fn wait_vmm_frontend(guest: VmmProcess, backend: Backend) -> Result<Running, String> {
    let last_line = |p: &VmmProcess| {
        // The stderr reader may lag the exit a little.
        let t0 = Instant::now();
        while p.stderr().trim().is_empty() && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = p.stderr();
        err.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(nothing on stderr)")
            .trim()
            .to_string()
    };
    let t0 = Instant::now();
    loop {
        if guest.output().contains(BANNER) {
            return Ok(Running {
                guest,
                backend: Some(backend),
            });
        }
        if exited(guest.pid()) {
            return Err(format!(
                "the vmm exited before the guest was up: {}",
                last_line(&guest)
            ));
        }
        if t0.elapsed() > BOOT_TIMEOUT {
            return Err(format!(
                "no guest banner within {BOOT_TIMEOUT:?}; vmm: {}; backend: {}",
                last_line(&guest),
                backend.log().lines().last().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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

/// A ratio column: `a / b` of a metric, "-" when either is missing.
fn ratio(a: Option<&Row>, b: Option<&Row>, f: Metric) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}", f(a) / f(b)),
        _ => "-".into(),
    }
}

/// The target, from the medians: the backend (vmm+vu) within 10%
/// of the in-vmm device on each pps metric (ratio >= 0.90, higher is
/// better) and on RTT (ratio <= 1.10, lower is better).
fn target_verdict(vu: Option<&Row>, vmm: Option<&Row>, why_not: &str) -> String {
    let (Some(vu), Some(vmm)) = (vu, vmm) else {
        return format!("not measured ({why_not})");
    };
    let higher: [(&str, Metric); 5] = [
        ("host->guest 64B", |r| r.h2g_64),
        ("host->guest 1400B", |r| r.h2g_1400),
        ("guest->host 64B", |r| r.g2h_64),
        ("guest->host 1400B", |r| r.g2h_1400),
        ("echo", |r| r.echo_rps),
    ];
    let lower: [(&str, Metric); 2] = [("RTT p50", |r| r.ping_p50), ("RTT p99", |r| r.ping_p99)];
    let mut missed: Vec<String> = higher
        .iter()
        .filter(|(_, f)| f(vu) / f(vmm) < 0.90)
        .map(|(n, f)| format!("{n} {:.2}", f(vu) / f(vmm)))
        .collect();
    missed.extend(
        lower
            .iter()
            .filter(|(_, f)| f(vu) / f(vmm) > 1.10)
            .map(|(n, f)| format!("{n} {:.2}", f(vu) / f(vmm))),
    );
    if missed.is_empty() {
        "met".into()
    } else {
        format!("missed on {}", missed.join(", "))
    }
}

fn main() {
    let o = parse_opts();
    install_cleanup_on_panic();
    let netd = Netd::start(&bin("netd"), "bn", TEST_POLICY, &[]);
    {
        let mut l = leftovers();
        l.pids.push(netd.pid());
        l.netns.push(netd.ns.name.clone());
        l.paths.push(netd.dir.clone());
    }
    let dir = TempDir::new("bench-net");
    leftovers().paths.push(dir.0.clone());
    let ceiling_64 = raw_tap_rate(&netd, "s0", 64, Duration::from_millis(500));
    let ceiling_1400 = raw_tap_rate(&netd, "s1", 1400, Duration::from_millis(500));

    // All guests run at once (the idle ones sit in hlt, the backends in
    // epoll) and are measured in turns, round after round: load from
    // elsewhere on the host then hits all alike, and the medians are
    // compared.
    let qemu_ok = o.qemu && qemu_available();
    let no_qemu = if o.qemu {
        "QEMU not installed"
    } else {
        "skipped (--skip-qemu)"
    };
    let no_vu = "skipped (--skip-vhost-user)";
    let mut subjects = Vec::new();
    subjects.push(Subject::booted(
        "vmm",
        "vmm, in-vmm virtio-net on a netd TAP",
        1,
        vmm_command(&netd, "vm1", 1, "", None, RunAs::RootWithUserOption),
        None,
    ));
    let (name, what) = ("vmm+vu", "vmm as frontend of vhost-user-net (netd TAP)");
    subjects.push(if o.vhost_user {
        let b = start_backend(&netd, &dir, "vm4");
        Subject::new(name, what, 4, start_vmm_frontend(b, 4))
    } else {
        Subject::skipped(name, what, 4, no_vu)
    });
    let (name, what) = (
        "qemu",
        "QEMU microvm, userspace virtio-net (vhost=off), netd TAP",
    );
    subjects.push(if qemu_ok {
        let cmd = qemu_command(&bin("netd_probe"), &guest_elf(), &netd, "vm2", 2);
        Subject::booted(name, what, 2, cmd, None)
    } else {
        Subject::skipped(name, what, 2, no_qemu)
    });
    let (name, what) = (
        "qemu+vu",
        "QEMU microvm as frontend of vhost-user-net (netd TAP)",
    );
    subjects.push(if !qemu_ok {
        Subject::skipped(name, what, 3, no_qemu)
    } else if !o.vhost_user {
        Subject::skipped(name, what, 3, no_vu)
    } else {
        let b = start_backend(&netd, &dir, "vm3");
        let cmd = qemu_frontend_command(&b.sock, 3, 1);
        Subject::booted(name, what, 3, cmd, Some(b))
    });
    for s in subjects.iter().filter(|s| s.run.is_err()) {
        if let Err(why) = &s.run {
            eprintln!("bench_net: {}: not measured: {why}", s.name);
        }
    }

    for round in 1..=o.rounds {
        for s in &mut subjects {
            let Ok(run) = &s.run else { continue };
            eprintln!("bench_net: round {round}/{}: {}", o.rounds, s.name);
            let r = measure(&netd, s.n, &o);
            if r.lost != "none" {
                eprintln!(
                    "bench_net: {} guest console:\n{}\n{}\n{}",
                    s.name,
                    run.guest.output(),
                    run.guest.stderr(),
                    run.backend.as_ref().map(Backend::log).unwrap_or_default()
                );
            }
            s.rows.push(r);
        }
    }
    // Everything stops here; nothing is left for the panic hook to kill
    // (the pids are about to be reaped and could be reused).
    leftovers().pids.clear();
    let medians: Vec<Option<Row>> = subjects.iter().map(Subject::median).collect();
    let why: Vec<Option<String>> = subjects
        .iter()
        .map(|s| s.run.as_ref().err().cloned())
        .collect();
    let legend: Vec<(&str, &str)> = subjects.iter().map(|s| (s.name, s.what)).collect();
    drop(subjects);
    let [vmm_m, vvu_m, qemu_m, qvu_m] = [0, 1, 2, 3].map(|i| medians[i].as_ref());

    let cpu = Command::new("nproc")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "bench_net: same test guest, netd TAPs on one bridge, {cpu} host CPUs (shared: noisy); medians of {} rounds, columns interleaved; host->guest floods in {} bursts of {:?}",
        o.rounds, o.bursts, o.burst
    );
    for ((name, what), why) in legend.iter().zip(&why) {
        match why {
            None => {
                let _ = writeln!(out, "  {name:<8} {what}");
            }
            Some(w) => {
                let _ = writeln!(out, "  {name:<8} {what}: - ({w})");
            }
        }
    }
    let _ = writeln!(
        out,
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>14} {:>9} {:>9}",
        "metric", "vmm", "vmm+vu", "qemu", "qemu+vu", "backend/in-vmm", "qvu/qemu", "vmm/qemu"
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
        let cell = |m: Option<&Row>| m.map_or_else(|| "-".to_string(), |r| format!("{:.2}", f(r)));
        let _ = writeln!(
            out,
            "{name:<34} {:>10} {:>10} {:>10} {:>10} {:>14} {:>9} {:>9}",
            cell(vmm_m),
            cell(vvu_m),
            cell(qemu_m),
            cell(qvu_m),
            ratio(vvu_m, vmm_m, f),
            ratio(qvu_m, qemu_m, f),
            ratio(vmm_m, qemu_m, f),
        );
    }
    for (i, (name, _)) in legend.iter().enumerate() {
        let _ = writeln!(
            out,
            "losses {name:<8} {}",
            medians[i].as_ref().map_or("-", |r| r.lost.as_str())
        );
    }
    let _ = writeln!(
        out,
        "target (vmm+vu within 10% of vmm: pps ratio >= 0.90, RTT ratio <= 1.10): {}",
        target_verdict(vvu_m, vmm_m, why[1].as_deref().unwrap_or("no rounds"))
    );
    let _ = writeln!(
        out,
        "ceiling: host loop writing frames to a TAP: 64B {ceiling_64:.0} pps, 1400B {ceiling_1400:.0} pps"
    );
}
