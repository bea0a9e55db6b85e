//! The NIC counters of `vmctl status --json`, against real traffic: real
//! KVM, a TAP from a real netd in a namespace of the test's own, real ping.
//! They match the TAP's own statistics (read in that namespace) and the
//! ping count, go on across a local migration from where the source
//! stopped, and show a hostile driver's bad chains as drops of that cause.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::migration_harness::{
    GuestSpec, MigEnv, SETTLE, TargetSpec, assert_answers_ping, guest_stats, migrate, start_source,
    start_target, vmctl,
};
use tests::net_guest::{GuestLink, guest_ip, ping};
use tests::netd_harness::wait_for;

const PINGS: u32 = 200;
/// Frames besides the pings a quiet guest may see or send in a test's
/// window (ARP, IPv6 neighbour discovery from the host side).
const SLACK: u64 = 20;

/// The NIC's counters as a status reports them: (NIC total, per queue).
fn counters(api: &Path) -> (Value, Vec<Value>) {
    let (code, st) = vmctl(api, &["status"]);
    assert_eq!(code, Some(0), "{st}");
    let net = &st["nets"][0];
    let total = net["counters"].clone();
    assert!(total.is_object(), "no counters in {st}");
    let queues = net["queue_counters"]
        .as_array()
        .unwrap_or_else(|| panic!("no queue_counters in {st}"))
        .clone();
    assert_eq!(queues.len() as u64, net["queues"].as_u64().unwrap(), "{st}");
    (total, queues)
}

fn get(v: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} not a number in {v}"))
}

/// The TAP's statistics, read in netd's namespace (as the host sees them:
/// its tx is the guest's rx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TapStats {
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

fn tap_stats(env: &MigEnv, tap: &str) -> TapStats {
    let read = |f: &str| -> u64 {
        let p = format!("/sys/class/net/{tap}/statistics/{f}");
        env.netd.ns.exec(&["cat", &p]).trim().parse().expect(f)
    };
    TapStats {
        rx_packets: read("rx_packets"),
        rx_bytes: read("rx_bytes"),
        tx_packets: read("tx_packets"),
        tx_bytes: read("tx_bytes"),
    }
}

/// How far the NIC's rx/tx packet counts are from the TAP's tx/rx, read
/// once both have stayed the same for a moment (frames the TAP counted
/// before the device was up make it non-zero).
fn quiet_offset(env: &MigEnv, api: &Path) -> (i64, i64) {
    let read = || (counters(api).0, tap_stats(env, "vm0"));
    let mut prev = read();
    let ok = wait_for(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = read();
        let same = now == prev;
        prev = now;
        same
    });
    assert!(ok, "traffic does not settle: {prev:?}");
    let (c, t) = prev;
    (
        get(&c, "rx_packets") as i64 - t.tx_packets as i64,
        get(&c, "tx_packets") as i64 - t.rx_packets as i64,
    )
}

/// (vmm counters, TAP statistics) once the device has published its last
/// batch: both stop changing and the guest's rx/tx match the TAP's tx/rx
/// (up to `offset`, the difference they had at the start).
fn settled(env: &MigEnv, api: &Path, offset: (i64, i64)) -> (Value, Vec<Value>, TapStats) {
    let mut last = None;
    let ok = wait_for(Duration::from_secs(10), || {
        let (c, q) = counters(api);
        let t = tap_stats(env, "vm0");
        let matched = get(&c, "rx_packets") as i64 - t.tx_packets as i64 == offset.0
            && get(&c, "tx_packets") as i64 - t.rx_packets as i64 == offset.1;
        last = Some((c, q, t));
        matched
    });
    let (c, q, t) = last.unwrap();
    assert!(
        ok,
        "the NIC's counters do not match the TAP's (offset {offset:?}):\n vmm {c}\n tap {t:?}"
    );
    (c, q, t)
}

