//! Live-migration benchmark: chained local migrations of the test guest on
//! vmm (backend transfer, and the classic path with a new TAP from netd)
//! and on QEMU 7.2 microvm (RAM in one shared file, `x-ignore-shared`, a
//! new TAP), at two RAM sizes, each under a 1,000 pps UDP echo stream.
//! Prints a table; asserts nothing about speed.
//!
//! bench_migrate [--runs N] [--qemu-runs N] [--sizes 256M,16G] [--pps N]
//!               [--paths transfer,classic,qemu] [--skip-qemu] [--verbose]
//!               [--guest-busy] [--host-load] [--rows] [--vcpus 1,2,4,8]
//!
//! `--guest-busy`: the guests boot with `testguest.busy` (their vCPU
//! computes and writes RAM between interrupts); `--host-load`: one host
//! core is kept busy by another process (a shell loop) during each chain.
//! Rows so made are labelled " busy" / " loaded". `--rows`: the issue's
//! table in one run, whatever `--sizes`/`--paths` say: transfer and QEMU at
//! 256M and 16G, then transfer and QEMU at 256M busy and at 256M loaded.
//! `--vcpus 1,2,4,8`: each row at each vCPU count (`--vcpus N` for vmm,
//! `-smp N` for QEMU), labelled " N vCPUs" (without it, one vCPU).
//!
//! Run as root after `cargo build --release --workspace`. It starts its own
//! netd in a network namespace. Each migration's target becomes the next
//! one's source: a vmm target is started with `--incoming` on a new path
//! and no `--api-socket` (it takes over the source's API socket, so one
//! path serves the whole chain); a QEMU target with `-incoming defer`.
//!
//! Downtime: vmm reports it (source vCPU pause to target vCPU resume,
//! CLOCK_MONOTONIC of both processes); for QEMU it is the target's RESUME
//! event minus the source's STOP event (CLOCK_REALTIME of both). Guest RAM
//! is never touched beyond what the guest uses, so a 16 GiB guest costs
//! no host memory (a sparse memfd, or a sparse file in /dev/shm).
//! Packets lost: datagrams of the stream sent from the start of a
//! migration request to 100 ms after its reply whose echo never came.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::api::{MigrationPhases, MigrationReport};
use common::migration::marks;
use serde_json::{Value, json};
use tests::echo_stream::{EchoStream, StreamResult};
use tests::leftovers::{install_cleanup_on_panic, leftovers};
use tests::net_guest::{
    GuestLink, RunAs, ScratchDir, guest_ip, guest_mac, qemu_available, qemu_on_netd_tap,
    vmm_command_with_cmdline, wait_ping,
};
use tests::netd_harness::{NOBODY, Netd, TEST_POLICY};
use tests::qmp::{Qmp, event_time_us, realtime_us};
use tests::stats::{percentile, quartet};
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};
use tests::{bin, guest_elf};

/// A migration (or a QEMU migration event) must be done within this.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// A stream datagram sent this long after a migration's reply still counts
/// as sent during it (it may have met the old TAP or a paused guest).
const LOSS_WINDOW_TAIL: Duration = Duration::from_millis(100);

