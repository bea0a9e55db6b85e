//! vmctl drives a running vmm over --api-socket: status, pause (the guest's
//! heartbeat stops), resume (the same count continues), shutdown (exit 0).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};
use tests::{bin, guest_elf};

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

fn ticks(vm: &VmmProcess) -> Vec<(Instant, u64)> {
    vm.lines()
        .into_iter()
        .filter_map(|(t, l)| Some((t, l.trim().strip_prefix("testguest: tick ")?.parse().ok()?)))
        .collect()
}

#[test]
fn pause_stops_heartbeat_and_resume_continues_the_count() {
    let dir = std::env::temp_dir().join(format!("vmctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sock = dir.join("api.sock");
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
        .arg(&sock);
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 3", BOOT_TIMEOUT);

    let st = vmctl(&sock, &["status"]);
    assert_eq!(st["state"], "Running", "{st}");
    assert_eq!(st["pid"], vm.pid(), "{st}");
    assert_eq!(st["vcpus"], 1, "{st}");

    assert_eq!(vmctl(&sock, &["pause"])["result"], "ok");
    // Serial output is written by the vCPU thread itself, so once pause has
    // returned no tick can come until resume; let the pipe reader catch up
    // with what was written before.
    std::thread::sleep(Duration::from_millis(200));
    let paused_at = Instant::now();
    let before = ticks(&vm).last().unwrap().1;
    assert_eq!(vmctl(&sock, &["status"])["state"], "Paused");
    std::thread::sleep(Duration::from_secs(1));
    let during = ticks(&vm);
    assert_eq!(
        during.last().unwrap().1,
        before,
        "ticks arrived while paused: {}",
        vm.output()
    );
    assert!(paused_at.elapsed() >= Duration::from_secs(1));

    assert_eq!(vmctl(&sock, &["resume"])["result"], "ok");
    vm.wait_for_line(&format!("testguest: tick {}", before + 1), BOOT_TIMEOUT);
    vm.wait_for_line(&format!("testguest: tick {}", before + 3), BOOT_TIMEOUT);
    // The count goes on from where it stopped: no reset, no gap.
    let all: Vec<u64> = ticks(&vm).into_iter().map(|(_, n)| n).collect();
    let expect: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all, expect);
    assert_eq!(vmctl(&sock, &["status"])["state"], "Running");

    // Migration is not there yet: a clean error, and the VM keeps running.
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(&sock)
        .args(["migrate", "--to", "/nonexistent", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "error", "{v}");

    assert_eq!(vmctl(&sock, &["shutdown"])["result"], "ok");
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert!(st.success(), "{st}: {}", vm.stderr());
    assert!(!sock.exists(), "vmm left its API socket behind");
    std::fs::remove_dir_all(&dir).unwrap();
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
