//! Exposes the target directory to the tests. The test guest build is added here.
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
    build_trivial_guest(&target);
}

/// target/guest/trivial.elf: the all-assembly PVH guest of guest/trivial.rs
/// (first serial byte at entry, long mode, a line, power-off). Used by the
/// boot tests and bench_boot.
fn build_trivial_guest(target: &Path) {
    let src = Path::new("guest/trivial.rs");
    let script = Path::new("guest/trivial.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let dir = target.join("guest");
    std::fs::create_dir_all(&dir).expect("create target/guest");
    let script = script.canonicalize().expect("guest/trivial.ld exists");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
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
        .arg(dir.join("trivial.elf"))
        .arg(src)
        .status()
        .expect("run rustc for the trivial guest");
    assert!(status.success(), "building the trivial guest failed");
}
