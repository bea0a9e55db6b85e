//! Exactly one owner of the guest, with real processes: a real source, a
//! real target, and between them a blind relay (tests/src/relay.rs) that
//! signals the target just before each message of the source reaches it
//! or in the middle of the State, holds the State past the limit, or
//! trickles the target's replies; then real targets and real sources
//! SIGKILLed at seeded random instants of migrations under traffic.
//!
//! Protocol 3: Hello → Ready, State → Resumed. The State is the commit:
//! the target takes the guest (the ownership CAS) as soon as it restored
//! it, before it answers Resumed; a source that gave up first took it back.
//!
//! After each fault: the guest runs in exactly one process (or in none
//! when the owner itself was killed, and the survivor says so in one
//! line), the boot id and the heartbeat numbering prove it is the same
//! guest and that it never ran twice (no tick number in two serial files,
//! none missing, a target that never owned it printed nothing), never two
//! processes tick at once, the API path answers from the owner, nothing is
//! left (processes, live sockets, TAPs), and a fresh migration succeeds
//! while a live owner remains.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tests::migration_harness::{
    GuestSpec, MigEnv, Pinger, SETTLE, TargetSpec, Vm, boot_id, echo_stream, guest_stats, migrate,
    start_source, start_target, ticks, vmctl,
};
use tests::net_guest::guest_ip;
use tests::netd_harness::wait_for;
use tests::relay::{Fault, Relay, SOURCE_MSGS, TARGET_MSGS, process_exited, sockets_in};
use tests::rng::{Rng, fuzz_seed};

/// The switch-over limit of the faulted migrations: short, so that a
/// trickled reply costs the guest little and the cases run fast.
const LIMIT_MS: u64 = 400;
/// Slack over the limit for a loaded 2-core host.
const LIMIT_SLACK_MS: u64 = 300;
/// Gap between the bytes of a trickled reply.
const TRICKLE_GAP: Duration = Duration::from_millis(300);
/// How long heartbeats are watched to see who runs the guest.
const WINDOW: Duration = Duration::from_millis(400);

/// Up to the last newline: a running guest may be in the middle of a
/// line (`tick 1` of `tick 13`).
fn complete_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |i| i + 1)]
}

fn ticks_in(path: &Path) -> Vec<u64> {
    ticks(complete_lines(
        &std::fs::read_to_string(path).unwrap_or_default(),
    ))
}

/// A guest across the processes that ran it.
struct Guest {
    owner: Vm,
    api: PathBuf,
    boot: String,
    /// Serial files of the processes that ran it, in order of ownership
    /// (the owner's last).
    lineage: Vec<PathBuf>,
}

impl Guest {
    fn boot(env: &MigEnv, spec: &GuestSpec) -> Self {
        let api = env.path("api.sock");
        let mut owner = start_source(env, spec, &api);
        // A first heartbeat before any migration: every guest's numbering
        // is checked from 1.
        owner.wait_serial("testguest: tick 1", SETTLE);
        let boot = boot_id(&owner.serial_text());
        let lineage = vec![owner.serial.clone()];
        Guest {
            owner,
            api,
            boot,
            lineage,
        }
    }

    /// The heartbeat over every process that ran the guest counts 1, 2,
    /// 3... with no number twice and none missing; only the first printed
    /// a boot line.
    fn assert_lineage(&self, what: &str) {
        let mut all = Vec::new();
        for (i, p) in self.lineage.iter().enumerate() {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let boots = text.matches("testguest: up boot_id=").count();
            assert_eq!(
                boots,
                usize::from(i == 0),
                "{what}: boot lines in serial #{i}"
            );
            all.push(text);
        }
        // A line cut by a migration is joined; the owner's last may be
        // still being written.
        let all = ticks(complete_lines(&all.concat()));
        assert_eq!(all.first(), Some(&1), "{what}: heartbeat from 1: {all:?}");
        for w in all.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "{what}: heartbeat not continuous over {} processes: {} then {}",
                self.lineage.len(),
                w[0],
                w[1]
            );
        }
    }
}

/// Which process runs the guest after a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Source,
    Target,
    None,
}

fn status_text(st: Option<ExitStatus>) -> String {
    match st {
        None => "alive".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (_, Some(9)) => "SIGKILL".into(),
            (_, Some(sig)) => format!("signal {sig}"),
            _ => s.to_string(),
        },
    }
}

