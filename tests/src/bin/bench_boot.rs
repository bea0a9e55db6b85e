//! Boot benchmark: vmm against QEMU microvm on the same PVH guest, runs
//! alternated, printing medians of exec→first serial byte, exec→power-off
//! (process exit) and peak RSS (wait4's ru_maxrss).
//!
//! `cargo run --release -p tests --bin bench_boot [-- --runs N] [--guest ELF] [--cmdline S]`
//! (default: 20 runs of target/guest/trivial.elf).

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::net_guest::{QEMU, QEMU_MICROVM_ARGS};

struct Sample {
    first_byte: Option<Duration>,
    total: Duration,
    maxrss_kib: i64,
    exit: std::process::ExitStatus,
    output: Vec<u8>,
}

// The child is reaped by wait4 (for its rusage), not Child::wait.
#[allow(clippy::zombie_processes)]
fn run_once(mut cmd: Command) -> Sample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut first_byte = None;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| start.elapsed());
                output.extend_from_slice(&buf[..n]);
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
    let mut guest = tests::trivial_elf();
    let mut cmdline = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|s| s.parse().ok()).expect("--runs N"),
            "--guest" => guest = args.next().expect("--guest ELF").into(),
            "--cmdline" => cmdline = args.next().expect("--cmdline S"),
            _ => panic!("unknown argument {a}"),
        }
    }
    let vmm = tests::bin("vmm");
    let mut results: [(&str, Vec<Sample>); 2] = [("vmm", Vec::new()), ("qemu microvm", Vec::new())];
    for _ in 0..runs {
        let mut c = Command::new(&vmm);
        c.arg("--kernel")
            .arg(&guest)
            .args(["--user", "65534:65534"]);
        if !cmdline.is_empty() {
            c.args(["--cmdline", &cmdline]);
        }
        results[0].1.push(run_once(c));

        let mut q = Command::new(QEMU);
        q.args(QEMU_MICROVM_ARGS).arg("-kernel").arg(&guest);
        if !cmdline.is_empty() {
            q.args(["-append", &cmdline]);
        }
        results[1].1.push(run_once(q));
    }
    println!("guest: {} ({runs} runs each, alternated)", guest.display());
    println!(
        "{:<14} {:>16} {:>18} {:>14} {:>10}",
        "", "first byte (ms)", "power-off (ms)", "peak RSS (KiB)", "exits ok"
    );
    for (name, samples) in &results {
        let first = median(
            samples
                .iter()
                .filter_map(|s| s.first_byte.map(ms))
                .collect(),
        );
        let total = median(samples.iter().map(|s| ms(s.total)).collect());
        let rss = median(samples.iter().map(|s| s.maxrss_kib as f64).collect());
        // QEMU's isa-debug-exit turns a write of v into exit code 2v+1.
        let ok = samples
            .iter()
            .filter(|s| s.exit.success() || (name.starts_with("qemu") && s.exit.code() == Some(1)))
            .count();
        println!(
            "{name:<14} {first:>16.2} {total:>18.2} {rss:>14.0} {ok:>7}/{}",
            samples.len()
        );
    }
    if let Some(s) = results[0].1.first() {
        println!(
            "vmm output of the first run: {:?}",
            String::from_utf8_lossy(&s.output)
        );
    }
}
