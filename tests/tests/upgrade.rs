//! Upgrades across releases, with real processes: the previous release's
//! `vmm` and `vmctl` (`PREVIOUS_VMM`, `PREVIOUS_VMCTL`: `.ci/run` builds
//! them from the last release tag) beside this build's, on one real netd.
//!
//! - previous → current: a guest booted on the previous release moves to
//!   this build's vmm as it would in a migration between equals: no packet
//!   lost under a 2 ms ping and a numbered UDP echo stream, the same boot,
//!   a heartbeat that counts on, the same TAP. A blind relay between them
//!   sees the previous release's protocol: 0.2.0 (protocol 2) gets Loaded
//!   after its State and sends Commit, where this build's protocol 3 has
//!   neither.
//! - current → previous: either that works just the same, or the previous
//!   target refuses before the pause (a newer migration protocol, which it
//!   must refuse): then the source's guest never stops, loses nothing, and
//!   keeps its vmm.
//!
//! Without `PREVIOUS_VMM` the tests skip loudly (`REQUIRE_PREVIOUS=1`, set
//! by `.ci/run`, makes that a failure).

use std::path::Path;

use common::migration::MIGRATION_PROTOCOL_VERSION;
use tests::bin;
use tests::migration_harness::{
    Exits, GuestSpec, MigEnv, SETTLE, TargetSpec, Traffic, assert_answers_ping,
    assert_same_guest_on_the_same_tap, assert_ticks_continuous, boot_id, guest_stats, migrate,
    migrate_with, start_source, start_source_with, start_target_with, ticks, vmctl_with,
};
use tests::prereq::{Prerequisite, PreviousRelease, require_or_skip};
use tests::relay::{Fault, Relay, said};

/// This build's version, as its vmm reports it.
const CURRENT: &str = env!("CARGO_PKG_VERSION");

/// The previous release's binaries, or `None` after a loud skip.
fn previous() -> Option<PreviousRelease> {
    if !require_or_skip(
        Prerequisite::PreviousRelease,
        "upgrade from the previous release",
    ) {
        return None;
    }
    Some(PreviousRelease::from_env().unwrap_or_else(|e| panic!("{e}")))
}

