//! vmm boots guests by PVH under real KVM, as an unprivileged user, and
//! refuses bad input with one line and exit code 2.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::vmm_process::{BOOT_TIMEOUT, VmmProcess, as_nobody_with_kvm, vm_rss_kib};
use tests::{TempDir, bin, guest_elf, trivial_elf};

fn is_banner(line: &str) -> bool {
    let Some(rest) = line.trim_end().strip_prefix("testguest: up boot_id=") else {
        return false;
    };
    rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The program header types of an ELF64 little-endian file, and its
/// e_type.
fn elf_program_headers(bytes: &[u8]) -> (u16, Vec<u32>) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not ELF64");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    let types = (0..usize::from(phnum))
        .map(|i| u32_at(phoff + i * usize::from(phentsize)))
        .collect();
    (u16_at(0x10), types)
}

/// README: `vmm` is a static PIE (no dynamic loader before `main`, 0.3 ms
/// of the boot here), unless built with VMM_LINK_DYNAMIC=1. A build that
/// fell back to a dynamic link (static archives missing) fails here
/// rather than silently booting slower.
#[test]
fn vmm_is_a_static_pie() {
    if std::env::var("VMM_LINK_DYNAMIC").as_deref() == Ok("1") {
        return;
    }
    const ET_DYN: u16 = 3;
    const PT_INTERP: u32 = 3;
    let (e_type, headers) = elf_program_headers(&std::fs::read(bin("vmm")).unwrap());
    assert_eq!(e_type, ET_DYN, "vmm is not position-independent");
    assert!(
        !headers.contains(&PT_INTERP),
        "vmm names a dynamic loader: it was linked dynamically"
    );
    // The other binaries are linked as cargo does by default: this check
    // tells a static binary from a dynamic one.
    let (_, vmctl) = elf_program_headers(&std::fs::read(bin("vmctl")).unwrap());
    assert!(vmctl.contains(&PT_INTERP), "vmctl has no PT_INTERP");
}

#[test]
fn boots_testguest_as_unprivileged_user_in_kvm_group() {
    let mut cmd = as_nobody_with_kvm(&bin("vmm"));
    cmd.arg("--kernel")
        .arg(guest_elf())
        .args(["--cmdline", "testguest.exit"]);
    let mut vm = VmmProcess::spawn(cmd);
    let st = vm.wait_exit(BOOT_TIMEOUT);
    let out = vm.output();
    assert!(
        out.lines().any(is_banner),
        "no banner in:\n{out}\nstderr: {}",
        vm.stderr()
    );
    assert!(st.success(), "exit {st}, stderr: {}", vm.stderr());
}

#[test]
fn boots_as_root_with_user_option_and_really_drops_privileges() {
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--user",
        "65534:65534",
        "--cmdline",
        "testguest.heartbeat=100",
    ]);
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 1", BOOT_TIMEOUT);
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>())
            .unwrap()
    };
    assert_eq!(field("Uid:"), vec!["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), vec!["65534"; 4], "{status}");
    assert!(field("Groups:").is_empty(), "{status}");
}

#[test]
fn trivial_guest_reaches_long_mode_and_powers_off() {
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel")
        .arg(trivial_elf())
        .args(["--user", "65534:65534"]);
    let mut vm = VmmProcess::spawn(cmd);
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert_eq!(vm.output(), "Trivial: long mode");
    assert!(st.success(), "{st}: {}", vm.stderr());
}

#[test]
fn serial_to_file() {
    let tmp = TempDir::new("boot-serial");
    let dir = tmp.path();
    let log = dir.join("serial.log");
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel")
        .arg(trivial_elf())
        .args(["--user", "65534:65534", "--serial"])
        .arg(&log);
    let mut vm = VmmProcess::spawn(cmd);
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert!(st.success(), "{st}: {}", vm.stderr());
    assert!(vm.output().is_empty());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "Trivial: long mode\n"
    );
}

/// A copy of the trivial guest with its PT_NOTE program header blanked out
/// (PT_NULL): a valid ELF that loads at 1 MiB but has no PVH note.
fn elf_without_pvh_note(dir: &Path) -> PathBuf {
    let mut elf = std::fs::read(trivial_elf()).unwrap();
    let rd16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, num) = (rd16(&elf, 0x36), rd16(&elf, 0x38));
    let mut blanked = 0;
    for i in 0..num {
        let o = phoff + i * size;
        if elf[o..o + 4] == 4u32.to_le_bytes() {
            elf[o..o + 4].copy_from_slice(&0u32.to_le_bytes());
            blanked += 1;
        }
    }
    assert_eq!(blanked, 1, "trivial.elf has one PT_NOTE");
    let p = dir.join("no-pvh.elf");
    std::fs::write(&p, elf).unwrap();
    p
}

/// A copy of the trivial guest whose first instruction is replaced by
/// `code` (2 bytes): `ud2` cannot be delivered without an IDT (triple fault),
/// `int3` is not even emulated on this nested KVM (internal error).
fn elf_with_first_instruction(dir: &Path, name: &str, code: [u8; 2]) -> PathBuf {
    let mut elf = std::fs::read(trivial_elf()).unwrap();
    // The first PT_LOAD's file offset holds the entry (the linker script puts
    // .text.boot first, at 1 MiB).
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let off = u64::from_le_bytes(elf[phoff + 8..phoff + 16].try_into().unwrap()) as usize;
    elf[off..off + 2].copy_from_slice(&code);
    let p = dir.join(name);
    std::fs::write(&p, elf).unwrap();
    p
}

