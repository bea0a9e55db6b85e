//! The migration fault matrix: what goes wrong before the target takes the
//! guest must cost the guest nothing. Scripted fake peers written against
//! `common::migration` (a fake target for a real source, a fake source for
//! a real target) break the protocol at each step; real targets are
//! started with the wrong shape; strangers knock on the target's socket.
//!
//! Protocol 3 (this build's source): Hello → Ready, State → Resumed or
//! Failed. The State is the commit: a fake target takes the ownership
//! page (CAS) itself before it answers Resumed, as the real one does. A
//! fake source of protocol 2 (release 0.2.0) still gets Loaded after its
//! State and must send Commit.
//! After each fault the source still serves the guest (ping, the same TAP)
//! and a second migration to a fresh real target succeeds. A hostile
//! source gets a non-zero exit with one line from the target, and the TAP
//! it sent stays as it was, still the source's.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::migration::{FdRole, MIGRATION_PROTOCOL_VERSION, SourceMsg, TargetMsg};
use common::ownership::{Owner, OwnerPage};
use tests::migration_harness::{
    Captured, Exits, FakeTarget, GuestSpec, MEMORY_BYTES, MigEnv, MigrateOutcome, Peer, SETTLE,
    Target, TargetSpec, TickWatch, Vm, assert_answers_ping, assert_ticks_continuous,
    capture_from_source, hello, hello_of, memfd, memfd_unsealed, migrate, migrate_in_background,
    one_nic_shape, owner_page, start_source, start_target, take_in_child_and_exit, ticks, vmctl,
};
use tests::netd_harness::wait_for;
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

    /// Migrates this guest (vmctl `args`) to a fake target that answers
    /// Ready and reads the State, nothing more: where the cases of the
    /// window after the State start.
    fn migrate_to_the_state(&self, args: &[&str]) -> AtState {
        let fake = self.fake_target();
        let t0 = Instant::now();
        let job = migrate_in_background(&self.api, &fake.path, args);
        let (peer, h) = fake_up_to(&fake, After::State);
        AtState {
            fake,
            job,
            peer,
            h,
            t0,
        }
    }

    fn finish(mut self) {
        let (code, out) = vmctl(&self.api, &["shutdown"]);
        assert_eq!(code, Some(0), "vmctl shutdown: {out}");
        self.exits.wait(&mut self.cur, "the last vmm, shut down");
        self.exits.assert_all_ok();
        assert_nothing_left(&self.env);
    }

    /// The source still runs the same guest after `after`: the heartbeat
    /// `w` goes on (same boot, no tick lost or repeated), ping answers,
    /// status says Running from the same pid on the same TAP.
    fn assert_runs_on(&mut self, w: &TickWatch, after: &str) {
        assert!(
            w.wait_more(5, SETTLE),
            "no heartbeat after {after}\n{}",
            self.cur.proc.stderr()
        );
        w.assert_one_guest_continuous(after);
        self.assert_serves(after);
    }

    /// Starts a heartbeat watch on the current vmm's serial and waits for
    /// a few ticks.
    fn watch(&self) -> TickWatch {
        let w = TickWatch::start(&self.cur.serial);
        assert!(w.wait_more(3, SETTLE), "no heartbeat");
        w
    }
}

/// No process, socket or TAP of this test's is left: every process whose
/// command line names the scratch directory has ended, the directory holds
/// no socket, and netd's namespace has no `vm*` TAP (the bridge aside).
fn assert_nothing_left(env: &MigEnv) {
    use std::os::unix::fs::FileTypeExt;
    let dir = format!("{}/", env.dir.0.display());
    let procs = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                cmd.contains(&dir)
                    .then(|| format!("{}: {cmd}", e.file_name().display()))
            })
            .collect()
    };
    assert!(
        wait_for(SETTLE, || procs().is_empty()),
        "left running: {:?}",
        procs()
    );
    let sockets: Vec<_> = std::fs::read_dir(&env.dir.0)
        .expect("the scratch directory")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect();
    assert!(sockets.is_empty(), "sockets left behind: {sockets:?}");
    let taps = || -> Vec<String> {
        env.links()
            .into_iter()
            .filter(|l| l.starts_with("vm") && l != "vmbr0")
            .collect()
    };
    assert!(
        wait_for(SETTLE, || taps().is_empty()),
        "TAPs left: {:?}",
        taps()
    );
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
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
fn a_target_dying_after_hello_during_state_or_answering_loaded_costs_nothing() {
    let mut g = Guest::start("mf1", "");

    // Dies right after reading the Hello.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let h = peer.recv_hello();
    assert_eq!(h.roles()[0], FdRole::GuestRam);
    drop((peer, h, fake));
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
    let h = peer.recv_hello();
    peer.send(&ready(), &[]);
    let part = peer.read_bytes(64);
    assert!(String::from_utf8_lossy(&part[4..]).starts_with("State("));
    drop((peer, h, fake));
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("State"), "{r}");
    g.assert_serves("a target that died during State");
    g.migrate_ok("a target that died during State");

    // Takes the whole State, answers Loaded as a protocol 2 target would
    // (a protocol 3 source sends no Commit) without taking the guest, and
    // dies: the source must resume.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let h = peer.recv_hello();
    peer.send(&ready(), &[]);
    let (state, _) = peer.recv_text().expect("State");
    assert!(state.starts_with("State("));
    peer.send(&TargetMsg::Loaded { restore_us: 1 }, &[]);
    let page = h.page();
    drop((peer, h, fake));
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("State") && r.contains("Loaded"), "{r}");
    assert_eq!(
        page.owner(),
        Owner::Source { pid: g.cur.pid() },
        "the source took the guest back"
    );
    drop(page);
    g.assert_serves("a target that answered Loaded and died");
    g.migrate_ok("a target that answered Loaded and died");
    g.finish();
}

