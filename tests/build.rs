//! Exposes the target directory to the tests and builds the freestanding
//! test guest (tests/guest/main.rs) to <target>/guest/testguest.elf.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out; the
    // target directory is the ancestor holding CACHEDIR.TAG.
    let target = out
        .ancestors()
        .find(|p| p.join("CACHEDIR.TAG").exists())
        .expect("OUT_DIR lies inside a cargo target directory")
        .to_path_buf();
    println!("cargo:rustc-env=TESTS_TARGET_DIR={}", target.display());

    build_testguest(&out, &target);
    build_trivial_guest(&out, &target);
}

/// Compiles the test guest with rustc directly: the host target, no std, no
/// SSE (this host's guests cannot run SSE), static at 1 MiB by link.ld. The
/// flags are fixed here, never taken from the cargo profile, so every
/// profile produces the same ELF.
fn build_testguest(out: &Path, target: &Path) {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src_dir = manifest.join("guest");
    let main_rs = src_dir.join("main.rs");
    let link_ld = src_dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", src_dir.display());
    for entry in std::fs::read_dir(&src_dir).expect("tests/guest is readable") {
        let path = entry.expect("tests/guest entry").path();
        if path.extension().is_some_and(|e| e == "rs" || e == "ld")
            && path.file_stem().is_some_and(|n| n != "trivial")
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = out.join("testguest.elf");
    let output = Command::new(&rustc)
        .arg(&main_rs)
        .args([
            "--edition=2024",
            "--crate-type=bin",
            "--crate-name=testguest",
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "codegen-units=1",
        ])
        .args([
            "-C",
            "debuginfo=0",
            "-C",
            "relocation-model=static",
            "-C",
            "no-redzone",
        ])
        .args(["-C", "target-feature=-sse,-sse2,+soft-float"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args([
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg=-T{}", link_ld.display()))
        .arg(format!("--remap-path-prefix={}=guest", src_dir.display()))
        .arg("-o")
        .arg(&built)
        // Flags meant for cargo's own builds must not leak into the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    if !output.status.success() {
        eprintln!(
            "building the test guest failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        std::process::exit(1);
    }

    // Publish atomically: builds of other profiles may run at the same time.
    let dir = target.join("guest");
    std::fs::create_dir_all(&dir).expect("create <target>/guest");
    let tmp = dir.join(format!("testguest.elf.tmp{}", std::process::id()));
    std::fs::copy(&built, &tmp).expect("copy the test guest");
    std::fs::rename(&tmp, dir.join("testguest.elf")).expect("publish the test guest");
}

/// target/guest/trivial.elf: the all-assembly PVH guest of guest/trivial.rs
/// (first serial byte at entry, long mode, a line, power-off). Used by the
/// boot tests and bench_boot.
fn build_trivial_guest(out: &Path, target: &Path) {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src = manifest.join("guest").join("trivial.rs");
    let script = manifest.join("guest").join("trivial.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = out.join("trivial.elf");
    let output = Command::new(&rustc)
        .args([
            "--edition",
            "2024",
            "--crate-type",
            "bin",
            "-C",
            "opt-level=2",
        ])
        .args(["-C", "panic=abort", "-C", "relocation-model=static"])
        .args(["-C", "no-redzone", "-C", "debuginfo=0"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args([
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg(format!("-Clink-arg=-T{}", script.display()))
        .arg("-o")
        .arg(&built)
        .arg(&src)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    if !output.status.success() {
        panic!(
            "building the trivial guest failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let dir = target.join("guest");
    std::fs::create_dir_all(&dir).expect("create <target>/guest");
    let tmp = dir.join(format!("trivial.elf.tmp{}", std::process::id()));
    std::fs::copy(&built, &tmp).expect("copy the trivial guest");
    std::fs::rename(&tmp, dir.join("trivial.elf")).expect("publish the trivial guest");
}