fn host_memory_bytes() -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |name: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (kib("MemTotal:") + kib("SwapTotal:")) * 1024
}

#[test]
fn bad_input_gives_one_line_and_exit_code_2() {
    let tmp = TempDir::new("boot-bad");
    let dir = tmp.path();
    let not_elf = dir.join("not-elf");
    std::fs::write(&not_elf, "this is not a kernel\n").unwrap();
    let no_pvh = elf_without_pvh_note(dir);
    let trivial = trivial_elf();
    let too_big = format!("{}G", host_memory_bytes() / (1 << 30) * 2 + 2);
    let user = ["--user", "65534:65534"];
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), s(&dir.join("missing"))],
            "cannot open kernel",
        ),
        (vec!["--kernel".into(), s(&not_elf)], "is not an ELF"),
        (vec!["--kernel".into(), s(&no_pvh)], "no PVH entry note"),
        (
            vec![
                "--kernel".into(),
                s(&trivial),
                "--memory".into(),
                "1M".into(),
            ],
            "does not fit in guest RAM",
        ),
        (
            vec![
                "--kernel".into(),
                s(&trivial),
                "--memory".into(),
                "0".into(),
            ],
            "larger than zero",
        ),
        (
            vec![
                "--kernel".into(),
                s(&trivial),
                "--memory".into(),
                "lots".into(),
            ],
            "invalid memory size 'lots'",
        ),
        (
            vec!["--kernel".into(), s(&trivial), "--memory".into(), too_big],
            "larger than this host allows",
        ),
        (
            vec!["--kernel".into(), s(&trivial), "--frobnicate".into()],
            "unknown option '--frobnicate'",
        ),
        (
            vec![
                "--kernel".into(),
                s(&trivial),
                "--vcpus".into(),
                "256".into(),
            ],
            "--vcpus 256 is too many",
        ),
        (
            vec!["--memory".into(), "64M".into()],
            "--kernel is required",
        ),
    ];
    for (args, expect) in cases {
        let out = Command::new(bin("vmm"))
            .args(&args)
            .args(user)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }

    // Root without --user is refused before anything is opened.
    let out = Command::new(bin("vmm"))
        .arg("--kernel")
        .arg(&trivial)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("refusing to run as root"), "{err}");
}

#[test]
fn six_gib_guest_boots_with_small_rss() {
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--user",
        "65534:65534",
        "--memory",
        "6G",
        "--cmdline",
        "testguest.heartbeat=100",
    ]);
    let mut vm = VmmProcess::spawn(cmd);
    vm.wait_for_line("testguest: tick 2", BOOT_TIMEOUT);
    // RAM above 4 GiB is mapped: the guest RAM mappings add up to 6 GiB.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid())).unwrap();
    let ram: u64 = maps
        .lines()
        .filter(|l| l.contains("memfd:guest-ram"))
        .map(|l| {
            let (a, b) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap()
        })
        .sum();
    assert_eq!(ram, 6 << 30, "{maps}");
    let rss = vm_rss_kib(vm.pid());
    eprintln!("6 GiB guest: vmm VmRSS {rss} KiB");
    assert!(rss < 64 * 1024, "VmRSS {rss} KiB is not far below 6 GiB");
}

#[test]
fn guest_fault_exits_nonzero_with_reason_and_rip() {
    let tmp = TempDir::new("boot-fault");
    let dir = tmp.path();
    for (name, code) in [("ud2.elf", [0x0f, 0x0b]), ("int3.elf", [0xcc, 0x90])] {
        let elf = elf_with_first_instruction(dir, name, code);
        let mut cmd = Command::new(bin("vmm"));
        cmd.arg("--kernel")
            .arg(&elf)
            .args(["--user", "65534:65534"]);
        let mut vm = VmmProcess::spawn(cmd);
        let st = vm.wait_exit(BOOT_TIMEOUT);
        let err = vm.stderr();
        assert_ne!(st.code(), Some(0), "{name}: {err}");
        assert_ne!(st.code(), None, "{name}: killed by a signal: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.contains("at RIP 0x1000"), "{name}: {err}");
        assert!(
            err.contains("triple fault") || err.contains("internal error"),
            "{name}: {err}"
        );
    }
}

#[test]
fn i8042_reset_powers_off_cleanly() {
    // The trivial guest with its final `mov dx, 0x501; xor al, al; out dx, al`
    // turned into `mov dx, 0x64; mov al, 0xfe; out dx, al`.
    let tmp = TempDir::new("boot-i8042");
    let dir = tmp.path();
    let mut elf = std::fs::read(trivial_elf()).unwrap();
    let from = [0x66, 0xba, 0x01, 0x05, 0x30, 0xc0];
    let to = [0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe];
    let at = elf
        .windows(from.len())
        .position(|w| w == from)
        .expect("power-off sequence in trivial.elf");
    elf[at..at + to.len()].copy_from_slice(&to);
    let p = dir.join("reset.elf");
    std::fs::write(&p, elf).unwrap();
    let mut cmd = Command::new(bin("vmm"));
    cmd.arg("--kernel").arg(&p).args(["--user", "65534:65534"]);
    // Without a working reset the guest would idle in hlt: wait_exit fails.
    let mut vm = VmmProcess::spawn(cmd);
    let st = vm.wait_exit(BOOT_TIMEOUT);
    assert_eq!(vm.output(), "Trivial: long mode");
    assert!(st.success(), "{st}: {}", vm.stderr());
}
