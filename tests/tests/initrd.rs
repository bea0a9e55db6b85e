//! `--initrd FILE` on the real `vmm`: what cannot be an initrd is refused
//! at once with exit 2 and one line (a FIFO is never waited on), and what
//! the guest finds in its module list is the file, byte for byte: the test
//! guest reports the initrd's size and CRC-32, checked here against the
//! file's.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;
use tests::guest_lines::crc32;

use tests::bin;
use tests::net_guest::ScratchDir;
use tests::netd_harness::NOBODY;
use tests::rng::Rng;
use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess, as_nobody_with_kvm, assert_refused, mkfifo};

const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);

/// vmm as root dropping to 65534.
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

fn run(mut cmd: Command, initrd: &Path, memory: &str) -> (ExitStatus, String) {
    cmd.arg("--kernel")
        .arg(tests::guest_elf())
        .args([
            "--memory",
            memory,
            "--cmdline",
            "testguest.exit",
            "--initrd",
        ])
        .arg(initrd);
    let mut p = VmmProcess::spawn(cmd);
    let st = p.wait_exit(REFUSAL_TIMEOUT);
    (st, p.stderr())
}

#[test]
fn a_fifo_a_directory_or_a_file_bigger_than_ram_is_refused() {
    let dir = ScratchDir::new("initrdbad");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    // Sparse: 64 MiB that a 32 MiB guest cannot hold.
    let big = dir.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    type Start = fn() -> Command;
    let starts: [(&str, Start); 2] = [("--user", vmm_with_user), ("uid 65534", vmm_as_nobody)];
    for (how, start) in starts {
        let (st, err) = run(start(), &fifo, "32M");
        assert_refused(&format!("{how}: FIFO initrd"), st, &err, "is a FIFO");
        let (st, err) = run(start(), dir.path(), "32M");
        assert_refused(
            &format!("{how}: directory initrd"),
            st,
            &err,
            "is a directory",
        );
        let (st, err) = run(start(), &big, "32M");
        assert_refused(&format!("{how}: initrd > RAM"), st, &err, "does not fit");
    }
}

/// Boots the test guest with a random initrd of `size` bytes and checks
/// the size and CRC-32 it reports.
fn guest_sees_the_initrd(size: usize, memory: &str) {
    let dir = ScratchDir::new("initrd");
    let mut rng = Rng(0x1d_0000 ^ size as u64);
    let data: Vec<u8> = (0..size / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let path = dir.join("initrd.img");
    std::fs::write(&path, &data).unwrap();
    let want = format!(
        "testguest: initrd {} bytes, crc32 {:08x}",
        size,
        crc32(&data)
    );

    let mut c = vmm_with_user();
    c.arg("--kernel")
        .arg(tests::guest_elf())
        .args(["--memory", memory, "--initrd"])
        .arg(&path);
    let mut p = VmmProcess::spawn(c);
    // On this nested KVM a guest reads RAM its vmm wrote at about 0.5 MiB/s
    // (2.2 s per MiB measured; QEMU's guest likewise), so the CRC of a
    // large initrd takes minutes.
    let timeout = BOOT_TIMEOUT + Duration::from_secs(5 * (size as u64 >> 20));
    let line = p.wait_for_line("testguest: initrd ", timeout);
    assert!(line.contains(&want), "guest said {line:?}, want {want:?}");
}

#[test]
fn guest_reads_a_1mib_initrd() {
    guest_sees_the_initrd(1 << 20, "128M");
}

#[test]
fn guest_reads_a_64mib_initrd() {
    guest_sees_the_initrd(64 << 20, "256M");
}
