//! Boot benchmark: vmm against QEMU microvm on the same PVH guest, runs
//! alternated, printing medians of exec→first serial byte, exec→power-off
//! (process exit) and peak RSS (wait4's ru_maxrss).
//!
//! `cargo run --release -p tests --bin bench_boot [-- --runs N] [--guest ELF] [--cmdline S] [--vcpus 1,2,4,8]`
//! (default: 20 runs of target/guest/trivial.elf).
//!
//! `--vcpus`: one table row pair per vCPU count (`--vcpus N` / `-smp N`),
//! booting the test guest with `testguest.exit` (it starts every AP,
//! waits for their `cpu N up` lines, then powers off), with one more
//! column: exec→the last CPU up.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::net_guest::{QEMU, QEMU_MICROVM_ARGS};

struct Sample {
    first_byte: Option<Duration>,
    /// When the output held `up_lines` lines starting "testguest: cpu ".
    all_up: Option<Duration>,
    total: Duration,
    maxrss_kib: i64,
    exit: std::process::ExitStatus,
    output: Vec<u8>,
}

// The child is reaped by wait4 (for its rusage), not Child::wait.
#[allow(clippy::zombie_processes)]
fn run_once(mut cmd: Command, up_lines: usize) -> Sample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut first_byte = None;
    let mut all_up = None;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    let ups = |o: &[u8]| {
        String::from_utf8_lossy(o)
            .lines()
            .filter(|l| l.starts_with("testguest: cpu ") && l.ends_with(" up"))
            .count()
    };
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| start.elapsed());
                output.extend_from_slice(&buf[..n]);
                // One CPU: up once the guest's banner is out.
                let up = if up_lines == 0 {
                    output.windows(14).any(|w| w == b"testguest: up ")
                } else {
                    ups(&output) >= up_lines
                };
                if all_up.is_none() && up {
                    all_up = Some(start.elapsed());
                }
            }
        }
    }
    let mut status = 0;
    // SAFETY: rusage is plain data, zero is a valid value for it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; the pointers are valid for the call.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let total = start.elapsed();
    assert_eq!(r, child.id() as i32, "wait4 failed");
    Sample {
        first_byte,
        all_up,
        total,
        maxrss_kib: ru.ru_maxrss,
        exit: std::process::ExitStatus::from_raw(status),
        output,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let mut runs = 20usize;
    let mut guest = None;
    let mut cmdline = String::new();
    let mut vcpus: Vec<u8> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|s| s.parse().ok()).expect("--runs N"),
            "--guest" => guest = Some(args.next().expect("--guest ELF").into()),
            "--cmdline" => cmdline = args.next().expect("--cmdline S"),
            "--vcpus" => {
                vcpus = args
                    .next()
                    .expect("--vcpus 1,2,4")
                    .split(',')
                    .map(|v| v.parse().expect("--vcpus: numbers 1 to 255"))
                    .collect()
            }
            _ => panic!("unknown argument {a}"),
        }
    }
    let smp = !vcpus.is_empty();
    let guest = guest.unwrap_or_else(|| {
        if smp {
            tests::guest_elf()
        } else {
            tests::trivial_elf()
        }
    });
    if smp {
        cmdline = format!("{cmdline} testguest.exit").trim_start().to_string();
    } else {
        vcpus.push(1);
    }
    let vmm = tests::bin("vmm");
    println!("guest: {} ({runs} runs each, alternated)", guest.display());
    println!(
        "{:<22} {:>16} {:>14} {:>18} {:>14} {:>10}",
        "", "first byte (ms)", "all up (ms)", "power-off (ms)", "peak RSS (KiB)", "exits ok"
    );
    let mut first_output = None;
    for &n in &vcpus {
        let aps = usize::from(n) - 1;
        let mut results: [(String, Vec<Sample>); 2] = [
            (format!("vmm {n} vCPU"), Vec::new()),
            (format!("qemu microvm {n} vCPU"), Vec::new()),
        ];
        for _ in 0..runs {
            let mut c = Command::new(&vmm);
            c.arg("--kernel").arg(&guest).args([
                "--user",
                "65534:65534",
                "--vcpus",
                &n.to_string(),
            ]);
            if !cmdline.is_empty() {
                c.args(["--cmdline", &cmdline]);
            }
            results[0].1.push(run_once(c, aps));

            let mut q = Command::new(QEMU);
            q.args(QEMU_MICROVM_ARGS)
                .args(["-smp", &n.to_string()])
                .arg("-kernel")
                .arg(&guest);
            if !cmdline.is_empty() {
                q.args(["-append", &cmdline]);
            }
            results[1].1.push(run_once(q, aps));
        }
        for (name, samples) in &results {
            let first = median(
                samples
                    .iter()
                    .filter_map(|s| s.first_byte.map(ms))
                    .collect(),
            );
            let up = median(samples.iter().filter_map(|s| s.all_up.map(ms)).collect());
            let total = median(samples.iter().map(|s| ms(s.total)).collect());
            let rss = median(samples.iter().map(|s| s.maxrss_kib as f64).collect());
            // QEMU's isa-debug-exit turns a write of v into exit code 2v+1.
            let ok = samples
                .iter()
                .filter(|s| {
                    s.exit.success() || (name.starts_with("qemu") && s.exit.code() == Some(1))
                })
                .count();
            // The trivial guest prints no banner to time "all up" by.
            let up = if up.is_nan() {
                "-".to_string()
            } else {
                format!("{up:.2}")
            };
            println!(
                "{name:<22} {first:>16.2} {up:>14} {total:>18.2} {rss:>14.0} {ok:>7}/{}",
                samples.len()
            );
        }
        if first_output.is_none() {
            first_output = results[0].1.first().map(|s| s.output.clone());
        }
    }
    if let Some(o) = first_output {
        println!(
            "vmm output of the first run: {:?}",
            String::from_utf8_lossy(&o)
        );
    }
}
