//! Reproduces, in a fresh process, how a VM with a NIC died at power-off
//! (SIGSYS, `openat`): a thread allocates, then the main thread, under the
//! vmm's compiled `main` seccomp filter, frees that memory. glibc then trims
//! the thread's arena and, the first time, opens
//! `/proc/sys/vm/overcommit_memory`.
//!
//! `malloc_trim_probe [--with-fix]`: with `--with-fix` it first applies
//! [`jail::malloc::no_lazy_file_opens`] (what the vmm does at
//! lock-down). Exits 0 when the frees went through; a seccomp kill shows
//! as SIGSYS. A fresh process matters: glibc remembers the probe's answer.

use vmm::sandbox::{Filters, SeccompMode, ThreadKind};

/// 512 KiB in 1 KiB pieces: well above glibc's 128 KiB trim threshold.
const BLOCKS: usize = 512;

fn main() {
    let with_fix = std::env::args().any(|a| a == "--with-fix");
    if with_fix && !jail::malloc::no_lazy_file_opens() {
        eprintln!("malloc_trim_probe: mallopt refused");
        std::process::exit(3);
    }
    // Allocated by another thread: they live in that thread's arena.
    let blocks = std::thread::spawn(|| (0..BLOCKS).map(|_| vec![1u8; 1024]).collect::<Vec<_>>())
        .join()
        .expect("allocating thread");
    let filters = Filters::compile(SeccompMode::Kill).expect("compile the filters");
    if let Err(e) = filters.apply(ThreadKind::Main) {
        eprintln!("malloc_trim_probe: {e}");
        std::process::exit(4);
    }
    drop(blocks);
    std::process::exit(0);
}