fn one_line(vm: &Vm) -> String {
    let l = vm.error_lines();
    match l.len() {
        0 => "-".into(),
        1 => l[0].clone(),
        _ => l.join(" / "),
    }
}

/// Whose serial grows over [`WINDOW`] (both must not).
fn tickers(a: &Vm, b: &Vm) -> (bool, bool) {
    let (a0, b0) = (ticks_in(&a.serial).len(), ticks_in(&b.serial).len());
    std::thread::sleep(WINDOW);
    let (a1, b1) = (ticks_in(&a.serial).len(), ticks_in(&b.serial).len());
    (a1 > a0, b1 > b0)
}

/// Waits until `vm` exited or prints a heartbeat it had not printed.
fn wait_exit_or_tick(vm: &mut Vm) {
    let base = ticks_in(&vm.serial).len();
    let settled = wait_for(SETTLE, || {
        vm.try_exit().is_some() || ticks_in(&vm.serial).len() > base
    });
    assert!(settled, "vmm {} neither exits nor runs", vm.pid());
}

/// `vmctl migrate` as it came out, whatever happened to the source.
struct MigrateRun {
    code: Option<i32>,
    result: String,
    downtime_us: Option<u64>,
}

fn migrate_cmd(api: &Path, to: &Path) -> Command {
    let mut c = Command::new(tests::bin("vmctl"));
    c.arg("--api-socket")
        .arg(api)
        .arg("migrate")
        .arg("--to")
        .arg(to)
        .args(["--downtime-limit-ms", &LIMIT_MS.to_string(), "--json"]);
    c
}

fn migrate_run(out: std::process::Output) -> MigrateRun {
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let result = match (json["result"].as_str(), json["error"].as_str()) {
        // vmctl's own failure (the vmm went away before it answered).
        (Some("error"), Some(e)) => format!("error: {e}"),
        (r, _) => r.map_or_else(
            || {
                let e = String::from_utf8_lossy(&out.stderr);
                format!("(no report) {}", e.lines().next().unwrap_or("").trim())
            },
            str::to_string,
        ),
    };
    MigrateRun {
        code: out.status.code(),
        result,
        downtime_us: json["downtime_us"].as_u64(),
    }
}

/// What was left in the scratch directory: the live sockets must be
/// exactly the owner's API socket; stale ones (left by SIGKILLed
/// processes, which cannot remove them) are listed.
fn check_sockets(env: &MigEnv, owner_api: Option<&Path>, what: &str) -> Vec<String> {
    let socks = sockets_in(&env.dir.0);
    let live: Vec<&PathBuf> = socks.iter().filter(|(_, l)| *l).map(|(p, _)| p).collect();
    let want: Vec<&Path> = owner_api.into_iter().collect();
    assert_eq!(
        live.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
        want,
        "{what}: live sockets"
    );
    socks
        .iter()
        .filter(|(_, l)| !*l)
        .map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy().into())
        .collect()
}

/// The guest runs in `owner` (alone), on the same boot, answers ping and
/// the API, holds the TAP.
fn assert_runs_in(env: &MigEnv, g: &Guest, what: &str) {
    assert!(
        tests::net_guest::wait_ping(&env.netd.ns, guest_ip(1), SETTLE),
        "{what}: the guest does not answer ping"
    );
    assert_eq!(
        guest_stats(env, 1).boot_id,
        g.boot,
        "{what}: not the same boot"
    );
    let (code, st) = vmctl(&g.api, &["status"]);
    assert_eq!(code, Some(0), "{what}: status: {st}");
    assert_eq!(st["pid"], g.owner.pid(), "{what}: status from {st}");
    assert_eq!(st["state"], "Running", "{what}: {st}");
    assert_eq!(g.owner.tap_queues("vm0"), 1, "{what}: the owner's TAP");
    g.assert_lineage(what);
}

fn wait_tap_gone(env: &MigEnv, what: &str) {
    assert!(
        wait_for(SETTLE, || !env.links().contains(&"vm0".to_string())),
        "{what}: the TAP outlived the guest: {:?}",
        env.links()
    );
}

/// One faulted migration through the relay and what came of it.
struct Case {
    fault: String,
    vmctl: String,
    source: String,
    target: String,
    owner: Owner,
    stale: Vec<String>,
}

