//! Hostile or odd input to the real `vmm` and `vmctl` binaries: arguments
//! that are not UTF-8, a FIFO or a directory where a file is expected, and a
//! serial output that fails every write. Each must end at once with exit
//! code 2 and one line on stderr (or, for the serial, run normally with
//! one warning), never panic, hang or flood the log.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tests::bin;
use tests::net_guest::ScratchDir;
use tests::netd_harness::NOBODY;
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess, as_nobody_with_kvm, assert_refused, mkfifo};

/// A refusal is immediate; this only bounds a hang.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);

fn not_utf8() -> OsString {
    OsString::from_vec(b"\xff.elf".to_vec())
}

/// vmm as root dropping to 65534, with a clean environment for logging.
fn vmm_with_user() -> Command {
    let mut c = Command::new(bin("vmm"));
    c.args(["--user", &format!("{NOBODY}:{NOBODY}")])
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    c
}

/// vmm started as uid 65534 with the kvm group.
fn vmm_as_nobody() -> Command {
    let mut c = as_nobody_with_kvm(&bin("vmm"));
    c.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
    c
}

/// How a vmm command starts.
type Start = fn() -> Command;

/// Runs `cmd` to the end (bounded) and returns its status and stderr.
fn run(cmd: Command) -> (ExitStatus, String) {
    let mut p = VmmProcess::spawn(cmd);
    let st = p.wait_exit(REFUSAL_TIMEOUT);
    (st, p.stderr())
}

#[test]
fn non_utf8_arguments_give_exit_2_and_one_line() {
    // A path may be any bytes: it is simply not there.
    let mut c = vmm_with_user();
    c.arg("--kernel").arg(not_utf8());
    let (st, err) = run(c);
    assert_refused("--kernel <bytes>", st, &err, "No such file");

    // Other values and option names must be text.
    let mut c = vmm_with_user();
    c.arg("--kernel")
        .arg(tests::guest_elf())
        .arg("--cmdline")
        .arg(not_utf8());
    let (st, err) = run(c);
    assert_refused("--cmdline <bytes>", st, &err, "not valid UTF-8");

    let mut c = vmm_with_user();
    c.arg(not_utf8());
    let (st, err) = run(c);
    assert_refused("an option of bytes", st, &err, "not valid UTF-8");

    let mut c = Command::new(bin("vmctl"));
    c.arg("--api-socket").arg(not_utf8()).arg("status");
    let (st, err) = run(c);
    assert_refused("vmctl --api-socket <bytes>", st, &err, "not valid UTF-8");
}

#[test]
fn a_fifo_or_directory_as_kernel_or_serial_is_refused_at_once() {
    let dir = ScratchDir::new("fifo");
    let fifo = dir.0.join("fifo");
    mkfifo(&fifo);

    // As root with --user and as uid 65534 from the start: neither may
    // block in an open (the uid decides whether the open even gets to wait).
    let starts: [(&str, Start); 2] = [("--user", vmm_with_user), ("uid 65534", vmm_as_nobody)];
    for (how, start) in starts {
        let mut c = start();
        c.arg("--kernel").arg(&fifo);
        let (st, err) = run(c);
        assert_refused(&format!("{how}: FIFO kernel"), st, &err, "is a FIFO");

        let mut c = start();
        c.arg("--kernel")
            .arg(tests::guest_elf())
            .arg("--serial")
            .arg(&fifo);
        let (st, err) = run(c);
        assert_refused(&format!("{how}: FIFO serial"), st, &err, "is a FIFO");

        let mut c = start();
        c.arg("--kernel").arg(&dir.0);
        let (st, err) = run(c);
        assert_refused(
            &format!("{how}: directory kernel"),
            st,
            &err,
            "is a directory",
        );

        let mut c = start();
        c.arg("--kernel")
            .arg(tests::guest_elf())
            .arg("--serial")
            .arg(&dir.0);
        let (st, err) = run(c);
        assert_refused(
            &format!("{how}: directory serial"),
            st,
            &err,
            "is a directory",
        );
    }
}

#[test]
fn character_devices_and_files_are_fine_as_serial() {
    let dir = ScratchDir::new("serialok");
    let log = dir.0.join("serial.log");
    for target in [Path::new("/dev/null"), log.as_path()] {
        let mut c = vmm_with_user();
        c.arg("--kernel")
            .arg(tests::guest_elf())
            .args(["--cmdline", "testguest.exit", "--serial"])
            .arg(target);
        let mut p = VmmProcess::spawn(c);
        let st = p.wait_exit(BOOT_TIMEOUT);
        assert_eq!(
            st.code(),
            Some(0),
            "{}: {st}: {}",
            target.display(),
            p.stderr()
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("testguest: up boot_id="), "{text}");
}

/// Every byte the guest writes fails with ENOSPC on /dev/full: one warning,
/// not one per byte.
#[test]
fn serial_to_dev_full_warns_once() {
    let mut c = vmm_with_user();
    c.arg("--kernel").arg(tests::guest_elf()).args([
        "--cmdline",
        "testguest.exit",
        "--serial",
        "/dev/full",
    ]);
    let mut p = VmmProcess::spawn(c);
    let st = p.wait_exit(BOOT_TIMEOUT);
    let err = p.stderr();
    assert_eq!(st.code(), Some(0), "{st}: {err}");
    let warnings = err.lines().filter(|l| l.contains("serial")).count();
    assert_eq!(warnings, 1, "expected one serial warning:\n{err}");
    assert!(err.contains("No space left on device"), "{err}");
}

#[test]
fn version_names_the_release_and_what_it_writes_help_lists_it() {
    let out = tests::output_within(vmm_as_nobody_with(&["--version"]), REFUSAL_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "vmm {} (machine state format {}, migration protocol {})\n",
            env!("CARGO_PKG_VERSION"),
            vmm::persist::MACHINE_STATE_FORMAT,
            common::migration::MIGRATION_PROTOCOL_VERSION
        )
    );
    // --version wins over whatever else is given, without running a guest.
    let out = tests::output_within(
        vmm_as_nobody_with(&["--kernel", "/nonexistent", "--version"]),
        REFUSAL_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vmm "));
    let out = tests::output_within(vmm_as_nobody_with(&["--help"]), REFUSAL_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--kernel") && help.contains("--version"),
        "{help}"
    );
}

fn vmm_as_nobody_with(args: &[&str]) -> Command {
    let mut c = vmm_as_nobody();
    c.args(args);
    c
}