struct Opts {
    runs: usize,
    qemu_runs: usize,
    sizes: Vec<String>,
    pps: u32,
    /// Which chains to run: "transfer", "classic", "qemu".
    paths: Vec<String>,
    /// One line per migration: downtime and where the lost datagrams were.
    verbose: bool,
    /// Guests boot with `testguest.busy`.
    guest_busy: bool,
    /// One host core busy with another process during each chain.
    host_load: bool,
    /// The fixed set of rows ([`Row::issue_rows`]).
    rows: bool,
    /// vCPU counts; every row is run at each.
    vcpus: Vec<u8>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        runs: 50,
        qemu_runs: 20,
        sizes: vec!["256M".into(), "16G".into()],
        pps: 1000,
        paths: vec!["transfer".into(), "classic".into(), "qemu".into()],
        verbose: false,
        guest_busy: false,
        host_load: false,
        rows: false,
        vcpus: vec![1],
    };
    let usage = "usage: bench_migrate [--runs N] [--qemu-runs N] [--sizes 256M,16G] [--pps N] [--paths transfer,classic,qemu] [--skip-qemu] [--verbose] [--guest-busy] [--host-load] [--rows] [--vcpus 1,2,4,8]";
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next().unwrap_or_else(|| {
                eprintln!("{usage}");
                std::process::exit(2)
            })
        };
        let num = |v: String| -> usize {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{usage}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--runs" => o.runs = num(value()).max(1),
            "--qemu-runs" => o.qemu_runs = num(value()).max(1),
            "--sizes" => o.sizes = value().split(',').map(str::to_string).collect(),
            "--pps" => o.pps = num(value()).max(1) as u32,
            "--paths" => o.paths = value().split(',').map(str::to_string).collect(),
            "--skip-qemu" => o.paths.retain(|p| p != "qemu"),
            "--verbose" => o.verbose = true,
            "--guest-busy" => o.guest_busy = true,
            "--host-load" => o.host_load = true,
            "--rows" => o.rows = true,
            "--vcpus" => {
                o.vcpus = value()
                    .split(',')
                    .map(|v| num(v.to_string()).clamp(1, 255) as u8)
                    .collect()
            }
            _ => {
                eprintln!("{usage}");
                std::process::exit(2);
            }
        }
    }
    o
}

/// Which chain a row runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chain {
    Transfer,
    Classic,
    Qemu,
}

/// One row of the table: a chain of migrations and its conditions.
struct Row {
    path: Chain,
    ram: String,
    /// The guest runs `testguest.busy`.
    busy: bool,
    /// Another process keeps one host core busy.
    loaded: bool,
    vcpus: u8,
}

impl Row {
    fn new(path: Chain, ram: &str, busy: bool, loaded: bool) -> Row {
        Row {
            path,
            ram: ram.to_string(),
            busy,
            loaded,
            vcpus: 1,
        }
    }

    /// Each row at each vCPU count, in that order.
    fn at_vcpu_counts(rows: Vec<Row>, counts: &[u8]) -> Vec<Row> {
        counts
            .iter()
            .flat_map(|&n| {
                rows.iter().map(move |r| Row {
                    ram: r.ram.clone(),
                    vcpus: n,
                    ..*r
                })
            })
            .collect()
    }

    /// `--rows`: the rows issue 13 asks for, in one run.
    fn issue_rows() -> Vec<Row> {
        use Chain::{Qemu, Transfer};
        vec![
            Row::new(Transfer, "256M", false, false),
            Row::new(Transfer, "16G", false, false),
            Row::new(Qemu, "256M", false, false),
            Row::new(Qemu, "16G", false, false),
            Row::new(Transfer, "256M", true, false),
            Row::new(Transfer, "256M", false, true),
            Row::new(Qemu, "256M", true, false),
            Row::new(Qemu, "256M", false, true),
        ]
    }

    /// Without `--rows`: every asked path at every size, vmm first.
    fn from_opts(o: &Opts) -> Vec<Row> {
        let mut rows = Vec::new();
        let asked = |p: &str| o.paths.iter().any(|q| q == p);
        for ram in &o.sizes {
            for (name, path) in [("transfer", Chain::Transfer), ("classic", Chain::Classic)] {
                if asked(name) {
                    rows.push(Row::new(path, ram, o.guest_busy, o.host_load));
                }
            }
        }
        if asked("qemu") {
            for ram in &o.sizes {
                rows.push(Row::new(Chain::Qemu, ram, o.guest_busy, o.host_load));
            }
        }
        rows
    }

    fn label(&self) -> String {
        let base = match self.path {
            Chain::Transfer => "vmm backend transfer",
            Chain::Classic => "vmm new TAP (classic)",
            Chain::Qemu => "QEMU 7.2 new TAP",
        };
        format!(
            "{base}{}{}{}",
            if self.busy { " busy" } else { "" },
            if self.loaded { " loaded" } else { "" },
            if self.vcpus > 1 {
                format!(" {} vCPUs", self.vcpus)
            } else {
                String::new()
            }
        )
    }

    /// Distinguishes the file names of rows of the same path and size.
    fn tag(&self) -> String {
        format!(
            "{}{}{}-{}cpu",
            self.ram,
            if self.busy { "-busy" } else { "" },
            if self.loaded { "-loaded" } else { "" },
            self.vcpus
        )
    }

