//! The migration fault matrix: what goes wrong before the commit must cost
//! the guest nothing. Scripted fake peers written against
//! `common::migration` (a fake target for a real source, a fake source for
//! a real target) break the protocol at each step; real targets are
//! started with the wrong shape; strangers knock on the target's socket.
//! After each fault the source still serves the guest (ping, the same TAP)
//! and a second migration to a fresh real target succeeds. A hostile
//! source gets a non-zero exit with one line from the target, and the TAP
//! it sent stays as it was, still the source's.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::migration::{FdRole, SourceMsg, TargetMsg};
use tests::migration_harness::{
    Captured, Exits, FakeTarget, GuestSpec, MEMORY_BYTES, MigEnv, Peer, SETTLE, Target, TargetSpec,
    Vm, assert_answers_ping, capture_from_source, hello, memfd, migrate, migrate_in_background,
    one_nic_shape, start_source, start_target,
};
use vmm::persist::MACHINE_STATE_FORMAT;

/// A guest on a real source, and what must not change while faults hit it.
struct Guest {
    env: MigEnv,
    spec: GuestSpec,
    api: PathBuf,
    cur: Vm,
    exits: Exits,
    ifindex: u32,
    link: String,
}

impl Guest {
    fn start(tag: &str, net_extra: &str) -> Self {
        let env = MigEnv::new(tag);
        let api = env.path("api.sock");
        let spec = GuestSpec::one_nic(&env, 1, net_extra);
        let cur = start_source(&env, &spec, &api);
        assert_answers_ping(&env, 1, "at the start");
        let ifindex = env.ifindex("vm0");
        let link = env.link_details("vm0");
        Guest {
            env,
            spec,
            api,
            cur,
            exits: Exits::default(),
            ifindex,
            link,
        }
    }

    /// The source still serves the guest on the same, unchanged TAP.
    fn assert_serves(&mut self, after: &str) {
        assert!(
            self.cur.proc.try_wait().is_none(),
            "the source died after {after}: {}",
            self.cur.proc.stderr()
        );
        assert_answers_ping(&self.env, 1, &format!("after {after}"));
        assert_eq!(self.env.ifindex("vm0"), self.ifindex, "after {after}");
        assert_eq!(
            self.env.link_details("vm0"),
            self.link,
            "the TAP changed after {after}"
        );
        let (_, st) = tests::migration_harness::vmctl(&self.api, &["status"]);
        assert_eq!(st["state"], "Running", "after {after}: {st}");
        assert_eq!(st["pid"], self.cur.pid(), "after {after}: {st}");
    }

    /// A fresh real target takes the guest: the fault left nothing behind.
    fn migrate_ok(&mut self, after: &str) {
        let tgt = start_target(&self.env, &TargetSpec::like(&self.spec));
        let out = migrate(&self.api, &tgt.incoming, &[]);
        assert_eq!(
            out.result(),
            "ok",
            "second migration after {after}: {out:?}"
        );
        self.exits
            .wait(&mut self.cur, &format!("source before {after}"));
        self.cur = tgt.vm;
        assert_answers_ping(&self.env, 1, &format!("on the new target after {after}"));
        assert_eq!(self.env.ifindex("vm0"), self.ifindex);
    }

    fn fake_target(&self) -> FakeTarget {
        FakeTarget::bind(&self.env.path("fake.sock"))
    }

    fn finish(self) {
        self.exits.assert_all_ok();
    }
}

/// A real target that must end non-zero with one line containing `needle`.
fn assert_target_failed(t: &mut Target, needle: &str) -> String {
    let st = t.vm.wait_exit(SETTLE);
    let lines = t.vm.error_lines();
    assert!(
        !st.success() && st.code().is_some(),
        "target exit {st}: {}",
        t.vm.proc.stderr()
    );
    assert_eq!(lines.len(), 1, "one error line: {}", t.vm.proc.stderr());
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "target said {:?}, expected {needle:?}",
        lines[0]
    );
    assert!(!t.incoming.exists(), "the target left its socket behind");
    lines[0].clone()
}

fn ready() -> TargetMsg {
    TargetMsg::Ready {
        vmm_version: "fake".into(),
        takes_api_socket: false,
    }
}