#[test]
fn a_silent_target_is_given_up_within_seconds() {
    let mut g = Guest::start("mf2", "");
    // Takes the Hello and never answers.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let h = peer.recv_hello();
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("Hello") && r.contains("deadline"), "{r}");
    assert_eq!(
        out.json["downtime_us"], 0,
        "the guest paused: {:?}",
        out.json
    );
    assert!(
        out.took < Duration::from_secs(30),
        "gave up after {:?}",
        out.took
    );
    eprintln!("silent after Hello: given up after {:?}", out.took);
    drop((peer, h, fake));
    g.assert_serves("a target silent after Hello");

    // Takes the State (the guest is paused) and never answers.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let peer = fake.accept();
    let h = peer.recv_hello();
    peer.send(&ready(), &[]);
    let _state = peer.recv_text().expect("State");
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("downtime limit"), "{r}");
    assert!(
        out.took < Duration::from_secs(30),
        "gave up after {:?}",
        out.took
    );
    eprintln!("silent after State: given up after {:?}", out.took);
    drop((peer, h, fake));
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
                vcpus: 1,
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

/// The captured Hello again, with its real fds (memfd, TAP) and a fresh
/// ownership page, naming `format`.
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

/// The fds of [`replay_hello`]: the source's memfd and TAP queue, `page`.
fn real_fds<'a>(c: &'a Captured, page: &'a OwnerPage) -> Vec<BorrowedFd<'a>> {
    vec![c.hello.fd(&FdRole::GuestRam), tap_fd(c), page.as_fd()]
}

