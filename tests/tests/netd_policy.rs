//! `netd --check-policy` (as uid 65534, on the shipped policy and on each kind
//! of broken one) and SIGHUP reloads of a serving netd: a good policy takes
//! effect for new and already-connected clients, a bad one is refused and the
//! old one stays; both are audit lines.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::codec;
use common::netd::{NETD_MAX_FRAME, NetdErrorKind, NetdRequest, NetdResponse};
use tests::netd_harness::{
    NOBODY, Netd, TEST_POLICY, hello, probe, probe_hold, wait_for, world_exec_copy,
};

/// Runs `netd --check-policy` on `text` as uid/gid 65534 and returns (exit
/// code, stdout, stderr).
fn check(dir: &Path, netd: &Path, name: &str, text: &str) -> (Option<i32>, String, String) {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(netd);
    cmd.arg("--check-policy").arg(&file).uid(NOBODY).gid(NOBODY);
    let out = tests::output_within(cmd, Duration::from_secs(30));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn world_dir(tag: &str) -> tests::TempDir {
    let dir = tests::TempDir::new(tag);
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn check_policy_accepts_the_shipped_policy_as_nobody() {
    let dir = world_dir("checkpol-ok");
    let netd = world_exec_copy(&tests::bin("netd"), &dir.0);
    let shipped = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy/netd.ron"),
    )
    .unwrap();
    let (code, out, err) = check(&dir.0, &netd, "netd.ron", &shipped);
    assert_eq!(code, Some(0), "stdout {out} stderr {err}");
    assert!(err.is_empty(), "{err}");
    assert!(out.contains("is valid"), "{out}");
    assert!(
        out.contains(
            "Uid(65534): may open TAPs with names starting with \"vm\", up to 4 queue(s) each, at most 64 at once, vhost-net allowed, enslaved to bridge \"vmbr0\""
        ),
        "{out}"
    );
    // The test policy's three tenants get a line each.
    let (code, out, err) = check(&dir.0, &netd, "test.ron", TEST_POLICY);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains(": may open TAPs"))
            .count(),
        3,
        "{out}"
    );
    assert!(
        out.contains("Gid(4343): may open TAPs with names matching \"nv*\""),
        "{out}"
    );
    assert!(
        out.contains("vhost-net refused, routed, host address 10.0.9.1/30"),
        "{out}"
    );
}

#[test]
fn check_policy_names_each_problem_and_exits_2() {
    let dir = world_dir("checkpol-bad");
    let netd = world_exec_copy(&tests::bin("netd"), &dir.0);
    let t = |rest: &str| {
        format!("(bridges: [(name: \"br0\", address: Some(\"10.0.1.1/24\"))], tenants: [{rest}])")
    };
    let ok = r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Bridge("br0"))"#;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown field",
            "(tenants: [], colour: 1)".to_string(),
            "colour",
        ),
        (
            "unknown tenant field",
            t(
                r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Bridge("br0"), cpus: 2)"#,
            ),
            "cpus",
        ),
        (
            "duplicate tenant",
            t(&format!("{ok}, {}", ok.replace("\"vm\"", "\"x\""))),
            "tenant #1 (Uid(1)) appears twice",
        ),
        (
            "overlapping names",
            t(&format!(
                "{ok}, (who: Gid(5), names: Pattern(\"v*\"), max_queues: 1, attach: Bridge(\"br0\"))"
            )),
            "names matching \"v*\" overlap tenant #0 (Uid(1))'s names starting with \"vm\"",
        ),
        (
            "undeclared bridge",
            t(r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Bridge("nobr"))"#),
            "bridge \"nobr\" is not declared",
        ),
        (
            "bad address",
            t(r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Routed("10.0.2.1"))"#),
            "lacks a /prefix",
        ),
        (
            "network address",
            t(
                r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Routed("10.0.2.0/24"))"#,
            ),
            "network or broadcast address",
        ),
        (
            "multicast address",
            t(
                r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Routed("224.0.0.9/24"))"#,
            ),
            "not a unicast host address",
        ),
        (
            "overlapping subnets",
            t(
                r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Routed("10.0.1.9/30"))"#,
            ),
            "subnet 10.0.1.9/30 overlaps bridge \"br0\"'s 10.0.1.1/24",
        ),
        (
            "queues out of range",
            t(r#"(who: Uid(1), names: Prefix("vm"), max_queues: 17, attach: Bridge("br0"))"#),
            "max_queues 17 is out of range 1..=16",
        ),
        (
            "taps out of range",
            t(
                r#"(who: Uid(1), names: Prefix("vm"), max_queues: 1, max_taps: 0, attach: Bridge("br0"))"#,
            ),
            "max_taps 0 is out of range 1..=1024",
        ),
        (
            "bad prefix",
            t(r#"(who: Uid(1), names: Prefix("v m"), max_queues: 1, attach: Bridge("br0"))"#),
            "prefix \"v m\" must be",
        ),
        (
            "pattern matching nothing",
            t(
                r#"(who: Uid(1), names: Pattern("abcdefghijklmnop"), max_queues: 1, attach: Bridge("br0"))"#,
            ),
            "matches no name of at most 15 characters",
        ),
        (
            "bad bridge name",
            "(bridges: [(name: \"br/0\")], tenants: [])".to_string(),
            "bridge \"br/0\": not a valid interface name",
        ),
        (
            "bridge declared twice",
            "(bridges: [(name: \"br0\"), (name: \"br0\")], tenants: [])".to_string(),
            "bridge \"br0\" is declared twice",
        ),
    ];
    for (what, text, want) in &cases {
        let (code, out, err) = check(&dir.0, &netd, "bad.ron", text);
        assert_eq!(code, Some(2), "{what}: stdout {out} stderr {err}");
        assert!(err.contains(want), "{what}: want {want:?} in {err}");
        assert!(
            err.lines().all(|l| l.starts_with("netd: ")),
            "{what}: {err}"
        );
        assert!(!out.contains("is valid"), "{what}: {out}");
    }
    // Several problems: one line each.
    let (code, _, err) = check(
        &dir.0,
        &netd,
        "bad.ron",
        &t(
            r#"(who: Uid(1), names: Prefix("vm"), max_queues: 0, max_taps: 5000, attach: Bridge("nobr"))"#,
        ),
    );
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 3, "{err}");

    // netd refuses to start on a rejected policy, with the same message.
    let (_, _, checker_err) = check(&dir.0, &netd, "bad.ron", &cases[4].1);
    let ns = tests::NetNs::new("checkpol");
    let mut cmd = ns.command(&[netd.to_str().unwrap()]);
    cmd.arg("--socket")
        .arg(dir.0.join("s.sock"))
        .arg("--policy")
        .arg(dir.0.join("bad.ron"));
    let out = tests::output_within(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), checker_err);
}