impl Case {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {:?} | {} |",
            self.fault,
            self.vmctl,
            self.source,
            self.target,
            self.owner,
            if self.stale.is_empty() {
                "-".into()
            } else {
                self.stale.join(", ")
            }
        )
    }
}

/// Migrates `g` through a relay scripted with `fault`, checks the outcome
/// against `expect`, and leaves `g` with its owner (or `None`).
fn relayed_case(
    env: &MigEnv,
    spec: &GuestSpec,
    g: Guest,
    fault: Fault,
    name: &str,
    expect: Owner,
) -> (Option<Guest>, Case) {
    let mut g = g;
    let stale_before = check_sockets(env, Some(&g.api), name);
    let mut tgt = start_target(env, &TargetSpec::like(spec));
    let mut relay = Relay::start(&env.path("relay.sock"), &tgt.incoming, tgt.vm.pid(), fault);
    let out = tests::output_within(migrate_cmd(&g.api, &relay.path), SETTLE);
    let run = migrate_run(out);
    assert!(
        relay.wait_done(SETTLE),
        "{name}: the relay still passes: {:?}",
        relay.log()
    );
    let log = relay.log();
    drop(relay);
    wait_exit_or_tick(&mut g.owner);
    wait_exit_or_tick(&mut tgt.vm);
    let (src_ticks, tgt_ticks) = tickers(&g.owner, &tgt.vm);
    let src_st = g.owner.try_exit();
    let tgt_st = tgt.vm.try_exit();
    let what = format!(
        "{name} (relay: {log:?}; vmctl {:?} {})",
        run.code, run.result
    );
    assert!(!(src_ticks && tgt_ticks), "{what}: both run the guest");
    let owner = match (src_st, tgt_st, src_ticks, tgt_ticks) {
        (None, Some(_), true, false) => Owner::Source,
        (Some(_), None, false, true) => Owner::Target,
        (Some(_), Some(_), false, false) => Owner::None,
        _ => panic!(
            "{what}: not exactly one owner: source {} ticking {src_ticks}, target {} ticking {tgt_ticks}\nsource: {}\ntarget: {}",
            status_text(src_st),
            status_text(tgt_st),
            g.owner.proc.stderr(),
            tgt.vm.proc.stderr()
        ),
    };
    assert_eq!(owner, expect, "{what}");
    if let Fault::Hold { msg: 1, .. } = fault {
        // The source took the guest back before the State reached the
        // target, which restored it, lost the CAS, and says so.
        let line = one_line(&tgt.vm);
        assert!(
            line.contains(&format!("taken back by the source (pid {})", g.owner.pid()))
                && line.ends_with("this vmm never ran it"),
            "{what}: the target's line: {line}"
        );
    }
    if let Fault::Trickle { msg: 1.., .. } | Fault::Hold { msg: 1.., .. } = fault {
        // The guest was paused when the reply was due: at most the limit.
        let d = run.downtime_us.unwrap_or(u64::MAX);
        assert!(
            d <= (LIMIT_MS + LIMIT_SLACK_MS) * 1000,
            "{what}: paused {d} us, the limit is {LIMIT_MS} ms"
        );
    }
    let case = |stale: Vec<String>| Case {
        fault: name.into(),
        vmctl: format!(
            "{} {}{}",
            run.code.map_or("-".into(), |c| c.to_string()),
            run.result,
            run.downtime_us.map_or(String::new(), |d| format!(
                " (downtime {:.1} ms)",
                d as f64 / 1000.0
            ))
        ),
        source: format!("{}: {}", status_text(src_st), one_line(&g.owner)),
        target: format!("{}: {}", status_text(tgt_st), one_line(&tgt.vm)),
        owner,
        stale: stale
            .into_iter()
            .filter(|s| !stale_before.contains(s))
            .collect(),
    };
    match owner {
        Owner::Source => {
            assert_ne!(run.code, Some(0), "{what}: vmctl said ok");
            assert!(
                ticks_in(&tgt.vm.serial).is_empty()
                    && !tgt.vm.serial_text().contains("testguest: up"),
                "{what}: the target ran the guest:\n{}",
                tgt.vm.serial_text()
            );
            assert_runs_in(env, &g, &what);
            let stale = check_sockets(env, Some(&g.api), &what);
            let c = case(stale);
            (Some(g), c)
        }
        Owner::Target => {
            assert_eq!(
                src_st.and_then(|s| s.code()),
                Some(0),
                "{what}: source exit"
            );
            assert_eq!(run.code, Some(0), "{what}");
            g.lineage.push(tgt.vm.serial.clone());
            let c = case(Vec::new());
            let old = std::mem::replace(&mut g.owner, tgt.vm);
            assert_runs_in(env, &g, &what);
            let stale = check_sockets(env, Some(&g.api), &what);
            drop(old);
            let stale = stale.into_iter().filter(|s| !stale_before.contains(s));
            (
                Some(g),
                Case {
                    stale: stale.collect(),
                    ..c
                },
            )
        }
        Owner::None => {
            g.lineage.push(tgt.vm.serial.clone());
            g.assert_lineage(&what);
            wait_tap_gone(env, &what);
            let stale = check_sockets(env, None, &what);
            (None, case(stale))
        }
    }
}

