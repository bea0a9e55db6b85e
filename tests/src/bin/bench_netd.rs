//! OpenTap latency (p50/p99) and throughput of netd with 1 and 32 concurrent
//! clients, then one tenant's OpenTap latency quiet and while 3 hostile uids
//! (4242..4244, no tenant entry) flood netd with garbage, fd floods, long
//! names and trickling connections (`netd_hostile mixed`). Starts its own
//! netd (target/release/netd) in a network namespace of its own; run as root
//! after `cargo build --release --workspace`.
//!
//! bench_netd [REQUESTS_PER_RUN]   (default 2000; the hostile runs use a quarter)
//!
//! A request is what a VMM does at start-up: connect, Hello, OpenTap (one
//! queue, vnet header, bridge attach, link up), receive and verify the fds;
//! the fds are closed right after, which destroys the TAP. req/s counts that
//! close too (the kernel's TAP teardown, shown apart as "close mean": most closes are
//! quick, a few wait for the kernel's RCU/netdev teardown).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::netd_harness::{Netd, TEST_POLICY, world_exec_copy};
use vmm::net::netd_client::NetdClient;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Run {
    clients: usize,
    requests: usize,
    wall: Duration,
    lat: Vec<Duration>,
    close: Vec<Duration>,
}

fn run(netd: &Netd, clients: usize, total: usize, tag: &str) -> Run {
    let t0 = Instant::now();
    let (mut lat, mut close): (Vec<Duration>, Vec<Duration>) = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let socket = netd.socket.clone();
                sc.spawn(move || {
                    let mut lat = Vec::new();
                    let mut close = Vec::new();
                    for i in (c..total).step_by(clients) {
                        let name = format!("s{tag}{i}");
                        let t = Instant::now();
                        let r = NetdClient::connect(&socket, Duration::from_secs(60))
                            .and_then(|mut cl| cl.open_tap(&name, 1, true, false, None));
                        match r {
                            Ok(fds) => {
                                lat.push(t.elapsed());
                                let t = Instant::now();
                                drop(fds);
                                close.push(t.elapsed());
                            }
                            Err(e) => eprintln!("{name}: {e}"),
                        }
                    }
                    (lat, close)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_default()).fold(
            (Vec::new(), Vec::new()),
            |(mut a, mut b), (l, c)| {
                a.extend(l);
                b.extend(c);
                (a, b)
            },
        )
    });
    let wall = t0.elapsed();
    lat.sort();
    close.sort();
    Run {
        clients,
        requests: lat.len(),
        wall,
        lat,
        close,
    }
}

/// The hostile clients, killed on drop.
struct Flood(Vec<Child>);

impl Drop for Flood {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn flood(netd: &Netd) -> Flood {
    let exe = std::env::current_exe()
        .expect("own path")
        .with_file_name("netd_hostile");
    assert!(
        exe.exists(),
        "{} is missing: cargo build --release --workspace",
        exe.display()
    );
    let hostile = world_exec_copy(&exe, &netd.dir);
    let sock = netd.socket.to_str().expect("utf-8 path").to_string();
    Flood(
        [4242u32, 4243, 4244]
            .iter()
            .map(|&uid| {
                Command::new(&hostile)
                    .args(["mixed", &sock, "600", &uid.to_string()])
                    .uid(uid)
                    .gid(uid)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn netd_hostile")
            })
            .collect(),
    )
}

fn main() {
    let per_run: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let netd = Netd::start(&tests::bin("netd"), "bench", TEST_POLICY, &[]);
    // Warm up (page cache, bridge FDB, thread stacks).
    run(&netd, 4, 100, "w");
    let runs = [run(&netd, 1, per_run, "a"), run(&netd, 32, per_run, "b")];
    let quiet = run(&netd, 1, per_run / 4, "q");
    let hostile = {
        let _flood = flood(&netd);
        // Let the flood get going.
        std::thread::sleep(Duration::from_millis(500));
        run(&netd, 1, per_run / 4, "h")
    };
    println!("netd OpenTap (connect + Hello + OpenTap + verify; fds closed after each)");
    println!(
        "{:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>16}",
        "clients", "requests", "p50 (us)", "p99 (us)", "max (us)", "req/s", "close mean (us)"
    );
    for r in &runs {
        println!(
            "{:>8} {:>9} {:>10} {:>10} {:>10} {:>10.0} {:>16}",
            r.clients,
            r.requests,
            percentile(&r.lat, 0.50).as_micros(),
            percentile(&r.lat, 0.99).as_micros(),
            r.lat.last().copied().unwrap_or_default().as_micros(),
            r.requests as f64 / r.wall.as_secs_f64(),
            r.close
                .iter()
                .sum::<Duration>()
                .checked_div(r.close.len().max(1) as u32)
                .unwrap_or_default()
                .as_micros()
        );
    }
    println!();
    println!("one tenant's OpenTap, quiet and while 3 hostile uids flood netd");
    println!(
        "{:>8} {:>9} {:>10} {:>10} {:>10}",
        "case", "requests", "p50 (us)", "p99 (us)", "max (us)"
    );
    for (name, r) in [("quiet", &quiet), ("hostile", &hostile)] {
        println!(
            "{:>8} {:>9} {:>10} {:>10} {:>10}",
            name,
            r.requests,
            percentile(&r.lat, 0.50).as_micros(),
            percentile(&r.lat, 0.99).as_micros(),
            r.lat.last().copied().unwrap_or_default().as_micros(),
        );
    }
    let ratio = percentile(&hostile.lat, 0.99).as_secs_f64()
        / percentile(&quiet.lat, 0.99).as_secs_f64().max(1e-9);
    println!("p99 hostile / quiet: {ratio:.2} (target: within 2x)");
}
