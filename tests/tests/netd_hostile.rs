//! netd against hostile local users (issue 7, items 1 to 5): uids with no
//! tenant entry (4242, 4243, 4244: strangers) and tenants misbehaving. After
//! each attack netd's fd count, thread count and interfaces are back at
//! their baseline, its audit log grew by a bounded amount, and a good tenant
//! (uid 65534, through the VMM's netd client) is served.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::codec;
use common::netd::{
    NETD_MAX_FRAME, NETD_PROTOCOL_VERSION, NetdErrorKind, NetdRequest, NetdResponse,
};
use tests::hostile::{
    NetdState, assert_back_to, audit_bytes, hostile_bin, run_hostile, thread_count,
};
use tests::netd_harness::{NOBODY, Netd, TEST_POLICY, hello, probe, wait_for, world_exec_copy};
use vmm::net::netd_client::{NetdClient, NetdClientError};

const STRANGERS: [u32; 3] = [4242, 4243, 4244];

struct Bins {
    probe: PathBuf,
    hostile: PathBuf,
}

fn start(tag: &str, policy: &str, extra: &[&str]) -> (Netd, Bins) {
    let netd = Netd::start(&tests::bin("netd"), tag, policy, extra);
    let bins = Bins {
        probe: world_exec_copy(Path::new(env!("CARGO_BIN_EXE_netd_probe")), &netd.dir),
        hostile: hostile_bin(Path::new(env!("CARGO_BIN_EXE_netd_hostile")), &netd.dir),
    };
    (netd, bins)
}

/// A good tenant (uid 65534) gets a TAP, which vanishes with its fds.
fn assert_served(netd: &Netd, bins: &Bins, name: &str) {
    let net = format!("netd={},id={name}", netd.socket.display());
    let r = probe(&bins.probe, NOBODY, NOBODY, &["tap", &net]);
    assert_eq!(r["ok"], true, "good tenant after the attack: {r}");
}

/// Baseline after one served request (thread stacks, bridge state warm).
fn baseline(netd: &Netd, bins: &Bins) -> (NetdState, u64) {
    assert_served(netd, bins, "vmwarm");
    let ok = wait_for(Duration::from_secs(10), || {
        thread_count(netd.pid()) == 1 && !netd.links().iter().any(|l| l == "vmwarm")
    });
    assert!(ok, "netd not idle before the attack");
    (NetdState::of(netd), audit_bytes(netd))
}