fn tap_fd(c: &Captured) -> BorrowedFd<'_> {
    c.hello.fd(&FdRole::TapQueue {
        net: "vm0".into(),
        queue: 0,
    })
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
    let page = owner_page();
    let (mut t, _peer, answer) =
        hello_to_target(&g, &replay_hello(&c, newer), &real_fds(&c, &page));
    assert!(
        matches!(&answer, TargetMsg::Refused { reason } if reason.contains("newer")),
        "{answer:?}"
    );
    assert_target_failed(&mut t, "newer");
    g.assert_serves("a newer format");

    // Four fds named, one sent.
    let mut three = replay_hello(&c, MACHINE_STATE_FORMAT);
    if let SourceMsg::Hello { fds, .. } = &mut three {
        fds.push(FdRole::ApiListener);
    }
    let ram = c.hello.fd(&FdRole::GuestRam);
    let (mut t, _peer, answer) = hello_to_target(&g, &three, &[ram]);
    assert!(
        matches!(&answer, TargetMsg::Refused { reason } if reason.contains("4 fds")),
        "{answer:?}"
    );
    assert_target_failed(&mut t, "4 fds, 1 arrived");
    g.assert_serves("a wrong fd count");

    // A valid Hello with the real fds, then garbage for the State.
    let ok = replay_hello(&c, MACHINE_STATE_FORMAT);
    let page = owner_page();
    let (mut t, peer, answer) = hello_to_target(&g, &ok, &real_fds(&c, &page));
    assert!(matches!(answer, TargetMsg::Ready { .. }), "{answer:?}");
    peer.send_payload("State((format:(major:1,minor:0),memory_bytes:\"x\"", &[]);
    let answer = peer.recv_target_msg().expect("answer to garbage");
    assert!(matches!(answer, TargetMsg::Failed { .. }), "{answer:?}");
    assert_target_failed(&mut t, "State");
    g.assert_serves("a garbage State");

    // A valid Hello, then a State frame cut short.
    let page = owner_page();
    let (mut t, peer, answer) = hello_to_target(&g, &ok, &real_fds(&c, &page));
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
        let page = owner_page();
        let (mut t, peer, answer) = hello_to_target(&g, &ok, &real_fds(&c, &page));
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
    let tap = tap_fd(&c);
    let page = owner_page();
    let p = page.as_fd();
    let cases: [(&str, [BorrowedFd<'_>; 3], &str); 3] = [
        (
            "RAM regions larger than the memfd",
            [small.as_fd(), tap, p],
            "memfd",
        ),
        ("a pipe as the memfd", [pipe_r.as_fd(), tap, p], "memfd"),
        (
            "/dev/null as the TAP queue",
            [c.hello.fd(&FdRole::GuestRam), null.as_fd(), p],
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
            FdRole::OwnerPage,
        ],
    );
    let (mut t, _peer, answer) = hello_to_target(&g, &msg, &[small.as_fd(), tap, p]);
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

// ---------------------------------------------------------------------------
// Protocols 2 and 3: what a target requires of a Hello, and what it still
// takes from releases 0.1.0 and 0.2.0.

/// `msg` (a Hello) saying it is of migration protocol `protocol`.
fn with_protocol(msg: &SourceMsg<()>, protocol: u32) -> SourceMsg<()> {
    let mut m = msg.clone();
    if let SourceMsg::Hello { protocol: p, .. } = &mut m {
        *p = protocol;
    }
    m
}

#[test]
fn a_protocol_2_hello_needs_sealed_ram_and_an_offered_sealed_page_and_protocol_1_still_works() {
    let mut g = Guest::start("mf8", "");
    let c = capture_from_source(&g.env, &g.api);
    g.assert_serves("the capture");
    let tap = tap_fd(&c);

    let unsealed_ram = memfd_unsealed(MEMORY_BYTES);
    let unsealed_page = memfd_unsealed(common::ownership::PAGE_LEN);
    let two_pages = memfd(2 * common::ownership::PAGE_LEN);
    let taken_back = owner_page();
    taken_back.take_back().expect("take back a fresh page");
    let page = owner_page();
    // RAM and TAP only: what protocol 1 sends.
    let ram_and_tap = || {
        vec![
            FdRole::GuestRam,
            FdRole::TapQueue {
                net: "vm0".into(),
                queue: 0,
            },
        ]
    };
    let ram = c.hello.fd(&FdRole::GuestRam);
    // Release 0.2.0's protocol, and this build's: the same requirements.
    for protocol in [2, MIGRATION_PROTOCOL_VERSION] {
        let ok = with_protocol(&replay_hello(&c, MACHINE_STATE_FORMAT), protocol);
        let no_page = hello_of(
            protocol,
            MACHINE_STATE_FORMAT,
            c.hello.shape(),
            true,
            ram_and_tap(),
        );
        let cases: [(&str, &SourceMsg<()>, Vec<BorrowedFd<'_>>, &str); 5] = [
            (
                "an unsealed RAM memfd",
                &ok,
                vec![unsealed_ram.as_fd(), tap, page.as_fd()],
                "not sealed against shrink",
            ),
            (
                "no ownership page",
                &no_page,
                vec![ram, tap],
                "ownership page",
            ),
            (
                "an unsealed ownership page",
                &ok,
                vec![ram, tap, unsealed_page.as_fd()],
                "not sealed",
            ),
            (
                "an ownership page of two pages",
                &ok,
                vec![ram, tap, two_pages.as_fd()],
                "4096 bytes",
            ),
            (
                "a page the source took back",
                &ok,
                vec![ram, tap, taken_back.as_fd()],
                "not offered",
            ),
        ];
        for (what, msg, fds, needle) in cases {
            let (mut t, _peer, answer) = hello_to_target(&g, msg, &fds);
            assert!(
                matches!(&answer, TargetMsg::Refused { reason } if reason.contains(needle)),
                "{what}: {answer:?}"
            );
            let line = assert_target_failed(&mut t, needle);
            eprintln!(
                "SUMMARY protocol {protocol} Hello with {what}: refused before Ready: {line}"
            );
            g.assert_serves(what);
        }
    }
    assert_eq!(
        page.owner(),
        Owner::Offered {
            by: std::process::id()
        },
        "a refusing target touched the page"
    );

    // Release 0.1.0's Hello: protocol 1, no page, an unsealed memfd.
    let v1 = hello_of(
        1,
        MACHINE_STATE_FORMAT,
        c.hello.shape(),
        true,
        ram_and_tap(),
    );
    let (mut t, peer, answer) = hello_to_target(&g, &v1, &[unsealed_ram.as_fd(), tap]);
    assert!(
        matches!(answer, TargetMsg::Ready { .. }),
        "protocol 1: {answer:?}"
    );
    drop(peer);
    let st = t.vm.wait_exit(SETTLE);
    assert!(!st.success(), "the target ran on without a State");
    assert!(!t.incoming.exists(), "the target left its socket behind");
    eprintln!("SUMMARY protocol 1 Hello (no page, unsealed memfd): Ready");
    g.assert_serves("a protocol 1 Hello");
    drop(c);
    g.finish();
}

/// Between a real source (protocol 3) and a real target: passes the
/// source's Hello to the target as protocol 2 (release 0.2.0's), its
/// fds along, and the target's Ready back; then the State on. Returns
/// the two connections, the Hello and the target's answer to the State.
fn protocol_2_middle(
    fake: &FakeTarget,
    target: &Target,
) -> (Peer, Peer, tests::migration_harness::HelloSeen, TargetMsg) {
    let src = fake.accept();
    let h = src.recv_hello();
    assert!(
        matches!(h.msg, SourceMsg::Hello { protocol, .. } if protocol == MIGRATION_PROTOCOL_VERSION),
        "{:?}",
        h.msg
    );
    let tgt = Peer::connect(&target.incoming);
    let fds: Vec<BorrowedFd<'_>> = h.fds.iter().map(|f| f.as_fd()).collect();
    tgt.send(&with_protocol(&h.msg, 2), &fds);
    drop(fds);
    let ready = tgt.recv_target_msg().expect("Ready");
    assert!(matches!(ready, TargetMsg::Ready { .. }), "{ready:?}");
    src.send(&ready, &[]);
    let (state, _) = src.recv_text().expect("State");
    assert!(
        state.starts_with("State("),
        "{}",
        &state[..state.len().min(80)]
    );
    tgt.send_payload(&state, &[]);
    let answer = tgt.recv_target_msg().expect("the answer to the State");
    (src, tgt, h, answer)
}

#[test]
fn a_protocol_2_source_gets_loaded_and_only_its_commit_and_the_cas_hand_the_guest_over() {
    let mut g = Guest::start("mf16", "");
    let w = g.watch();
    let source_pid = g.cur.pid();

    // Commit withheld past the source's limit: the source takes the guest
    // back; the Commit that comes then makes the target's CAS fail.
    let mut t = start_target(&g.env, &TargetSpec::like(&g.spec));
    let fake = g.fake_target();
    let t0 = Instant::now();
    let job = migrate_in_background(&g.api, &fake.path, &["--downtime-limit-ms", "500"]);
    let (src, tgt, h, answer) = protocol_2_middle(&fake, &t);
    assert!(
        matches!(answer, TargetMsg::Loaded { .. }),
        "a protocol 2 source gets Loaded: {answer:?}"
    );
    let page = h.page();
    assert_eq!(
        page.owner(),
        Owner::Offered { by: source_pid },
        "the target took the guest before the Commit"
    );
    let out = job.join().expect("vmctl");
    assert!(out.result().contains("downtime limit"), "{out:?}");
    assert_eq!(page.owner(), Owner::Source { pid: source_pid });
    tgt.send(&SourceMsg::<()>::Commit, &[]);
    let line = assert_target_failed(&mut t, "taken back by the source");
    assert!(line.ends_with("this vmm never ran it"), "{line}");
    assert!(
        ticks(&t.vm.serial_text()).is_empty(),
        "the target ran the guest"
    );
    drop((src, tgt, h, page, fake));
    assert_rolled_back_within(
        &mut g,
        &w,
        &out,
        t0,
        Duration::from_millis(500),
        "a protocol 2 Commit after the source's limit",
    );
    eprintln!("SUMMARY protocol 2, Commit after the limit: the target said {line:?}");

    // Commit in time: the target takes the guest, answers Resumed without
    // a timeline (a protocol 2 source refuses unknown fields), runs it.
    let t = start_target(&g.env, &TargetSpec::like(&g.spec));
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let (src, tgt, h, answer) = protocol_2_middle(&fake, &t);
    assert!(matches!(answer, TargetMsg::Loaded { .. }), "{answer:?}");
    let page = h.page();
    assert_eq!(page.owner(), Owner::Offered { by: source_pid });
    tgt.send(&SourceMsg::<()>::Commit, &[]);
    let (resumed, fds) = tgt.recv_text().expect("Resumed");
    assert!(fds.is_empty());
    assert!(
        resumed.starts_with("Resumed(") && !resumed.contains("timeline"),
        "{resumed}"
    );
    assert_eq!(page.owner(), Owner::Target { pid: t.vm.pid() });
    src.send_payload(&resumed, &[]);
    let out = job.join().expect("vmctl");
    out.assert_ok();
    drop((src, tgt, h, page, fake));
    g.exits
        .wait(&mut g.cur, "the source of the protocol 2 migration");
    let source_serial = g.cur.serial_text();
    g.cur = t.vm;
    g.cur.wait_ticks(2);
    assert_ticks_continuous(&[source_serial, g.cur.serial_text()]);
    assert_answers_ping(&g.env, 1, "after the protocol 2 migration");
    let (_, st) = vmctl(&g.api, &["status"]);
    assert_eq!(st["pid"], g.cur.pid(), "{st}");
    assert_eq!(st["state"], "Running", "{st}");
    assert_eq!(g.env.ifindex("vm0"), g.ifindex, "the TAP was recreated");
    eprintln!(
        "SUMMARY protocol 2 (Hello, Ready, State, Loaded, Commit, Resumed): the target runs the guest (downtime_us {})",
        out.json["downtime_us"]
    );
    g.finish();
}

// ---------------------------------------------------------------------------
// A source trusts only a target of its own uid.

#[test]
fn a_target_of_another_uid_receives_nothing_and_the_guest_runs_on() {
    let mut g = Guest::start("mf9", "");
    let w = g.watch();
    // uid 4242 (socket mode 0777, so anyone may connect), and root.
    for uid in [4242u32, 0] {
        let fake = FakeTarget::bind_as(&g.env.path("stranger.sock"), uid);
        let t0 = Instant::now();
        let job = migrate_in_background(&g.api, &fake.path, &[]);
        let peer = fake.accept();
        let got = peer.drain(Duration::from_secs(5));
        let out = job.join().expect("vmctl");
        let r = out.assert_failed();
        assert!(
            got.eof && got.bytes == 0 && got.fds == 0,
            "uid {uid}: the stranger received {got:?}"
        );
        assert!(
            r.contains(&format!("uid {uid}")) && r.contains("nothing was sent"),
            "{r}"
        );
        assert_eq!(out.json["downtime_us"], 0, "{:?}", out.json);
        assert!(out.took < Duration::from_secs(2), "took {:?}", out.took);
        g.assert_runs_on(&w, &format!("a target of uid {uid}"));
        eprintln!(
            "SUMMARY target of uid {uid} (mode 0777): it received {} bytes, {} fds; vmctl {r:?} in {} ms; the guest never paused (largest tick gap {} ms)",
            got.bytes,
            got.fds,
            ms(out.took),
            ms(w.max_gap_since(t0))
        );
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// Trickling targets, and the window after the State (the commit).

/// One byte of an answer every this long.
const TRICKLE: Duration = Duration::from_millis(300);
/// How late the tick watcher may stamp a tick written before a pause (it
/// reads the serial file every 5 ms; a loaded host delays it more). A
/// guest that ran on would tick every 50 ms past it.
const TICK_READ_SLACK: Duration = Duration::from_millis(100);
/// What a pause may exceed the downtime limit by, as the heartbeat sees it
/// (one heartbeat period, the watch's polling, a loaded 2-core host).
const PAUSE_MARGIN: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq)]
enum After {
    Hello,
    /// The whole State arrived: the guest is offered for good (protocol 3
    /// has no Commit), and is the fake's if it takes the page.
    State,
}

/// A fake target that goes through the protocol up to `after`, answering
/// like a real one, and returns the Hello and its connection (it neither
/// takes the guest nor answers the State).
/// A migration whose fake target holds the State ([`Guest::migrate_to_the_state`]).
struct AtState {
    fake: FakeTarget,
    job: std::thread::JoinHandle<MigrateOutcome>,
    peer: Peer,
    h: tests::migration_harness::HelloSeen,
    /// When vmctl was asked.
    t0: Instant,
}

/// A Resumed as a fake target says it (the source never acts on its
/// fields).
fn fake_resumed() -> TargetMsg {
    TargetMsg::Resumed {
        at_ns: 1,
        timeline: Default::default(),
    }
}

fn fake_up_to(fake: &FakeTarget, after: After) -> (Peer, tests::migration_harness::HelloSeen) {
    let peer = fake.accept();
    let h = peer.recv_hello();
    if after == After::Hello {
        return (peer, h);
    }
    peer.send(&ready(), &[]);
    let (state, _) = peer.recv_text().expect("State");
    assert!(
        state.starts_with("State("),
        "{}",
        &state[..state.len().min(80)]
    );
    (peer, h)
}

fn limit_args(limit_ms: Option<u64>) -> Vec<String> {
    limit_ms
        .map(|l| vec!["--downtime-limit-ms".to_string(), l.to_string()])
        .unwrap_or_default()
}

/// After a failure past the pause: vmctl named the limit, the guest was
/// paused about the limit (on the heartbeat and in the report), and runs
/// on at the source.
fn assert_rolled_back_within(
    g: &mut Guest,
    w: &TickWatch,
    out: &MigrateOutcome,
    t0: Instant,
    limit: Duration,
    what: &str,
) -> Duration {
    let r = out.assert_failed();
    g.assert_runs_on(w, what);
    let gap = w.max_gap_since(t0);
    let downtime = Duration::from_micros(out.json["downtime_us"].as_u64().unwrap_or(0));
    assert!(
        gap <= limit + PAUSE_MARGIN && downtime <= limit + PAUSE_MARGIN,
        "{what}: paused {} ms (heartbeat), {} ms (report), limit {} ms",
        ms(gap),
        ms(downtime),
        ms(limit)
    );
    // The heartbeat did see the pause: the measure is real.
    assert!(
        gap + Duration::from_millis(100) >= limit && downtime >= limit,
        "{what}: a pause of {} ms (report {} ms) is shorter than the limit {} ms",
        ms(gap),
        ms(downtime),
        ms(limit)
    );
    eprintln!(
        "SUMMARY {what}: rolled back, the guest runs on the source; paused {} ms on the heartbeat, downtime_us {} (limit {} ms); vmctl: {r:?}",
        ms(gap),
        out.json["downtime_us"],
        ms(limit)
    );
    gap
}

#[test]
fn a_trickling_target_after_the_state_holds_the_guest_at_most_the_limit() {
    let mut g = Guest::start("mf10", "");
    let w = g.watch();
    let failed = || TargetMsg::Failed {
        reason: "trickled".into(),
    };
    // Neither takes the guest: a Resumed without the CAS is not a
    // hand-over, whenever it arrives.
    for (answer, limit_ms) in [
        (failed(), Some(500)),
        (failed(), None),
        (fake_resumed(), Some(500)),
        (fake_resumed(), None),
    ] {
        let limit = Duration::from_millis(limit_ms.unwrap_or(1000));
        let after = After::State;
        let fake = g.fake_target();
        let t0 = Instant::now();
        let args = limit_args(limit_ms);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let job = migrate_in_background(&g.api, &fake.path, &a);
        let (peer, h) = fake_up_to(&fake, after);
        let trickler = peer.trickle(&answer, TRICKLE);
        let out = job.join().expect("vmctl");
        let r = out.result();
        assert!(
            r.contains("downtime limit") && r.contains(&format!("{limit:?}")),
            "{answer:?}: {r}"
        );
        drop((peer, h, fake));
        let sent = trickler.join().expect("trickler");
        let what = format!(
            "a target trickling {answer:?} after the State, limit {} ms ({sent} bytes sent)",
            ms(limit)
        );
        assert_rolled_back_within(&mut g, &w, &out, t0, limit, &what);
    }
    g.finish();
}

#[test]
fn a_target_trickling_its_ready_is_given_up_at_the_prepare_deadline_and_the_guest_never_pauses() {
    let mut g = Guest::start("mf11", "");
    let w = g.watch();
    let fake = g.fake_target();
    let t0 = Instant::now();
    let job = migrate_in_background(&g.api, &fake.path, &["--downtime-limit-ms", "500"]);
    let (peer, h) = fake_up_to(&fake, After::Hello);
    let trickler = peer.trickle(&ready(), TRICKLE);
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("Hello") && r.contains("deadline"), "{r}");
    drop((peer, h, fake));
    let sent = trickler.join().expect("trickler");
    assert_eq!(
        out.json["downtime_us"], 0,
        "the guest paused: {:?}",
        out.json
    );
    // PREPARE_TIMEOUT (10 s) from the connect.
    assert!(
        out.took >= Duration::from_secs(9) && out.took < Duration::from_secs(12),
        "gave up after {:?}",
        out.took
    );
    g.assert_runs_on(&w, "a target trickling Ready");
    let gap = w.max_gap_since(t0);
    assert!(
        gap < Duration::from_millis(400),
        "the guest stopped {} ms",
        ms(gap)
    );
    eprintln!(
        "SUMMARY a target trickling Ready ({sent} bytes): given up after {} ms, the guest never paused (largest tick gap {} ms); vmctl: {r:?}",
        ms(out.took),
        ms(gap)
    );
    g.finish();
}

/// Waits for the source's exit and returns it with the heartbeat count
/// after `since`.
fn source_exit(g: &mut Guest) -> std::process::ExitStatus {
    g.cur.wait_exit(SETTLE)
}

#[test]
fn a_target_that_takes_the_guest_and_trickles_has_it_and_the_source_exits_0() {
    let mut g = Guest::start("mf12", "");
    let w = g.watch();
    let AtState {
        fake,
        job,
        peer,
        h,
        t0,
    } = g.migrate_to_the_state(&["--downtime-limit-ms", "500"]);
    let paused_by = Instant::now();
    let page = h.page();
    // As the real target: the CAS first, then Resumed.
    page.take().expect("the fake takes the guest");
    let trickler = peer.trickle(&fake_resumed(), TRICKLE);
    let out = job.join().expect("vmctl");
    out.assert_ok();
    let st = source_exit(&mut g);
    drop(peer);
    trickler.join().expect("trickler");
    assert_eq!(st.code(), Some(0), "source exit: {}", g.cur.proc.stderr());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w.since(paused_by + TICK_READ_SLACK),
        0,
        "the source ran the guest after the commit"
    );
    assert_eq!(
        page.owner(),
        Owner::Target {
            pid: std::process::id()
        }
    );
    eprintln!(
        "SUMMARY a target that took the guest and trickled Resumed: vmctl ok after {} ms (downtime_us {}), the source exited 0 and ran no tick after the pause",
        ms(t0.elapsed()),
        out.json["downtime_us"]
    );
    drop((page, h, fake));
    assert_nothing_left(&g.env);
}

#[test]
fn the_window_after_the_state_the_guest_runs_in_exactly_one_place() {
    let mut g = Guest::start("mf13", "");
    let w = g.watch();
    let limit = Duration::from_millis(500);
    let args = ["--downtime-limit-ms", "500"];

    // Takes the whole State (the commit) and dies without owning.
    let AtState {
        fake,
        job,
        peer,
        h,
        t0,
    } = g.migrate_to_the_state(&args);
    drop((peer, h, fake));
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("State"), "{r}");
    g.assert_runs_on(&w, "a target that died after the State without owning");
    eprintln!(
        "SUMMARY a target dying after the State without owning: the source resumed (paused {} ms, downtime_us {}); vmctl: {r:?}",
        ms(w.max_gap_since(t0)),
        out.json["downtime_us"]
    );

    // Answers Resumed at once without owning: a lie the word exposes.
    let AtState {
        fake,
        job,
        peer,
        h,
        t0,
    } = g.migrate_to_the_state(&args);
    peer.send(&fake_resumed(), &[]);
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(r.contains("did not take the guest"), "{r}");
    assert_eq!(
        h.page().take(),
        Err(Owner::Source { pid: g.cur.pid() }),
        "the source took the guest back"
    );
    drop((peer, h, fake));
    g.assert_runs_on(&w, "a target that said Resumed without owning");
    eprintln!(
        "SUMMARY a target answering Resumed without owning: the source resumed (paused {} ms, downtime_us {}); vmctl: {r:?}",
        ms(w.max_gap_since(t0)),
        out.json["downtime_us"]
    );

    // Goes silent after the State without owning.
    let AtState {
        fake,
        job,
        peer,
        h,
        t0,
    } = g.migrate_to_the_state(&args);
    let out = job.join().expect("vmctl");
    drop((peer, h, fake));
    assert!(out.result().contains("downtime limit"), "{out:?}");
    assert_rolled_back_within(
        &mut g,
        &w,
        &out,
        t0,
        limit,
        "a target silent after the State",
    );

    // Answers Resumed after the limit without owning: too late.
    let AtState {
        fake,
        job,
        peer,
        h,
        t0,
    } = g.migrate_to_the_state(&args);
    std::thread::sleep(limit + Duration::from_millis(300));
    let _ = common::codec::send(&peer.sock, &fake_resumed(), &[]);
    let out = job.join().expect("vmctl");
    assert!(out.result().contains("downtime limit"), "{out:?}");
    let late = h.page().take();
    assert_eq!(
        late,
        Err(Owner::Source { pid: g.cur.pid() }),
        "a late take() must fail"
    );
    drop((peer, h, fake));
    assert_rolled_back_within(
        &mut g,
        &w,
        &out,
        t0,
        limit,
        "a target answering Resumed late without owning (its take() then failed)",
    );

    // Takes the State, owns the guest, dies before Resumed: the guest is
    // lost with it, and the source says so in one line.
    let AtState {
        fake, job, peer, h, ..
    } = g.migrate_to_the_state(&args);
    let paused_by = Instant::now();
    let owner = take_in_child_and_exit(&h.page());
    drop((peer, h));
    let out = job.join().expect("vmctl");
    let r = out.assert_failed();
    assert!(
        r.contains(&format!("pid {owner}")) && r.contains("lost"),
        "{r}"
    );
    let st = source_exit(&mut g);
    assert_eq!(st.code(), Some(1), "{}", g.cur.proc.stderr());
    let lines = g.cur.error_lines();
    assert_eq!(lines.len(), 1, "one line: {}", g.cur.proc.stderr());
    assert!(
        lines[0].contains("lost") && lines[0].contains(&format!("pid {owner}")),
        "{}",
        lines[0]
    );
    std::thread::sleep(Duration::from_millis(300));
    // The watcher stamps a line when it reads it (every 5 ms): a tick the
    // guest wrote just before the pause may be stamped a little after
    // `paused_by`. A guest running on would show ~6 ticks in 300 ms.
    assert_eq!(
        w.since(paused_by + TICK_READ_SLACK),
        0,
        "the source ran the guest after the commit"
    );
    eprintln!(
        "SUMMARY a target that took the guest and died (pid {owner}): the source exited 1: {}",
        lines[0]
    );
    drop(fake);
    assert_nothing_left(&g.env);
}

