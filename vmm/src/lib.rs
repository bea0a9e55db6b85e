//! The unprivileged VMM as a library: the `vmm` binary is a thin front end
//! over [`builder`], and tests and fuzz targets reach the devices directly.
//!
//! A boot ([`builder::build_for_boot`]), in order: [`config`] parses the
//! command line (`args_os`) and checks the kinds of the files it names
//! ([`inputs`]) → [`jail::privileges::check_invocation`] → open /dev/kvm →
//! [`sandbox::drop_bounding_set`] → [`jail::privileges::drop_to`] →
//! [`sandbox::lock_down`] (capabilities, no_new_privs, Landlock, the `setup`
//! seccomp filter) → [`exit::SignalWatch`] (SIGTERM/SIGINT blocked, one
//! thread takes them) → [`net::attach::open_nets`] (TAPs from netd as the
//! tenant's uid, device threads started, each installing its filter) →
//! [`boot::pvh::check_inputs`] → [`memory::GuestRam`] (memfd, MAP_SHARED) →
//! [`vm::Vm`] (RAM slots, TSS, irqchip, PIT) → legacy devices (serial,
//! power) → virtio devices ([`net::attach::attach_nets`] through
//! [`vm::Vm::attach_virtio_mmio`]) → [`boot::pvh::load`] (kernel, start
//! info, memory map, command line, initrd, firmware tables from
//! [`boot::firmware`]) → [`vcpu::Vcpu`] set up for the PVH
//! entry (KVM's supported CPUID and the PIT asked meanwhile on one
//! short-lived thread, [`boot_helper`]) → the vCPU threads, the migration thread, the
//! [`api`] thread (each installs its own filter first,
//! [`sandbox::enter_thread`]) → the main
//! thread's `main` filter → wait for the first [`vm::ExitReason`] →
//! [`exit::teardown`] → exit with the reason's code (the table in [`exit`]).
//!
//! An incoming migration ([`builder::build_for_incoming`]) shares those
//! steps, but builds a [`vm::VmShell`] and listens; the RAM, the devices
//! and the threads come once a source says Hello, and the state is restored
//! into them ([`migration::target`]).
//!
//! The run state (pause, resume, a migration's hold) is owned by
//! [`runtime::Runtime`]; the machine's migratable state is
//! [`persist::MachineState`], which [`machine::Machine`] saves and restores
//! part by part, each through its [`persist::Persist`] impl.

pub mod api;
pub mod api_gate;
pub mod boot;
pub mod boot_helper;
pub mod builder;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod inputs;
pub mod kvm_blob;
pub mod kvm_cpuid;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod net;
pub mod persist;
pub mod runtime;
pub mod sandbox;
pub mod thread_start;
pub mod vcpu;
pub mod vm;
