//! The test guest on vmm with virtio-net over a TAP that a real netd made
//! (in a namespace of the test's own): ping from iputils, the guest's UDP
//! services, multiqueue, two guests on one bridge, pause/resume with packets
//! waiting in the TAP, and the TAP going away with vmm.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::bin;
use tests::net_guest::{
    GuestLink, RunAs, ScratchDir, guest_ip, guest_mac, mac_bytes, ping, send_raw_frames,
    start_vmm_guest, udp_frame, vmm_command, vmm_command_with_cmdline, wait_ping,
};
use tests::netd_harness::{Netd, TEST_POLICY, wait_for};
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};

/// Per-packet and per-condition waits: generous for a loaded 2-core host.
const REPLY: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(30);

fn netd(tag: &str) -> Netd {
    Netd::start(&bin("netd"), tag, TEST_POLICY, &[])
}

fn guest(
    netd: &Netd,
    tap: &str,
    n: u8,
    net_extra: &str,
    api: Option<&Path>,
    run_as: RunAs,
) -> (VmmProcess, String) {
    let cmd = vmm_command(netd, tap, n, net_extra, api, run_as);
    start_vmm_guest(cmd, BOOT_TIMEOUT)
}

fn vmctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .arg("--json")
        .output()
        .expect("run vmctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmctl {args:?}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("vmctl printed {text}: {e}"))
}

fn assert_ping(netd: &Netd, n: u8, vm: &VmmProcess) {
    assert!(
        wait_ping(&netd.ns, guest_ip(n), SETTLE),
        "guest {n} does not answer ping\nstdout:\n{}\nstderr:\n{}",
        vm.output(),
        vm.stderr()
    );
    let (sent, got, rtts) = ping(&netd.ns, guest_ip(n), 5, "0.2", 5);
    assert_eq!(got, sent, "ping lost replies: {rtts:?}");
}

fn tun_fds(netd: &Netd) -> usize {
    netd.fd_targets()
        .iter()
        .filter(|t| t.contains("net/tun"))
        .count()
}

fn assert_blast(link: &GuestLink, count: u32, size: usize) {
    let (seen, took) = link.blast(count, size, REPLY);
    let missing: Vec<usize> = (0..seen.len()).filter(|&i| !seen[i]).collect();
    assert!(
        missing.is_empty(),
        "blast {count}x{size}: {} missing (first {:?}) after {took:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn ping_udp_services_and_blast_through_netd_tap() {
    let netd = netd("nv1");
    let dir = ScratchDir::new("nv1");
    let api = dir.0.join("api.sock");
    let (mut vm, boot_id) = guest(&netd, "vm0", 1, "", Some(&api), RunAs::RootWithUserOption);
    assert_ping(&netd, 1, &vm);

    let link = GuestLink::new(&netd.ns, guest_ip(1));
    let before = link.stats().expect("stats");
    assert_eq!(before.boot_id, boot_id, "stats come from this boot");
    let echoed = link.echo_round_trips(1000, 64, REPLY);
    assert_eq!(echoed, 1000, "UDP echo round trips lost");
    let after = link.stats().expect("stats");
    assert!(
        after.echo >= before.echo + 1000,
        "guest counted {} echoes, expected at least {}",
        after.echo,
        before.echo + 1000
    );
    assert!(after.rx >= before.rx + 1000);
    assert_blast(&link, 300, 64);
    assert_blast(&link, 200, 1400);

    let st = vmctl(&api, &["status"]);
    let nets = st["nets"].as_array().expect("nets in status");
    assert_eq!(nets.len(), 1, "{st}");
    assert_eq!(nets[0]["id"], "vm0");
    assert_eq!(nets[0]["tap"], "vm0");
    assert_eq!(nets[0]["mac"], guest_mac(1));
    assert_eq!(nets[0]["queues"], 1);
    assert_eq!(nets[0]["vhost"], false);
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(&api)
        .arg("status")
        .output()
        .expect("run vmctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("net vm0: tap vm0 mac {} queues 1 vhost off", guest_mac(1));
    assert!(text.lines().any(|l| l == want), "{text}");

    // netd keeps no fd of the TAP: vmm's exit removes it.
    assert_eq!(tun_fds(&netd), 0, "netd holds TAP fds");
    assert!(netd.links().contains(&"vm0".to_string()));
    vmctl(&api, &["shutdown"]);
    let st = vm.wait_exit(SETTLE);
    assert!(st.success(), "vmm exit {st}: {}", vm.stderr());
    assert!(
        wait_for(SETTLE, || !netd.links().contains(&"vm0".to_string())),
        "TAP vm0 still exists after vmm exited: {:?}",
        netd.links()
    );
}

/// `testguest.busy`: the guest computes and writes RAM between interrupts,
/// and still answers ping, UDP echo and stats, which say it is busy.
#[test]
fn busy_guest_still_answers_ping_echo_and_reports_busy() {
    let netd = netd("nvb");
    let cmd = vmm_command_with_cmdline(
        &netd,
        "vm0",
        1,
        "",
        None,
        RunAs::RootWithUserOption,
        "testguest.busy",
    );
    let (vm, boot_id) = start_vmm_guest(cmd, BOOT_TIMEOUT);
    assert!(
        vm.output()
            .contains("testguest: busy: writing 4 MiB at 0x00400000 between interrupts"),
        "no busy banner:\n{}",
        vm.output()
    );
    assert_ping(&netd, 1, &vm);
    let link = GuestLink::new(&netd.ns, guest_ip(1));
    let before = link.stats().expect("stats");
    assert_eq!(before.boot_id, boot_id, "stats come from this boot");
    let echoed = link.echo_round_trips(500, 64, REPLY);
    assert_eq!(echoed, 500, "UDP echo round trips lost");
    // The busy loop goes on between the requests: its passes grow.
    let mut after = link.stats().expect("stats");
    let t0 = std::time::Instant::now();
    while after.busy <= before.busy && t0.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(100));
        after = link.stats().expect("stats");
    }
    match (before.busy, after.busy) {
        (Some(a), Some(b)) => assert!(b > a, "busy passes did not grow: {a} -> {b}"),
        other => panic!("stats do not report busy: {other:?}"),
    }
    assert!(after.echo >= before.echo + 500);
}