#[test]
fn a_target_dying_after_hello_during_state_or_after_loaded_costs_nothing() {
    let mut g = Guest::start("mf1", "");

    // Dies right after reading the Hello.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let h = peer.recv_hello();
    assert_eq!(h.roles()[0], FdRole::GuestRam);
    drop((peer, h));
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("Hello"), "{r}");
    assert_eq!(
        out.json["downtime_us"], 0,
        "the guest paused: {:?}",
        out.json
    );
    g.assert_serves("a target that died after Hello");
    g.migrate_ok("a target that died after Hello");

    // Says Ready, reads part of the State, dies: the guest was paused.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let _h = peer.recv_hello();
    peer.send(&ready(), &[]);
    let part = peer.read_bytes(64);
    assert!(String::from_utf8_lossy(&part[4..]).starts_with("State("));
    drop(peer);
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("State"), "{r}");
    g.assert_serves("a target that died during State");
    g.migrate_ok("a target that died during State");

    // Loads, answers Loaded and dies before the Commit. It stops reading
    // first, so the Commit cannot reach it (a UNIX socket whose peer shut
    // its read side fails the send): the source must resume.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let _h = peer.recv_hello();
    peer.send(&ready(), &[]);
    let (state, _) = peer.recv_text().expect("State");
    assert!(state.starts_with("State("));
    peer.sock
        .shutdown(std::net::Shutdown::Read)
        .expect("shutdown");
    peer.send(&TargetMsg::Loaded { restore_us: 1 }, &[]);
    drop(peer);
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("Commit"), "{r}");
    g.assert_serves("a target that died after Loaded");
    g.migrate_ok("a target that died after Loaded");
    g.finish();
}

#[test]
fn a_silent_target_is_given_up_within_seconds() {
    let mut g = Guest::start("mf2", "");
    // Takes the Hello and never answers.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let _h = peer.recv_hello();
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("timed out"), "{r}");
    assert!(
        out.took < Duration::from_secs(30),
        "gave up after {:?}",
        out.took
    );
    eprintln!("silent after Hello: given up after {:?}", out.took);
    drop(peer);
    g.assert_serves("a target silent after Hello");

    // Takes the State (the guest is paused) and never answers.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let _h = peer.recv_hello();
    peer.send(&ready(), &[]);
    let _state = peer.recv_text().expect("State");
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("timed out"), "{r}");
    assert!(
        out.took < Duration::from_secs(30),
        "gave up after {:?}",
        out.took
    );
    eprintln!("silent after State: given up after {:?}", out.took);
    drop(peer);
    g.assert_serves("a target silent after State");
    g.migrate_ok("a silent target");
    g.finish();
}

#[test]
fn a_target_of_another_shape_refuses_while_the_guest_runs() {
    let mut g = Guest::start("mf3", "");
    let cases = [
        ("memory size", "128M", g.env.net("vm0", 1, ""), "memory"),
        ("queues", "256M", g.env.net("vm0", 1, "queues=2"), "queue"),
        ("MAC", "256M", g.env.net("vm0", 2, ""), "MAC"),
    ];
    for (what, memory, net, needle) in cases {
        let mut t = start_target(
            &g.env,
            &TargetSpec {
                nets: vec![net],
                memory,
                api: None,
            },
        );
        let out = migrate(&g.api, &t.incoming, &[]);
        let r = out.assert_failed();
        assert!(r.contains("refused") && r.contains(needle), "{what}: {r}");
        assert_eq!(out.json["downtime_us"], 0, "{what}: the guest paused");
        let line = assert_target_failed(&mut t, needle);
        eprintln!("{what} mismatch: vmctl {r:?}; target {line:?}");
        g.assert_serves(&format!("a {what} mismatch"));
        g.migrate_ok(&format!("a {what} mismatch"));
    }
    g.finish();
}

/// A real target, and a fake source that connected to it and said `hello`
/// with `fds`; returns the target's answer.
fn hello_to_target(
    g: &Guest,
    msg: &SourceMsg<()>,
    fds: &[BorrowedFd<'_>],
) -> (Target, Peer, TargetMsg) {
    let t = start_target(&g.env, &TargetSpec::like(&g.spec));
    let peer = Peer::connect(&t.incoming);
    peer.send(msg, fds);
    let answer = peer.recv_target_msg().expect("the target's answer");
    (t, peer, answer)
}

/// The captured Hello again, with its real fds (memfd, TAP), naming
/// `format`.
fn replay_hello(c: &Captured, format: common::migration::FormatVersion) -> SourceMsg<()> {
    match &c.hello.msg {
        SourceMsg::Hello {
            protocol,
            vmm_version,
            shape,
            backend_transfer,
            paused,
            fds,
            ..
        } => SourceMsg::Hello {
            protocol: *protocol,
            format,
            vmm_version: vmm_version.clone(),
            shape: shape.clone(),
            backend_transfer: *backend_transfer,
            paused: *paused,
            // The API listener stays with the source here.
            fds: fds
                .iter()
                .filter(|r| **r != FdRole::ApiListener)
                .cloned()
                .collect(),
        },
        m => panic!("not a Hello: {m:?}"),
    }
}

/// `text` with the number after the first `key` replaced by `value`.
fn with_number(text: &str, key: &str, value: u64) -> String {
    let at = text.find(key).expect("key in the state") + key.len();
    let digits = text[at..]
        .find(|ch: char| !ch.is_ascii_digit())
        .expect("a number");
    format!("{}{value}{}", &text[..at], &text[at + digits..])
}

fn real_fds(c: &Captured) -> Vec<BorrowedFd<'_>> {
    vec![
        c.hello.fd(&FdRole::GuestRam),
        c.hello.fd(&FdRole::TapQueue {
            net: "vm0".into(),
            queue: 0,
        }),
    ]
}