/// A fresh real migration of `g` (no relay, no fault) succeeds.
fn fresh_migration(env: &MigEnv, spec: &GuestSpec, mut g: Guest, what: &str) -> Guest {
    let tgt = start_target(env, &TargetSpec::like(spec));
    let out = migrate(&g.api, &tgt.incoming, &[]);
    out.assert_ok();
    let st = g.owner.wait_exit(SETTLE);
    assert_eq!(st.code(), Some(0), "{what}: the source's exit after ok");
    g.lineage.push(tgt.vm.serial.clone());
    g.owner = tgt.vm;
    let base = ticks_in(&g.owner.serial).len();
    assert!(
        wait_for(SETTLE, || ticks_in(&g.owner.serial).len() > base + 1),
        "{what}: the new owner does not run the guest"
    );
    assert_runs_in(env, &g, &format!("{what}, then a fresh migration"));
    check_sockets(env, Some(&g.api), what);
    g
}

/// Runs `faults` one after the other on one guest (a new one when the
/// owner died), each followed by a fresh migration; prints the table.
fn relay_matrix(tag: &str, faults: &[(Fault, String, Owner)]) {
    let env = MigEnv::new(tag);
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut guest = None;
    let mut rows = Vec::new();
    for (fault, name, expect) in faults {
        let g = guest.take().unwrap_or_else(|| Guest::boot(&env, &spec));
        let (after, case) = relayed_case(&env, &spec, g, *fault, name, *expect);
        eprintln!("{}", case.row());
        rows.push(case.row());
        guest = after.map(|g| fresh_migration(&env, &spec, g, name));
    }
    eprintln!(
        "| fault | vmctl migrate | source | target | owner after | stale sockets |\n|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
}

/// The target killed by `sig` just before each of the source's messages
/// reaches it, and with all of the State but its last byte (the commit
/// on its way: the target cannot have taken the guest): the source keeps
/// (or takes back) the guest every time.
fn signal_before_each_message(tag: &str, sig: libc::c_int, name: &str) {
    let mut faults: Vec<(Fault, String, Owner)> = (0..SOURCE_MSGS.len())
        .map(|msg| {
            (
                Fault::SignalBefore { msg, sig },
                format!("{name} target before {}", SOURCE_MSGS[msg]),
                Owner::Source,
            )
        })
        .collect();
    faults.push((
        Fault::SignalDuring { msg: 1, sig },
        format!("{name} target with the State but its last byte"),
        Owner::Source,
    ));
    relay_matrix(tag, &faults);
}

#[test]
fn target_sigkilled_just_before_each_message_of_the_source() {
    signal_before_each_message("own-kill", libc::SIGKILL, "SIGKILL");
}

#[test]
fn target_sigtermed_just_before_each_message_of_the_source() {
    signal_before_each_message("own-term", libc::SIGTERM, "SIGTERM");
}

#[test]
fn each_reply_of_the_target_trickled_a_late_state_and_a_target_dying_after_it_took_the_guest() {
    let mut faults: Vec<(Fault, String, Owner)> = (0..TARGET_MSGS.len())
        .map(|msg| {
            (
                Fault::Trickle {
                    msg,
                    gap: TRICKLE_GAP,
                },
                format!("{} trickled", TARGET_MSGS[msg]),
                // Resumed is sent by a target that owns the guest.
                if TARGET_MSGS[msg] == "Resumed" {
                    Owner::Target
                } else {
                    Owner::Source
                },
            )
        })
        .collect();
    // The State reaches the target after the source gave up at the limit
    // and took the guest back: the target restores it, loses the CAS and
    // never runs it.
    faults.push((
        Fault::Hold {
            msg: 1,
            delay: Duration::from_millis(LIMIT_MS + LIMIT_SLACK_MS + 300),
        },
        "State held past the limit".into(),
        Owner::Source,
    ));
    faults.push((
        Fault::KillAndDrop { msg: 1 },
        "SIGKILL target after it took the guest (Resumed dropped)".into(),
        Owner::None,
    ));
    relay_matrix("own-slow", &faults);
}

// ---------------------------------------------------------------------------
// Seeded random instants.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Source,
    Target,
}

