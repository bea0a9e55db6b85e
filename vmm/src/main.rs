//! vmm: boots a guest under KVM as an unprivileged user, or takes one over
//! from another vmm (`--incoming`), or writes the firmware tables a VM
//! would get (`--dump-acpi`). A thin front end: the library's
//! [`vmm::builder`] builds the VM; this maps the outcome to an exit code.

use std::process::exit;
use std::time::Instant;

use vmm::builder;
use vmm::config::{Invocation, VmConfig};
use vmm::migration::target;
use vmm::vm::ExitReason;

fn main() {
    let started = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cfg = match VmConfig::parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Run(cfg)) => cfg,
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            exit(0);
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            exit(cli::EXIT_USAGE.into());
        }
    };
    if let Some(dir) = &cfg.dump_acpi {
        // Tables only: no guest, no KVM, no netd.
        match vmm::boot::dump::dump_acpi(&cfg, dir) {
            Ok(_) => exit(0),
            Err(e) => {
                eprintln!("vmm: {e}");
                exit(2);
            }
        }
    }
    let built = if cfg.incoming.is_some() {
        target::receive(&cfg, started).map_err(|e| (e.to_string(), e.exit_code()))
    } else {
        builder::build_for_boot(&cfg, started).map_err(|e| (e.to_string(), e.exit_code()))
    };
    let vmm = match built {
        Ok(v) => v,
        Err((e, code)) => {
            eprintln!("vmm: {e}");
            exit(code);
        }
    };
    let reason = vmm.wait();
    match &reason {
        ExitReason::VcpuFailed { vcpu, message } => eprintln!("vmm: vCPU {vcpu}: {message}"),
        ExitReason::MigrationLost { reason } => {
            eprintln!("vmm: migration: {reason}")
        }
        r => log::info!("VM stopped: {r:?}"),
    }
    exit(reason.exit_code());
}