fn kinds(report: &serde_json::Value) -> Vec<String> {
    report["kinds"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn raw_frame(text: &str) -> Vec<u8> {
    let mut f = (text.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(text.as_bytes());
    f
}

/// Item 1: fds sent to netd (65 and more per frame, up to 300, by strangers
/// and by a tenant; a tenant's own TAP fd among them) never stay in netd.
#[test]
fn fd_floods_leave_no_fd_in_netd() {
    let (netd, bins) = start("fdflood", TEST_POLICY, &[]);
    let (base, audit0) = baseline(&netd, &bins);

    for (uid, fds) in STRANGERS.iter().zip([65usize, 253, 300]) {
        let r = run_hostile(
            &bins.hostile,
            *uid,
            &[
                "fdflood",
                netd.socket.to_str().unwrap(),
                "40",
                &fds.to_string(),
            ],
        );
        assert_eq!(kinds(&r), ["UnknownTenant"], "{r}");
    }
    // A tenant, past Hello, sending fds with a request.
    let r = run_hostile(
        &bins.hostile,
        NOBODY,
        &[
            "fdflood",
            netd.socket.to_str().unwrap(),
            "40",
            "120",
            "hello",
        ],
    );
    assert_eq!(r["kinds"]["InvalidRequest"], 40, "{r}");

    // A tenant handing netd its own TAP: the TAP must still vanish when the
    // tenant closes its copy.
    let tap = NetdClient::connect(&netd.socket, Duration::from_secs(10))
        .and_then(|mut c| c.open_tap("sgift", 1, true, false, None))
        .expect("root tenant gets a TAP");
    let s = UnixStream::connect(&netd.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    hello(&s);
    let gift = [tap.taps[0].as_fd()];
    codec::send(&s, &NetdRequest::Status, &gift).unwrap();
    let r: codec::Received<NetdResponse> = codec::recv(&s, NETD_MAX_FRAME, 0).unwrap();
    assert!(
        matches!(
            r.msg,
            NetdResponse::Error {
                kind: NetdErrorKind::InvalidRequest,
                ..
            }
        ),
        "{:?}",
        r.msg
    );
    drop((s, tap));

    assert_back_to(&netd, &base);
    let grew = audit_bytes(&netd) - audit0;
    assert!(grew < 64 * 1024, "audit log grew by {grew} bytes");
    assert_served(&netd, &bins, "vmafter");
}

/// Item 2: a stranger's huge names cost one short refusal each, and the
/// audit log grows by a bounded amount (rate-limited per uid, with a summary
/// line); a tenant's long name is refused briefly and logged bounded.
#[test]
fn amplification_is_bounded_and_rate_limited() {
    let (netd, bins) = start("amplify", TEST_POLICY, &[]);
    let (base, audit0) = baseline(&netd, &bins);
    let r = run_hostile(
        &bins.hostile,
        4242,
        &["longname", netd.socket.to_str().unwrap(), "1500", "3900"],
    );
    assert_eq!(kinds(&r), ["UnknownTenant"], "{r}");
    assert_eq!(r["replies"], 1500, "one reply per connection: {r}");
    let biggest = r["max_reply_bytes"].as_u64().unwrap();
    assert!(biggest <= 512, "a refusal of {biggest} bytes");

    let t = run_hostile(
        &bins.hostile,
        NOBODY,
        &["longname", netd.socket.to_str().unwrap(), "20", "3900"],
    );
    assert_eq!(t["kinds"]["InvalidRequest"], 20, "{t}");
    let biggest = t["max_reply_bytes"].as_u64().unwrap();
    assert!(biggest <= 512, "a refusal of {biggest} bytes");

    let garbage = run_hostile(
        &bins.hostile,
        4243,
        &["garbage", netd.socket.to_str().unwrap(), "500"],
    );
    assert_eq!(kinds(&garbage), ["UnknownTenant"], "{garbage}");

    assert_back_to(&netd, &base);
    let summarised = wait_for(Duration::from_secs(20), || {
        let a = netd.audit_text();
        a.contains("uid=4242 suppressed=") && a.contains("uid=4243 suppressed=")
    });
    let audit = netd.audit_text();
    assert!(summarised, "no summary of suppressed lines:\n{audit}");
    let grew = audit_bytes(&netd) - audit0;
    assert!(
        grew < 96 * 1024,
        "audit log grew by {grew} bytes for 2020 requests"
    );
    let longest = audit.lines().map(str::len).max().unwrap_or(0);
    assert!(longest <= 1024, "an audit line of {longest} bytes");
    assert!(
        audit.contains("...(3900 bytes)"),
        "names are cut, not dropped"
    );
    assert_served(&netd, &bins, "vmafter");
}

/// Item 3: strangers never hold slots (3 uids x 48 trickling connections
/// while the tenant asks), and one tenant cannot take another tenant's
/// reserve.
#[test]
fn strangers_hold_no_slots_and_tenants_keep_a_reserve() {
    let (netd, bins) = start(
        "slots",
        TEST_POLICY,
        &[
            "--max-clients",
            "12",
            "--max-clients-per-uid",
            "12",
            "--tenant-reserve",
            "3",
        ],
    );
    let (base, _) = baseline(&netd, &bins);
    let sock = netd.socket.to_str().unwrap().to_string();
    let floods: Vec<_> = STRANGERS
        .iter()
        .map(|&uid| {
            let (bin, sock) = (bins.hostile.clone(), sock.clone());
            std::thread::spawn(move || run_hostile(&bin, uid, &["trickle", &sock, "48", "4"]))
        })
        .collect();
    assert_served(&netd, &bins, "vmdur");
    for f in floods {
        let r = f.join().unwrap();
        assert_eq!(r["kinds"]["answered"], 48, "each refused: {r}");
        assert_eq!(r["kinds"]["still_open"], 0, "{r}");
    }
    // A continuous mixed flood (garbage, fds, long names, trickling): first
    // alone, when netd must run no thread but its main one, then while the
    // tenant asks again and again.
    let floods: Vec<_> = STRANGERS
        .iter()
        .map(|&uid| {
            let (bin, sock) = (bins.hostile.clone(), sock.clone());
            std::thread::spawn(move || {
                run_hostile(&bin, uid, &["mixed", &sock, "5", &uid.to_string()])
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut max_threads = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        max_threads = max_threads.max(thread_count(netd.pid()));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        max_threads, 1,
        "netd ran {max_threads} threads for strangers"
    );
    let mut served = 0;
    while floods.iter().any(|f| !f.is_finished()) {
        assert_served(&netd, &bins, &format!("vmdur{served}"));
        served += 1;
    }
    for f in floods {
        let r = f.join().unwrap();
        assert!(r["replies"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(served > 0);

    // Root (tenant "s") takes every slot it can: 12 minus 3 for each of the
    // two other tenants.
    let mut held = Vec::new();
    loop {
        let s = UnixStream::connect(&netd.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = codec::send(
            &s,
            &NetdRequest::Hello {
                version: NETD_PROTOCOL_VERSION,
            },
            &[],
        );
        match codec::recv::<_, NetdResponse>(&s, NETD_MAX_FRAME, 0).map(|r| r.msg) {
            Ok(NetdResponse::Hello { .. }) => held.push(s),
            Ok(NetdResponse::Error {
                kind: NetdErrorKind::Busy,
                ..
            }) => break,
            other => panic!("{other:?}"),
        }
        assert!(held.len() <= 12, "no cap");
    }
    assert_eq!(held.len(), 6, "root held {} slots", held.len());
    assert_served(&netd, &bins, "vmreserve");
    drop(held);
    assert_back_to(&netd, &base);
    assert_served(&netd, &bins, "vmafter");
}

/// Item 4: `max_taps` caps the TAPs a tenant has at once; netd holds no fd
/// for them and a TAP that is gone no longer counts.
#[test]
fn max_taps_caps_a_tenant_without_netd_holding_fds() {
    let policy = TEST_POLICY.replace(
        r#"(who: Uid(0), names: Prefix("s"), max_queues: 4,"#,
        r#"(who: Uid(0), names: Prefix("s"), max_queues: 4, max_taps: 3,"#,
    );
    assert_ne!(policy, TEST_POLICY);
    let (netd, bins) = start("maxtaps", &policy, &[]);
    let (base, _) = baseline(&netd, &bins);
    let mut c = NetdClient::connect(&netd.socket, Duration::from_secs(10)).unwrap();
    let mut held: Vec<_> = (0..3)
        .map(|i| c.open_tap(&format!("st{i}"), 2, true, false, None).unwrap())
        .collect();
    match c.open_tap("st3", 1, true, false, None) {
        Err(NetdClientError::Refused {
            kind: NetdErrorKind::TooManyTaps,
            message,
        }) => assert!(message.contains("max_taps 3"), "{message}"),
        other => panic!("a 4th TAP: {other:?}"),
    }
    assert!(!netd.links().iter().any(|l| l == "st3"));
    // netd keeps none of the 6 TAP fds (only the client connection).
    let targets = netd.fd_targets();
    assert!(
        !targets.iter().any(|t| t.contains("tun")),
        "netd holds TAP fds: {targets:?}"
    );
    assert!(NetdState::of(&netd).fds <= base.fds + 2, "{targets:?}");
    // Another tenant is not affected.
    assert_served(&netd, &bins, "vmother");
    // One TAP gone: a new one is allowed.
    held.pop();
    let ok = wait_for(Duration::from_secs(10), || {
        !netd.links().iter().any(|l| l == "st2")
    });
    assert!(ok, "st2 did not vanish");
    held.push(c.open_tap("st3", 1, true, false, None).unwrap());
    drop((held, c));
    assert_back_to(&netd, &base);
    assert!(netd.audit_text().contains("kind=TooManyTaps iface=\"st3\""));
    assert_served(&netd, &bins, "vmafter");
}

/// Item 5: unknown fields are refused (nothing created), and well-formed
/// RON of the wrong type is answered with an error, before and after Hello.
#[test]
fn unknown_fields_and_wrong_types_get_an_error_reply() {
    let (netd, bins) = start("strict", TEST_POLICY, &[]);
    let (base, _) = baseline(&netd, &bins);
    let s = UnixStream::connect(&netd.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    hello(&s);
    for text in [
        r#"OpenTap(name: "s5", queues: 1, vnet_hdr: true, vhost: false, mac: None, persist: true, owner: 0)"#,
        r#"OpenTap(name: 5, queues: 1, vnet_hdr: true, vhost: false, mac: None)"#,
        r#"OpenVhost(queues: "two")"#,
        r#"Status(verbose: true)"#,
        "42",
        r#""OpenTap""#,
        "(a: 1)",
    ] {
        (&s).write_all(&raw_frame(text)).unwrap();
        let r: codec::Received<NetdResponse> = codec::recv(&s, NETD_MAX_FRAME, 0)
            .unwrap_or_else(|e| panic!("no reply to {text}: {e}"));
        assert!(
            matches!(
                r.msg,
                NetdResponse::Error {
                    kind: NetdErrorKind::InvalidRequest,
                    ..
                }
            ),
            "{text}: {:?}",
            r.msg
        );
    }
    // The connection still works, and nothing was created.
    codec::send(&s, &NetdRequest::Status, &[]).unwrap();
    let r: codec::Received<NetdResponse> = codec::recv(&s, NETD_MAX_FRAME, 0).unwrap();
    assert!(matches!(r.msg, NetdResponse::Status { .. }), "{:?}", r.msg);
    assert!(!netd.links().iter().any(|l| l == "s5"));
    drop(s);

    // Before Hello: an error reply, then the connection closes.
    let s = UnixStream::connect(&netd.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(&raw_frame(r#"Hello(version: "1")"#))
        .unwrap();
    let r: codec::Received<NetdResponse> = codec::recv(&s, NETD_MAX_FRAME, 0).unwrap();
    assert!(
        matches!(
            r.msg,
            NetdResponse::Error {
                kind: NetdErrorKind::InvalidRequest,
                ..
            }
        ),
        "{:?}",
        r.msg
    );
    assert!(matches!(
        codec::recv::<_, NetdResponse>(&s, NETD_MAX_FRAME, 0),
        Err(codec::CodecError::Closed | codec::CodecError::Truncated)
    ));
    drop(s);
    assert_back_to(&netd, &base);
    assert_served(&netd, &bins, "vmafter");
}
