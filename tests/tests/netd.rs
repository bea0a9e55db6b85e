//! netd end to end: a real netd in a namespace of the test's own, real TAPs
//! and a real bridge, clients running as uid 65534 through the VMM's netd
//! client (tests/src/bin/netd_probe.rs), malformed input from raw sockets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::codec;
use common::netd::{
    NETD_MAX_FRAME, NETD_PROTOCOL_VERSION, NetdErrorKind, NetdRequest, NetdResponse,
};
use tests::netd_harness::{
    NOBODY, Netd, TEST_POLICY, hello, probe, probe_hold, wait_for, world_exec_copy,
};
use tests::prereq::{Prerequisite, require_or_skip};
use tests::rng::{Rng, fuzz_seed};

fn start(tag: &str, extra: &[&str]) -> (Netd, PathBuf) {
    let netd = Netd::start(&tests::bin("netd"), tag, TEST_POLICY, extra);
    let probe = world_exec_copy(
        PathBuf::from(env!("CARGO_BIN_EXE_netd_probe")).as_path(),
        &netd.dir,
    );
    (netd, probe)
}

fn net_opt(netd: &Netd, rest: &str) -> String {
    format!("netd={},{rest}", netd.socket.display())
}

/// A good client after each bad one: proves netd still serves.
fn assert_served(netd: &Netd, probe_bin: &std::path::Path, name: &str) {
    let r = probe(
        probe_bin,
        NOBODY,
        NOBODY,
        &["tap", &net_opt(netd, &format!("id={name}"))],
    );
    assert_eq!(r["ok"], true, "good client after a bad one: {r}");
    assert_eq!(r["tun_names"][0], name);
}