#[test]
fn a_fake_source_with_a_newer_format_wrong_fds_garbage_or_a_cut_stream_is_refused() {
    let mut g = Guest::start("mf4", "");
    // The source's real memfd and TAP fd, and a real state document.
    let c = capture_from_source(&g.env, &g.api);
    g.assert_serves("the capture");

    // A newer state format: refused at Hello.
    let newer = common::migration::FormatVersion {
        major: MACHINE_STATE_FORMAT.major,
        minor: MACHINE_STATE_FORMAT.minor + 1,
    };
    let (mut t, _peer, answer) = hello_to_target(&g, &replay_hello(&c, newer), &real_fds(&c));
    assert!(
        matches!(&answer, TargetMsg::Refused { reason } if reason.contains("newer")),
        "{answer:?}"
    );
    assert_target_failed(&mut t, "newer");
    g.assert_serves("a newer format");

    // Three fds named, one sent.
    let mut three = replay_hello(&c, MACHINE_STATE_FORMAT);
    if let SourceMsg::Hello { fds, .. } = &mut three {
        fds.push(FdRole::ApiListener);
    }
    let ram = c.hello.fd(&FdRole::GuestRam);
    let (mut t, _peer, answer) = hello_to_target(&g, &three, &[ram]);
    assert!(
        matches!(&answer, TargetMsg::Refused { reason } if reason.contains("3 fds")),
        "{answer:?}"
    );
    assert_target_failed(&mut t, "3 fds, 1 arrived");
    g.assert_serves("a wrong fd count");

    // A valid Hello with the real fds, then garbage for the State.
    let ok = replay_hello(&c, MACHINE_STATE_FORMAT);
    let (mut t, peer, answer) = hello_to_target(&g, &ok, &real_fds(&c));
    assert!(matches!(answer, TargetMsg::Ready { .. }), "{answer:?}");
    peer.send_payload("State((format:(major:1,minor:0),memory_bytes:\"x\"", &[]);
    let answer = peer.recv_target_msg().expect("answer to garbage");
    assert!(matches!(answer, TargetMsg::Failed { .. }), "{answer:?}");
    assert_target_failed(&mut t, "State");
    g.assert_serves("a garbage State");

    // A valid Hello, then a State frame cut short.
    let (mut t, peer, answer) = hello_to_target(&g, &ok, &real_fds(&c));
    assert!(matches!(answer, TargetMsg::Ready { .. }), "{answer:?}");
    let frame = format!("State({})", c.state);
    peer.send_raw(&(frame.len() as u32).to_le_bytes());
    peer.send_raw(&frame.as_bytes()[..frame.len() / 2]);
    drop(peer);
    assert_target_failed(&mut t, "closed the connection in the middle");
    g.assert_serves("a truncated State");

    drop(c);
    g.migrate_ok("the fake sources");
    g.finish();
}

