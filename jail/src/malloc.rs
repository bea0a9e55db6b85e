//! The C allocator must not open files once the filters are in.
//!
//! glibc's malloc reads `/proc/sys/vm/overcommit_memory` the first time it
//! shrinks the heap of a thread arena (`check_may_shrink_heap`, called from
//! `shrink_heap` ← `heap_trim` ← `free`). Whichever thread first frees enough
//! memory at the top of another thread's arena after lock-down makes that
//! `openat`, and its seccomp filter kills the process. It happened at
//! power-off with a NIC: the main thread, under its `main` filter, freed the
//! channel a device thread had allocated (SIGSYS, syscall 257, exit 159).
//!
//! Setting `M_TRIM_THRESHOLD` explicitly makes `heap_trim` return before
//! `shrink_heap` for any heap smaller than the threshold (a thread heap is
//! at most 64 MiB), so the probe never runs. Opening files stays forbidden
//! everywhere. The cost: the free top of a heap is kept instead of handed
//! back; the vmm's heap is small (guest RAM and large buffers are mappings
//! of their own).

/// Above the largest glibc thread heap (64 MiB on 64-bit), well below
/// `c_int::MAX`.
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Call before the first seccomp filter. Returns false if the C library
/// refused the setting (the risk above then remains).
pub fn no_lazy_file_opens() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt takes two integers and only changes malloc's
        // parameters (under its own lock).
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = TRIM_THRESHOLD;
        true
    }
}
