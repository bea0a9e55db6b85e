//! vmm: boots a guest under KVM as an unprivileged user.
//!
//! The flow, in order: parse → open /dev/kvm → drop to the user → build the
//! VM (RAM, devices, kernel) → start threads (API, vCPUs) → wait for the
//! first exit reason. The sandbox hooks in right after the user drop.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::exit;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm::api::{self, ApiContext, ApiError};
use vmm::boot::pvh::{self, BootError};
use vmm::config::{ConfigError, SerialTarget, USAGE, VmConfig};
use vmm::control::{self, RunControl};
use vmm::devices::power::{DEBUG_EXIT_PORT, DebugExit, I8042, I8042_PORT, I8042_PORT_LEN};
use vmm::devices::serial::{SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN, SerialDevice};
use vmm::devices::virtio::net::event_handler::ThreadHook;
use vmm::exit::{self as vm_exit, SignalWatch};
use vmm::inputs;
use vmm::memory::{self, GuestRam, MemoryError};
use vmm::net::attach::{self as net_attach, NetAttachError};
use vmm::persist::Machine;
use vmm::privileges::{self, PrivilegeError};
use vmm::sandbox::{self, SandboxError, ThreadKind};
use vmm::vcpu::{self, Vcpu, VcpuError};
use vmm::vm::{self, ExitReason, Vm, VmError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Privilege(#[from] PrivilegeError),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    Net(#[from] NetAttachError),
    #[error("serial output {path}: {err}")]
    Serial { path: String, err: std::io::Error },
    #[error("{0} is not supported by this build yet")]
    NotYet(&'static str),
    #[error("{what}: {err}")]
    Io {
        what: &'static str,
        err: std::io::Error,
    },
}

impl StartError {
    /// Bad input from the user is 2; everything else 1.
    fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_)
            | StartError::Privilege(PrivilegeError::RootWithoutUser)
            | StartError::Privilege(PrivilegeError::RootTarget)
            | StartError::Memory(MemoryError::TooLarge { .. })
            | StartError::Serial { .. }
            | StartError::NotYet(_)
            | StartError::Api(ApiError::Bind { .. }) => 2,
            StartError::Net(e) if e.is_bad_input() => 2,
            StartError::Boot(BootError::Write(_)) => 1,
            StartError::Boot(_) => 2,
            _ => 1,
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cfg = match VmConfig::parse(std::env::args_os().skip(1)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => {
            println!("{USAGE}");
            exit(0);
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            exit(2);
        }
    };
    match run(cfg) {
        Ok(ExitReason::VcpuFailed { vcpu, message }) => {
            eprintln!("vmm: vCPU {vcpu}: {message}");
            exit(1);
        }
        Ok(reason) => {
            log::info!("VM stopped: {reason:?}");
            exit(reason.exit_code());
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            exit(e.exit_code());
        }
    }
}

fn run(cfg: VmConfig) -> Result<ExitReason, StartError> {
    let started = Instant::now();
    cfg.check_files()?;
    privileges::check_invocation(cfg.user)?;
    if cfg.incoming.is_some() {
        return Err(StartError::NotYet("--incoming"));
    }
    let kvm = Kvm::new().map_err(StartError::Kvm)?;
    // The bounding set needs CAP_SETPCAP, which the uid drop takes away.
    sandbox::drop_bounding_set();
    if let Some((uid, gid)) = cfg.user {
        privileges::drop_to(uid, gid)?;
    }
    let report = sandbox::lock_down(&sandbox::Plan::for_config(&cfg))?;
    log::info!("sandbox: {report:?}");
    let signals = SignalWatch::start().map_err(|err| StartError::Io {
        what: "start the signal thread",
        err,
    })?;
    // TAPs come from netd as the tenant's uid. The device threads start
    // now, before any vCPU can activate a device: they inherit the sandbox
    // (setup filter, Landlock, no_new_privs) and narrow it to their own.
    let device_hook: ThreadHook =
        Arc::new(|_name: &str| sandbox::enter_thread_or_exit(ThreadKind::Device));
    let nets = net_attach::open_nets(&cfg.nets, Some(device_hook))?;

    // Bad kernels fail before a VM exists (tearing one down costs ~20 ms here).
    pvh::check_kernel(&cfg.kernel, cfg.memory)?;
    memory::check_host_limit(cfg.memory)?;
    let ram = GuestRam::new(cfg.memory)?;
    let mut vm = Vm::new(kvm, ram)?;
    let (exit_tx, exit_rx) = vm::exit_channel();
    signals.deliver_to(exit_tx.clone());
    let serial = add_legacy_devices(&mut vm, &cfg, &exit_tx)?;
    // Virtio devices attach here (Vm::attach_virtio_mmio) before the
    // command line is written.
    let nets = net_attach::attach_nets(&mut vm, nets)?;

    let mut cmdline = cfg.cmdline.clone();
    for extra in &vm.cmdline_extra {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    let entry = pvh::load(&vm.ram, &cfg.kernel, &cmdline)?;
    let boot_vcpu = Vcpu::new(&vm, 0)?;
    boot_vcpu.configure_pvh(&vm.kvm, &vm.ram.memory, entry)?;

    control::install_kick_handler().map_err(|err| StartError::Io {
        what: "install the vCPU kick handler",
        err,
    })?;
    let ctl = Arc::new(RunControl::new());
    let pio = Arc::new(std::mem::take(&mut vm.pio));
    let mmio = Arc::new(std::mem::take(&mut vm.mmio));
    let msrs = Vcpu::saveable_msrs(&vm.kvm)?;
    let machine = Arc::new(Machine {
        vm: Arc::new(vm),
        vcpus: vec![Arc::new(Mutex::new(boot_vcpu))],
        serial,
        msrs,
        nets,
    });
    if let Some(path) = &cfg.api_socket {
        api::start(
            path,
            ApiContext {
                control: ctl.clone(),
                exit: exit_tx.clone(),
                vcpus: cfg.vcpus,
                memory_bytes: cfg.memory,
                started,
                machine: machine.clone(),
            },
        )?;
    }
    let mut threads = Vec::new();
    for v in &machine.vcpus {
        threads.push(vcpu::spawn(
            v.clone(),
            pio.clone(),
            mmio.clone(),
            ctl.clone(),
            exit_tx.clone(),
        )?);
    }
    // Every thread runs under its own filter now; main only waits.
    sandbox::enter_thread(ThreadKind::Main)?;
    log::info!("guest started after {:?}", started.elapsed());

    // A closed channel cannot happen while exit_tx lives here; treat it as
    // a failure rather than a clean power-off just in case.
    let reason = exit_rx.recv().unwrap_or(ExitReason::VcpuFailed {
        vcpu: 0,
        message: "exit channel closed".into(),
    });
    vm_exit::teardown(cfg.api_socket.as_deref(), &ctl, &threads);
    Ok(reason)
}

/// Serial on 0x3f8 (IRQ 4 by irqfd) and the two power-off ports.
fn add_legacy_devices(
    vm: &mut Vm,
    cfg: &VmConfig,
    exit: &vm::ExitSender,
) -> Result<Arc<Mutex<SerialDevice>>, StartError> {
    let out: Box<dyn Write + Send> = match &cfg.serial {
        // A duplicate of fd 1 as a File: unbuffered, each guest byte is
        // written at once.
        SerialTarget::Stdout => Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|err| StartError::Serial {
                    path: "stdout".into(),
                    err,
                })?,
        )),
        SerialTarget::File(p) => {
            Box::new(
                inputs::open_serial(p, true).map_err(|err| StartError::Serial {
                    path: p.display().to_string(),
                    err,
                })?,
            )
        }
    };
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|err| StartError::Io {
        what: "create the serial irqfd",
        err,
    })?;
    vm.register_irqfd(&irq, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, out)));
    vm.pio
        .insert(SERIAL_PORT, SERIAL_PORT_LEN, serial.clone())
        .map_err(VmError::from)?;
    vm.pio
        .insert(
            DEBUG_EXIT_PORT,
            1,
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        )
        .map_err(VmError::from)?;
    vm.pio
        .insert(
            I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )
        .map_err(VmError::from)?;
    Ok(serial)
}