// ---------------------------------------------------------------------------
// A hostile target and the shared memory.

#[test]
fn a_target_cannot_resize_the_guest_ram_or_the_page_and_the_source_keeps_its_guest() {
    let mut g = Guest::start("mf14", "");
    let w = g.watch();
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let (peer, h) = fake_up_to(&fake, After::Hello);
    let ram = std::fs::File::from(
        h.fd(&FdRole::GuestRam)
            .try_clone_to_owned()
            .expect("dup the memfd"),
    );
    let page = std::fs::File::from(
        h.fd(&FdRole::OwnerPage)
            .try_clone_to_owned()
            .expect("dup the page"),
    );
    let mut tried = Vec::new();
    for (what, f, len) in [
        ("RAM shrunk", &ram, MEMORY_BYTES / 2),
        ("RAM to 0", &ram, 0),
        ("RAM grown", &ram, MEMORY_BYTES * 2),
        ("page to 0", &page, 0),
        ("page grown", &page, 2 * common::ownership::PAGE_LEN),
    ] {
        let e = f.set_len(len).expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}");
        tried.push(format!("{what}: {e}"));
    }
    assert_eq!(ram.metadata().expect("fstat").len(), MEMORY_BYTES);
    peer.send(
        &TargetMsg::Refused {
            reason: "hostile".into(),
        },
        &[],
    );
    let out = job.join().expect("vmctl");
    assert!(out.assert_failed().contains("hostile"), "{out:?}");
    drop((peer, h, ram, page, fake));
    // A shrunk memfd killed the source about a second later: watch longer.
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        w.since(t) >= 20,
        "the heartbeat stopped: {}",
        g.cur.serial_text()
    );
    g.assert_runs_on(&w, "a target that tried to resize the memfd");
    eprintln!(
        "SUMMARY a target resizing the memfd and the page before refusing: every resize failed ({}); the source ran on for 3 s and more",
        tried.join("; ")
    );
    g.finish();
}

