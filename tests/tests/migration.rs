//! Local live migration end to end: real KVM, real TAPs from a real netd in
//! a namespace of the test's own, real ping. The guest must not notice:
//! no packet lost under a 2 ms ping and a numbered UDP echo stream, the
//! same boot, a heartbeat that counts on, the same TAP (ifindex), and netd
//! never asked (backend transfer). Also: netd stopped, multiqueue, two
//! NICs, 20 migrations in a row, a paused guest, the classic path.

use std::time::Instant;

use tests::hostile::settled_fd_count;
use tests::migration_harness::{
    Exits, GuestSpec, MEMORY, MigEnv, SETTLE, TargetSpec, Traffic, Vm, assert_answers_ping,
    assert_same_guest_on_the_same_tap, assert_ticks_continuous, boot_id, fd_count, guest_stats,
    migrate, start_source, start_target, ticks, vmctl,
};
use tests::net_guest::{guest_ip, guest_mac};
use tests::netd_harness::wait_for;

/// The fd count of `vm` comes back to `start` (within a few seconds: a
/// connection that just ended may still be closing).
fn assert_fds_back(vm: &Vm, start: usize, who: &str) {
    let mut now = vm.fd_count();
    let back = wait_for(std::time::Duration::from_secs(3), || {
        now = vm.fd_count();
        now == start
    });
    assert!(
        back,
        "{who} (pid {}) leaked within its hop: {now} fds, {start} when it took the guest",
        vm.pid()
    );
}

#[test]
fn under_traffic_nothing_is_lost_the_guest_and_its_tap_stay_and_netd_is_not_asked() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mg1");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let before = guest_stats(&env, 1);
    assert_eq!(before.boot_id, boot_id(&src.serial_text()));
    let ifindex = env.ifindex("vm0");
    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    let traffic = Traffic::start(&env, 1, 1);
    let audit = env.audit_lines();

    let out = migrate(&api, &tgt.incoming, &[]);
    out.assert_ok();
    exits.wait(&mut src, "source");
    traffic.wait_flowing("after the migration");
    let (pings, echoes) = traffic.stop_and_check();
    assert_eq!(
        env.audit_lines(),
        audit,
        "netd was asked during the migration:\n{}",
        env.netd.audit_text()
    );

    let j = &out.json;
    eprintln!(
        "migration under traffic: downtime {} us, total {} us, phases {}, state {} bytes, {} fds; {pings} pings and {echoes} echoes, none lost",
        j["downtime_us"], j["total_us"], j["phases"], j["state_bytes"], j["fds_passed"]
    );
    assert_eq!(j["backend_transfer"], true, "{j}");
    // RAM memfd, the TAP queue, the ownership page, the API listener.
    assert_eq!(j["fds_passed"], 4, "{j}");
    assert!(j["downtime_us"].as_u64().is_some_and(|d| d > 0), "{j}");
    assert!(j["state_bytes"].as_u64().is_some_and(|b| b > 0), "{j}");

    // The same guest, on the same TAP, now held by the target alone.
    assert_same_guest_on_the_same_tap(&env, &before, ifindex, &src, &tgt.vm);

    // The source's API path answers, from the target.
    let (_, st) = vmctl(&api, &["status"]);
    assert_eq!(st["pid"], tgt.vm.pid(), "{st}");
    assert_eq!(st["state"], "Running", "{st}");
    tgt.vm.shutdown(&api);
    assert!(
        wait_for(SETTLE, || !env.links().contains(&"vm0".to_string())),
        "the TAP outlived the last vmm: {:?}",
        env.links()
    );
    exits.assert_all_ok();
}

#[test]
fn netd_stopped_before_the_migration_is_not_needed() {
    let mut exits = Exits::default();
    let mut env = MigEnv::new("mg2");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let ifindex = env.ifindex("vm0");
    assert_eq!(env.netd.terminate(), Some(0), "netd's SIGTERM exit");
    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    let traffic = Traffic::start(&env, 1, 1);
    migrate(&api, &tgt.incoming, &[]).assert_ok();
    exits.wait(&mut src, "source");
    traffic.wait_flowing("after the migration");
    traffic.stop_and_check();
    assert_answers_ping(&env, 1, "after the migration without netd");
    assert_eq!(env.ifindex("vm0"), ifindex);
    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}

