//! Several vCPUs: `--vcpus N` on real KVM, the test guest finding its CPUs
//! in the vmm's firmware tables and starting each application processor
//! with INIT-SIPI-SIPI; pause, resume and local live migration of every
//! vCPU together (running ones, and one the guest has not started yet);
//! bad `--vcpus` values refused with exit 2.

use std::process::Command;
use std::time::Duration;

use tests::migration_harness::{
    Exits, GuestSpec, MigEnv, TargetSpec, Traffic, assert_answers_ping, migrate, start_source,
    start_target, vmctl,
};

const N: u8 = 4;

/// The vCPU list of `vmctl status --json`: (apic id, run, mp_state).
fn vcpu_list(api: &std::path::Path) -> Vec<(u64, String, String)> {
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
fn migration_with_four_vcpus_under_traffic_loses_nothing() {
    let mut exits = Exits::default();
    let env = MigEnv::new("smp1");
    let api = env.path("api.sock");
    let mut spec = GuestSpec::one_nic(&env, 1, "");
    spec.vcpus = N;
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 1, "before the migration");
    let before = vcpu_list(&api);
    assert_eq!(before.len(), usize::from(N), "{before:?}");
    for (i, v) in before.iter().enumerate() {
        assert_eq!(v.0, i as u64, "{before:?}");
        assert_eq!(v.1, "running", "{before:?}");
    }

    let mut tgt = start_target(&env, &TargetSpec::like(&spec));
    let traffic = Traffic::start(&env, 1, 1);
    let out = migrate(&api, &tgt.incoming, &[]);
    out.assert_ok();
    exits.wait(&mut src, "source");
    traffic.wait_flowing("after the migration");
    traffic.stop_and_check();
    eprintln!(
        "{N} vCPUs: downtime {} us, phases {}",
        out.json["downtime_us"], out.json["phases"]
    );

    // Every vCPU arrived with the MP state it had at the source.
    let after = vcpu_list(&api);
    assert_eq!(after.len(), usize::from(N), "{after:?}");
    for (a, b) in after.iter().zip(&before) {
        assert_eq!((a.0, &a.1), (b.0, &b.1), "{after:?} vs {before:?}");
    }

    // A target of another vCPU count is refused before the guest pauses.
    let mut other = TargetSpec::like(&spec);
    other.vcpus = N - 1;
    let api2 = env.path("api2.sock");
    other.api = Some(&api2);
    let mut wrong = tests::migration_harness::start_target_at(&env, &other, &env.path("m2.sock"));
    let refused = migrate(&api, &wrong.incoming, &[]);
    let why = refused.assert_failed();
    assert!(why.contains("vCPU count differs"), "{why}");
    assert_eq!(refused.json["downtime_us"], 0, "{}", refused.json);
    wrong.vm.wait_exit(Duration::from_secs(10));
    assert_answers_ping(&env, 1, "after a refused migration");

    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}

#[test]
fn pause_and_resume_stop_and_restart_every_vcpu() {
    let env = MigEnv::new("smp2");
    let api = env.path("api.sock");
    let mut spec = GuestSpec::one_nic(&env, 1, "");
    spec.vcpus = N;
    let mut src = start_source(&env, &spec, &api);
    assert_eq!(vmctl(&api, &["pause"]).0, Some(0));
    let paused = vcpu_list(&api);
    assert!(paused.iter().all(|v| v.1 == "paused"), "{paused:?}");
    assert_eq!(vmctl(&api, &["resume"]).0, Some(0));
    let running = vcpu_list(&api);
    assert!(running.iter().all(|v| v.1 == "running"), "{running:?}");
    assert_answers_ping(&env, 1, "after resume");
    src.shutdown(&api);
}
