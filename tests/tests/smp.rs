//! Several vCPUs on real KVM: the test guest finds its CPUs in the vmm's
//! ACPI tables (MADT) and starts each application processor with
//! INIT-SIPI-SIPI; each CPU ticks on its own LAPIC timer. Pause, resume
//! and local live migration take every vCPU together, running ones and an
//! AP the guest has not started yet (`testguest.hold_ap`), which it starts
//! after the migration. Bad `--vcpus` values are refused with exit 2.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::guest_lines::{all_cpu_ticks, assert_cpu_ticks_continuous};
use tests::migration_harness::{
    Exits, GuestSpec, HEARTBEAT_MS, MigEnv, TargetSpec, Traffic, Vm, assert_answers_ping,
    guest_stats, migrate, start_source, start_target, start_target_at, vmctl,
};
use tests::net_guest::{GuestLink, guest_ip};

/// The vCPU list of `vmctl status --json`: (apic id, run, mp_state).
fn vcpu_list(api: &Path) -> Vec<(u64, String, String)> {
    let (code, st) = vmctl(api, &["status"]);
    assert_eq!(code, Some(0), "{st}");
    st["vcpu_list"]
        .as_array()
        .unwrap_or_else(|| panic!("no vcpu_list in {st}"))
        .iter()
        .map(|v| {
            (
                v["apic_id"].as_u64().unwrap(),
                v["run"].as_str().unwrap().to_string(),
                v["mp_state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The vCPU list once every vCPU's thread is `run` (a resumed thread
/// reports itself running once it has woken, a moment after the reply).
fn vcpus_all(api: &Path, run: &str) -> Vec<(u64, String, String)> {
    let t0 = Instant::now();
    loop {
        let list = vcpu_list(api);
        if list.iter().all(|v| v.1 == run) {
            return list;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "not every vCPU {run}: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `testguest: cpu i up` of every AP in `aps`.
fn wait_aps_up(vm: &mut Vm, aps: impl IntoIterator<Item = u8>) {
    for i in aps {
        vm.wait_serial(&format!("testguest: cpu {i} up\n"), Duration::from_secs(60));
    }
}

/// The last heartbeat's per-CPU ticks in `vm`'s serial output, once it has
/// at least `n` heartbeats.
fn last_ticks(vm: &Vm, n: usize) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let all = all_cpu_ticks(&vm.serial_text());
        if all.len() >= n {
            return all.last().cloned().unwrap_or_default();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "fewer than {n} heartbeats: {}",
            vm.serial_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spec(env: &MigEnv, vcpus: u8, cmdline: &'static str) -> GuestSpec {
    let mut s = GuestSpec::one_nic(env, 1, "");
    s.vcpus = vcpus;
    s.cmdline = cmdline;
    s
}

#[test]
fn bad_vcpu_counts_exit_2_with_one_line() {
    for bad in ["0", "256", "1000000", "two", "", "-1", "4x"] {
        let out = Command::new(tests::bin("vmm"))
            .args(["--kernel", "/nonexistent", "--vcpus", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--vcpus '{bad}': {err}");
        assert_eq!(err.trim().lines().count(), 1, "--vcpus '{bad}': {err}");
        assert!(err.contains("--vcpus"), "--vcpus '{bad}': {err}");
    }
}

#[test]
fn four_and_thirty_two_vcpus_all_come_up_answer_and_power_off() {
    for n in [4u8, 32] {
        let mut exits = Exits::default();
        let env = MigEnv::new(&format!("smpb{n}"));
        let api = env.path("api.sock");
        let mut vm = start_source(&env, &spec(&env, n, ""), &api);
        vm.wait_serial(
            &format!("testguest: acpi madt: {n} cpus"),
            Duration::from_secs(10),
        );
        wait_aps_up(&mut vm, 1..n);
        let text = vm.serial_text();
        for i in 1..n {
            let line = format!("testguest: cpu {i} up\n");
            assert_eq!(text.matches(&line).count(), 1, "{line}: {text}");
        }
        assert_answers_ping(&env, 1, &format!("with {n} vCPUs"));
        assert_eq!(guest_stats(&env, 1).cpus, Some(u64::from(n)));
        // Every CPU ticks on its own timer.
        let first = last_ticks(&vm, 1);
        let seen = all_cpu_ticks(&vm.serial_text()).len();
        let later = last_ticks(&vm, seen + 5);
        assert_eq!(first.len(), usize::from(n), "{first:?}");
        for (cpu, (a, b)) in first.iter().zip(&later).enumerate() {
            assert!(b > a, "CPU #{cpu} does not tick: {first:?} then {later:?}");
        }
        let list = vcpu_list(&api);
        assert_eq!(list.len(), usize::from(n), "{list:?}");
        assert!(
            list.iter()
                .enumerate()
                .all(|(i, v)| v.0 == i as u64 && v.1 == "running" && v.2 == "runnable"),
            "{list:?}"
        );
        vm.shutdown(&api);
        exits.wait(&mut vm, &format!("{n} vCPUs"));
        exits.assert_all_ok();
    }
}

#[test]
fn pause_and_resume_stop_and_restart_every_vcpu() {
    const N: u8 = 4;
    let env = MigEnv::new("smpp");
    let api = env.path("api.sock");
    let mut vm = start_source(&env, &spec(&env, N, ""), &api);
    wait_aps_up(&mut vm, 1..N);
    let seen = all_cpu_ticks(&vm.serial_text()).len();
    last_ticks(&vm, seen + 3);

    assert_eq!(vmctl(&api, &["pause"]).0, Some(0));
    // A pause returns once every vCPU is parked: no waiting here.
    let paused = vcpu_list(&api);
    assert!(paused.iter().all(|v| v.1 == "paused"), "{paused:?}");
    let before = last_ticks(&vm, 1);
    let lines = all_cpu_ticks(&vm.serial_text()).len();
    // Twenty heartbeat periods: a CPU that ran on would gain about 20.
    std::thread::sleep(Duration::from_millis(u64::from(HEARTBEAT_MS) * 20));
    assert_eq!(
        all_cpu_ticks(&vm.serial_text()).len(),
        lines,
        "the guest printed while paused"
    );
    let resumed = Instant::now();
    assert_eq!(vmctl(&api, &["resume"]).0, Some(0));
    vcpus_all(&api, "running");
    // The first heartbeat after the resume, and the fifth after it: five
    // periods later, not at once (a PIT catching up on the paused time
    // would print the ticks it missed back to back).
    last_ticks(&vm, lines + 6);
    let took = resumed.elapsed();
    assert!(
        took >= Duration::from_millis(u64::from(HEARTBEAT_MS) * 3),
        "six heartbeats within {took:?} of the resume: the paused time was caught up"
    );
    let all = all_cpu_ticks(&vm.serial_text());
    let (after, later) = (&all[lines], &all[lines + 5]);
    for cpu in 0..usize::from(N) {
        // A timer that expired during the pause is delivered once at the
        // resume: at most one tick more than a heartbeat's worth.
        assert!(
            after[cpu] <= before[cpu] + 3,
            "CPU #{cpu} ticked while paused: {before:?} then {after:?}"
        );
        assert!(
            later[cpu] > after[cpu],
            "CPU #{cpu} stopped after the resume: {after:?} then {later:?}"
        );
    }
    assert_answers_ping(&env, 1, "after resume");
    vm.shutdown(&api);
}

#[test]
fn migration_with_four_vcpus_and_a_parked_ap_under_traffic_loses_nothing() {
    const N: u8 = 4;
    let mut exits = Exits::default();
    let env = MigEnv::new("smpm");
    let api = env.path("api.sock");
    // AP 3 stays parked in KVM (never sent INIT) until after the migration.
    let spec = spec(&env, N, "testguest.hold_ap=3");
    let mut src = start_source(&env, &spec, &api);
    wait_aps_up(&mut src, 1..N - 1);
    src.wait_serial("testguest: cpu 3 held", Duration::from_secs(10));
    assert_answers_ping(&env, 1, "before the migration");
    assert_eq!(guest_stats(&env, 1).cpus, Some(u64::from(N) - 1));
    let before = vcpu_list(&api);
    assert_eq!(before.len(), usize::from(N), "{before:?}");
    assert_eq!(before[3].2, "waiting-for-init", "{before:?}");

    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    let traffic = Traffic::start(&env, 1, 1);
    let out = migrate(&api, &tgt.incoming, &[]);
    out.assert_ok();
    exits.wait(&mut src, "source");
    traffic.wait_flowing("after the migration");
    traffic.stop_and_check();
    eprintln!(
        "{N} vCPUs (one parked): downtime {} us, phases {}",
        out.json["downtime_us"], out.json["phases"]
    );

    // Every vCPU arrived in the state it left: AP 3 still waits for INIT.
    let after = vcpus_all(&api, "running");
    assert_eq!(after.len(), usize::from(N), "{after:?}");
    assert_eq!(after[3].2, "waiting-for-init", "{after:?}");

    // The guest starts the parked AP on the target.
    let link = GuestLink::new(&env.netd.ns, guest_ip(1));
    let reply = link
        .call(5004, b"start 3", 3, Duration::from_secs(5))
        .expect("a reply to start 3");
    assert_eq!(String::from_utf8_lossy(&reply), "started 3");
    tgt.vm
        .wait_serial("testguest: cpu 3 up\n", Duration::from_secs(10));
    assert_eq!(guest_stats(&env, 1).cpus, Some(u64::from(N)));
    let seen = all_cpu_ticks(&tgt.vm.serial_text()).len();
    last_ticks(&tgt.vm, seen + 5);
    // Each CPU's ticks went on across the migration, AP 3's from 0.
    assert_cpu_ticks_continuous(&[src.serial_text(), tgt.vm.serial_text()]);

    // A target of another vCPU count is refused before the guest pauses.
    let mut other = TargetSpec::like(&spec);
    other.vcpus = N - 1;
    let api2 = env.path("api2.sock");
    other.api = Some(&api2);
    let mut wrong = start_target_at(&env, &other, &env.path("m2.sock"));
    let refused = migrate(&api, &wrong.incoming, &[]);
    let why = refused.assert_failed();
    assert!(why.contains("vCPU count differs"), "{why}");
    assert_eq!(refused.json["downtime_us"], 0, "{}", refused.json);
    wrong.vm.wait_exit(Duration::from_secs(10));
    assert_answers_ping(&env, 1, "after a refused migration");

    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}