#[test]
fn two_queue_pairs_every_flow_answers_after_the_migration() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mg3");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "queues=2");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    assert_eq!(src.tap_queues("vm0"), 2);
    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    // 16 UDP flows: the TAP spreads flows over its queues, so each queue
    // fd of the TAP is exercised (a queue left wrongly attached or
    // detached after the migration loses the flows that hash to it).
    let traffic = Traffic::start(&env, 1, 16);
    migrate(&api, &tgt.incoming, &[]).assert_ok();
    exits.wait(&mut src, "source");
    traffic.wait_flowing("after the migration");
    traffic.stop_and_check();
    assert_eq!(tgt.vm.tap_queues("vm0"), 2, "both TAP queues moved");
    let (_, st) = vmctl(&api, &["status"]);
    assert_eq!(st["nets"][0]["queues"], 2, "{st}");
    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}

#[test]
fn two_nics_move_together_on_their_own_taps() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mg4");
    let api = env.path("api.sock");
    // The test guest drives its first NIC; the second (2 queues) checks
    // that every TAP fd lands on its own NIC (one global fd table).
    let spec = GuestSpec {
        n: 1,
        nets: vec![env.net("vm0", 1, ""), env.net("vm1", 2, "queues=2")],
        memory: MEMORY,
        vcpus: 1,
        cmdline: "",
    };
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let idx = (env.ifindex("vm0"), env.ifindex("vm1"));
    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    let traffic = Traffic::start(&env, 1, 4);
    let out = migrate(&api, &tgt.incoming, &[]);
    out.assert_ok();
    // memfd, 1 + 2 TAP queues, the ownership page, the API listener.
    assert_eq!(out.json["fds_passed"], 6, "{}", out.json);
    exits.wait(&mut src, "source");
    traffic.wait_flowing("after the migration");
    traffic.stop_and_check();
    assert_eq!((env.ifindex("vm0"), env.ifindex("vm1")), idx);
    assert_eq!(tgt.vm.tap_queues("vm0"), 1);
    assert_eq!(tgt.vm.tap_queues("vm1"), 2);
    let (_, st) = vmctl(&api, &["status"]);
    let nets = st["nets"].as_array().expect("nets");
    assert_eq!(nets.len(), 2, "{st}");
    for (n, (tap, mac, q)) in nets
        .iter()
        .zip([("vm0", guest_mac(1), 1), ("vm1", guest_mac(2), 2)])
    {
        assert_eq!(
            (n["tap"].as_str(), n["mac"].as_str()),
            (Some(tap), Some(mac.as_str()))
        );
        assert_eq!(n["queues"], q, "{st}");
    }
    tgt.vm.shutdown(&api);
    assert!(wait_for(SETTLE, || {
        let l = env.links();
        !l.contains(&"vm0".to_string()) && !l.contains(&"vm1".to_string())
    }));
    exits.assert_all_ok();
}

