//! Stale sockets: a vmm or a migration target killed with SIGKILL leaves its
//! socket file behind; a new one on the same path replaces it (nobody
//! listens there). A path where a live vmm listens, or a file that is not a
//! socket, is refused with exit 2 and left as it is.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

use tests::migration_harness::{
    Exits, GuestSpec, MEMORY, MigEnv, Proc, SETTLE, TargetSpec, Vm, assert_ticks_continuous,
    boot_id, is_listening, migrate, start_source, start_target, start_target_at, ticks, vmctl,
};
use tests::vmm_process::BOOT_TIMEOUT;
use tests::{TempDir, bin, guest_elf};

/// A vmm (as uid 65534) with the test guest and its API socket at `api`.
fn vmm_on(dir: &Path, api: &Path, tag: &str) -> Vm {
    let serial = dir.join(format!("serial-{tag}"));
    let mut c = Command::new(bin("vmm"));
    c.args(["--user", "65534:65534", "--memory", "64M"])
        .arg("--kernel")
        .arg(guest_elf())
        .args(["--cmdline", "testguest.heartbeat=50"])
        .arg("--api-socket")
        .arg(api)
        .arg("--serial")
        .arg(&serial);
    Vm {
        proc: Proc::spawn(c),
        serial,
    }
}

fn sigkill(vm: &mut Vm) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not
    // reaped (Proc reaps only in wait_exit / drop).
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) }, 0);
    let st = vm.wait_exit(SETTLE);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// `vmctl status`: exit code and the answering pid.
fn status_pid(api: &Path) -> (Option<i32>, Option<u64>) {
    let (code, json) = vmctl(api, &["status"]);
    (code, json["pid"].as_u64())
}

#[test]
fn a_killed_vmms_api_socket_does_not_block_a_restart() {
    let dir = TempDir::new("stale-api");
    let api = dir.join("api.sock");
    let mut first = vmm_on(dir.path(), &api, "first");
    first.wait_serial("testguest: up boot_id=", BOOT_TIMEOUT);
    assert_eq!(status_pid(&api), (Some(0), Some(u64::from(first.pid()))));
    sigkill(&mut first);
    assert!(is_socket(&api), "SIGKILL leaves the socket file");
    assert!(!is_listening(&api));

    let mut second = vmm_on(dir.path(), &api, "second");
    second.wait_serial("testguest: up boot_id=", BOOT_TIMEOUT);
    assert_eq!(
        status_pid(&api),
        (Some(0), Some(u64::from(second.pid()))),
        "{}",
        second.proc.stderr()
    );
    assert_eq!(vmctl(&api, &["shutdown"]).0, Some(0));
    assert_eq!(second.wait_exit(SETTLE).code(), Some(0));
}

#[test]
fn a_live_vmms_api_socket_is_refused_and_it_keeps_answering() {
    let dir = TempDir::new("live-api");
    let api = dir.join("api.sock");
    let mut live = vmm_on(dir.path(), &api, "live");
    live.wait_serial("testguest: up boot_id=", BOOT_TIMEOUT);

    let mut second = vmm_on(dir.path(), &api, "second");
    let st = second.wait_exit(SETTLE);
    assert_eq!(st.code(), Some(2), "{}", second.proc.stderr());
    let err = second.error_lines().join("\n");
    assert!(
        err.contains(&api.display().to_string()) && err.contains("in use"),
        "one line naming the path: {err}"
    );
    for _ in 0..3 {
        assert_eq!(status_pid(&api), (Some(0), Some(u64::from(live.pid()))));
    }
    assert!(live.try_exit().is_none(), "{}", live.proc.stderr());
    assert_eq!(vmctl(&api, &["shutdown"]).0, Some(0));
    assert_eq!(live.wait_exit(SETTLE).code(), Some(0));
}

#[test]
fn a_regular_file_at_the_path_is_not_removed() {
    let dir = TempDir::new("file-api");
    let api = dir.join("api.sock");
    std::fs::write(&api, b"not a socket\n").unwrap();
    let mut vm = vmm_on(dir.path(), &api, "vm");
    let st = vm.wait_exit(SETTLE);
    assert_eq!(st.code(), Some(2), "{}", vm.proc.stderr());
    let err = vm.error_lines().join("\n");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&api).unwrap(), b"not a socket\n");

    // The same for a target's --incoming path.
    let incoming = dir.join("mig.sock");
    std::fs::write(&incoming, b"keep\n").unwrap();
    let mut c = Command::new(bin("vmm"));
    c.args(["--user", "65534:65534", "--memory", "64M"])
        .arg("--incoming")
        .arg(&incoming);
    let mut target = Proc::spawn(c);
    let st = target.wait_exit(SETTLE);
    assert_eq!(st.code(), Some(2), "{}", target.stderr());
    assert!(target.stderr().contains("is not a socket"));
    assert_eq!(std::fs::read(&incoming).unwrap(), b"keep\n");
}

#[test]
fn a_killed_targets_incoming_socket_does_not_block_a_new_target() {
    let env = MigEnv::new("stale-mig");
    let spec = GuestSpec {
        n: 2,
        nets: vec![],
        memory: MEMORY,
        vcpus: 1,
        cmdline: "",
    };
    let api = env.path("api.sock");
    let mut source = start_source(&env, &spec, &api);
    source.wait_serial("testguest: tick 3", SETTLE);

    let mut dead = start_target(&env, &TargetSpec::like(&spec));
    sigkill(&mut dead.vm);
    assert!(is_socket(&dead.incoming), "SIGKILL leaves --incoming");
    assert!(!is_listening(&dead.incoming));

    let mut target = start_target_at(&env, &TargetSpec::like(&spec), &dead.incoming);
    migrate(&api, &target.incoming, &[]).assert_ok();
    let mut exits = Exits::default();
    exits.wait(&mut source, "source");
    exits.assert_all_ok();
    // The target took over the source's API socket and runs the same
    // guest, its ticks going on.
    assert_eq!(
        status_pid(&api),
        (Some(0), Some(u64::from(target.vm.pid())))
    );
    let last = ticks(&source.serial_text()).last().copied().unwrap_or(0);
    target
        .vm
        .wait_serial(&format!("testguest: tick {}", last + 3), SETTLE);
    assert!(
        !target.vm.serial_text().contains("testguest: up"),
        "no second boot"
    );
    assert!(!boot_id(&source.serial_text()).is_empty());
    assert_ticks_continuous(&[source.serial_text(), target.vm.serial_text()]);
    assert_eq!(vmctl(&api, &["shutdown"]).0, Some(0));
    assert_eq!(target.vm.wait_exit(SETTLE).code(), Some(0));
    assert!(
        !is_socket(&target.incoming),
        "the target removed its socket"
    );
}
