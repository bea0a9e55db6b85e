//! QEMU serves the test guest on a TAP fd that netd handed to an
//! unprivileged client (netd_probe as uid 65534 execs QEMU with the fd),
//! the way netd brokers TAPs for another VMM: ping answers, UDP echo works.
//!
//! Without qemu-system-x86_64 each test fails where `REQUIRE_QEMU=1` (CI
//! sets it) and is otherwise skipped loudly (`tests::prereq`).

use std::time::Duration;

use tests::net_guest::{GuestLink, guest_ip, ping, qemu_available, qemu_command, wait_ping};
use tests::netd_harness::{Netd, TEST_POLICY, wait_for};
use tests::vmm_process::VmmProcess;
use tests::{bin, guest_elf};

const SETTLE: Duration = Duration::from_secs(60);

#[test]
fn qemu_guest_on_a_netd_tap_fd_answers_ping_and_echo() {
    if !qemu_available() {
        return;
    }
    let netd = Netd::start(&bin("netd"), "nq1", TEST_POLICY, &[]);
    let cmd = qemu_command(&bin("netd_probe"), &guest_elf(), &netd, "vm0", 1);
    let mut qemu = VmmProcess::spawn(cmd);
    qemu.wait_for_line("testguest: up boot_id=", SETTLE);
    assert!(
        wait_ping(&netd.ns, guest_ip(1), SETTLE),
        "the guest on QEMU does not answer ping\nstdout:\n{}\nstderr:\n{}",
        qemu.output(),
        qemu.stderr()
    );
    let (sent, got, rtts) = ping(&netd.ns, guest_ip(1), 5, "0.2", 5);
    assert_eq!(got, sent, "ping lost replies: {rtts:?}");
    let link = GuestLink::new(&netd.ns, guest_ip(1));
    assert_eq!(link.echo_round_trips(100, 64, Duration::from_secs(5)), 100);
    // QEMU runs as 65534 and the TAP it serves is netd's, attached to vmbr0.
    let status = std::fs::read_to_string(format!("/proc/{}/status", qemu.pid())).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().skip(1).all(|u| u == "65534")),
        "{status}"
    );
    assert!(netd.audit_text().contains("vm0"), "{}", netd.audit_text());
    drop(qemu);
    assert!(
        wait_for(SETTLE, || !netd.links().contains(&"vm0".to_string())),
        "TAP vm0 survived QEMU: {:?}",
        netd.links()
    );
}

#[test]
fn guests_on_vmm_and_on_qemu_share_a_bridge_and_reach_each_other() {
    use tests::net_guest::{RunAs, guest_mac, start_vmm_guest, vmm_command};
    use tests::vmm_process::BOOT_TIMEOUT;
    if !qemu_available() {
        return;
    }
    let netd = Netd::start(&bin("netd"), "nq2", TEST_POLICY, &[]);
    let (vm, _) = start_vmm_guest(
        vmm_command(&netd, "vm1", 1, "", None, RunAs::RootWithUserOption),
        BOOT_TIMEOUT,
    );
    let mut qemu = VmmProcess::spawn(qemu_command(
        &bin("netd_probe"),
        &guest_elf(),
        &netd,
        "vm2",
        2,
    ));
    qemu.wait_for_line("testguest: up boot_id=", SETTLE);
    for n in [1, 2] {
        assert!(
            wait_ping(&netd.ns, guest_ip(n), SETTLE),
            "guest {n} does not answer ping\nvmm:\n{}\nqemu:\n{}\n{}",
            vm.output(),
            qemu.output(),
            qemu.stderr()
        );
    }
    // Each guest ARPs for and pings the other (UDP 5002 probe).
    for (from, to) in [(1u8, 2u8), (2, 1)] {
        let link = GuestLink::new(&netd.ns, guest_ip(from));
        let req = guest_ip(to).to_string();
        let reply = link
            .call(5002, req.as_bytes(), 10, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no probe answer from guest {from} for {req}"));
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("probe {req} ok mac={}", guest_mac(to))
        );
    }
}
