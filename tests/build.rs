//! Exposes the target directory to the tests and builds the two freestanding
//! guests: tests/guest/main.rs → <target>/guest/testguest.elf (the test guest)
//! and tests/guest/trivial.rs → <target>/guest/trivial.elf (the all-assembly
//! PVH guest the boot tests and bench_boot use).
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

    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let guest_dir = manifest.join("guest");
    println!("cargo:rerun-if-changed={}", guest_dir.display());
    for entry in std::fs::read_dir(&guest_dir).expect("tests/guest is readable") {
        let path = entry.expect("tests/guest entry").path();
        if path.extension().is_some_and(|e| e == "rs" || e == "ld") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let dest = target.join("guest");
    std::fs::create_dir_all(&dest).expect("create <target>/guest");
    build_freestanding("testguest", &guest_dir, "main.rs", "link.ld", &out, &dest);
    build_freestanding(
        "trivial",
        &guest_dir,
        "trivial.rs",
        "trivial.ld",
        &out,
        &dest,
    );
}

/// Compiles one guest with rustc directly: the host target, no std, no SSE
/// (this host's guests cannot run SSE), static at the address its linker
/// script gives. The flags are fixed here, never taken from the cargo
/// profile, so every profile produces the same ELF; `<dest>/<name>.elf` is
/// published atomically, since builds of other profiles may run at once.
fn build_freestanding(
    name: &str,
    dir: &Path,
    main_rs: &str,
    script: &str,
    out: &Path,
    dest: &Path,
) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = out.join(format!("{name}.elf"));
    let output = Command::new(&rustc)
        .arg(dir.join(main_rs))
        .args(["--edition=2024", "--crate-type=bin"])
        .arg(format!("--crate-name={name}"))
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
        .arg(format!("-Clink-arg=-T{}", dir.join(script).display()))
        .arg(format!("--remap-path-prefix={}=guest", dir.display()))
        .arg("-o")
        .arg(&built)
        // Flags meant for cargo's own builds must not leak into the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    if !output.status.success() {
        panic!(
            "building the {name} guest failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tmp = dest.join(format!("{name}.elf.tmp{}", std::process::id()));
    std::fs::copy(&built, &tmp).unwrap_or_else(|e| panic!("copy the {name} guest: {e}"));
    std::fs::rename(&tmp, dest.join(format!("{name}.elf")))
        .unwrap_or_else(|e| panic!("publish the {name} guest: {e}"));
}