fn raw_connect(netd: &Netd) -> UnixStream {
    let s = UnixStream::connect(&netd.socket).expect("connect to netd");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn expect_refusal(s: &UnixStream, kind: NetdErrorKind) -> String {
    let r: codec::Received<NetdResponse> = codec::recv(s, NETD_MAX_FRAME, 0).expect("a reply");
    assert!(r.fds.is_empty());
    match r.msg {
        NetdResponse::Error { kind: k, message } if k == kind => message,
        other => panic!("expected a {kind:?} refusal, got {other:?}"),
    }
}

/// Reads until EOF; true when netd closed the connection within `within`.
fn closed_by_netd(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

#[test]
fn granted_tap_is_attached_up_held_by_the_client_only_and_vanishes() {
    let (netd, probe_bin) = start("grant", &[]);
    // The bridge of the policy was created with its address.
    let br = netd
        .ns
        .exec(&["ip", "-o", "-4", "addr", "show", "dev", "vmbr0"]);
    assert!(br.contains("10.0.1.1/24"), "{br}");
    // With an address of its own (locally administered, from its name), so
    // that it does not follow its ports' MACs as TAPs come and go.
    let bridge_mac = || {
        netd.ns
            .exec(&["cat", "/sys/class/net/vmbr0/address"])
            .trim()
            .to_string()
    };
    let mac_before = bridge_mac();
    assert!(mac_before.starts_with("02:"), "{mac_before}");

    let held = probe_hold(
        &probe_bin,
        NOBODY,
        NOBODY,
        &net_opt(&netd, "id=vm0,queues=2,mac=52:54:00:00:00:01"),
    );
    assert_eq!(held.reply["ok"], true, "{}", held.reply);
    assert_eq!(held.reply["taps"], 2);
    assert_eq!(held.reply["tun_names"], serde_json::json!(["vm0", "vm0"]));

    let link = netd.ns.exec(&["ip", "-d", "link", "show", "vm0"]);
    assert!(link.contains("master vmbr0"), "not on the bridge: {link}");
    assert_eq!(bridge_mac(), mac_before, "the bridge took a port's MAC");
    assert!(link.contains(",UP"), "not up: {link}");
    assert!(link.contains("tun type tap"), "{link}");
    assert!(link.contains("multi_queue"), "{link}");
    assert!(
        !link.contains("persist on"),
        "TAP must not be persistent: {link}"
    );

    // netd keeps no fd of the TAP (nor of /dev/net/tun at all).
    let fds = netd.fd_targets();
    assert!(!fds.iter().any(|t| t.contains("tun")), "netd holds {fds:?}");

    let audit = netd.audit_text();
    let line = audit
        .lines()
        .find(|l| l.contains("OpenTap") && l.contains("result=granted"))
        .unwrap_or_else(|| panic!("no granted OpenTap line in {audit}"));
    assert!(
        line.contains(&format!("uid={NOBODY} gid={NOBODY}")),
        "{line}"
    );
    assert!(
        line.contains("iface=\"vm0\"") && line.contains("pid="),
        "{line}"
    );

    held.release();
    assert!(
        wait_for(Duration::from_secs(20), || !netd
            .links()
            .iter()
            .any(|l| l == "vm0")),
        "vm0 still exists after the client exited: {:?}",
        netd.links()
    );
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket() {
    let (mut netd, probe_bin) = start("term", &[]);
    assert_served(&netd, &probe_bin, "vmt0");
    assert_eq!(netd.terminate(), Some(0));
    assert!(!netd.socket.exists());
}

#[test]
fn policy_refusals_each_followed_by_a_served_client() {
    let (netd, probe_bin) = start("refuse", &[]);
    let tap = |uid: u32, gid: u32, rest: &str| {
        probe(&probe_bin, uid, gid, &["tap", &net_opt(&netd, rest)])
    };
    let refused = |r: &serde_json::Value, kind: &str| {
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["kind"], kind, "{r}");
        assert!(!r["message"].as_str().unwrap_or("").is_empty(), "{r}");
    };

    refused(&tap(NOBODY, NOBODY, "id=eth0"), "NameNotAllowed");
    assert_served(&netd, &probe_bin, "vmg1");
    refused(&tap(NOBODY, NOBODY, "id=vmbr0"), "NameNotAllowed");
    assert_served(&netd, &probe_bin, "vmg2");
    refused(&tap(NOBODY, NOBODY, "id=vm0,queues=5"), "TooManyQueues");
    assert_served(&netd, &probe_bin, "vmg3");
    refused(&tap(4242, 4242, "id=vm0"), "UnknownTenant");
    assert_served(&netd, &probe_bin, "vmg4");

    // Name in use: by a TAP another client holds, and by a non-TAP device.
    let held = probe_hold(
        &probe_bin,
        NOBODY,
        NOBODY,
        &net_opt(&netd, "id=vmheld,queues=2"),
    );
    assert_eq!(held.reply["ok"], true, "{}", held.reply);
    refused(&tap(NOBODY, NOBODY, "id=vmheld,queues=2"), "NameInUse");
    refused(&tap(NOBODY, NOBODY, "id=vmheld"), "NameInUse");
    netd.ns
        .exec(&["ip", "link", "add", "vmdummy", "type", "bridge"]);
    refused(&tap(NOBODY, NOBODY, "id=vmdummy"), "NameInUse");
    assert_served(&netd, &probe_bin, "vmg5");
    // The holder's TAP is untouched: still two queues, still attached.
    let link = netd.ns.exec(&["ip", "-d", "link", "show", "vmheld"]);
    assert!(
        link.contains("master vmbr0") && link.contains("multi_queue"),
        "{link}"
    );
    held.release();

    // vhost: refused as unavailable where the host has no /dev/vhost-net.
    let r = tap(NOBODY, NOBODY, "id=vmvh,vhost=on");
    let r2 = probe(
        &probe_bin,
        NOBODY,
        NOBODY,
        &["vhost", netd.socket.to_str().unwrap(), "2"],
    );
    if require_or_skip(
        Prerequisite::VhostNet,
        "the vhost grant (only the refusal is checked)",
    ) {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["vhost"], 1, "{r}");
        assert_eq!(r2["vhost"], 2, "{r2}");
    } else {
        refused(&r, "VhostUnavailable");
        refused(&r2, "VhostUnavailable");
        assert!(
            !netd.links().iter().any(|l| l == "vmvh"),
            "a refused request left a TAP"
        );
    }
    assert_served(&netd, &probe_bin, "vmg6");

    // A gid tenant without vhost, routed with a host address on the TAP.
    refused(&tap(4343, 4343, "id=nv0,vhost=on"), "VhostNotAllowed");
    let held = probe_hold(&probe_bin, 4343, 4343, &net_opt(&netd, "id=nv0"));
    assert_eq!(held.reply["ok"], true, "{}", held.reply);
    let a = netd
        .ns
        .exec(&["ip", "-o", "-4", "addr", "show", "dev", "nv0"]);
    assert!(a.contains("10.0.9.1/30"), "{a}");
    held.release();
    assert_served(&netd, &probe_bin, "vmg7");

    let audit = netd.audit_text();
    for kind in [
        "NameNotAllowed",
        "TooManyQueues",
        "UnknownTenant",
        "NameInUse",
        "VhostNotAllowed",
    ] {
        assert!(
            audit.contains(&format!("kind={kind}")),
            "no {kind} audit line in\n{audit}"
        );
    }
    assert!(
        audit.contains("kind=NameInUse iface=\"vmdummy\""),
        "{audit}"
    );
    assert!(audit.contains("uid=4242 gid=4242"), "{audit}");
}

#[test]
fn malformed_input_each_followed_by_a_served_client() {
    let (netd, probe_bin) = start(
        "malformed",
        &["--read-timeout-ms", "1000", "--client-deadline-ms", "4000"],
    );

    // Wrong protocol version: refused, then closed.
    let mut s = raw_connect(&netd);
    codec::send(&s, &NetdRequest::Hello { version: 99 }, &[]).unwrap();
    let m = expect_refusal(&s, NetdErrorKind::Version);
    assert!(m.contains("99"), "{m}");
    assert!(closed_by_netd(&mut s, Duration::from_secs(10)));
    assert_served(&netd, &probe_bin, "vmm1");

    // A request before Hello.
    let mut s = raw_connect(&netd);
    codec::send(&s, &NetdRequest::Status, &[]).unwrap();
    expect_refusal(&s, NetdErrorKind::Version);
    assert!(closed_by_netd(&mut s, Duration::from_secs(10)));
    assert_served(&netd, &probe_bin, "vmm2");

    // Unknown request and an inconsistent one: refused, connection kept.
    let s = raw_connect(&netd);
    hello(&s);
    (&s).write_all(&raw_frame(b"Frobnicate(level: 11)"))
        .unwrap();
    expect_refusal(&s, NetdErrorKind::InvalidRequest);
    codec::send(
        &s,
        &NetdRequest::OpenTap {
            name: "bad name".into(),
            queues: 1,
            vnet_hdr: true,
            vhost: false,
            mac: None,
        },
        &[],
    )
    .unwrap();
    expect_refusal(&s, NetdErrorKind::InvalidRequest);
    codec::send(
        &s,
        &NetdRequest::OpenTap {
            name: "s0".into(),
            queues: 0,
            vnet_hdr: true,
            vhost: false,
            mac: None,
        },
        &[],
    )
    .unwrap();
    expect_refusal(&s, NetdErrorKind::InvalidRequest);
    codec::send(&s, &NetdRequest::Status, &[]).unwrap();
    let r: codec::Received<NetdResponse> = codec::recv(&s, NETD_MAX_FRAME, 0).unwrap();
    assert!(matches!(r.msg, NetdResponse::Status { .. }), "{:?}", r.msg);
    drop(s);
    assert_served(&netd, &probe_bin, "vmm3");

    // Garbage (binary, then text that is not RON): closed.
    for junk in [&[0xffu8, 0x00, 0x13, 0x37][..], b"@@@ not ron {{{"] {
        let mut s = raw_connect(&netd);
        hello(&s);
        s.write_all(&raw_frame(junk)).unwrap();
        assert!(closed_by_netd(&mut s, Duration::from_secs(10)), "{junk:?}");
        assert_served(&netd, &probe_bin, "vmm4");
    }

    // Deep nesting within the size cap: refused by the parser's recursion
    // limit, not a stack overflow in netd's small client threads.
    let mut s = raw_connect(&netd);
    hello(&s);
    s.write_all(&raw_frame("[".repeat(4000).as_bytes()))
        .unwrap();
    assert!(closed_by_netd(&mut s, Duration::from_secs(10)));
    assert_served(&netd, &probe_bin, "vmm9");

    // Oversized frame: closed before netd reads (or allocates) the payload.
    let mut s = raw_connect(&netd);
    s.write_all(&(64u32 << 20).to_le_bytes()).unwrap();
    assert!(closed_by_netd(&mut s, Duration::from_secs(10)));
    assert_served(&netd, &probe_bin, "vmm5");

    // Disconnect in the middle of a frame.
    let mut s = raw_connect(&netd);
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(b"OpenTap(").unwrap();
    drop(s);
    assert_served(&netd, &probe_bin, "vmm6");

    // A slow client: half a frame, then silence past the read timeout.
    let mut s = raw_connect(&netd);
    s.write_all(&100u32.to_le_bytes()).unwrap();
    let t0 = Instant::now();
    assert!(closed_by_netd(&mut s, Duration::from_secs(20)));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    assert_served(&netd, &probe_bin, "vmm7");

    // A trickling client (a byte every 300 ms, never a whole frame) is cut
    // at the per-connection deadline.
    let mut s = raw_connect(&netd);
    s.write_all(&1000u32.to_le_bytes()).unwrap();
    let t0 = Instant::now();
    let mut cut = false;
    while t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(300));
        if s.write_all(b" ").is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "netd never cut the trickling client");
    assert_served(&netd, &probe_bin, "vmm8");

    let audit = netd.audit_text();
    assert!(audit.contains("kind=Version"), "{audit}");
    assert!(
        audit.contains("Frobnicate") && audit.contains("kind=InvalidRequest"),
        "{audit}"
    );
    assert!(
        audit.contains("result=closed reason=\"frame is not UTF-8\""),
        "{audit}"
    );
    assert!(audit.contains("malformed frame"), "{audit}");
    assert!(audit.contains("exceeds the limit"), "{audit}");
    assert!(audit.contains("in the middle of a frame"), "{audit}");
    assert!(audit.contains("read timeout"), "{audit}");
}