fn assert_queues_sum_to_total(total: &Value, queues: &[Value]) {
    for f in [
        "rx_packets",
        "rx_bytes",
        "tx_packets",
        "tx_bytes",
        "interrupts",
        "interrupts_saved_by_event_idx",
        "drops.no_rx_buffer",
        "drops.rx_bad_chains",
        "drops.tx_bad_chains",
    ] {
        let sum: u64 = queues.iter().map(|q| get(q, f)).sum();
        assert_eq!(sum, get(total, f), "{f}: {total} vs {queues:?}");
    }
}

fn assert_no_drops(c: &Value) {
    for f in [
        "no_rx_buffer",
        "rx_tap_errors",
        "tx_tap_errors",
        "rx_bad_chains",
        "tx_bad_chains",
        "ctrl_bad_chains",
    ] {
        assert_eq!(get(c, &format!("drops.{f}")), 0, "{f}: {c}");
    }
}

#[test]
fn after_200_pings_the_counters_match_the_tap_and_the_ping_count() {
    let env = MigEnv::new("nc1");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut vm = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "at boot");
    let g0 = guest_stats(&env, 1);
    let offset = quiet_offset(&env, &api);
    let (c0, _, t0) = settled(&env, &api, offset);

    let (sent, got, _) = ping(&env.netd.ns, guest_ip(1), PINGS, "0.01", 5);
    assert_eq!((sent, got), (PINGS, PINGS), "ping lost replies");
    let (c1, q1, t1) = settled(&env, &api, offset);
    let g1 = guest_stats(&env, 1);

    let d = |f: &str| get(&c1, f) - get(&c0, f);
    eprintln!("after {PINGS} pings: vmm {c1}\n tap {t1:?} (before {t0:?})");
    // Exactly what the TAP counted, each way, packets and bytes.
    assert_eq!(d("rx_packets"), t1.tx_packets - t0.tx_packets);
    assert_eq!(d("rx_bytes"), t1.tx_bytes - t0.tx_bytes);
    assert_eq!(d("tx_packets"), t1.rx_packets - t0.rx_packets);
    assert_eq!(d("tx_bytes"), t1.rx_bytes - t0.rx_bytes);
    // And the pings: each request in, each reply out (98-byte frames).
    assert!(
        (PINGS as u64..=PINGS as u64 + SLACK).contains(&d("rx_packets")),
        "{} frames in for {PINGS} pings",
        d("rx_packets")
    );
    assert!(
        (PINGS as u64..=PINGS as u64 + SLACK).contains(&d("tx_packets")),
        "{} frames out for {PINGS} pings",
        d("tx_packets")
    );
    assert!(d("rx_bytes") >= 98 * PINGS as u64, "{}", d("rx_bytes"));
    assert_eq!(g1.echo - g0.echo, PINGS as u64, "the guest's echo count");
    // The guest asks for an interrupt per rx batch and none for tx (its
    // used_event stays behind): EVENT_IDX saves one per reply.
    assert!(d("interrupts") >= PINGS as u64 / 2, "{c1}");
    assert!(
        d("interrupts_saved_by_event_idx") >= PINGS as u64 / 2,
        "{c1}"
    );
    assert_no_drops(&c1);
    assert_queues_sum_to_total(&c1, &q1);

    // The human status: one compact line per NIC.
    let out = std::process::Command::new(tests::bin("vmctl"))
        .arg("--api-socket")
        .arg(&api)
        .arg("status")
        .output()
        .expect("run vmctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("net vm0: rx "))
        .unwrap_or_else(|| panic!("no counters line in {text}"));
    assert!(
        line.contains(" pkts ") && line.contains("drops 0"),
        "{line}"
    );
    vm.shutdown(&api);
}

