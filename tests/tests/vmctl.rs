//! vmctl drives a running vmm over --api-socket: status, pause (the guest's
//! heartbeat stops), resume (the same count continues), shutdown (exit 0).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};
use tests::{TempDir, bin, guest_elf, wait_for};

fn vmctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmctl {args:?}: {} {}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("vmctl {args:?} printed {text}: {e}"))
}

/// The tick numbers in the serial log so far. vmm writes the serial port
/// from the vCPU thread, so once `pause` has returned the file holds every
/// tick the guest printed.
fn ticks(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("testguest: tick ")?.parse().ok())
        .collect()
}

fn wait_ticks(log: &Path, n: u64) {
    assert!(
        wait_for(BOOT_TIMEOUT, || ticks(log).last() >= Some(&n)),
        "no tick {n} within {BOOT_TIMEOUT:?}: {:?}",
        std::fs::read_to_string(log)
    );
}

#[test]
fn pause_stops_heartbeat_and_resume_continues_the_count() {
    let dir = TempDir::new("vmctl");
    let sock = dir.join("api.sock");
    let log = dir.join("serial.log");
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel")
        .arg(guest_elf())
        .args([
            "--user",
            "65534:65534",
            "--cmdline",
            "testguest.heartbeat=50",
        ])
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial")
        .arg(&log);
    let mut vm = VmmProcess::spawn(cmd);
    wait_ticks(&log, 3);

    let st = vmctl(&sock, &["status"]);
    assert_eq!(st["state"], "Running", "{st}");
    assert_eq!(st["pid"], vm.pid(), "{st}");
    assert_eq!(st["vcpus"], 1, "{st}");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"), "{st}");
    assert_eq!(
        st["format"],
        vmm::persist::MACHINE_STATE_FORMAT.to_string(),
        "{st}"
    );

    assert_eq!(vmctl(&sock, &["pause"])["result"], "ok");
    let before = ticks(&log);
    assert_eq!(vmctl(&sock, &["status"])["state"], "Paused");
    // Twenty heartbeat periods: a running guest would print about twenty
    // ticks; a paused one none (this fails at the first tick that comes).
    let moved = wait_for(Duration::from_secs(1), || ticks(&log) != before);
    assert!(
        !moved,
        "ticks arrived while paused: {before:?} then {:?}",
        ticks(&log)
    );

    assert_eq!(vmctl(&sock, &["resume"])["result"], "ok");
    let last = *before.last().expect("ticks before the pause");
    wait_ticks(&log, last + 3);
    // The count goes on from where it stopped: no reset, no gap.
    let all = ticks(&log);
    let expect: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expect);
    assert_eq!(vmctl(&sock, &["status"])["state"], "Running");

    // A migration request to a target that does not exist is answered by
    // the vmm with a reason (today "not supported yet"; with migration, a
    // failure to reach the target), and the VM keeps running.
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(&sock)
        .args(["migrate", "--to", "/nonexistent/target.sock", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text} {:?}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let reason = v["error"]
        .as_str()
        .or(v["result"].as_str())
        .unwrap_or_default();
    assert!(
        v["result"] != "ok" && !reason.is_empty() && reason != "ok",
        "{v}"
    );
    // vmctl's own failures (cannot connect, send, receive: the vmm died)
    // go to stderr as well, even with --json; the vmm's answer does not.
    assert!(
        out.stderr.is_empty() && !reason.contains(sock.to_str().unwrap()),
        "vmctl did not get an answer from the vmm: {v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(vmctl(&sock, &["status"])["state"], "Running");
    let now = *ticks(&log).last().unwrap();
    wait_ticks(&log, now + 1);

    assert_eq!(vmctl(&sock, &["shutdown"])["result"], "ok");
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert!(st.success(), "{st}: {}", vm.stderr());
    assert!(!sock.exists(), "vmm left its API socket behind");
}

#[test]
fn vmctl_usage_and_unreachable_socket() {
    let out = Command::new(bin("vmctl")).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("vmctl"))
        .args(["--api-socket", "/nonexistent/api.sock", "status", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "error");
}

#[test]
fn vmctl_version_and_help() {
    let version = format!("vmctl {}", env!("CARGO_PKG_VERSION"));
    tests::assert_version_and_help("vmctl", &version, &["--api-socket", "--downtime-limit-ms"]);
}
