//! The ACPI tables the real `vmm` builds (`--dump-acpi DIR`), checked by
//! ACPICA's own disassembler: `iasl -d` on each table must succeed without
//! an error or a checksum warning, for 1, 4 and 32 vCPUs. The MADT must
//! list one local APIC per vCPU and the DSDT every `--net` device. The
//! dump runs as uid 65534 without the kvm group: it needs neither
//! /dev/kvm nor netd (whose socket here does not exist).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tests::net_guest::ScratchDir;
use tests::netd_harness::NOBODY;
use tests::prereq::{IASL, Prerequisite, require_or_skip};
use tests::{bin, output_within};

const TIMEOUT: Duration = Duration::from_secs(30);
const TABLES: [&str; 4] = ["XSDT", "FACP", "APIC", "DSDT"];

/// `vmm ... --dump-acpi DIR` as uid 65534 with no supplementary group.
fn dump(dir: &Path, vcpus: u32, nets: usize) -> Output {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ])
    .arg(bin("vmm"))
    .arg("--kernel")
    .arg(tests::guest_elf())
    .args(["--memory", "256M", "--vcpus", &vcpus.to_string()]);
    for i in 0..nets {
        c.args([
            "--net",
            &format!("netd={}/no-netd.sock,id=vm{i}", dir.display()),
        ]);
    }
    c.arg("--dump-acpi").arg(dir);
    c.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
    output_within(c, TIMEOUT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Local APIC (type 0) and local x2APIC (type 9) structures of a MADT.
fn local_apics(madt: &[u8]) -> Vec<u32> {
    let len = u32::from_le_bytes(madt[4..8].try_into().unwrap()) as usize;
    assert_eq!(len, madt.len(), "MADT length field");
    let mut ids = Vec::new();
    let mut o = 44;
    while o < len {
        let (ty, l) = (madt[o], madt[o + 1] as usize);
        assert!(l >= 2 && o + l <= len, "MADT structure at {o} overruns");
        match ty {
            0 => ids.push(u32::from(madt[o + 3])),
            9 => ids.push(u32::from_le_bytes(madt[o + 4..o + 8].try_into().unwrap())),
            _ => {}
        }
        o += l;
    }
    ids
}

/// Disassembles `DIR/<sig>.dat` with `iasl -d` and returns the .dsl text.
fn disassemble(dir: &Path, sig: &str) -> String {
    let out = output_within(
        {
            let mut c = Command::new(IASL);
            c.arg("-d").arg(format!("{sig}.dat")).current_dir(dir);
            c
        },
        TIMEOUT,
    );
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "iasl -d {sig}.dat: {}\n{log}",
        out.status
    );
    for bad in [
        "Error", "error", "Warning", "warning", "checksum", "Checksum",
    ] {
        assert!(!log.contains(bad), "iasl -d {sig}.dat says {bad:?}:\n{log}");
    }
    std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap()
}

#[test]
fn iasl_accepts_the_tables_for_1_4_and_32_vcpus() {
    if !require_or_skip(Prerequisite::Iasl, "disassembling the ACPI tables") {
        return;
    }
    for (vcpus, nets) in [(1, 0), (4, 2), (32, 3)] {
        let dir = ScratchDir::new(&format!("acpi{vcpus}"));
        let out = dump(dir.path(), vcpus, nets);
        assert!(
            out.status.success(),
            "--vcpus {vcpus} --dump-acpi: {}: {}",
            out.status,
            text(&out.stderr)
        );
        for sig in TABLES {
            let dsl = disassemble(dir.path(), sig);
            assert!(dsl.contains(&format!("\"{sig}\"")), "{sig}.dsl:\n{dsl}");
        }
        let madt = std::fs::read(dir.join("APIC.dat")).unwrap();
        assert_eq!(
            local_apics(&madt),
            (0..vcpus).collect::<Vec<_>>(),
            "{vcpus} vCPUs: one local APIC each"
        );
        let dsdt = std::fs::read_to_string(dir.join("DSDT.dsl")).unwrap();
        assert!(dsdt.contains("PNP0501"), "serial port:\n{dsdt}");
        let devices = dsdt.matches("\"LNRO0005\"").count();
        assert_eq!(devices, nets, "virtio-mmio devices in\n{dsdt}");
        for i in 0..nets {
            assert!(dsdt.contains(&format!("Device (V{i:03X})")), "{dsdt}");
            let base = format!(
                "0x{:08X},         // Address Base",
                0xD000_0000u32 + i as u32 * 0x1000
            );
            assert!(dsdt.contains(&base), "window of device {i}:\n{dsdt}");
            assert!(
                dsdt.contains(&format!("0x{:08X},\n", 5 + i)),
                "GSI of device {i}:\n{dsdt}"
            );
        }
        let fadt = std::fs::read_to_string(dir.join("FACP.dsl")).unwrap();
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    }
}

#[test]
fn a_bad_dump_directory_is_exit_2_with_one_line() {
    let dir = ScratchDir::new("acpibad");
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    for (what, target) in [("missing", dir.join("missing")), ("a file", file)] {
        let out = dump(&target, 1, 0);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {}: {err}", out.status);
        assert_eq!(err.lines().count(), 1, "{what}: {err:?}");
        assert!(err.contains("--dump-acpi"), "{what}: {err}");
    }
    // Nothing was written next to it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
