//! Compiles the backend's seccomp allow-lists (policy/seccomp/vhost-user-net/
//! <kind>.json) into BPF at build time, with the vmm's compiler (a binary
//! search over the syscall numbers, `jail::bpf_tree`): start-up only
//! installs them. Also writes the man page and shell completions from the
//! clap definition (the `cli` crate) to `target/<profile>/assets/`.

use std::path::PathBuf;

/// The thread kinds, as `sandbox::ThreadKind::name` spells them.
const KINDS: [&str; 4] = ["setup", "main", "frontend", "worker"];

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    jail::programs::write_table(
        &root.join("../policy/seccomp/vhost-user-net"),
        &KINDS,
        &out_dir.join("seccomp_programs.rs"),
    );

    let assets = cli::assets::dir_from_out_dir(&out_dir).unwrap_or_else(|e| panic!("{e}"));
    cli::assets::write(
        <cli::vhost_user_net::Args as clap::CommandFactory>::command(),
        &assets,
    )
    .unwrap_or_else(|e| panic!("man page and completions in {}: {e}", assets.display()));
}