#[test]
fn unprivileged_vmm_answers_ping_and_echo_and_a_kill_removes_the_tap() {
    let netd = netd("nv2");
    let (vm, _) = guest(&netd, "vm0", 1, "", None, RunAs::Nobody);
    assert_ping(&netd, 1, &vm);
    let link = GuestLink::new(&netd.ns, guest_ip(1));
    assert_eq!(link.echo_round_trips(100, 200, REPLY), 100);
    // vmm really runs as 65534.
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    // SIGKILL: no clean-up code runs, the kernel closes the fds.
    drop(vm);
    assert!(
        wait_for(SETTLE, || !netd.links().contains(&"vm0".to_string())),
        "TAP vm0 survived its vmm: {:?}",
        netd.links()
    );
}

#[test]
fn two_queue_pairs_answer_ping_and_echo() {
    let netd = netd("nv3");
    let dir = ScratchDir::new("nv3");
    let api = dir.0.join("api.sock");
    let (vm, _) = guest(
        &netd,
        "vm0",
        1,
        "queues=2",
        Some(&api),
        RunAs::RootWithUserOption,
    );
    assert_ping(&netd, 1, &vm);
    let link = GuestLink::new(&netd.ns, guest_ip(1));
    assert_eq!(link.echo_round_trips(300, 100, REPLY), 300);
    assert_blast(&link, 200, 64);
    let st = vmctl(&api, &["status"]);
    assert_eq!(st["nets"][0]["queues"], 2, "{st}");
}