    /// Extra guest command-line keys.
    fn cmdline_extra(&self) -> &'static str {
        if self.busy { "testguest.busy" } else { "" }
    }
}

/// One host core kept busy by another process (a shell loop) while it
/// lives; the panic hook kills it too.
struct HostLoad(std::process::Child);

impl HostLoad {
    fn start() -> HostLoad {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("start the host load");
        leftovers().pids.push(child.id());
        HostLoad(child)
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let pid = self.0.id();
        leftovers().pids.retain(|q| *q != pid);
    }
}

/// One chain of migrations of one guest.
struct Series {
    label: String,
    ram: String,
    /// Downtime of each migration, microseconds.
    downtime_us: Vec<f64>,
    /// Pause to the target's vCPUs resuming, microseconds: for vmm the
    /// target's "sending resumed" mark (its vCPUs wake right after; both
    /// processes' CLOCK_MONOTONIC), for QEMU the same as `downtime_us`
    /// (its STOP and RESUME events). The source-clock `downtime_us` of
    /// vmm also counts the source's own wake-up to read Resumed.
    guest_paused_us: Vec<f64>,
    /// Request to reply (vmm: vmctl's total; QEMU: `migrate` to the
    /// target's RESUME event), microseconds.
    total_us: Vec<f64>,
    /// vmm's phases of each migration.
    phases: Vec<MigrationPhases>,
    /// QEMU's own `downtime` from query-migrate, milliseconds.
    qemu_reported_ms: Vec<f64>,
    /// Migration request start and reply.
    windows: Vec<(Instant, Instant)>,
    /// When each migration's source was seen gone, and when the next
    /// target listened.
    marks: Vec<(Option<Instant>, Option<Instant>)>,
    stream: Option<StreamResult>,
    /// How the sources ended ("exit 0", "SIGSYS", ...), counted.
    source_exits: BTreeMap<String, usize>,
    /// The guest's boot_id before the first and after the last migration.
    boot_ids: (String, String),
}

impl Series {
    fn new(label: String, ram: &str) -> Series {
        Series {
            label,
            ram: ram.to_string(),
            downtime_us: Vec::new(),
            guest_paused_us: Vec::new(),
            total_us: Vec::new(),
            phases: Vec::new(),
            qemu_reported_ms: Vec::new(),
            windows: Vec::new(),
            marks: Vec::new(),
            stream: None,
            source_exits: BTreeMap::new(),
            boot_ids: (String::new(), String::new()),
        }
    }

    fn note_exit(&mut self, st: ExitStatus) {
        let what = match (st.code(), st.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(libc::SIGSYS)) => "SIGSYS".to_string(),
            (None, Some(s)) => format!("signal {s}"),
            _ => "?".to_string(),
        };
        *self.source_exits.entry(what).or_default() += 1;
    }

    /// (sent, lost during migrations, most lost in one migration, lost
    /// outside them).
    fn losses(&self) -> (usize, usize, usize, usize) {
        let per = self.lost_per_migration();
        let outside =
            self.stream.as_ref().map_or(0, |s| s.lost().len()) - per.iter().sum::<usize>();
        (
            self.stream.as_ref().map_or(0, StreamResult::sent),
            per.iter().sum(),
            per.iter().copied().max().unwrap_or(0),
            outside,
        )
    }

    /// Datagrams lost in each migration's window.
    fn lost_per_migration(&self) -> Vec<usize> {
        let Some(s) = &self.stream else {
            return Vec::new();
        };
        let mut per = vec![0usize; self.windows.len()];
        for t in s.lost() {
            if let Some(i) = self
                .windows
                .iter()
                .position(|(a, b)| t >= *a && t <= *b + LOSS_WINDOW_TAIL)
            {
                per[i] += 1;
            }
        }
        per
    }
}

/// Waits until `path` exists (a target's listening socket) or its process
/// exits.
fn wait_for_socket(p: &mut VmmProcess, path: &Path, what: &str) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "{what}: no socket {} within {BOOT_TIMEOUT:?}\nstderr:\n{}",
            path.display(),
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn boot_id(netd: &Netd, n: u8) -> String {
    GuestLink::new(&netd.ns, guest_ip(n))
        .stats()
        .map(|s| s.boot_id)
        .unwrap_or_else(|e| format!("({e})"))
}