// ---------------------------------------------------------------------------
// vmctl while a migration runs.

/// `vmctl ARGS` and how long it took.
fn timed_vmctl(api: &std::path::Path, args: &[&str]) -> (Option<i32>, serde_json::Value, Duration) {
    let t = Instant::now();
    let (code, v) = vmctl(api, args);
    (code, v, t.elapsed())
}

#[test]
fn vmctl_during_a_migration_answers_at_once_and_only_one_migration_runs() {
    let mut g = Guest::start("mf15", "");
    let w = g.watch();
    let prompt = Duration::from_secs(1);

    // Its own API socket as the target.
    let out = migrate(&g.api, &g.api, &[]);
    let r = out.assert_failed();
    assert!(r.contains("own socket"), "{r}");
    assert!(out.took < prompt, "took {:?}", out.took);
    g.assert_runs_on(&w, "a migrate to its own socket");
    eprintln!(
        "SUMMARY migrate --to its own API socket: {r:?} in {} ms",
        ms(out.took)
    );

    // A migration held after Hello (no Ready): the guest runs, the source
    // is Migrating.
    let fake = g.fake_target();
    let job = migrate_in_background(&g.api, &fake.path, &[]);
    let (peer, h) = fake_up_to(&fake, After::Hello);
    let (code, st, took) = timed_vmctl(&g.api, &["status"]);
    assert_eq!((code, &st["state"]), (Some(0), &"Migrating".into()), "{st}");
    assert_eq!(st["pid"], g.cur.pid(), "{st}");
    assert!(took < prompt, "status took {took:?}");
    let mut said = vec![format!("status Migrating in {} ms", ms(took))];
    let other = g.env.path("other.sock");
    let other = other.display().to_string();
    for args in [
        vec!["pause"],
        vec!["resume"],
        vec!["shutdown"],
        vec!["migrate", "--to", &other],
    ] {
        let (code, v, took) = timed_vmctl(&g.api, &args);
        let text = v.to_string();
        assert!(
            code != Some(0) && (text.contains("busy") || text.contains("Migrating")),
            "{args:?}: {code:?} {text}"
        );
        assert!(took < prompt, "{args:?} took {took:?}");
        said.push(format!("{} busy in {} ms", args[0], ms(took)));
    }
    // Four more migrates at once, and status meanwhile.
    let fakes: Vec<FakeTarget> = (0..4).map(|_| g.fake_target()).collect();
    let jobs: Vec<_> = fakes
        .iter()
        .map(|f| migrate_in_background(&g.api, &f.path, &[]))
        .collect();
    let (code, st, took) = timed_vmctl(&g.api, &["status"]);
    assert_eq!(code, Some(0), "{st}");
    assert!(took < prompt, "status took {took:?} beside 4 migrates");
    for j in jobs {
        let out = j.join().expect("vmctl");
        assert!(out.assert_failed().contains("busy"), "{out:?}");
        assert!(out.took < prompt, "a second migrate took {:?}", out.took);
    }
    said.push(format!(
        "status beside 4 migrates in {} ms, each busy",
        ms(took)
    ));
    assert!(w.max_gap_since(Instant::now() - Duration::from_secs(2)) < Duration::from_millis(400));
    drop((peer, h, fake));
    let out = job.join().expect("vmctl");
    out.assert_failed();
    assert_eq!(out.json["downtime_us"], 0, "{:?}", out.json);
    drop(fakes);
    g.assert_runs_on(&w, "vmctl during a migration");
    eprintln!("SUMMARY vmctl during a held migration: {}", said.join(", "));

    // Two real sources to one real target: the first has it, the second
    // is turned away at once and its guest runs on.
    let api2 = g.env.path("api2.sock");
    let spec2 = GuestSpec {
        n: 2,
        nets: vec![g.env.net("vm1", 2, "")],
        memory: tests::migration_harness::MEMORY,
        vcpus: 1,
        cmdline: "",
    };
    let mut src2 = start_source(&g.env, &spec2, &api2);
    let w2 = TickWatch::start(&src2.serial);
    assert!(w2.wait_more(3, SETTLE));
    let tgt = start_target(&g.env, &TargetSpec::like(&g.spec));
    let first = migrate_in_background(&g.api, &tgt.incoming, &[]);
    // The target stops listening once the first source said Hello.
    assert!(wait_for(SETTLE, || !tgt.incoming.exists()));
    let second = migrate(&api2, &tgt.incoming, &[]);
    let r2 = second.assert_failed();
    assert!(second.took < prompt, "the second took {:?}", second.took);
    assert_eq!(second.json["downtime_us"], 0);
    let first = first.join().expect("vmctl");
    first.assert_ok();
    assert!(w2.wait_more(5, SETTLE), "the second guest stopped");
    w2.assert_one_guest_continuous("the second source");
    assert_answers_ping(&g.env, 2, "on the second source");
    let (_, st2) = vmctl(&api2, &["status"]);
    assert_eq!(
        (&st2["state"], &st2["pid"]),
        (&"Running".into(), &src2.pid().into())
    );
    g.exits.wait(&mut g.cur, "the first source");
    g.cur = tgt.vm;
    assert_answers_ping(&g.env, 1, "on the target");
    eprintln!(
        "SUMMARY two sources to one target: the first migrated (downtime_us {}), the second failed in {} ms ({r2:?}) and its guest runs on",
        first.json["downtime_us"],
        ms(second.took)
    );
    let (code, out) = vmctl(&api2, &["shutdown"]);
    assert_eq!(code, Some(0), "{out}");
    g.exits.wait(&mut src2, "the second source, shut down");
    g.finish();
}