#[test]
fn a_hostile_source_gets_a_clear_error_and_the_tap_is_untouched() {
    let mut g = Guest::start("mf5", "");
    let c = capture_from_source(&g.env, &g.api);
    let ok = replay_hello(&c, MACHINE_STATE_FORMAT);

    // States the target must refuse after Ready.
    let hostile: [(&str, String, &str); 4] = [
        (
            "a queue larger than its maximum",
            c.state.replacen("size:256,", "size:4096,", 1),
            "queue",
        ),
        (
            "a descriptor table outside guest RAM",
            with_number(&c.state, "desc_table:", 1 << 40),
            "State",
        ),
        (
            "a TAP fd index beyond the fd table",
            c.state.replacen("tap_fds:[1]", "tap_fds:[7]", 1),
            "fd",
        ),
        (
            "the RAM memfd named as the TAP fd",
            c.state.replacen("tap_fds:[1]", "tap_fds:[0]", 1),
            "fd",
        ),
    ];
    for (what, state, needle) in hostile {
        assert_ne!(state, c.state, "{what}: the fixture edit did not apply");
        let (mut t, peer, answer) = hello_to_target(&g, &ok, &real_fds(&c));
        assert!(
            matches!(answer, TargetMsg::Ready { .. }),
            "{what}: {answer:?}"
        );
        peer.send_payload(&format!("State({state})"), &[]);
        let answer = peer.recv_target_msg();
        assert!(
            matches!(answer, Ok(TargetMsg::Failed { .. })),
            "{what}: {answer:?}"
        );
        let line = assert_target_failed(&mut t, needle);
        eprintln!("hostile source, {what}: {line}");
        g.assert_serves(what);
    }

    // Hellos the target must refuse: RAM regions beyond the memfd, a
    // pipe as the memfd, /dev/null as the TAP queue.
    let small = memfd(MEMORY_BYTES / 2);
    let (pipe_r, _pipe_w) = nix::unistd::pipe().expect("pipe");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let tap = c.hello.fd(&FdRole::TapQueue {
        net: "vm0".into(),
        queue: 0,
    });
    let cases: [(&str, [BorrowedFd<'_>; 2], &str); 3] = [
        (
            "RAM regions larger than the memfd",
            [small.as_fd(), tap],
            "memfd",
        ),
        ("a pipe as the memfd", [pipe_r.as_fd(), tap], "memfd"),
        (
            "/dev/null as the TAP queue",
            [c.hello.fd(&FdRole::GuestRam), null.as_fd()],
            "TAP",
        ),
    ];
    for (what, fds, needle) in cases {
        let (mut t, _peer, answer) = hello_to_target(&g, &ok, &fds);
        assert!(
            matches!(&answer, TargetMsg::Refused { .. }),
            "{what}: {answer:?}"
        );
        let line = assert_target_failed(&mut t, needle);
        eprintln!("hostile source, {what}: {line}");
        g.assert_serves(what);
    }
    // A shape that is not the target's at all, with a fake memfd.
    let big = one_nic_shape(MEMORY_BYTES * 2, "vm0", 1, 1);
    let msg = hello(
        MACHINE_STATE_FORMAT,
        big,
        true,
        vec![
            FdRole::GuestRam,
            FdRole::TapQueue {
                net: "vm0".into(),
                queue: 0,
            },
        ],
    );
    let (mut t, _peer, answer) = hello_to_target(&g, &msg, &[small.as_fd(), tap]);
    assert!(matches!(&answer, TargetMsg::Refused { .. }), "{answer:?}");
    assert_target_failed(&mut t, "memory");
    g.assert_serves("a shape of another size");

    drop(c);
    g.migrate_ok("the hostile sources");
    g.finish();
}

#[test]
fn a_peer_of_another_uid_cannot_migrate_in_and_the_target_waits_for_the_source() {
    let mut g = Guest::start("mf6", "");
    let mut t = start_target(&g.env, &TargetSpec::like(&g.spec));
    let mode = std::fs::metadata(&t.incoming)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the incoming socket's mode");

    // As uid 4242: a Hello-less connect and read. The 0600 socket refuses
    // the connect (EACCES); made world-writable, the target itself
    // refuses the peer by SO_PEERCRED.
    let knock = || {
        let script = "import socket,sys\n\
s=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\n\
try:\n s.connect(sys.argv[1])\n\
except OSError as e:\n print('connect', e.errno); sys.exit(0)\n\
s.settimeout(20)\n\
d=b''\n\
while True:\n c=s.recv(4096)\n if not c: break\n d+=c\n\
print('reply', d[4:].decode(errors='replace'))\n";
        let out = Command::new("setpriv")
            .args(["--reuid=4242", "--regid=4242", "--clear-groups", "--"])
            .args(["/usr/bin/python3", "-c", script])
            .arg(&t.incoming)
            .current_dir("/")
            .output()
            .expect("run python3 as uid 4242");
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && !said.is_empty(),
            "uid 4242 peer: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        said
    };
    let said = knock();
    assert_eq!(said, format!("connect {}", libc::EACCES), "{said}");
    std::fs::set_permissions(&t.incoming, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let said = knock();
    assert!(
        said.starts_with("reply Refused") && said.contains("4242"),
        "{said}"
    );
    // The target still waits, and takes the real source.
    assert!(t.vm.proc.try_wait().is_none(), "{}", t.vm.proc.stderr());
    assert!(t.incoming.exists());
    let out = migrate(&g.api, &t.incoming, &[]);
    assert_eq!(out.result(), "ok", "{out:?}");
    g.exits.wait(&mut g.cur, "source");
    g.cur = t.vm;
    assert_answers_ping(&g.env, 1, "after the real source came");
    g.finish();
}

#[test]
fn a_target_path_that_does_not_exist_is_reported_and_the_guest_runs_on() {
    let mut g = Guest::start("mf7", "");
    let missing = g.env.path("no-such-target.sock");
    let t0 = Instant::now();
    let out = migrate(&g.api, &missing, &[]);
    let r = out.assert_failed();
    assert!(
        r.contains("connect") && r.contains(&missing.display().to_string()),
        "{r}"
    );
    assert!(t0.elapsed() < SETTLE);
    g.assert_serves("a missing target");
    g.migrate_ok("a missing target");
    g.finish();
}
