//! Compiles every thread kind's seccomp allow-list (policy/seccomp/*.json)
//! into BPF at build time, as a binary search over the syscall numbers
//! (`jail::bpf_tree`): start-up then only installs them. And writes
//! the man pages and shell completions of `vmm` and `vmctl` from their clap
//! definitions (the `cli` crate) to `target/<profile>/assets/`.

use std::path::PathBuf;

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
}