fn open_tap(s: &UnixStream, name: &str) -> NetdResponse {
    let req = NetdRequest::OpenTap {
        name: name.to_string(),
        queues: 1,
        vnet_hdr: true,
        vhost: false,
        mac: None,
    };
    codec::send(s, &req, &[]).unwrap();
    let r: codec::Received<NetdResponse> = codec::recv(s, NETD_MAX_FRAME, 16).unwrap();
    r.msg
}

fn sighup(netd: &Netd) {
    // SAFETY: kill(2) on the test's own netd child.
    assert_eq!(unsafe { libc::kill(netd.pid() as i32, libc::SIGHUP) }, 0);
}

fn wait_audit(netd: &Netd, what: &str, n: usize) {
    assert!(
        wait_for(Duration::from_secs(20), || netd
            .audit_text()
            .matches(what)
            .count()
            >= n),
        "no {n}th {what:?} in the audit log:\n{}",
        netd.audit_text()
    );
}

#[test]
fn sighup_reloads_a_good_policy_and_keeps_the_old_one_on_a_bad_one() {
    let netd = Netd::start(&tests::bin("netd"), "reload", TEST_POLICY, &[]);
    let probe_bin = world_exec_copy(
        PathBuf::from(env!("CARGO_BIN_EXE_netd_probe")).as_path(),
        &netd.dir,
    );
    let net = |rest: &str| format!("netd={},{rest}", netd.socket.display());
    let policy = netd.dir.join("policy.ron");

    // Being served: nobody holds a TAP, root has a connection open.
    let held = probe_hold(&probe_bin, NOBODY, NOBODY, &net("id=vmheld"));
    assert_eq!(held.reply["ok"], true, "{}", held.reply);
    let root = UnixStream::connect(&netd.socket).unwrap();
    root.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    hello(&root);
    assert!(matches!(open_tap(&root, "s1"), NetdResponse::Tap { .. }));

    // A bad policy: refused, audited, the old one stays in force.
    std::fs::write(&policy, "(tenants: [(who: Uid(4242), names: Prefix(\"nt\"), max_queues: 1, attach: Bridge(\"nobr\"))])").unwrap();
    sighup(&netd);
    wait_audit(&netd, "event=reload", 1);
    let audit = netd.audit_text();
    let line = audit.lines().find(|l| l.contains("event=reload")).unwrap();
    assert!(line.contains("result=refused old_policy=kept"), "{line}");
    assert!(
        line.contains("bridge \\\"nobr\\\" is not declared"),
        "{line}"
    );
    let r = probe(&probe_bin, NOBODY, NOBODY, &["tap", &net("id=vmafterbad")]);
    assert_eq!(r["ok"], true, "old policy still serves nobody: {r}");
    let r = probe(&probe_bin, 4242, 4242, &["tap", &net("id=nt0")]);
    assert_eq!(
        r["kind"], "UnknownTenant",
        "the bad policy was not applied: {r}"
    );
    assert!(matches!(open_tap(&root, "s2"), NetdResponse::Tap { .. }));

    // A good policy: nobody and root removed, uid 4242 added.
    std::fs::write(
        &policy,
        r#"(bridges: [(name: "vmbr0", address: Some("10.0.1.1/24"))],
            tenants: [(who: Uid(4242), names: Prefix("nt"), max_queues: 1, attach: Bridge("vmbr0"))])"#,
    )
    .unwrap();
    sighup(&netd);
    wait_audit(&netd, "event=reload", 2);
    let audit = netd.audit_text();
    let line = audit
        .lines()
        .filter(|l| l.contains("event=reload"))
        .nth(1)
        .unwrap();
    assert!(line.contains("result=applied tenants=1"), "{line}");
    let r = probe(&probe_bin, 4242, 4242, &["tap", &net("id=nt0")]);
    assert_eq!(r["ok"], true, "newly allowed tenant: {r}");
    assert_eq!(r["tun_names"][0], "nt0");
    let r = probe(&probe_bin, NOBODY, NOBODY, &["tap", &net("id=vmafter")]);
    assert_eq!(r["kind"], "UnknownTenant", "removed tenant: {r}");
    // The connection root opened before the reload gets no new TAP either.
    match open_tap(&root, "s3") {
        NetdResponse::Error { kind, .. } => assert_eq!(kind, NetdErrorKind::UnknownTenant),
        other => panic!("removed tenant got {other:?}"),
    }
    // The same listening socket serves on, and the held TAP is untouched.
    assert!(
        netd.links().iter().any(|l| l == "vmheld"),
        "{:?}",
        netd.links()
    );
    assert!(!netd.links().iter().any(|l| l == "s3" || l == "vmafter"));
    held.release();
}