#[test]
fn across_a_migration_the_counters_go_on_from_the_sources() {
    let env = MigEnv::new("nc2");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 2, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 2, "before the migration");
    let (sent, got, _) = ping(&env.netd.ns, guest_ip(2), 100, "0.01", 5);
    assert_eq!((sent, got), (100, 100));
    let offset = quiet_offset(&env, &api);
    let (a, qa, ta) = settled(&env, &api, offset);
    assert!(get(&a, "rx_packets") >= 100, "{a}");

    let tgt = start_target(&env, &TargetSpec::like(&spec));
    migrate(&api, &tgt.incoming, &[]).assert_ok();
    let _ = src.wait_exit(SETTLE);
    let (code, st) = vmctl(&api, &["status"]);
    assert_eq!((code, &st["pid"]), (Some(0), &Value::from(tgt.vm.pid())));

    // Right after: where the source stopped, plus at most what crossed
    // the TAP meanwhile (no reset, no jump).
    let (b, qb) = counters(&api);
    let tb = tap_stats(&env, "vm0");
    eprintln!("source's last {a}\n target's first {b}");
    for (qa, qb) in qa.iter().zip(&qb) {
        for f in [
            "rx_packets",
            "rx_bytes",
            "tx_packets",
            "tx_bytes",
            "interrupts",
        ] {
            assert!(get(qb, f) >= get(qa, f), "{f} went back: {qa} -> {qb}");
        }
    }
    assert!(get(&b, "rx_packets") - get(&a, "rx_packets") <= tb.tx_packets - ta.tx_packets);
    assert!(get(&b, "tx_packets") - get(&a, "tx_packets") <= tb.rx_packets - ta.rx_packets);

    // Then 100 more pings: the target's counters and the TAP's (the same
    // TAP, handed over) still differ by what they did on the source.
    let (sent, got, _) = ping(&env.netd.ns, guest_ip(2), 100, "0.01", 5);
    assert_eq!((sent, got), (100, 100));
    let (c, q, tc) = settled(&env, &api, offset);
    assert!(get(&c, "rx_packets") - get(&a, "rx_packets") >= 100);
    assert_eq!(
        get(&c, "rx_bytes") - get(&a, "rx_bytes"),
        tc.tx_bytes - ta.tx_bytes
    );
    assert_eq!(
        get(&c, "tx_bytes") - get(&a, "tx_bytes"),
        tc.rx_bytes - ta.rx_bytes
    );
    assert_no_drops(&c);
    assert_queues_sum_to_total(&c, &q);
    let mut tgt = tgt;
    tgt.vm.shutdown(&api);
}

#[test]
fn a_hostile_drivers_bad_chains_are_drops_of_that_cause() {
    let env = MigEnv::new("nc3");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 3, "");
    let mut vm = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 3, "at boot");
    let (c0, _) = counters(&api);
    assert_no_drops(&c0);

    // 5 tx chains of 2 bytes, and 3 rx buffers given back 4 bytes long:
    // all shorter than a vnet header.
    let link = GuestLink::new(&env.netd.ns, guest_ip(3));
    let reply = link
        .call(5005, b"5 3", 5, Duration::from_secs(3))
        .expect("no reply to the bad-chains request");
    assert_eq!(reply, b"bad 5 3");
    // The short rx buffers come up once the device has gone round the
    // ring (256 buffers): enough traffic to get there twice.
    assert_eq!(link.echo_round_trips(600, 64, Duration::from_secs(5)), 600);
    let ok = wait_for(Duration::from_secs(10), || {
        let (c, _) = counters(&api);
        get(&c, "drops.tx_bad_chains") == 5 && get(&c, "drops.rx_bad_chains") == 3
    });
    let (c, q) = counters(&api);
    assert!(ok, "bad chains not counted as such: {c}");
    for f in [
        "no_rx_buffer",
        "rx_tap_errors",
        "tx_tap_errors",
        "ctrl_bad_chains",
    ] {
        assert_eq!(get(&c, &format!("drops.{f}")), 0, "{f}: {c}");
    }
    assert_queues_sum_to_total(&c, &q);
    // The device went on serving the guest.
    assert_answers_ping(&env, 3, "after its bad chains");
    vm.shutdown(&api);
}