/// Random bytes, and random mutations of valid requests, into the frame
/// decoder: it never panics, and it decodes exactly the frames whose length
/// prefix is honest and whose payload is a valid request.
#[test]
fn frame_decoder_never_panics_on_random_input() {
    const RUNS: u64 = 20_000;
    let seed = fuzz_seed(0x0ddb_a11c_0ffe_e001);
    let mut rng = Rng(seed);
    let valid: Vec<String> = [
        NetdRequest::Hello { version: 1 },
        NetdRequest::Status,
        NetdRequest::OpenVhost { queues: 2 },
        NetdRequest::OpenTap {
            name: "vm0".into(),
            queues: 4,
            vnet_hdr: true,
            vhost: true,
            mac: Some([2, 0, 0, 0, 0, 1]),
        },
    ]
    .iter()
    .map(|r| ron::to_string(r).unwrap())
    .collect();
    let (mut decoded, mut errors) = (0u64, 0u64);
    for run in 0..RUNS {
        let mut payload: Vec<u8> = match rng.below(3) {
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            _ => valid[rng.below(valid.len() as u64) as usize]
                .clone()
                .into_bytes(),
        };
        for _ in 0..rng.below(6) {
            if payload.is_empty() {
                break;
            }
            let i = rng.below(payload.len() as u64) as usize;
            match rng.below(4) {
                0 => payload[i] = rng.next() as u8,
                1 => {
                    payload.remove(i);
                }
                2 => payload.insert(
                    i,
                    b"()[]{},:\"'0123456789-.eSomeNone"[rng.below(31) as usize],
                ),
                _ => payload.truncate(i),
            }
        }
        let mut frame = raw_frame(&payload);
        if rng.below(8) == 0 {
            // A lying length prefix.
            let l = rng.next() as u32;
            frame[..4].copy_from_slice(&l.to_le_bytes());
        }
        let honest = frame[..4] == (payload.len() as u32).to_le_bytes();
        // What the decoder must produce: the request the payload spells.
        let expected = std::str::from_utf8(&payload)
            .ok()
            .and_then(|t| ron::from_str::<NetdRequest>(t).ok())
            .filter(|_| honest && payload.len() <= NETD_MAX_FRAME);
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        a.write_all(&frame).unwrap();
        drop(a);
        match (
            codec::recv::<_, NetdRequest>(&b, NETD_MAX_FRAME, 0),
            expected,
        ) {
            (Ok(got), Some(want)) => {
                assert_eq!(got.msg, want, "run {run}: {payload:?}");
                decoded += 1;
            }
            (Err(e), None) => {
                assert!(
                    !matches!(e, codec::CodecError::Timeout),
                    "run {run}: the decoder waited on a closed socket"
                );
                errors += 1;
            }
            (got, want) => panic!(
                "run {run} (seed {seed}): decoded {got:?}, expected {want:?} for frame {frame:?}"
            ),
        }
    }
    eprintln!("{RUNS} frames: {decoded} decoded, {errors} errors");
    assert!(
        decoded > 0 && errors > 0,
        "the generator must hit both outcomes"
    );
}