/// A row with a busy guest checks that the guest says so (stats `busy=`).
fn check_busy(netd: &Netd, n: u8, row: &Row) {
    if !row.busy {
        return;
    }
    let stats = GuestLink::new(&netd.ns, guest_ip(n)).stats();
    assert!(
        stats.as_ref().is_ok_and(|s| s.busy.is_some()),
        "{} {}: the guest does not report testguest.busy: {stats:?}",
        row.label(),
        row.ram
    );
}

/// Starts the stream and waits until its echoes flow.
fn start_stream(netd: &Netd, n: u8, pps: u32) -> EchoStream {
    let stream = EchoStream::start(&netd.ns, guest_ip(n), pps, 1);
    let t0 = Instant::now();
    while stream.echoed() < 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the guest does not echo the stream"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stream
}

// ---------------------------------------------------------- leftovers ---

/// Spawns a vmm or QEMU child that the panic hook kills.
fn spawn(cmd: Command) -> VmmProcess {
    let p = VmmProcess::spawn(cmd);
    leftovers().pids.push(p.pid());
    p
}

/// Waits for a child to exit (reaping it).
fn reap(p: &mut VmmProcess) -> ExitStatus {
    let st = p.wait_exit(MIGRATION_TIMEOUT);
    let pid = p.pid();
    leftovers().pids.retain(|q| *q != pid);
    st
}

// ---------------------------------------------------------------- vmm ---

/// A vmm waiting for a migration on `incoming`, with the same guest shape.
fn vmm_target(netd: &Netd, id: &str, n: u8, row: &Row, incoming: &Path, classic: bool) -> Command {
    let mut c = Command::new(bin("vmm"));
    c.args([
        "--user",
        &format!("{NOBODY}:{NOBODY}"),
        "--memory",
        &row.ram,
    ])
    .args(["--vcpus", &row.vcpus.to_string()])
    .args([
        "--net",
        &format!(
            "netd={},id={id},mac={}{}",
            netd.socket.display(),
            guest_mac(n),
            if classic { ",backend-transfer=off" } else { "" }
        ),
    ])
    .arg("--incoming")
    .arg(incoming);
    c
}

