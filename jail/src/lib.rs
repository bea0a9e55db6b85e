//! What every unprivileged process of the project (the vmm, the
//! vhost-user-net backend) does to itself before it touches anything a
//! guest or a peer controls, shared so that both do it the same way:
//!
//! - [`privileges`]: refuse root without `--user`, drop to that user;
//! - [`caps`]: empty the bounding set while still root, clear every other
//!   capability set after the drop;
//! - [`malloc`]: keep glibc's allocator from opening files once the
//!   seccomp filters are in;
//! - [`lockdown`]: those steps, plus no_new_privs and a one-line panic
//!   report, in the order every process takes them;
//! - [`bpf_tree`]: a seccompiler JSON allow-list compiled into a BPF
//!   program that finds the syscall by binary search;
//! - [`programs`]: those programs written as a table at build time, and
//!   looked up at run time.
//!
//! Landlock and the seccomp lists themselves are each process's own.

pub mod bpf_tree;
pub mod caps;
pub mod lockdown;
pub mod malloc;
pub mod privileges;
pub mod programs;