/// Random frames at a live netd; every one is answered or ends the
/// connection (none hangs it), and netd keeps serving.
#[test]
fn live_netd_survives_random_frames() {
    const RUNS: u32 = 300;
    let (netd, probe_bin) = start("fuzz", &["--read-timeout-ms", "500"]);
    let seed = fuzz_seed(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng(seed);
    let (mut answered, mut closed) = (0u32, 0u32);
    for run in 0..RUNS {
        let s = raw_connect(&netd);
        if rng.below(2) == 0 {
            hello(&s);
        }
        let payload: Vec<u8> = match rng.below(2) {
            0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
            _ => {
                let mut p =
                    b"OpenTap(name:\"vm0\",queues:1,vnet_hdr:true,vhost:false,mac:None)".to_vec();
                let i = rng.below(p.len() as u64) as usize;
                p[i] = rng.next() as u8;
                p
            }
        };
        // netd may close before taking it all (it stops at the first bad byte).
        let sent = (&s).write_all(&raw_frame(&payload));
        match codec::recv::<_, NetdResponse>(&s, NETD_MAX_FRAME, 0) {
            Ok(_) => answered += 1,
            Err(codec::CodecError::Timeout) => {
                panic!("run {run} (seed {seed}): no answer and no close for {payload:?}")
            }
            Err(_) => closed += 1,
        }
        if let Err(e) = sent {
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "run {run}: {e}"
            );
        }
    }
    eprintln!("{RUNS} random frames: {answered} answered, {closed} closed");
    assert!(answered > 0 && closed > 0, "both outcomes must occur");
    assert_served(&netd, &probe_bin, "vmfz");
}