#[test]
fn twenty_chained_migrations_under_traffic_leak_nothing() {
    const HOPS: usize = 20;
    let mut exits = Exits::default();
    let env = MigEnv::new("mg5");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut cur = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migrations");
    let boot = guest_stats(&env, 1).boot_id;
    let ifindex = env.ifindex("vm0");
    let traffic = Traffic::start(&env, 1, 2);
    // Per vmm of the chain: its fd count once it runs the guest, settled.
    let mut start_fds = vec![settled_fd_count(cur.pid())];
    let audit = env.audit_lines();
    let mut serials = Vec::new();
    let mut downtimes = Vec::new();
    let mut pids = vec![cur.pid()];
    let t0 = Instant::now();
    for hop in 0..HOPS {
        // Each target adopts the API socket: the same path drives them all.
        let tgt = start_target(&env, &TargetSpec::like(&spec));
        // Within its hop the vmm ran the guest under traffic and answered
        // the API: it must hold exactly what it held when it took over.
        assert_fds_back(&cur, start_fds[hop], &format!("vmm #{hop}"));
        let out = migrate(&api, &tgt.incoming, &[]);
        assert_eq!(out.result(), "ok", "hop {hop}: {out:?}");
        downtimes.push(out.json["downtime_us"].as_u64().unwrap_or(0));
        exits.wait(&mut cur, &format!("vmm #{hop}"));
        serials.push(cur.serial_text());
        cur = tgt.vm;
        pids.push(cur.pid());
        // Each vmm of the chain runs the guest: a heartbeat of its own.
        cur.wait_ticks(1);
        if !traffic.echo.wait_more(5, SETTLE) {
            let serial = cur.serial_text();
            let tail: Vec<&str> = serial.lines().rev().take(5).collect();
            let pid = cur.pid();
            let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| {
                            let p = e.path();
                            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                            let wchan =
                                std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                            format!("{}:{wchan}", comm.trim())
                        })
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "hop {hop}: the guest stopped answering; ping now {:?}; link {}; threads {threads:?}; tap queues {}; migration {:?}; status {}; serial tail {tail:?}; stderr {}",
                tests::net_guest::ping(&env.netd.ns, guest_ip(1), 3, "0.2", 1),
                env.netd.ns.exec(&["ip", "-s", "link", "show", "vm0"]),
                cur.tap_queues("vm0"),
                out.json,
                vmctl(&api, &["status"]).1,
                cur.proc.stderr()
            );
        }
        start_fds.push(settled_fd_count(cur.pid()));
        // An API connection within the hop, closed before its end.
        let (_, st) = vmctl(&api, &["status"]);
        assert_eq!(st["pid"], cur.pid(), "hop {hop}: {st}");
        // Every target took the guest the same way: the same fds.
        assert_eq!(
            start_fds[hop + 1],
            start_fds[1],
            "fds of vmm #{} once it ran the guest, against vmm #1's: {start_fds:?}",
            hop + 1
        );
    }
    let took = t0.elapsed();
    traffic.wait_flowing("after the last migration");
    let (pings, echoes) = traffic.stop_and_check();
    cur.wait_ticks(2);
    serials.push(cur.serial_text());
    assert_ticks_continuous(&serials);
    assert_eq!(guest_stats(&env, 1).boot_id, boot);
    assert_eq!(env.ifindex("vm0"), ifindex);
    assert_eq!(env.audit_lines(), audit, "netd was asked");
    assert_fds_back(&cur, start_fds[HOPS], &format!("vmm #{HOPS}"));
    downtimes.sort_unstable();
    eprintln!(
        "{HOPS} migrations in {took:?}: downtime p50 {} us max {} us; {pings} pings, {echoes} echoes, none lost; fds at takeover {start_fds:?}",
        downtimes[HOPS / 2],
        downtimes[HOPS - 1]
    );

    cur.shutdown(&api);
    // Nothing left: no vmm of the chain, no socket, no interface.
    for pid in &pids {
        assert_eq!(fd_count(*pid), 0, "vmm {pid} still runs");
    }
    assert!(
        wait_for(SETTLE, || !env.links().contains(&"vm0".to_string())),
        "TAP left: {:?}",
        env.links()
    );
    let extra: Vec<String> = env
        .links()
        .into_iter()
        .filter(|l| l != "lo" && l != "vmbr0")
        .collect();
    assert!(extra.is_empty(), "interfaces left: {extra:?}");
    let sockets: Vec<String> = std::fs::read_dir(&env.dir.0)
        .expect("scratch dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            use std::os::unix::fs::FileTypeExt;
            e.file_type().is_ok_and(|t| t.is_socket())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
    exits.assert_all_ok();
}

