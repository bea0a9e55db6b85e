//! The vmm API socket against hostile local users (issue 7, items 1, 5, 8
//! and 9): it is created 0600 even under umask 000, serves only the vmm's
//! uid and root (SO_PEERCRED), closes fds it did not ask for, answers
//! unknown fields and wrong types with an error, and a trickling client
//! neither blocks other clients nor outlives its connection deadline. After
//! each attack the vmm's fd and thread counts are back at their baseline and
//! the guest still runs.

use std::io::{IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::api::{API_VERSION, ApiRequest, ApiResponse};
use common::codec::{self, DEFAULT_MAX_FRAME};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tests::hostile::{fd_count, hostile_bin, run_hostile, settled_fd_count, thread_count};
use tests::netd_harness::wait_for;
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess};
use tests::{bin, guest_elf};

/// A scratch directory any uid may enter, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("vmm-apihostile-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A vmm started by root under umask 000, dropping to 65534, with its API
/// socket in `dir`; returns once the guest ticks.
fn start_vmm(dir: &Scratch) -> (VmmProcess, PathBuf) {
    let sock = dir.0.join("api.sock");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 000; exec \"$0\" \"$@\""])
        .arg(bin("vmm"))
        .args([
            "--user",
            "65534:65534",
            "--cmdline",
            "testguest.heartbeat=100",
        ])
        .arg("--api-socket")
        .arg(&sock)
        .arg("--kernel")
        .arg(guest_elf());
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 1", BOOT_TIMEOUT);
    (vm, sock)
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    s
}

fn hello(s: &UnixStream) {
    codec::send(
        s,
        &ApiRequest::Hello {
            version: API_VERSION,
        },
        &[],
    )
    .unwrap();
    let r = codec::recv::<_, ApiResponse>(s, DEFAULT_MAX_FRAME, 0).unwrap();
    assert!(matches!(r.msg, ApiResponse::Hello { .. }), "{:?}", r.msg);
}

