//! Two claims of the local migration, each checked on real processes:
//! - a frame the source's NIC read from the TAP but could not deliver yet
//!   (the guest had no rx buffers) travels in the state and reaches the
//!   guest after the migration, once;
//! - no page of guest RAM is copied: the target maps the very memfd the
//!   source did, and its resident memory does not grow with guest RAM.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use tests::migration_harness::{
    Exits, GuestSpec, MigEnv, SETTLE, TargetSpec, Vm, assert_answers_ping, assert_ticks_continuous,
    capture_from_source, guest_ram_inodes, guest_ram_mapped, migrate, start_source, start_target,
    status_kib,
};
use tests::net_guest::{GuestLink, guest_ip, guest_mac};

/// UDP port of the test guest's rx hold (tests/guest/README.md).
const PORT_HOLD: u16 = 5003;
/// How long the guest keeps its rx buffers back, in heartbeat ticks (50 ms):
/// 3 s, for a capture and a migration that took 0.4 s on a host with a
/// load average of 10; the test checks that the hold indeed ended on the
/// target.
const HOLD_TICKS: u32 = 60;

/// The serial line that starts with `testguest: <prefix>`, once there.
fn wait_line(vm: &mut Vm, prefix: &str, timeout: Duration) -> String {
    let needle = format!("testguest: {prefix}");
    vm.wait_serial(&needle, timeout);
    vm.serial_text()
        .lines()
        .find(|l| l.starts_with(&needle))
        .map(str::to_string)
        .unwrap_or_default()
}

#[test]
fn a_frame_read_but_not_delivered_at_the_pause_arrives_after_the_migration() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mc1");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    // No frame but the test's reaches the guest while it holds its
    // buffers (a stray one would take the place of the frame under test):
    // no IPv6 in the namespace (the TAP and the bridge send MLD reports),
    // no multicast or broadcast flooded to the TAP, no IGMP reports from
    // the bridge, no ARP from the host.
    env.netd.ns.exec(&[
        "bridge",
        "link",
        "set",
        "dev",
        "vm0",
        "mcast_flood",
        "off",
        "bcast_flood",
        "off",
    ]);
    for conf in ["all", "default"] {
        env.netd.ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{conf}.disable_ipv6=1"),
        ]);
    }
    // The bridge itself reports its membership of 224.0.0.106 (all
    // snoopers, joined for multicast snooping) by IGMP, and a bridge
    // floods what it sends itself whatever the port's mcast_flood: no
    // IGMP reports for 224.0.0.x groups in this namespace.
    env.netd
        .ns
        .exec(&["sysctl", "-qw", "net.ipv4.igmp_link_local_mcast_reports=0"]);
    env.netd.ns.exec(&[
        "ip",
        "neigh",
        "replace",
        &guest_ip(1).to_string(),
        "lladdr",
        &guest_mac(1),
        "dev",
        "vmbr0",
        "nud",
        "permanent",
    ]);

    // The guest stops giving rx buffers back; the frames of `k` more
    // datagrams use up those the device still has.
    let control = GuestLink::new(&env.netd.ns, guest_ip(1));
    let t0 = Instant::now();
    let reply = control
        .call(PORT_HOLD, HOLD_TICKS.to_string().as_bytes(), 1, SETTLE)
        .expect("no answer to the rx hold");
    assert_eq!(reply, format!("hold {HOLD_TICKS}").as_bytes());
    let line = wait_line(&mut src, "rx hold for ", SETTLE);
    let posted: usize = line
        .split(", ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no buffer count in {line:?}"));
    for i in 0..posted {
        control.send(9, format!("filler {i}").as_bytes());
    }
    wait_line(&mut src, "rx ring empty", SETTLE);

    // The frame under test: the device reads it, has nowhere to put it,
    // and keeps it.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        ^ u128::from(std::process::id());
    let payload = format!("in-flight frame {nonce:032x}");
    let echo = GuestLink::new(&env.netd.ns, guest_ip(1));
    echo.send(7, payload.as_bytes());
    std::thread::sleep(Duration::from_millis(300));

    // What the source's NIC holds at a pause: a fake target takes the
    // state and refuses, so the source resumes (still holding it).
    let captured = capture_from_source(&env, &api);
    let pending = captured.rx_pending();
    drop(captured);
    let held: Vec<&Vec<u8>> = pending.iter().filter(|f| !f.is_empty()).collect();
    assert_eq!(
        held.len(),
        1,
        "the source's state should hold one undelivered frame: {pending:?}"
    );
    assert!(
        held[0]
            .windows(payload.len())
            .any(|w| w == payload.as_bytes()),
        "the undelivered frame in the state is not the one sent ({} bytes): {:?}",
        held[0].len(),
        String::from_utf8_lossy(held[0])
    );

    let out = migrate(&api, &tgt.incoming, &[]);
    out.assert_ok();
    exits.wait(&mut src, "source");
    let migrated_at = t0.elapsed();
    assert!(
        !src.serial_text().contains("testguest: rx hold released"),
        "the hold ended on the source ({migrated_at:?} after it began): make HOLD_TICKS longer\n{}",
        src.serial_text()
    );

    // The target's guest gives its buffers back when the hold ends; the
    // frame comes first, and the guest echoes it — once.
    let mut buf = [0u8; 2048];
    echo.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut copies = Vec::new();
    let deadline = Instant::now() + SETTLE;
    while Instant::now() < deadline {
        if let Ok((n, from)) = echo.sock.recv_from(&mut buf) {
            if from == SocketAddrV4::new(guest_ip(1), 7).into() {
                copies.push(buf[..n].to_vec());
            }
        } else if !copies.is_empty() {
            break;
        }
    }
    assert!(
        tgt.vm.serial_text().contains("testguest: rx hold released"),
        "the hold did not end on the target:\n{}",
        tgt.vm.serial_text()
    );
    assert_eq!(
        copies,
        vec![payload.as_bytes().to_vec()],
        "the guest should echo the in-flight frame once, after the migration"
    );
    eprintln!(
        "in-flight frame: {} buffers used up, frame of {} bytes in the state, migrated {migrated_at:?} after the hold began, echoed once by the target",
        posted,
        held[0].len()
    );

    assert_answers_ping(&env, 1, "after the migration");
    tgt.vm.wait_ticks(2);
    assert_ticks_continuous(&[src.serial_text(), tgt.vm.serial_text()]);
    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}