/// The migration protocol a vmm binary speaks as a source, from its
/// `--version` line (`vmm X (machine state format A.B, migration protocol N)`).
fn protocol_of(vmm: &Path) -> u32 {
    let out = std::process::Command::new(vmm)
        .arg("--version")
        .output()
        .expect("run vmm --version");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split("migration protocol ")
        .nth(1)
        .and_then(|r| r.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no protocol in {line:?}"))
}

/// `status` through `vmctl_bin`, which must succeed.
fn status(vmctl_bin: &Path, api: &Path) -> serde_json::Value {
    let (code, st) = vmctl_with(vmctl_bin, api, &["status"]);
    assert_eq!(code, Some(0), "{} status: {st}", vmctl_bin.display());
    st
}

#[test]
fn a_guest_on_the_previous_release_moves_to_this_one_with_nothing_lost() {
    let Some(prev) = previous() else { return };
    let mut exits = Exits::default();
    let env = MigEnv::new("up1");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut src = start_source_with(&prev.vmm, &env, &spec, &api);
    assert_answers_ping(&env, 1, "on the previous release");

    // The source is the previous release, not this build: its own vmctl
    // drives it, and this build's vmctl still reads its status.
    let st = status(&prev.vmctl, &api);
    assert_eq!(st["pid"], src.pid(), "{st}");
    let st = status(&bin("vmctl"), &api);
    assert_eq!(st["pid"], src.pid(), "{st}");
    assert_eq!(st["state"], "Running", "{st}");
    assert_ne!(
        st["version"], CURRENT,
        "PREVIOUS_VMM is this build's vmm, not the previous release: {st}"
    );

    let before = guest_stats(&env, 1);
    assert_eq!(before.boot_id, boot_id(&src.serial_text()));
    let ifindex = env.ifindex("vm0");
    let mut tgt = start_target_with(
        &bin("vmm"),
        &env,
        &TargetSpec::like(&spec),
        &env.path("mig.sock"),
    );
    let traffic = Traffic::start(&env, 1, 1);
    let mut relay = Relay::start(
        &env.path("relay.sock"),
        &tgt.incoming,
        tgt.vm.pid(),
        Fault::Pass,
    );

    let out = migrate_with(&prev.vmctl, &api, &relay.path, &[]);
    out.assert_ok();
    exits.wait(&mut src, "the previous release's source");
    assert!(relay.wait_done(SETTLE), "the relay still passes");
    // What each side said, as the previous release's protocol has it.
    let log = relay.log();
    let (from_source, from_target) = (said(&log, "FromSource"), said(&log, "FromTarget"));
    match protocol_of(&prev.vmm) {
        2 => {
            assert_eq!(from_source, ["Hello", "State", "Commit"], "{log:?}");
            assert_eq!(from_target, ["Ready", "Loaded", "Resumed"], "{log:?}");
        }
        p if p == MIGRATION_PROTOCOL_VERSION => {
            assert_eq!(from_source, ["Hello", "State"], "{log:?}");
            assert_eq!(from_target, ["Ready", "Resumed"], "{log:?}");
        }
        p => panic!("the previous release speaks migration protocol {p}: {log:?}"),
    }
    drop(relay);
    traffic.wait_flowing("after the migration");
    let (pings, echoes) = traffic.stop_and_check();
    eprintln!(
        "upgrade {} -> {CURRENT}: downtime {} us; {pings} pings and {echoes} echoes, none lost",
        prev.vmm.display(),
        out.json["downtime_us"]
    );

    // The same guest on the same TAP, now held by this build's vmm alone.
    assert_same_guest_on_the_same_tap(&env, &before, ifindex, &src, &tgt.vm);

    // The source's API path answers, from this build's vmm.
    let st = status(&bin("vmctl"), &api);
    assert_eq!(st["pid"], tgt.vm.pid(), "{st}");
    assert_eq!(st["state"], "Running", "{st}");
    assert_eq!(st["version"], CURRENT, "{st}");
    assert_eq!(
        st["format"],
        vmm::persist::MACHINE_STATE_FORMAT.to_string(),
        "{st}"
    );
    tgt.vm.shutdown(&api);
    exits.assert_all_ok();
}

#[test]
fn this_release_hands_a_guest_to_the_previous_one_or_is_refused_before_the_pause() {
    let Some(prev) = previous() else { return };
    let mut exits = Exits::default();
    let env = MigEnv::new("up2");
    let api = env.path("api.sock");
    let spec = GuestSpec::one_nic(&env, 2, "");
    let mut src = start_source(&env, &spec, &api);
    assert_answers_ping(&env, 2, "before the migration");
    // The previous release's vmctl reads this build's status (it skips the
    // fields it does not know).
    let st = status(&prev.vmctl, &api);
    assert_eq!(st["pid"], src.pid(), "{st}");
    assert_eq!(st["state"], "Running", "{st}");

    let before = guest_stats(&env, 2);
    let ifindex = env.ifindex("vm0");
    let mut tgt = start_target_with(
        &prev.vmm,
        &env,
        &TargetSpec::like(&spec),
        &env.path("mig.sock"),
    );
    let traffic = Traffic::start(&env, 2, 1);

    let out = migrate(&api, &tgt.incoming, &[]);
    // A target takes no newer protocol than its own.
    assert!(
        out.result() != "ok" || protocol_of(&prev.vmm) >= MIGRATION_PROTOCOL_VERSION,
        "a target of protocol {} took this build's protocol {MIGRATION_PROTOCOL_VERSION}: {out:?}",
        protocol_of(&prev.vmm)
    );
    if out.result() == "ok" {
        out.assert_ok();
        exits.wait(&mut src, "this build's source");
        traffic.wait_flowing("after the migration");
        traffic.stop_and_check();
        let after = guest_stats(&env, 2);
        assert_eq!(after.boot_id, before.boot_id, "the guest rebooted");
        assert!(after.rx > before.rx && after.echo > before.echo);
        assert_eq!(env.ifindex("vm0"), ifindex, "the TAP was recreated");
        assert_eq!(tgt.vm.tap_queues("vm0"), 1, "the target holds the TAP");
        tgt.vm.wait_ticks(2);
        assert_ticks_continuous(&[src.serial_text(), tgt.vm.serial_text()]);
        // The previous release answers on the source's path now.
        let st = status(&prev.vmctl, &api);
        assert_eq!(st["pid"], tgt.vm.pid(), "{st}");
        assert_eq!(st["state"], "Running", "{st}");
        let st = status(&bin("vmctl"), &api);
        assert_ne!(st["version"], CURRENT, "{st}");
        tgt.vm.shutdown_with(&prev.vmctl, &api);
        exits.assert_all_ok();
        return;
    }

    // Refused: before the pause, by the source's own report, and the
    // guest never noticed.
    let reason = out.assert_failed();
    eprintln!("the previous release refused this build's migration: {reason}");
    assert!(
        protocol_of(&prev.vmm) < MIGRATION_PROTOCOL_VERSION
            && reason.contains(&format!("migration protocol {MIGRATION_PROTOCOL_VERSION}")),
        "refused for another reason than a newer protocol: {reason}"
    );
    assert!(
        out.stderr.is_empty(),
        "vmctl got no report from the source: {out:?}"
    );
    assert_eq!(
        out.json["downtime_us"], 0,
        "the source paused its guest before the refusal: {out:?}"
    );
    assert!(
        src.try_exit().is_none(),
        "the source exited after a refused migration: {}",
        src.proc.stderr()
    );
    let st = status(&bin("vmctl"), &api);
    assert_eq!(st["pid"], src.pid(), "{st}");
    assert_eq!(st["state"], "Running", "{st}");
    traffic.wait_flowing("after the refusal");
    traffic.stop_and_check();
    src.wait_ticks(2);
    assert_ticks_continuous(&[src.serial_text()]);
    assert_eq!(guest_stats(&env, 2).boot_id, before.boot_id);
    assert_eq!(env.ifindex("vm0"), ifindex, "the TAP was recreated");
    assert_eq!(src.tap_queues("vm0"), 1, "the source lost its TAP");
    // The previous target took nothing: it gave up, or it still waits.
    match tgt.vm.try_exit() {
        Some(st) => assert!(!st.success(), "the refusing target exited 0"),
        None => {
            assert!(ticks(&tgt.vm.serial_text()).is_empty(), "the target ran");
            assert_eq!(tgt.vm.tap_queues("vm0"), 0, "the target holds the TAP");
        }
    }
    src.shutdown(&api);
}