/// Status over a fresh connection, answered within 8 s.
fn status_answered(sock: &Path) -> Result<(), String> {
    let s = connect(sock);
    let sent = codec::send(
        &s,
        &ApiRequest::Hello {
            version: API_VERSION,
        },
        &[],
    );
    sent.map_err(|e| e.to_string())?;
    codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0).map_err(|e| e.to_string())?;
    codec::send(&s, &ApiRequest::Status, &[]).map_err(|e| e.to_string())?;
    match codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0) {
        Ok(r) if matches!(r.msg, ApiResponse::Status(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

fn raw_frame(text: &str) -> Vec<u8> {
    let mut f = (text.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(text.as_bytes());
    f
}

/// The guest keeps ticking.
fn assert_guest_runs(vm: &mut VmmProcess) {
    let n = vm.lines().len();
    vm.wait_for_line(&format!("testguest: tick {}", n + 1), BOOT_TIMEOUT);
}

fn shutdown(sock: &Path, vm: &mut VmmProcess) {
    let out = Command::new(bin("vmctl"))
        .arg("--api-socket")
        .arg(sock)
        .arg("shutdown")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert!(st.success(), "{st}: {}", vm.stderr());
}

/// Item 9: 0600 under umask 000, owned by the vmm's uid; another uid that
/// reaches the socket anyway (mode opened by root) is refused by
/// SO_PEERCRED, and its Shutdown has no effect.
#[test]
fn api_socket_is_private_under_umask_000_and_checks_the_peer_uid() {
    let dir = Scratch::new("umask");
    let (mut vm, sock) = start_vmm(&dir);
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "API socket mode");
    assert_eq!(meta.uid(), 65534, "owned by the vmm's uid");

    // Open the door as root would by mistake: the uid check still holds.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let hostile = hostile_bin(Path::new(env!("CARGO_BIN_EXE_netd_hostile")), &dir.0);
    let r = run_hostile(
        &hostile,
        4242,
        &[
            "raw",
            sock.to_str().unwrap(),
            &format!("Hello(version: {API_VERSION})"),
            "Shutdown",
        ],
    );
    let first = r["texts"][0].as_str().unwrap_or_default().to_string();
    assert!(first.contains("uid 4242 may not use this API"), "{r}");
    assert_eq!(r["replies"], 1, "one refusal, nothing else: {r}");
    assert_guest_runs(&mut vm);
    status_answered(&sock).expect("root is served");
    shutdown(&sock, &mut vm);
}

/// Item 8: two clients trickling a byte every 300 ms hold neither the API
/// (status is answered meanwhile) nor their connections past the deadline.
#[test]
fn trickling_clients_neither_block_others_nor_outlive_the_deadline() {
    let dir = Scratch::new("trickle");
    let (mut vm, sock) = start_vmm(&dir);
    status_answered(&sock).unwrap();
    let pid = vm.pid();
    let (fds0, threads0) = (settled_fd_count(pid), thread_count(pid));

    let tricklers: Vec<_> = (0..2)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.write_all(&1000u32.to_le_bytes()).unwrap();
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(40) {
                    std::thread::sleep(Duration::from_millis(300));
                    if s.write_all(b" ").is_err() {
                        return Some(t0.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        status_answered(&sock).expect("status while clients trickle");
    }
    for t in tricklers {
        let cut = t.join().unwrap();
        let cut = cut.expect("the trickling client was never cut");
        assert!(cut < Duration::from_secs(25), "cut after {cut:?}");
    }
    assert!(
        wait_for(Duration::from_secs(10), || fd_count(pid) == fds0),
        "vmm fds {} (was {fds0})",
        fd_count(pid)
    );
    assert_eq!(thread_count(pid), threads0, "vmm threads");
    assert_guest_runs(&mut vm);
    shutdown(&sock, &mut vm);
}

/// Items 1 and 5 at the API: fds sent with a request are closed and
/// refused; unknown fields and well-formed RON of the wrong type get an
/// error reply and the connection goes on.
#[test]
fn api_refuses_fds_unknown_fields_and_wrong_types() {
    let dir = Scratch::new("strict");
    let (mut vm, sock) = start_vmm(&dir);
    status_answered(&sock).unwrap();
    let pid = vm.pid();
    let fds0 = settled_fd_count(pid);

    let null = std::fs::File::open("/dev/null").unwrap();
    for n in [1usize, 65, 200] {
        let s = connect(&sock);
        hello(&s);
        let frame = raw_frame("Status");
        let raw = vec![null.as_raw_fd(); n];
        let iov = [IoSlice::new(&frame)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        match codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0) {
            Ok(r) => assert!(matches!(r.msg, ApiResponse::Error { .. }), "{:?}", r.msg),
            Err(e) => panic!("{n} fds: no error reply ({e})"),
        }
    }
    assert!(
        wait_for(Duration::from_secs(10), || fd_count(pid) == fds0),
        "vmm fds {} (was {fds0})",
        fd_count(pid)
    );

    // An unknown field in the first Hello: an error, not a session.
    let s = connect(&sock);
    (&s).write_all(&raw_frame(&format!(
        "Hello(version: {API_VERSION}, evil: true)"
    )))
    .unwrap();
    let r = codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0).unwrap();
    assert!(matches!(r.msg, ApiResponse::Error { .. }), "{:?}", r.msg);
    drop(s);

    let s = connect(&sock);
    hello(&s);
    for text in [
        r#"Migrate(to: "/nonexistent", backend_transfer: false, evil: 1)"#,
        "Status(1)",
        "42",
        r#"Pause(force: true)"#,
    ] {
        (&s).write_all(&raw_frame(text)).unwrap();
        let r = codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0)
            .unwrap_or_else(|e| panic!("no reply to {text}: {e}"));
        assert!(
            matches!(r.msg, ApiResponse::Error { .. }),
            "{text}: {:?}",
            r.msg
        );
    }
    codec::send(&s, &ApiRequest::Status, &[]).unwrap();
    let r = codec::recv::<_, ApiResponse>(&s, DEFAULT_MAX_FRAME, 0).unwrap();
    assert!(
        matches!(&r.msg, ApiResponse::Status(st) if format!("{:?}", st.state) == "Running"),
        "{:?}",
        r.msg
    );
    drop(s);
    assert_guest_runs(&mut vm);
    shutdown(&sock, &mut vm);
}
