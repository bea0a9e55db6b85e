//! The unprivileged VMM as a library: the `vmm` binary is a thin front end,
//! and tests and fuzz targets reach the devices directly.
//!
//! Start-up (vmm/src/main.rs), in order:
//! [`config`] parses the command line (`args_os`) and checks the kinds of
//! the files it names ([`inputs`]) → [`privileges::check_invocation`] →
//! open /dev/kvm → [`sandbox::drop_bounding_set`] → [`privileges::drop_to`]
//! → [`sandbox::lock_down`] (capabilities, no_new_privs, Landlock, the
//! `setup` seccomp filter) → [`exit::SignalWatch`] (SIGTERM/SIGINT blocked,
//! one thread takes them) → [`net::attach::open_nets`] (TAPs from netd as
//! the tenant's uid, device threads started, each installing its filter) →
//! [`boot::pvh::check_kernel`] → [`memory::GuestRam`] (memfd, MAP_SHARED) →
//! [`vm::Vm`] (RAM slots, TSS, irqchip, PIT) → legacy devices (serial, power)
//! → virtio devices ([`net::attach::attach_nets`] through
//! [`vm::Vm::attach_virtio_mmio`]) → [`boot::pvh::load`]
//! (kernel, start info, memory map, command line) → [`vcpu::Vcpu`] set up
//! for the PVH entry → [`api`] thread → vCPU threads (each thread installs
//! its own filter first, [`sandbox::enter_thread`]) → the main thread's
//! `main` filter → wait for the first [`vm::ExitReason`] →
//! [`exit::teardown`] → exit with the reason's code (the table in [`exit`]).
//!
//! Pause/resume is [`control::RunControl`]; the machine's migratable state is
//! [`persist::MachineState`], read and written through [`persist::Machine`].

pub mod api;
pub mod boot;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod exit;
pub mod inputs;
pub mod kvm_blob;
pub mod memory;
pub mod migration;
pub mod net;
pub mod persist;
pub mod privileges;
pub mod ratelimit;
pub mod runtime;
pub mod sandbox;
pub mod vcpu;
pub mod vm;