#[test]
fn two_guests_on_one_bridge_reach_each_other() {
    let netd = netd("nv4");
    let (a, _) = guest(&netd, "vm1", 1, "", None, RunAs::RootWithUserOption);
    let (b, _) = guest(&netd, "vm2", 2, "", None, RunAs::RootWithUserOption);
    assert_ping(&netd, 1, &a);
    assert_ping(&netd, 2, &b);
    let link_a = GuestLink::new(&netd.ns, guest_ip(1));
    let link_b = GuestLink::new(&netd.ns, guest_ip(2));
    assert_eq!(link_a.echo_round_trips(50, 64, REPLY), 50);
    assert_eq!(link_b.echo_round_trips(50, 64, REPLY), 50);

    // The probe service (UDP 5002): each guest ARPs for and pings the
    // other over the bridge, then tells us the MAC that answered.
    for (from, to) in [(&link_a, 2u8), (&link_b, 1u8)] {
        let req = guest_ip(to).to_string();
        let reply = from
            .call(5002, req.as_bytes(), 10, REPLY)
            .unwrap_or_else(|| panic!("no probe answer from {} for {req}", from.ip));
        let text = String::from_utf8_lossy(&reply);
        assert_eq!(text, format!("probe {req} ok mac={}", guest_mac(to)));
    }

    // Also a stream the other way round: echo requests to A that
    // claim to come from B (B's MAC and IP, B's discard port). A's replies
    // cross the bridge from TAP vm1 to TAP vm2 and B counts them.
    const N: u32 = 40;
    let b_before = link_b.stats().expect("stats of B");
    let a_before = link_a.stats().expect("stats of A");
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            udp_frame(
                mac_bytes(&guest_mac(2)),
                mac_bytes(&guest_mac(1)),
                (guest_ip(2), 9),
                (guest_ip(1), 7),
                format!("from B #{i}").as_bytes(),
            )
        })
        .collect();
    let sent = send_raw_frames(&netd.ns, "vmbr0", frames);
    assert_eq!(sent as u32, N);
    let mut b_after = b_before.clone();
    let arrived = wait_for(SETTLE, || {
        b_after = link_b.stats().expect("stats of B");
        // B's own stats exchanges add one frame each; A's echoes add N.
        b_after.rx >= b_before.rx + u64::from(N)
    });
    let a_after = link_a.stats().expect("stats of A");
    assert!(
        a_after.echo >= a_before.echo + u64::from(N),
        "A echoed {} of {N}",
        a_after.echo - a_before.echo
    );
    assert!(
        arrived,
        "B received {} frames, expected at least {N} from A",
        b_after.rx - b_before.rx
    );
}

#[test]
fn pause_holds_packets_in_the_tap_until_resume() {
    let netd = netd("nv5");
    let dir = ScratchDir::new("nv5");
    let api = dir.0.join("api.sock");
    let (vm, _) = guest(&netd, "vm0", 1, "", Some(&api), RunAs::RootWithUserOption);
    assert_ping(&netd, 1, &vm);
    let link = GuestLink::new(&netd.ns, guest_ip(1));
    assert_eq!(link.echo_round_trips(10, 64, REPLY), 10);

    vmctl(&api, &["pause"]);
    assert_eq!(vmctl(&api, &["status"])["state"], "Paused");
    let (_, got, _) = ping(&netd.ns, guest_ip(1), 3, "0.3", 1);
    assert_eq!(got, 0, "a paused guest answered ping");
    // Sent while paused: waits in the TAP queue; no answer yet.
    let held: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 32]).collect();
    for p in &held {
        link.send(7, p);
    }
    let mut buf = [0u8; 2048];
    link.sock
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    assert!(
        link.sock.recv_from(&mut buf).is_err(),
        "an echo came back while paused"
    );

    vmctl(&api, &["resume"]);
    assert_eq!(vmctl(&api, &["status"])["state"], "Running");
    link.sock.set_read_timeout(Some(REPLY)).expect("timeout");
    let mut back = Vec::new();
    while back.len() < held.len() {
        match link.sock.recv_from(&mut buf) {
            Ok((n, _)) => back.push(buf[..n].to_vec()),
            Err(e) => panic!(
                "only {} of {} held echoes came back after resume: {e}",
                back.len(),
                held.len()
            ),
        }
    }
    back.sort();
    assert_eq!(back, held, "the held echoes, each once");
    assert_ping(&netd, 1, &vm);
}

#[test]
fn net_errors_give_one_line_and_exit_codes() {
    let netd = netd("nv6");
    let run = |net: &str| {
        let out = Command::new(bin("vmm"))
            .args(["--user", "65534:65534", "--kernel"])
            .arg(tests::guest_elf())
            .args(["--net", net])
            .output()
            .expect("run vmm");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        (out.status.code(), err)
    };
    let sock = netd.socket.display().to_string();
    // Refused by netd's policy (the tenant may only use names "vm…").
    let (code, err) = run(&format!("netd={sock},id=xx0"));
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("xx0") && err.contains("refused"), "{err}");
    // A malformed option.
    let (code, err) = run("netd=/x,id=vm0,queues=zero");
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // No netd there.
    let (code, err) = run(&format!("netd={}.missing,id=vm0", sock));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("netd"), "{err}");
    assert!(!netd.links().iter().any(|l| l == "xx0"));
}