/// One fuzz round's outcome, for the matrix.
struct Round {
    victim: Victim,
    delay_us: u64,
    relayed: bool,
    vmctl: String,
    source: String,
    target: String,
    owner: Owner,
}

/// Sends SIGKILL to a test child (a zombie at worst: not reaped yet).
fn sigkill(pid: u32) {
    // SAFETY: kill(2) on the test's own child, not reaped yet.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// A short category of a vmctl result, for the matrix.
fn step_of(result: &str) -> String {
    let r = result.trim();
    if r == "ok" {
        return "ok".into();
    }
    if r.starts_with("(no report)") {
        return "no report".into();
    }
    if r.contains("took the guest and exited") {
        return "lost with the target".into();
    }
    if let Some(e) = r.strip_prefix("error: ") {
        return format!("vmctl: {}", e.chars().take(50).collect::<String>());
    }
    if r.starts_with("cannot connect") {
        return "connect refused".into();
    }
    r.split(':').next().unwrap_or(r).chars().take(40).collect()
}

#[allow(clippy::too_many_arguments)]
fn fuzz_round(
    env: &MigEnv,
    spec: &GuestSpec,
    g: Guest,
    victim: Victim,
    delay: Duration,
    relay_delay: Option<Duration>,
    label: &str,
) -> (Option<Guest>, Round) {
    let mut g = g;
    let mut tgt = start_target(env, &TargetSpec::like(spec));
    let relay = relay_delay.map(|d| {
        Relay::start(
            &env.path("relay.sock"),
            &tgt.incoming,
            tgt.vm.pid(),
            Fault::Delay(d),
        )
    });
    let to = relay
        .as_ref()
        .map_or(tgt.incoming.clone(), |r| r.path.clone());
    let child = migrate_cmd(&g.api, &to)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmctl");
    let t0 = Instant::now();
    std::thread::sleep(delay);
    let victim_pid = match victim {
        Victim::Source => g.owner.pid(),
        Victim::Target => tgt.vm.pid(),
    };
    sigkill(victim_pid);
    let delay_us = t0.elapsed().as_micros() as u64;
    let what = format!("{label}: {victim:?} SIGKILLed {delay_us} us after vmctl migrate");
    // vmctl ends when the source settles (or dies).
    let vmctl_pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(SETTLE) {
        Ok(o) => o.expect("vmctl output"),
        Err(_) => {
            sigkill(vmctl_pid);
            panic!("{what}: vmctl migrate does not return");
        }
    };
    let _ = waiter.join();
    let run = migrate_run(out);
    assert!(
        wait_for(SETTLE, || process_exited(victim_pid)),
        "{what}: the victim lives"
    );
    // The survivor settles: it exits, or runs the guest, or (a target that
    // never got a Hello) still waits for a source.
    let mut idle = false;
    match victim {
        Victim::Target => wait_exit_or_tick(&mut g.owner),
        Victim::Source => {
            let base = ticks_in(&tgt.vm.serial).len();
            let settled = wait_for(SETTLE, || {
                tgt.vm.try_exit().is_some()
                    || ticks_in(&tgt.vm.serial).len() > base
                    || (tgt.incoming.exists() && t0.elapsed() > Duration::from_millis(500))
            });
            assert!(settled, "{what}: the target neither exits nor runs");
            idle = tgt.vm.try_exit().is_none() && ticks_in(&tgt.vm.serial).len() == base;
        }
    }
    if let Some(mut r) = relay {
        assert!(r.wait_done(SETTLE), "{what}: the relay still passes");
    }
    let (src_ticks, tgt_ticks) = tickers(&g.owner, &tgt.vm);
    assert!(!(src_ticks && tgt_ticks), "{what}: both run the guest");
    let mut target_note = String::new();
    if idle {
        assert!(!tgt_ticks, "{what}");
        // A target that never got a Hello waits for a source: it is
        // stopped as an operator would, and removes its socket.
        // SAFETY: kill(2) on the test's own child.
        unsafe { libc::kill(tgt.vm.pid() as i32, libc::SIGTERM) };
        let st = tgt.vm.wait_exit(SETTLE);
        assert_eq!(st.code(), Some(0), "{what}: the idle target's SIGTERM exit");
        assert!(
            !tgt.incoming.exists(),
            "{what}: the idle target left its socket"
        );
        target_note = " (had no Hello; SIGTERM then)".into();
    }
    let src_st = g.owner.try_exit();
    let tgt_st = tgt.vm.try_exit();
    let owner = match (src_st, tgt_st, src_ticks, tgt_ticks) {
        (None, Some(_), true, false) => Owner::Source,
        (Some(_), None, false, true) => Owner::Target,
        (Some(_), Some(_), false, false) => Owner::None,
        _ => panic!(
            "{what}: not exactly one owner: source {} ticking {src_ticks}, target {} ticking {tgt_ticks}; vmctl {:?} {}\nsource: {}\ntarget: {}",
            status_text(src_st),
            status_text(tgt_st),
            run.code,
            run.result,
            g.owner.proc.stderr(),
            tgt.vm.proc.stderr()
        ),
    };
    let what = format!("{what}; vmctl {:?} {}", run.code, run.result);
    let round = Round {
        victim,
        delay_us,
        relayed: relay_delay.is_some(),
        vmctl: step_of(&run.result),
        source: format!("{}: {}", status_text(src_st), one_line(&g.owner)),
        target: format!(
            "{}{target_note}: {}",
            status_text(tgt_st),
            one_line(&tgt.vm)
        ),
        owner,
    };
    match owner {
        Owner::Source => {
            assert_eq!(victim, Victim::Target, "{what}: the killed source runs?");
            assert_ne!(run.code, Some(0), "{what}: vmctl said ok");
            assert!(
                ticks_in(&tgt.vm.serial).is_empty(),
                "{what}: the dead target had run the guest and the source runs it too"
            );
            assert_runs_in(env, &g, &what);
            check_sockets(env, Some(&g.api), &what);
            (Some(g), round)
        }
        Owner::Target => {
            assert_eq!(victim, Victim::Source, "{what}: the killed target runs?");
            g.lineage.push(tgt.vm.serial.clone());
            g.owner = tgt.vm;
            assert_runs_in(env, &g, &what);
            check_sockets(env, Some(&g.api), &what);
            (Some(g), round)
        }
        Owner::None => {
            match victim {
                // The target took the guest and died with it: the source
                // said ok (Resumed came first) or says so in one line.
                Victim::Target => {
                    let line = one_line(&g.owner);
                    assert!(
                        (src_st.and_then(|s| s.code()) == Some(0) && run.code == Some(0))
                            || (src_st.and_then(|s| s.code()) == Some(1)
                                && g.owner.error_lines().len() == 1
                                && line.contains("took the guest and exited")),
                        "{what}: the source ended with {}: {line}",
                        status_text(src_st)
                    );
                    g.lineage.push(tgt.vm.serial.clone());
                }
                // The source owned the guest: the target never ran it, and
                // says why in one line (or it had no Hello at all).
                Victim::Source => {
                    assert!(
                        ticks_in(&tgt.vm.serial).is_empty(),
                        "{what}: the target ran the guest, then stopped?"
                    );
                    if !idle {
                        assert_eq!(
                            (tgt_st.and_then(|s| s.code()), tgt.vm.error_lines().len()),
                            (Some(1), 1),
                            "{what}: the target's end: {}",
                            tgt.vm.proc.stderr()
                        );
                        // The survivor says the guest went with its owner.
                        let line = one_line(&tgt.vm);
                        assert!(
                            line.contains(&format!(
                                "the guest is lost with its source (pid {victim_pid})"
                            )) && line.ends_with("this vmm never ran it"),
                            "{what}: the target's line: {line}"
                        );
                    }
                }
            }
            g.assert_lineage(&what);
            wait_tap_gone(env, &what);
            check_sockets(env, None, &what);
            (None, round)
        }
    }
}

#[test]
fn target_then_source_sigkilled_at_seeded_random_instants_under_traffic() {
    const ROUNDS: usize = 30;
    let seed = fuzz_seed(0x5eed_0f0e_4e12);
    let mut rng = Rng(seed.max(1));
    let env = MigEnv::new("own-fuzz");
    let spec = GuestSpec::one_nic(&env, 1, "");
    let mut guest = Some(Guest::boot(&env, &spec));
    let ping = Pinger::start(&env, guest_ip(1));
    let echo = echo_stream(&env, guest_ip(1), 2);
    let t_all = Instant::now();
    let mut rounds = Vec::new();
    let mut boots = 1;
    for (phase, victim) in [Victim::Target, Victim::Source].into_iter().enumerate() {
        for i in 0..ROUNDS {
            let g = guest.take().unwrap_or_else(|| {
                boots += 1;
                Guest::boot(&env, &spec)
            });
            // Every other round goes through a relay that holds each
            // message 4 ms: the windows between the steps widen (such a
            // migration takes ~30 ms here, a direct one 5-10 ms).
            let relayed = i % 2 == 1;
            let delay_us = if relayed {
                rng.below(36_000)
            } else if rng.below(5) == 0 {
                10_000 + rng.below(20_000)
            } else {
                rng.below(10_000)
            };
            let label = format!("round {}", phase * ROUNDS + i);
            let (after, round) = fuzz_round(
                &env,
                &spec,
                g,
                victim,
                Duration::from_micros(delay_us),
                relayed.then_some(Duration::from_millis(4)),
                &label,
            );
            if after.is_some() {
                // Traffic reaches the live owner.
                let p = ping.answered();
                assert!(
                    echo.wait_more(10, SETTLE),
                    "{label}: the UDP echo stream is not answered"
                );
                assert!(
                    wait_for(SETTLE, || ping.answered() >= p + 10),
                    "{label}: ping is not answered"
                );
            }
            eprintln!(
                "{label}: {:?} killed at {} us{}: vmctl {}, source {}, target {}, owner {:?}",
                round.victim,
                round.delay_us,
                if round.relayed { " (relayed)" } else { "" },
                round.vmctl,
                round.source,
                round.target,
                round.owner
            );
            rounds.push(round);
            guest = after;
        }
    }
    if let Some(mut g) = guest {
        let (code, out) = vmctl(&g.api, &["shutdown"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(g.owner.wait_exit(SETTLE).success());
        wait_tap_gone(&env, "at the end");
    }
    drop((ping, echo));
    // The matrix: outcomes grouped, with the range of instants.
    let mut groups: std::collections::BTreeMap<String, (usize, u64, u64)> = Default::default();
    for r in &rounds {
        let key = format!(
            "| {:?} | {} | {} | {} | {:?} |",
            r.victim,
            r.vmctl,
            strip_pids(&r.source),
            strip_pids(&r.target),
            r.owner
        );
        let e = groups.entry(key).or_insert((0, u64::MAX, 0));
        e.0 += 1;
        e.1 = e.1.min(r.delay_us);
        e.2 = e.2.max(r.delay_us);
    }
    eprintln!(
        "{} rounds in {:?}, {boots} guests booted, seed {seed}\n| killed | vmctl migrate | source | target | owner after | rounds | instants (us) |\n|---|---|---|---|---|---|---|",
        rounds.len(),
        t_all.elapsed()
    );
    for (k, (n, lo, hi)) in groups {
        eprintln!("{k} {n} | {lo}..{hi} |");
    }
}

/// A line with its pids and numbers of microseconds replaced, so that
/// rounds with the same outcome group together.
fn strip_pids(s: &str) -> String {
    let mut out = String::new();
    let mut digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !digits {
                out.push('N');
            }
            digits = true;
        } else {
            digits = false;
            out.push(c);
        }
    }
    out.chars().take(160).collect()
}
