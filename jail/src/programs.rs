//! Seccomp filters compiled at build time: a build script writes every
//! thread kind's program, in both modes, as a Rust table
//! ([`write_table`]); the process includes that table and looks a program
//! up ([`find`]) when it installs it. Nothing is parsed at start-up.

use std::fmt::Write;
use std::path::Path;

use seccompiler::{BpfProgramRef, sock_filter};

/// (thread kind, log mode, program), as [`write_table`] writes them.
pub type Table = [(&'static str, bool, &'static [sock_filter])];

/// `kind`'s program in the given mode, if the table has it.
pub fn find(table: &'static Table, kind: &str, log_mode: bool) -> Option<BpfProgramRef<'static>> {
    table
        .iter()
        .find(|(name, m, _)| *name == kind && *m == log_mode)
        .map(|(_, _, p)| *p)
}

/// For build scripts: compiles `policy_dir/<kind>.json` of each kind (a
/// binary-search tree, [`crate::bpf_tree::tree`]) and writes the table as
/// `pub(super) static PROGRAMS` to `dest`, telling cargo to rebuild when a
/// policy changes. Panics (failing the build) on a bad policy.
pub fn write_table(policy_dir: &Path, kinds: &[&str], dest: &Path) {
    let mut out = format!(
        "/// (kind, log mode, program), generated at build time from {}.\n\
         pub(super) static PROGRAMS: &jail::programs::Table = &[\n",
        policy_dir.display()
    );
    for kind in kinds {
        let path = policy_dir.join(format!("{kind}.json"));
        println!("cargo:rerun-if-changed={}", path.display());
        let json =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for log_mode in [false, true] {
            let prog = crate::bpf_tree::tree(&json, kind, log_mode)
                .unwrap_or_else(|e| panic!("seccomp policy {kind}: {e}"));
            // Writing to a String cannot fail.
            let _ = write!(out, "    ({kind:?}, {log_mode}, &[");
            for i in prog {
                let _ = write!(
                    out,
                    "seccompiler::sock_filter {{ code: {:#x}, jt: {}, jf: {}, k: {:#x} }},",
                    i.code, i.jt, i.jf, i.k
                );
            }
            out.push_str("]),\n");
        }
    }
    out.push_str("];\n");
    std::fs::write(dest, out).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}