/// `vmctl migrate --json`: the report, or why it failed.
fn vmctl_migrate(api: &Path, to: &Path, classic: bool) -> Result<MigrationReport, String> {
    let mut c = Command::new(bin("vmctl"));
    c.arg("--api-socket")
        .arg(api)
        .args(["migrate", "--to"])
        .arg(to)
        .arg("--json");
    if classic {
        c.arg("--no-backend-transfer");
    }
    let out = c.output().map_err(|e| format!("run vmctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("vmctl printed {text:?}: {e}"))?;
    if v["result"] != "ok" {
        return Err(format!("migration failed: {v}"));
    }
    serde_json::from_value(v).map_err(|e| format!("vmctl's report: {e}"))
}

fn vmctl(api: &Path, command: &str) -> bool {
    Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(api)
        .arg(command)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A chain of `runs` vmm migrations of guest `n` as `row` says.
fn vmm_series(netd: &Netd, dir: &Path, row: &Row, runs: usize, pps: u32) -> Series {
    let (ram, classic) = (row.ram.as_str(), row.path == Chain::Classic);
    let n: u8 = if classic { 2 } else { 1 };
    let mut s = Series::new(row.label(), ram);
    // The classic path needs a TAP of another name for each target; the
    // source's is gone once it exits, so three names in turn suffice.
    let tap = |i: usize| {
        if classic {
            format!("vm{n}c{i}")
        } else {
            format!("vm{n}")
        }
    };
    let tag = format!("{}-{}", if classic { "c" } else { "t" }, row.tag());
    let api = dir.join(format!("api-{tag}.sock"));
    let mut cmd = vmm_command_with_cmdline(
        netd,
        &tap(0),
        n,
        "",
        Some(&api),
        RunAs::RootWithUserOption,
        row.cmdline_extra(),
    );
    cmd.args(["--memory", ram, "--vcpus", &row.vcpus.to_string()]);
    let mut current = spawn(cmd);
    current.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
    assert!(
        wait_ping(&netd.ns, guest_ip(n), Duration::from_secs(30)),
        "guest {n} does not answer ping"
    );
    s.boot_ids.0 = boot_id(netd, n);
    check_busy(netd, n, row);
    let stream = start_stream(netd, n, pps);
    for i in 0..runs {
        eprint!("\rbench_migrate: {} {ram}: {}/{runs} ", s.label, i + 1);
        let incoming = dir.join(format!("mig-{tag}-{i}.sock"));
        let mut target = spawn(vmm_target(netd, &tap(i + 1), n, row, &incoming, classic));
        wait_for_socket(&mut target, &incoming, "vmm target");
        if let Some(m) = s.marks.last_mut() {
            m.1 = Some(Instant::now());
        }
        let t0 = Instant::now();
        let report = vmctl_migrate(&api, &incoming, classic);
        s.windows.push((t0, Instant::now()));
        let report = report.unwrap_or_else(|e| {
            panic!(
                "migration {i}: {e}\nsource stderr:\n{}\ntarget stderr:\n{}",
                current.stderr(),
                target.stderr()
            )
        });
        s.downtime_us.push(report.downtime_us as f64);
        let resumed = report
            .phases
            .marks
            .iter()
            .find(|m| m.what == marks::SENDING_RESUMED)
            .map_or(report.downtime_us, |m| m.at_us);
        s.guest_paused_us.push(resumed as f64);
        s.total_us.push(report.total_us as f64);
        s.phases.push(report.phases);
        let st = reap(&mut current);
        s.marks.push((Some(Instant::now()), None));
        s.note_exit(st);
        current = target;
    }
    eprintln!();
    s.stream = Some(stream.stop());
    s.boot_ids.1 = boot_id(netd, n);
    if s.boot_ids.1 != s.boot_ids.0 {
        eprintln!(
            "bench_migrate: {} {ram}: the guest no longer answers as before; last vmm's serial:\n{}\nstderr:\n{}",
            s.label,
            current.output(),
            current.stderr()
        );
    }
    vmctl(&api, "shutdown");
    let _ = reap(&mut current);
    s
}

// --------------------------------------------------------------- QEMU ---

/// The shared RAM file of a QEMU chain in /dev/shm, removed on drop.
struct ShmFile(PathBuf);

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// QEMU microvm as uid 65534 (kvm group) on a new TAP `tap` from netd
/// (netd_probe execs it with the fd), RAM in `mem_path` (shared), QMP on
/// `qmp`; waiting for an incoming migration when `incoming`. RAM size and
/// guest command line as `row` says.
fn qemu_command(
    netd: &Netd,
    tap: &str,
    n: u8,
    row: &Row,
    mem_path: &Path,
    qmp: &Path,
    incoming: bool,
) -> Command {
    let (ram, cmdline_extra) = (row.ram.as_str(), row.cmdline_extra());
    let mut c = qemu_on_netd_tap(&bin("netd_probe"), netd, tap);
    c.args([
        "-smp",
        &row.vcpus.to_string(),
        "-m",
        ram,
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={ram},share=on,mem-path={}",
            mem_path.display()
        ),
        "-machine",
        "memory-backend=mem",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-netdev",
        "tap,id=n0,fd={fd},vhost=off",
        "-device",
        &format!("virtio-net-device,netdev=n0,mac={}", guest_mac(n)),
        "-append",
        format!("testguest.ip={}/24 {cmdline_extra}", guest_ip(n)).trim_end(),
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
        "-kernel",
    ])
    .arg(guest_elf());
    if incoming {
        c.args(["-incoming", "defer"]);
    }
    c
}

/// RAM stays in the shared file: only device state travels.
fn ignore_shared(q: &mut Qmp) {
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    )
    .expect("set x-ignore-shared");
}

/// A chain of `runs` QEMU migrations of guest 3 as `row` says.
fn qemu_series(netd: &Netd, dir: &Path, row: &Row, runs: usize, pps: u32) -> Series {
    let (n, ram, tag) = (3, row.ram.as_str(), row.tag());
    let mut s = Series::new(row.label(), ram);
    let shm = ShmFile(PathBuf::from(format!(
        "/dev/shm/bench-migrate-{}-{tag}",
        std::process::id()
    )));
    leftovers().paths.push(shm.0.clone());
    let _ = std::fs::remove_file(&shm.0);
    let tap = |i: usize| format!("vm{n}q{}", i % 3);
    let qmp_path = |i: usize| dir.join(format!("qmp-{tag}-{i}.sock"));

    let mut current = spawn(qemu_command(
        netd,
        &tap(0),
        n,
        row,
        &shm.0,
        &qmp_path(0),
        false,
    ));
    current.wait_for_line("testguest: up boot_id=", BOOT_TIMEOUT);
    let mut qmp = Qmp::connect(&qmp_path(0), BOOT_TIMEOUT).expect("QMP of the first QEMU");
    assert!(
        wait_ping(&netd.ns, guest_ip(n), Duration::from_secs(30)),
        "QEMU guest does not answer ping"
    );
    s.boot_ids.0 = boot_id(netd, n);
    check_busy(netd, n, row);
    let stream = start_stream(netd, n, pps);
    for i in 0..runs {
        eprint!("\rbench_migrate: {} {ram}: {}/{runs} ", s.label, i + 1);
        let uri = format!(
            "unix:{}",
            dir.join(format!("qmig-{tag}-{i}.sock")).display()
        );
        let target = spawn(qemu_command(
            netd,
            &tap(i + 1),
            n,
            row,
            &shm.0,
            &qmp_path(i + 1),
            true,
        ));
        let mut tq = Qmp::connect(&qmp_path(i + 1), BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\ntarget stderr:\n{}", target.stderr()));
        if let Some(m) = s.marks.last_mut() {
            m.1 = Some(Instant::now());
        }
        ignore_shared(&mut tq);
        tq.execute("migrate-incoming", json!({ "uri": uri }))
            .expect("migrate-incoming");
        ignore_shared(&mut qmp);
        qmp.clear_events();

        let t0 = Instant::now();
        let requested = realtime_us();
        qmp.execute("migrate", json!({ "uri": uri }))
            .expect("migrate");
        let stop = qmp
            .wait_event("STOP", MIGRATION_TIMEOUT)
            .unwrap_or_else(|e| panic!("source: {e}\n{}", current.stderr()));
        let resume = tq
            .wait_event("RESUME", MIGRATION_TIMEOUT)
            .unwrap_or_else(|e| panic!("target: {e}\n{}", target.stderr()));
        s.windows.push((t0, Instant::now()));
        let (stop_us, resume_us) = (
            event_time_us(&stop).expect("STOP timestamp"),
            event_time_us(&resume).expect("RESUME timestamp"),
        );
        s.downtime_us.push((resume_us - stop_us) as f64);
        s.guest_paused_us.push((resume_us - stop_us) as f64);
        s.total_us.push((resume_us - requested) as f64);
        // QEMU's own figure (milliseconds, from the source's view).
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let q = qmp
                .execute("query-migrate", Value::Null)
                .expect("query-migrate");
            match q["status"].as_str() {
                Some("completed") => {
                    if let Some(d) = q["downtime"].as_f64() {
                        s.qemu_reported_ms.push(d);
                    }
                    break;
                }
                Some("failed" | "cancelled") => panic!("QEMU migration {i}: {q}"),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "QEMU migration {i} never completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The source stays in postmigrate: end it.
        let _ = qmp.execute("quit", Value::Null);
        let st = reap(&mut current);
        s.marks.push((Some(Instant::now()), None));
        s.note_exit(st);
        current = target;
        qmp = tq;
    }
    eprintln!();
    s.stream = Some(stream.stop());
    s.boot_ids.1 = boot_id(netd, n);
    let _ = qmp.execute("quit", Value::Null);
    let _ = reap(&mut current);
    s
}

// -------------------------------------------------------------- table ---

fn ms(us: f64) -> f64 {
    us / 1000.0
}

/// The host's 1-minute load average (other work on the 2 cores shows in
/// every number here).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn print_table(series: &[Series], o: &Opts, load_before: &str) {
    let mut out = std::io::stdout().lock();
    let cpu = Command::new("nproc")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "bench_migrate: chained local migrations of the test guest, {cpu} host CPUs (load average {load_before} before, {} after), {} pps UDP echo stream during each chain",
        load_average(),
        o.pps
    );
    let _ = writeln!(
        out,
        "{:<33} {:>5} {:>4} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>9}",
        "path",
        "RAM",
        "runs",
        "down p50",
        "down p90",
        "down p99",
        "down max",
        "total p50",
        "lost/sent",
        "max/mig"
    );
    let _ = writeln!(
        out,
        "{:<33} {:>5} {:>4} {:>9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>9}",
        "", "", "", "(ms)", "(ms)", "(ms)", "(ms)", "(ms)", "(in migr.)", ""
    );
    for s in series {
        let (sent, lost, max_one, _) = s.losses();
        let down = quartet(&s.downtime_us).map(ms);
        let _ = writeln!(
            out,
            "{:<33} {:>5} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>11} {:>9}",
            s.label,
            s.ram,
            s.downtime_us.len(),
            down[0],
            down[1],
            down[2],
            down[3],
            ms(percentile(&s.total_us, 0.5)),
            format!("{lost}/{sent}"),
            max_one
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "guest paused: source pause to target vCPUs resumed (vmm: both processes' marks; QEMU: STOP to RESUME)"
    );
    let _ = writeln!(
        out,
        "{:<33} {:>5} {:>4} {:>9} {:>9} {:>9} {:>9}",
        "path", "RAM", "runs", "p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)"
    );
    for s in series {
        let [p50, p90, p99, max] = quartet(&s.guest_paused_us).map(ms);
        let _ = writeln!(
            out,
            "{:<33} {:>5} {:>4} {p50:>9.3} {p90:>9.3} {p99:>9.3} {max:>9.3}",
            s.label,
            s.ram,
            s.guest_paused_us.len(),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "vmm phase medians (us): {:<33} {:>5} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>7}",
        "path", "RAM", "connect", "prepare", "pause", "save", "load", "restore", "resume"
    );
    type Phase = fn(&MigrationPhases) -> u64;
    let phases: [Phase; 7] = [
        |p| p.connect_us,
        |p| p.prepare_us,
        |p| p.pause_us,
        |p| p.save_us,
        |p| p.load_us,
        |p| p.restore_us,
        |p| p.resume_us,
    ];
    for s in series.iter().filter(|s| !s.phases.is_empty()) {
        let med: Vec<f64> = phases
            .iter()
            .map(|f| {
                percentile(
                    &s.phases.iter().map(|p| f(p) as f64).collect::<Vec<_>>(),
                    0.5,
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "                        {:<33} {:>5} {:>8.0} {:>8.0} {:>6.0} {:>6.0} {:>6.0} {:>8.0} {:>7.0}",
            s.label, s.ram, med[0], med[1], med[2], med[3], med[4], med[5], med[6]
        );
    }
    for s in series.iter().filter(|s| !s.qemu_reported_ms.is_empty()) {
        let _ = writeln!(
            out,
            "{} {}: its own query-migrate downtime p50 {:.0} ms (ms resolution); total = `migrate` to the target's RESUME event",
            s.label,
            s.ram,
            percentile(&s.qemu_reported_ms, 0.5)
        );
    }
    let _ = writeln!(out);
    for s in series {
        let (_, _, _, outside) = s.losses();
        let exits: Vec<String> = s
            .source_exits
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            out,
            "{} {}: sources ended {}; boot_id {} ({} -> {}); lost outside migrations: {outside}",
            s.label,
            s.ram,
            exits.join(", "),
            if s.boot_ids.0 == s.boot_ids.1 {
                "unchanged"
            } else {
                "CHANGED"
            },
            s.boot_ids.0,
            s.boot_ids.1
        );
        print_marks(&mut out, s);
        if o.verbose {
            print_timeline(&mut out, s);
        }
        let lossy: Vec<String> = s
            .lost_per_migration()
            .iter()
            .enumerate()
            .filter(|(_, l)| **l > 0)
            .map(|(i, l)| format!("#{}: {l}", i + 1))
            .collect();
        if !lossy.is_empty() {
            let _ = writeln!(out, "  lost by migration: {}", lossy.join(", "));
        }
    }
}

/// The switch-over moment by moment (vmm 0.3.0 on): when each mark came
/// after the pause began, and the step from the mark before it, over all
/// migrations of the series that have the mark.
fn print_marks(out: &mut impl Write, s: &Series) {
    let mut names: Vec<&str> = Vec::new();
    for p in &s.phases {
        for m in &p.marks {
            if !names.contains(&m.what.as_str()) {
                names.push(&m.what);
            }
        }
    }
    if names.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<32} {:>8} {:>8} {:>8}   {:>9} {:>9} {:>9}",
        "switch-over (us after pause)",
        "at p50",
        "at p90",
        "at max",
        "step p50",
        "step p90",
        "step max"
    );
    for name in names {
        let mut at = Vec::new();
        let mut step = Vec::new();
        for p in &s.phases {
            if let Some(i) = p.marks.iter().position(|m| m.what == name) {
                let t = p.marks[i].at_us as f64;
                at.push(t);
                let before = i.checked_sub(1).map_or(0.0, |j| p.marks[j].at_us as f64);
                step.push(t - before);
            }
        }
        let _ = writeln!(
            out,
            "  {:<32} {:>8.0} {:>8.0} {:>8.0}   {:>9.0} {:>9.0} {:>9.0}",
            name,
            percentile(&at, 0.5),
            percentile(&at, 0.9),
            percentile(&at, 1.0),
            percentile(&step, 0.5),
            percentile(&step, 0.9),
            percentile(&step, 1.0)
        );
    }
}

/// Each migration's downtime, and the lost datagrams sent from its start
/// to the next one's (milliseconds after its start).
fn print_timeline(out: &mut impl Write, s: &Series) {
    let lost = s
        .stream
        .as_ref()
        .map(StreamResult::lost)
        .unwrap_or_default();
    for (i, (start, end)) in s.windows.iter().enumerate() {
        let next = s.windows.get(i + 1).map(|w| w.0);
        let after: Vec<String> = lost
            .iter()
            .filter(|t| **t >= *start && next.is_none_or(|n| **t < n))
            .map(|t| format!("{:.0}", (*t - *start).as_secs_f64() * 1000.0))
            .collect();
        let rel = |t: Option<Instant>| {
            t.map(|t| format!("{:.0}", (t - *start).as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        let (gone, next) = s.marks.get(i).copied().unwrap_or((None, None));
        let phases = s
            .phases
            .get(i)
            .map(|p| {
                format!(
                    " (pause {} save {} load {} resume {} us)",
                    p.pause_us, p.save_us, p.load_us, p.resume_us
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  #{:<3} downtime {:>8.3} ms{phases}, reply at +{:.0}, source gone at +{}, next target listening at +{}; lost sent at +ms: [{}]",
            i + 1,
            ms(s.downtime_us.get(i).copied().unwrap_or(f64::NAN)),
            (*end - *start).as_secs_f64() * 1000.0,
            rel(gone),
            rel(next),
            after.join(" ")
        );
    }
}

fn main() {
    let o = parse_opts();
    let load_before = load_average();
    install_cleanup_on_panic();
    let netd = Netd::start(&bin("netd"), "bm", TEST_POLICY, &[]);
    {
        let mut l = leftovers();
        l.pids.push(netd.pid());
        l.netns.push(netd.ns.name.clone());
        l.paths.push(netd.dir.clone());
    }
    let dir = ScratchDir::new("bm");
    leftovers().paths.push(dir.0.clone());
    let rows = Row::at_vcpu_counts(
        if o.rows {
            Row::issue_rows()
        } else {
            Row::from_opts(&o)
        },
        &o.vcpus,
    );
    let qemu = rows.iter().any(|r| r.path == Chain::Qemu) && qemu_available();
    if !rows.iter().any(|r| r.path == Chain::Qemu) {
        eprintln!("bench_migrate: QEMU not asked for");
    } else if !qemu {
        eprintln!("bench_migrate: QEMU skipped");
    }
    let mut series = Vec::new();
    for row in &rows {
        let _load = row.loaded.then(HostLoad::start);
        match row.path {
            Chain::Qemu if qemu => {
                series.push(qemu_series(&netd, &dir.0, row, o.qemu_runs, o.pps));
            }
            Chain::Qemu => {}
            _ => series.push(vmm_series(&netd, &dir.0, row, o.runs, o.pps)),
        }
    }
    print_table(&series, &o, &load_before);
}