/// Resident memory a target may have, whatever its guest's RAM size: the
/// vmm itself (code, heap, thread stacks; about 4 MiB measured) plus the
/// guest RAM pages the test guest touched (its image, stack, virtqueues and
/// buffers: under 1 MiB; RssShmem measured 0.15 MiB). 32 MiB leaves room
/// for allocator noise and is still an eighth of the smaller guest: a
/// target that copied or touched guest RAM would have at least 256 MiB.
const TARGET_RSS_MAX_KIB: u64 = 32 << 10;
/// How much more a 16 GiB guest's target may have than a 256 MiB one's:
/// nothing should grow with RAM (no copy, no per-page bitmap: a dirty
/// bitmap of 16 GiB would be 512 KiB, a copy 16 GiB), so only noise
/// (measured: 40 KiB).
const RSS_GROWTH_MAX_KIB: u64 = 4 << 10;

#[test]
fn no_page_is_copied_the_target_maps_the_same_memfd_and_its_rss_does_not_grow_with_ram() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mc2");
    let mut rss = Vec::new();
    for (n, memory, bytes) in [(1u8, "256M", 256u64 << 20), (2, "16G", 16 << 30)] {
        let api = env.path("api.sock");
        let spec = GuestSpec {
            n,
            nets: vec![env.net(&format!("vm{n}"), n, "")],
            memory,
            vcpus: 1,
            cmdline: "",
        };
        let mut src = start_source(&env, &spec, &api);
        assert_answers_ping(&env, n, "before the migration");
        let src_ram = guest_ram_inodes(src.pid());
        assert!(
            !src_ram.is_empty(),
            "the source maps no /memfd:guest-ram:\n{}",
            std::fs::read_to_string(format!("/proc/{}/maps", src.pid())).unwrap_or_default()
        );
        assert!(
            guest_ram_mapped(src.pid()) >= bytes,
            "the source maps less than its guest RAM"
        );
        let src_rss = status_kib(src.pid(), "VmRSS");
        let mut tgt = start_target(&env, &TargetSpec::like(&spec));
        // Before the migration the target maps no guest RAM of its own.
        assert!(
            guest_ram_inodes(tgt.vm.pid()).is_empty(),
            "a waiting target already maps guest RAM"
        );
        migrate(&api, &tgt.incoming, &[]).assert_ok();
        exits.wait(&mut src, &format!("{memory} source"));
        let pid = tgt.vm.pid();
        assert_eq!(
            guest_ram_inodes(pid),
            src_ram,
            "the target's guest RAM is not the source's memfd"
        );
        assert!(
            guest_ram_mapped(pid) >= bytes,
            "the target maps less than the guest RAM"
        );
        // The target runs the guest (it answers, its heartbeat goes on).
        assert_answers_ping(&env, n, "after the migration");
        tgt.vm.wait_ticks(2);
        let (vm_rss, shmem) = (status_kib(pid, "VmRSS"), status_kib(pid, "RssShmem"));
        eprintln!(
            "{memory} guest: source VmRSS {src_rss} KiB; target VmRSS {vm_rss} KiB (RssShmem {shmem} KiB), guest RAM {} KiB",
            bytes >> 10
        );
        assert!(
            vm_rss < TARGET_RSS_MAX_KIB,
            "{memory} guest: the target's VmRSS is {vm_rss} KiB"
        );
        rss.push(vm_rss);
        tgt.vm.shutdown(&api);
    }
    assert!(
        rss[1] <= rss[0] + RSS_GROWTH_MAX_KIB,
        "the target's VmRSS grows with guest RAM: {} KiB for 256 MiB, {} KiB for 16 GiB",
        rss[0],
        rss[1]
    );
    exits.assert_all_ok();
}