/// 10,000 OpenTap requests from 32 concurrent clients (fds closed at once):
/// netd survives, its fd count returns to baseline, no interface is left.
#[test]
fn soak_10000_open_tap_from_32_clients() {
    use vmm::net::netd_client::{NetdClient, NetdClientError};
    let (netd, probe_bin) = start("soak", &[]);
    assert_served(&netd, &probe_bin, "vmwarm");
    let baseline_links = netd.links();
    // Idle netd holds one socket (the listener); every other fd is fixed.
    let non_sockets = |t: Vec<String>| -> Vec<String> {
        let mut v: Vec<String> = t
            .into_iter()
            .filter(|t| !t.starts_with("socket:"))
            .collect();
        v.sort();
        v
    };
    let sockets = || {
        netd.fd_targets()
            .iter()
            .filter(|t| t.starts_with("socket:"))
            .count()
    };
    let baseline_fds = non_sockets(netd.fd_targets());
    const CLIENTS: usize = 32;
    const TOTAL: usize = 10_000;
    let socket = netd.socket.clone();
    let t0 = Instant::now();
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let socket = socket.clone();
                sc.spawn(move || {
                    let mut ok = 0;
                    let mut errors = Vec::new();
                    for i in (c..TOTAL).step_by(CLIENTS) {
                        let name = format!("s{c}x{i}");
                        let r = NetdClient::connect(&socket, Duration::from_secs(60)).and_then(
                            |mut cl| cl.open_tap(&name, 1 + (i % 2) as u16, true, false, None),
                        );
                        match r {
                            Ok(t) => {
                                assert_eq!(t.taps.len(), 1 + i % 2);
                                ok += 1;
                            }
                            Err(NetdClientError::Refused { kind, message }) => {
                                errors.push(format!("{name}: {kind:?} {message}"))
                            }
                            Err(e) => errors.push(format!("{name}: {e}")),
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let ok: usize = results.iter().map(|r| r.0).sum();
    let errors: Vec<&String> = results.iter().flat_map(|r| r.1.iter()).collect();
    eprintln!(
        "soak: {ok}/{TOTAL} granted in {secs:.1} s ({:.0} req/s)",
        TOTAL as f64 / secs
    );
    assert!(
        errors.is_empty(),
        "{} failures, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(ok, TOTAL);

    assert!(
        wait_for(Duration::from_secs(30), || sockets() == 1
            && non_sockets(netd.fd_targets()) == baseline_fds),
        "netd fds now: {:?}, baseline: {baseline_fds:?} + the listener",
        netd.fd_targets(),
    );
    assert!(
        wait_for(Duration::from_secs(30), || netd.links() == baseline_links),
        "interfaces left: {:?} (before: {:?})",
        netd.links(),
        baseline_links
    );
    let grants = netd
        .audit_text()
        .lines()
        .filter(|l| l.contains("OpenTap") && l.contains("result=granted"))
        .count();
    assert_eq!(grants, TOTAL + 1, "one audit line per request");
    assert_served(&netd, &probe_bin, "vmafter");
}

#[test]
fn client_cap_answers_busy_and_recovers() {
    let (netd, probe_bin) = start("busy", &["--max-clients", "2"]);
    // The start-up probe's connection may still be counted for a moment.
    let admitted = || loop {
        let s = raw_connect(&netd);
        // A refused (Busy) connection may already be closed: retry.
        let _ = codec::send(
            &s,
            &NetdRequest::Hello {
                version: NETD_PROTOCOL_VERSION,
            },
            &[],
        );
        match codec::recv::<_, NetdResponse>(&s, NETD_MAX_FRAME, 0) {
            Ok(r) if matches!(r.msg, NetdResponse::Hello { .. }) => return s,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let a = admitted();
    let b = admitted();
    let c = raw_connect(&netd);
    let m = expect_refusal(&c, NetdErrorKind::Busy);
    assert!(m.contains("maximum of 2"), "{m}");
    drop((a, b));
    assert!(
        wait_for(Duration::from_secs(20), || {
            let r = probe(
                &probe_bin,
                NOBODY,
                NOBODY,
                &["tap", &net_opt(&netd, "id=vmbusy")],
            );
            r["ok"] == true
        }),
        "netd did not recover after the busy period"
    );
    assert!(netd.audit_text().contains("kind=Busy"));
}

#[test]
fn one_uid_cannot_take_every_client_slot() {
    let (netd, probe_bin) = start(
        "peruid",
        &["--max-clients", "8", "--max-clients-per-uid", "2"],
    );
    let admitted = || loop {
        let s = raw_connect(&netd);
        let _ = codec::send(
            &s,
            &NetdRequest::Hello {
                version: NETD_PROTOCOL_VERSION,
            },
            &[],
        );
        match codec::recv::<_, NetdResponse>(&s, NETD_MAX_FRAME, 0) {
            Ok(r) if matches!(r.msg, NetdResponse::Hello { .. }) => return s,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    // Root (this test) holds its two connections...
    let held = [admitted(), admitted()];
    let c = raw_connect(&netd);
    let m = expect_refusal(&c, NetdErrorKind::Busy);
    assert!(m.contains("uid 0") && m.contains("maximum of 2"), "{m}");
    // ...and another tenant is still served meanwhile.
    assert_served(&netd, &probe_bin, "vmfair");
    drop(held);
}

/// A netd child killed and reaped on drop (also when the test fails).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        tests::kill_and_reap(&mut self.0);
    }
}

#[test]
fn bad_policy_stops_netd_with_a_reason_and_stale_sockets_are_replaced() {
    let netd_bin = tests::bin("netd");
    let dir = tests::TempDir::new("netd-startup");
    // Every netd here runs in a namespace of the test's own (a start-up that
    // went wrong must not touch the host's network) and within a bound.
    let ns = tests::NetNs::new("startup");
    let run = |policy: &std::path::Path, sock: &std::path::Path| {
        let mut cmd = ns.command(&[netd_bin.to_str().unwrap()]);
        cmd.arg("--socket").arg(sock).arg("--policy").arg(policy);
        tests::output_within(cmd, Duration::from_secs(30))
    };
    let policy = dir.join("bad.ron");
    std::fs::write(
        &policy,
        r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 4, attach: Bridge("nobr"))])"#,
    )
    .unwrap();
    let sock = dir.join("s.sock");
    let out = run(&policy, &sock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bridge \"nobr\" is not declared"), "{err}");

    // A regular file at the socket path is never deleted.
    let good = dir.join("good.ron");
    std::fs::write(
        &good,
        r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Routed("10.0.2.1/30"))])"#,
    )
    .unwrap();
    std::fs::write(&sock, "precious").unwrap();
    let out = run(&good, &sock);
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
    std::fs::remove_file(&sock).unwrap();

    // A stale socket (nobody listening) is replaced, and SIGTERM exits 0.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut child = ChildGuard(
        ns.command(&[netd_bin.to_str().unwrap()])
            .arg("--socket")
            .arg(&sock)
            .arg("--policy")
            .arg(&good)
            .spawn()
            .unwrap(),
    );
    let up = wait_for(Duration::from_secs(20), || {
        UnixStream::connect(&sock).is_ok()
    });
    assert!(up, "netd did not replace the stale socket");
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut status = None;
    assert!(
        wait_for(Duration::from_secs(20), || {
            status = child.0.try_wait().unwrap();
            status.is_some()
        }),
        "netd did not exit after SIGTERM"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// Concurrent requests for one name: exactly one wins, the others get
/// NameInUse, and nobody joins the winner's multi-queue set.
#[test]
fn racing_requests_for_one_name_never_share_a_tap() {
    use vmm::net::netd_client::{NetdClient, NetdClientError};
    let (netd, _probe) = start("race", &[]);
    for round in 0..20 {
        let name = format!("srace{round}");
        let barrier = std::sync::Barrier::new(8);
        let results: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    sc.spawn(|| {
                        let mut c = NetdClient::connect(&netd.socket, Duration::from_secs(60))?;
                        barrier.wait();
                        c.open_tap(&name, 2, true, false, None)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        assert_eq!(won[0].taps.len(), 2);
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(
                        e,
                        NetdClientError::Refused {
                            kind: NetdErrorKind::NameInUse,
                            ..
                        }
                    ),
                    "{e}"
                );
            }
        }
        // The losers were refused before any TUNSETIFF could attach them
        // (NameInUse above); the winner's TAP is intact.
        let link = netd.ns.exec(&["ip", "-d", "link", "show", &name]);
        assert!(link.contains("multi_queue"), "{link}");
        drop(results);
    }
}

#[test]
fn netd_version_and_help() {
    let version = format!("netd {}", env!("CARGO_PKG_VERSION"));
    tests::assert_version_and_help("netd", &version, &["--policy"]);
}
