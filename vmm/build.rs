//! Compiles every thread kind's seccomp allow-list (policy/seccomp/*.json)
//! into BPF at build time, as a binary search over the syscall numbers
//! (`jail::bpf_tree`): start-up then only installs them. And writes
//! the man pages and shell completions of `vmm` and `vmctl` from their clap
//! definitions (the `cli` crate) to `target/<profile>/assets/`. And links
//! the `vmm` binary as a static PIE (see [`link_vmm_static_pie`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

/// The thread kinds, as `ThreadKind::name` spells them.
const KINDS: [&str; 7] = [
    "setup",
    "main",
    "vcpu",
    "device",
    "api",
    "migration",
    "vhost-user-relay",
];

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    jail::programs::write_table(
        &root.join("../policy/seccomp"),
        &KINDS,
        &out_dir.join("seccomp_programs.rs"),
    );
    let assets = cli::assets::dir_from_out_dir(&out_dir).unwrap_or_else(|e| panic!("{e}"));
    for cmd in [cli::vmm::Args::command(), cli::vmctl::Args::command()] {
        cli::assets::write(cmd, &assets)
            .unwrap_or_else(|e| panic!("man page and completions in {}: {e}", assets.display()));
    }
    link_vmm_static_pie(&out_dir.join("static-pie"));
}

/// Links the `vmm` binary, and only it, as a static PIE: no dynamic
/// loader, no shared libraries to map and relocate, which on this nested
/// host takes 0.3 ms of the 2.5 ms from exec to the guest's first byte (and
/// the sandbox then has no library files to keep reachable). The address
/// space is still randomised.
///
/// Cargo sets `-C target-feature=+crt-static` for a whole build only, and
/// without `--target` that includes the proc-macros, which cannot be
/// static; with `--target` every binary moves out of `target/release/`.
/// So the link line rustc writes for a dynamic binary is turned into a
/// static one here, for this binary: `-static-pie` to the `cc` driver
/// (start files, `-static -pie --no-dynamic-linker`), and a directory
/// searched first in which `-lc`, `-lm` and `-lgcc_s` name the static
/// archives, as rustc's own crt-static link would (`-lgcc_s` becomes
/// `libgcc_eh`). The other libraries rustc names (`-lutil`, `-lrt`,
/// `-lpthread`, `-ldl`) are empty archives in glibc >= 2.34.
///
/// `VMM_LINK_DYNAMIC=1` keeps the dynamic link; so does a toolchain
/// without glibc's static archives (with a warning).
fn link_vmm_static_pie(dir: &Path) {
    println!("cargo:rerun-if-env-changed=VMM_LINK_DYNAMIC");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("VMM_LINK_DYNAMIC") == "1"
        || var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
        // Static already (a crt-static build of the whole workspace).
        || var("CARGO_CFG_TARGET_FEATURE")
            .split(',')
            .any(|f| f == "crt-static")
    {
        return;
    }
    let driver = std::env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    // The archive's full path as the driver would find it, or None.
    let archive = |name: &str| -> Option<String> {
        let out = Command::new(&driver)
            .arg(format!("-print-file-name={name}"))
            .output()
            .ok()?;
        let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
        Path::new(&path).is_absolute().then_some(path)
    };
    let (Some(c), Some(m), Some(gcc_eh), Some(gcc)) = (
        archive("libc.a"),
        archive("libm.a"),
        archive("libgcc_eh.a"),
        archive("libgcc.a"),
    ) else {
        println!(
            "cargo:warning=no static glibc archives found by {driver}: vmm is linked dynamically"
        );
        return;
    };
    // Linker scripts under the names the dynamic link line asks for.
    let scripts = [
        ("libc.so", format!("GROUP ( {c} {gcc_eh} {gcc} )\n")),
        ("libm.so", format!("INPUT ( {m} )\n")),
        ("libgcc_s.so", format!("INPUT ( {gcc_eh} {gcc} )\n")),
    ];
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for (name, text) in scripts {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    println!("cargo:rustc-link-arg-bin=vmm=-static-pie");
    println!("cargo:rustc-link-arg-bin=vmm=-L{}", dir.display());
}