#[test]
fn a_paused_guest_arrives_paused_migrates_again_and_resumes() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mg6");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let (code, out) = vmctl(&api, &["pause"]);
    assert_eq!(code, Some(0), "{out}");
    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    let out = migrate(&api, &tgt.incoming, &[]);
    out.assert_ok();
    exits.wait(&mut src, "source");
    let (_, st) = vmctl(&api, &["status"]);
    assert_eq!(st["pid"], tgt.vm.pid(), "{st}");
    assert_eq!(st["state"], "Paused", "{st}");
    let (_, got, _) = tests::net_guest::ping(&env.netd.ns, guest_ip(1), 3, "0.2", 1);
    assert_eq!(got, 0, "a paused guest answered ping");
    assert!(
        ticks(&tgt.vm.serial_text()).is_empty(),
        "a paused guest printed heartbeats: {}",
        tgt.vm.serial_text()
    );
    // Once more while paused: this target's vCPUs never ran, so the
    // registers its restore left in kvm_run for their first KVM_RUN are
    // still there, and its save must take them from there (KVM's own copy
    // is the rehearsal's: the guest would start over).
    let mut tgt2 = start_target(&env, &TargetSpec::like(&spec));
    let out = migrate(&api, &tgt2.incoming, &[]);
    out.assert_ok();
    exits.wait(&mut tgt.vm, "first target");
    assert_eq!(vmctl(&api, &["status"]).1["state"], "Paused");
    let (code, out) = vmctl(&api, &["resume"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(vmctl(&api, &["status"]).1["state"], "Running");
    assert_answers_ping(&env, 1, "after resume");
    tgt2.vm.wait_ticks(2);
    assert_ticks_continuous(&[src.serial_text(), tgt2.vm.serial_text()]);
    tgt2.vm.shutdown(&api);
    exits.assert_all_ok();
}

#[test]
fn classic_path_gets_a_new_tap_from_netd_and_announces_the_guest() {
    let mut exits = Exits::default();
    let env = MigEnv::new("mg7");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let boot = guest_stats(&env, 1).boot_id;
    let tspec = TargetSpec {
        nets: vec![env.net("vm1", 1, "backend-transfer=off")],
        memory: MEMORY,
        vcpus: 1,
        api: None,
    };
    let mut tgt = start_target(&env, &tspec);
    // The target asked netd for its own TAP before the migration.
    assert!(
        wait_for(SETTLE, || env.links().contains(&"vm1".to_string())),
        "no TAP vm1: {:?}",
        env.links()
    );
    let out = migrate(&api, &tgt.incoming, &["--no-backend-transfer"]);
    out.assert_ok();
    assert_eq!(out.json["backend_transfer"], false, "{}", out.json);
    // memfd, the ownership page and the API listener, no TAP.
    assert_eq!(out.json["fds_passed"], 3, "{}", out.json);
    eprintln!(
        "classic migration: downtime {} us, phases {}",
        out.json["downtime_us"], out.json["phases"]
    );
    exits.wait(&mut src, "source");
    // The quiet guest sends nothing by itself: the bridge learns its MAC
    // on the new port from the target's RARP announcement.
    let mac = guest_mac(1);
    let fdb = || {
        env.netd
            .ns
            .exec(&["bridge", "fdb", "show", "br", "vmbr0"])
            .lines()
            .any(|l| l.starts_with(&mac) && l.contains("dev vm1"))
    };
    assert!(
        wait_for(SETTLE, fdb),
        "the bridge did not learn {mac} on vm1:\n{}",
        env.netd.ns.exec(&["bridge", "fdb", "show", "br", "vmbr0"])
    );
    assert_answers_ping(&env, 1, "after the classic migration");
    assert_eq!(guest_stats(&env, 1).boot_id, boot);
    assert!(
        wait_for(SETTLE, || !env.links().contains(&"vm0".to_string())),
        "the source's TAP outlived it: {:?}",
        env.links()
    );
    assert_eq!(tgt.vm.tap_queues("vm1"), 1);
    tgt.vm.wait_ticks(2);
    assert_ticks_continuous(&[src.serial_text(), tgt.vm.serial_text()]);
    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}
