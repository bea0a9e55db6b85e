//! Building a VM, two ways, sharing every step they have in common (as
//! Firecracker's `builder.rs` does): [`build_for_boot`] loads a kernel,
//! [`build_for_incoming`] takes a running guest from a source vmm (see
//! [`crate::migration::target`]). Both return a [`Vmm`], whose
//! [`Vmm::wait`] is the rest of the process's life. `main.rs` only parses
//! the command line and maps the outcome to an exit code.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use common::api::RunState;
use common::listener::Listener;
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::api::{self, ApiContext, ApiError};
use crate::api_gate::ApiGate;
use crate::boot::firmware::Firmware;
use crate::boot::pvh::{self, BootError};
use crate::boot_helper::{BootHelper, PitPending};
use crate::config::{ConfigError, SerialTarget, VmConfig};
use crate::control::{self, RunControl};
use crate::devices::power::{DEBUG_EXIT_PORT, DebugExit, I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN, SerialDevice};
use crate::devices::virtio::net::device::RELAY_VHOST_USER;
use crate::devices::virtio::net::event_handler::ThreadHook;
use crate::exit::{self, SignalWatch};
use crate::inputs;
use crate::machine::Machine;
use crate::memory::{self, GuestRam, MemoryError};
use crate::migration::source::MigrationWorker;
use crate::net::attach::{self as net_attach, NetAttachError, OpenedNet};
use crate::net::config::NetConfig;
use crate::net::netd_client;
use crate::runtime::Runtime;
use crate::sandbox::{self, SandboxError, ThreadKind};
use crate::vcpu::{self, Vcpu, VcpuCaps, VcpuError};
use crate::vm::{self, ExitReason, ExitSender, Vm, VmError, VmShell};
use jail::privileges::{self, PrivilegeError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Privilege(#[from] PrivilegeError),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("--vcpus {asked} is too many: this host's KVM allows at most {max}")]
    KvmVcpus { asked: u8, max: usize },
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
    #[error("{what}: {err}")]
    Io {
        what: &'static str,
        err: std::io::Error,
    },
}

impl BuildError {
    /// Bad input from the user is 2; everything else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Config(_)
            | BuildError::KvmVcpus { .. }
            | BuildError::Privilege(PrivilegeError::RootWithoutUser)
            | BuildError::Privilege(PrivilegeError::RootTarget)
            | BuildError::Memory(MemoryError::TooLarge { .. })
            | BuildError::Serial { .. }
            | BuildError::Api(ApiError::Bind { .. }) => 2,
            BuildError::Net(e) if e.is_bad_input() => 2,
            BuildError::Boot(e) if e.is_bad_input() => 2,
            _ => 1,
        }
    }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |err| BuildError::Io { what, err }
}

/// A built VM with its threads running (or parked, for a paused guest).
pub struct Vmm {
    pub runtime: Arc<Runtime>,
    exit_rx: Receiver<ExitReason>,
    vcpu_threads: Vec<JoinHandle<()>>,
    /// The API socket path this process serves (created, or adopted in a
    /// migration): removed at exit unless a target takes it over.
    api_socket: Option<PathBuf>,
    /// Where SIGTERM/SIGINT go.
    signals: SignalWatch,
    /// The API socket was the source's, taken over in a migration.
    adopted_api: bool,
}

/// Opens /dev/kvm, drops to the user and locks the process down (Landlock,
/// capabilities, no_new_privs, the `setup` seccomp filter), then starts the
/// thread that turns SIGTERM/SIGINT into an exit reason.
fn enter_sandbox(cfg: &VmConfig) -> Result<(Kvm, SignalWatch), BuildError> {
    cfg.check_files()?;
    privileges::check_invocation(cfg.user)?;
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let max = kvm.get_max_vcpus();
    if usize::from(cfg.vcpus) > max {
        return Err(BuildError::KvmVcpus {
            asked: cfg.vcpus,
            max,
        });
    }
    // The bounding set needs CAP_SETPCAP, which the uid drop takes away.
    sandbox::drop_bounding_set();
    if let Some((uid, gid)) = cfg.user {
        privileges::drop_to(uid, gid)?;
    }
    let report = sandbox::lock_down(&sandbox::Plan::for_config(cfg))?;
    log::info!("sandbox: {report:?}");
    let signals = SignalWatch::start().map_err(io_err("start the signal thread"))?;
    Ok((kvm, signals))
}

/// Device threads inherit the sandbox and narrow it to their own filter
/// (a vhost-user NIC's relay to the one that may reconnect).
fn device_hook() -> ThreadHook {
    Arc::new(|name: &str| {
        let kind = if name == RELAY_VHOST_USER {
            ThreadKind::VhostUserRelay
        } else {
            ThreadKind::Device
        };
        sandbox::enter_thread_or_exit(kind)
    })
}

/// Boots `cfg.kernel`.
pub fn build_for_boot(cfg: &VmConfig, started: Instant) -> Result<Vmm, BuildError> {
    let (kvm, signals) = enter_sandbox(cfg)?;
    // Asked while the VM is built; the vCPU set-up waits for it.
    let helper = BootHelper::start(&kvm).map_err(io_err("start the boot helper thread"))?;
    // TAPs come from netd as the tenant's uid. The device threads start
    // now, before any vCPU can activate a device.
    let nets = net_attach::open_nets(&cfg.nets, Some(device_hook()))?;
    // Bad kernels fail before a VM exists (tearing one down costs ~20 ms).
    pvh::check_inputs(&cfg.kernel, cfg.initrd.as_deref(), cfg.memory)?;
    memory::check_host_limit(cfg.memory)?;
    let api = bind_api(cfg)?;
    if let ApiSocket::Own(_, path) = &api {
        signals.remove_on_early_exit(path);
    }
    let ram = GuestRam::new(cfg.memory)?;
    let mut vm = Vm::new_without_pit(kvm, ram)?;
    let helper = helper.create_pit(&vm.fd);
    let (exit_tx, exit_rx) = vm::exit_channel();
    signals.deliver_to(exit_tx.clone());
    let serial = add_legacy_devices(&mut vm, open_serial(cfg)?, &exit_tx)?;
    let nets = net_attach::attach_nets(&mut vm, nets)?;

    let mut cmdline = cfg.cmdline.clone();
    for extra in &vm.cmdline_extra {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    let vcpus = (0..cfg.vcpus)
        .map(|i| Vcpu::new(&vm.fd, i))
        .collect::<Result<Vec<_>, _>>()?;
    helper.wait_cpuid();
    // The tables describe the devices in the slots they were given.
    let slots = nets.iter().map(|n| n.slot).collect();
    let firmware =
        Firmware::for_vm(&vm.kvm, u32::from(cfg.vcpus), slots).map_err(BootError::from)?;
    let entry = pvh::load(
        &vm.ram,
        &cfg.kernel,
        cfg.initrd.as_deref(),
        &cmdline,
        &firmware,
    )?;
    // The boot processor starts at the PVH entry; the others wait in KVM
    // for the guest's INIT and SIPI.
    for v in &vcpus {
        if v.id == 0 {
            v.configure_pvh(&vm.kvm, &vm.ram.memory, entry, cfg.vcpus)?;
        } else {
            v.configure_ap(&vm.kvm, cfg.vcpus)?;
        }
    }
    let parts = Parts {
        vm,
        vcpus,
        serial,
        nets,
        exit_tx,
        exit_rx,
    };
    wait_pit(helper)?;
    let vmm = launch(parts, api, signals, RunState::Running, started)?;
    enter_main_filter()?;
    log::info!("guest started after {:?}", started.elapsed());
    Ok(vmm)
}

fn wait_pit(helper: PitPending) -> Result<(), BuildError> {
    match helper.wait_pit() {
        Ok(r) => Ok(r?),
        Err(_) => Err(BuildError::Io {
            what: "create the PIT",
            err: std::io::Error::other("the boot helper thread panicked"),
        }),
    }
}

/// Where the API is served from.
enum ApiSocket {
    None,
    /// `--api-socket`, bound by this process.
    Own(Listener, PathBuf),
    /// The source's listening socket, taken over in a migration.
    Adopted(Listener),
}

fn bind_api(cfg: &VmConfig) -> Result<ApiSocket, BuildError> {
    Ok(match &cfg.api_socket {
        Some(p) => ApiSocket::Own(api::bind(p)?, p.clone()),
        None => ApiSocket::None,
    })
}

fn open_serial(cfg: &VmConfig) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match &cfg.serial {
        // A duplicate of fd 1 as a File: unbuffered, each guest byte is
        // written at once.
        SerialTarget::Stdout => Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|err| BuildError::Serial {
                    path: "stdout".into(),
                    err,
                })?,
        )),
        SerialTarget::File(p) => {
            Box::new(
                inputs::open_serial(p, true).map_err(|err| BuildError::Serial {
                    path: p.display().to_string(),
                    err,
                })?,
            )
        }
    })
}

/// Serial on 0x3f8 (IRQ 4 by irqfd) and the two power-off ports.
fn add_legacy_devices(
    vm: &mut Vm,
    out: Box<dyn Write + Send>,
    exit: &ExitSender,
) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("create the serial irqfd"))?;
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

/// A complete machine, not yet running.
struct Parts {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    nets: Vec<net_attach::NetAttachment>,
    exit_tx: ExitSender,
    exit_rx: Receiver<ExitReason>,
}

/// Starts the machine's threads: the vCPUs (parked unless `state` is
/// Running), the migration worker, the API. The caller is still under the `setup`
/// filter (these are the last threads this process creates).
fn launch(
    mut p: Parts,
    api: ApiSocket,
    signals: SignalWatch,
    state: RunState,
    started: Instant,
) -> Result<Vmm, BuildError> {
    control::install_kick_handler().map_err(io_err("install the vCPU kick handler"))?;
    // A migration target's vCPUs park at once, until the commit.
    let ctl = Arc::new(if state == RunState::Running {
        RunControl::new()
    } else {
        RunControl::new_paused()
    });
    let pio = Arc::new(std::mem::take(&mut p.vm.pio));
    let mmio = Arc::new(std::mem::take(&mut p.vm.mmio));
    let vcpu_activity = p.vcpus.iter().map(|v| v.activity.clone()).collect();
    let vcpus: Vec<Arc<Mutex<Vcpu>>> = p
        .vcpus
        .into_iter()
        .map(|v| Arc::new(Mutex::new(v)))
        .collect();
    // The vCPUs first: on a boot the guest's first instruction should not
    // wait for the rest (the other threads' start-up, KVM queries).
    let mut vcpu_threads = Vec::new();
    for v in &vcpus {
        vcpu_threads.push(vcpu::spawn(
            v.clone(),
            pio.clone(),
            mmio.clone(),
            ctl.clone(),
            p.exit_tx.clone(),
        )?);
    }
    let vcpu_caps = VcpuCaps {
        several: vcpus.len() > 1,
        ..VcpuCaps::of(&p.vm.kvm)?
    };
    let machine = Arc::new(Machine {
        vm: Arc::new(p.vm),
        vcpus,
        vcpu_activity,
        serial: p.serial,
        vcpu_caps,
        nets: p.nets,
    });
    let adopted_api = matches!(api, ApiSocket::Adopted(_));
    let (listener, own_path) = match api {
        ApiSocket::None => (None, None),
        ApiSocket::Own(l, path) => (Some(l), Some(path)),
        // Removed at exit like an own one (where Landlock lets this
        // process: the target's sockets live beside its --incoming path).
        ApiSocket::Adopted(l) => {
            let path = l.path().to_path_buf();
            (Some(l), Some(path).filter(|p| !p.as_os_str().is_empty()))
        }
    };
    let api_dup: Option<OwnedFd> = match &listener {
        Some(l) => Some(
            l.as_fd()
                .try_clone_to_owned()
                .map_err(io_err("duplicate the API socket"))?,
        ),
        None => None,
    };
    // Only the owner of the guest answers: a migration target opens the
    // gate once it took the guest.
    let gate = Arc::new(ApiGate::new(state == RunState::Running));
    let runtime = Arc::new(Runtime::new(
        machine.clone(),
        ctl.clone(),
        p.exit_tx.clone(),
        started,
        api_dup,
        gate,
        state,
    ));
    let worker = Arc::new(
        MigrationWorker::spawn(runtime.clone()).map_err(io_err("start the migration thread"))?,
    );
    if let Some(l) = listener {
        api::spawn(
            l,
            ApiContext {
                runtime: runtime.clone(),
                migration: worker,
            },
        )?;
    }
    Ok(Vmm {
        runtime,
        exit_rx: p.exit_rx,
        vcpu_threads,
        api_socket: own_path,
        signals,
        adopted_api,
    })
}

fn enter_main_filter() -> Result<(), BuildError> {
    // Every thread runs under its own filter now; main only waits.
    Ok(sandbox::enter_thread(ThreadKind::Main)?)
}

/// A NIC of a migration target before the source's Hello: its config
/// and, on the classic path, the TAP netd gave this process; with backend
/// transfer and vhost, this process's own vhost-net fds (a vhost device is
/// bound to the process that owns it, so the source's cannot move).
struct PendingNet {
    config: NetConfig,
    own_tap: Option<netd_client::TapFds>,
    own_vhost: Vec<OwnedFd>,
}

/// A migration target before its source said Hello: sandboxed, with
/// everything built that does not need the guest (the KVM VM without RAM,
/// the vCPUs with their CPUID, the serial output, TAPs or vhost fds of its
/// own from netd, its own API socket). The rest comes with
/// [`IncomingShell::build`] once the source's fds are checked.
pub struct IncomingShell {
    pub signals: SignalWatch,
    shell: VmShell,
    vcpus: Vec<Vcpu>,
    serial_out: Box<dyn Write + Send>,
    pending: Vec<PendingNet>,
    own_api: ApiSocket,
    started: Instant,
}

/// A NIC's datapath as a migration brings it.
pub enum ArrivedNet {
    /// The source's TAP queue fds (backend transfer).
    Taps(Vec<OwnedFd>),
    /// This process's own TAP from netd (the classic path).
    OwnTap,
    /// The source's connection to the vhost-user backend; `None` when the
    /// backend was away (this process connects when the guest resumes).
    VhostUser(Option<OwnedFd>),
}

/// What a source sent that a target's machine is built on, each fd
/// already checked by the protocol side.
pub struct Arrived {
    /// Guest RAM: the source's memfd.
    pub memfd: File,
    /// Per NIC in slot order: its MAC, and what its datapath is built on.
    pub nets: Vec<([u8; 6], ArrivedNet)>,
    /// The source's listening API socket, to serve if this process was
    /// started without `--api-socket`.
    pub api_listener: Option<UnixListener>,
}

impl IncomingShell {
    pub fn new(cfg: &VmConfig, started: Instant) -> Result<Self, BuildError> {
        let (kvm, signals) = enter_sandbox(cfg)?;
        let configs = cfg.nets.clone();
        // Before any source connects: the classic path (backend-transfer=off)
        // gets a TAP of its own from netd, and backend transfer with vhost
        // gets vhost-net fds; plain backend transfer does not ask netd.
        let mut pending = Vec::with_capacity(configs.len());
        for config in configs {
            let netd = |err| NetAttachError::Netd {
                id: config.id.clone(),
                err: Box::new(err),
            };
            let (own_tap, own_vhost) = match (config.backend_transfer, config.vhost) {
                (false, _) => (
                    Some(netd_client::open_tap_for(&config).map_err(netd)?),
                    vec![],
                ),
                (true, true) => (None, netd_client::open_vhost_for(&config).map_err(netd)?),
                (true, false) => (None, vec![]),
            };
            pending.push(PendingNet {
                config,
                own_tap,
                own_vhost,
            });
        }
        memory::check_host_limit(cfg.memory)?;
        let shell = VmShell::new(kvm)?;
        // The CPUID a boot would give: the same as the source's on this
        // host, so the restore (on the downtime path) need not set it again.
        let vcpus = (0..cfg.vcpus)
            .map(|i| {
                let v = Vcpu::new(&shell.fd, i)?;
                v.configure_cpuid(&shell.kvm, cfg.vcpus)?;
                Ok(v)
            })
            .collect::<Result<Vec<_>, VcpuError>>()?;
        let serial_out = open_serial(cfg)?;
        let own_api = bind_api(cfg)?;
        if let ApiSocket::Own(_, path) = &own_api {
            signals.remove_on_early_exit(path);
        }
        Ok(IncomingShell {
            signals,
            shell,
            vcpus,
            serial_out,
            pending,
            own_api,
            started,
        })
    }

    /// The `--net` configurations, in slot order.
    pub fn net_configs(&self) -> Vec<NetConfig> {
        self.pending.iter().map(|p| p.config.clone()).collect()
    }

    /// The API socket this process bound itself (`--api-socket`), if any.
    pub fn own_api_socket(&self) -> Option<&std::path::Path> {
        match &self.own_api {
            ApiSocket::Own(_, p) => Some(p),
            _ => None,
        }
    }

    /// Builds the machine on what the source sent: maps the memfd and
    /// registers it with KVM, attaches the devices (on the transferred TAP
    /// fds, or this process's own) with their ioeventfds and irqfds, and
    /// starts every thread parked, the API gate closed. The guest runs on
    /// at the source all the while.
    pub fn build(self, cfg: &VmConfig, arrived: Arrived) -> Result<Vmm, BuildError> {
        let api = match (self.own_api, arrived.api_listener) {
            (ApiSocket::None, Some(l)) => ApiSocket::Adopted(api::adopt(l)?),
            // Started with --api-socket: the source's socket is not needed.
            (own, _) => own,
        };
        let ram = GuestRam::from_memfd(Arc::new(arrived.memfd), cfg.memory)?;
        let mut vm = self.shell.with_ram(ram)?;
        let (exit_tx, exit_rx) = vm::exit_channel();
        let serial = add_legacy_devices(&mut vm, self.serial_out, &exit_tx)?;
        let mut opened = Vec::with_capacity(self.pending.len());
        for (p, (mac, arrived)) in self.pending.into_iter().zip(arrived.nets) {
            let mut config = p.config;
            config.mac = Some(mac);
            let (tap, taps, vhost) = match arrived {
                ArrivedNet::VhostUser(conn) => {
                    opened.push(OpenedNet::inherit_vhost_user(
                        config,
                        conn,
                        Some(device_hook()),
                    )?);
                    continue;
                }
                ArrivedNet::Taps(taps) => (config.id.clone(), taps, p.own_vhost),
                ArrivedNet::OwnTap => {
                    let own = p.own_tap.ok_or_else(|| NetAttachError::NoTap {
                        id: config.id.clone(),
                    })?;
                    (own.name, own.taps, own.vhost)
                }
            };
            let net = OpenedNet::from_fds(config, tap, taps, vhost, Some(device_hook()))?;
            opened.push(net);
        }
        let nets = net_attach::attach_nets(&mut vm, opened)?;
        let parts = Parts {
            vm,
            vcpus: self.vcpus,
            serial,
            nets,
            exit_tx,
            exit_rx,
        };
        launch(parts, api, self.signals, RunState::Migrating, self.started)
    }
}

impl Vmm {
    pub fn signals(&self) -> &SignalWatch {
        &self.signals
    }

    /// This process serves the API socket a migration source handed over.
    pub fn takes_api_socket(&self) -> bool {
        self.adopted_api
    }

    /// Waits for the first exit reason, then ends the threads in order.
    pub fn wait(self) -> ExitReason {
        // A closed channel cannot happen while the runtime holds a sender;
        // treat it as a failure rather than a clean power-off just in case.
        let reason = self.exit_rx.recv().unwrap_or(ExitReason::VcpuFailed {
            vcpu: 0,
            message: "exit channel closed".into(),
        });
        // An outgoing migration in flight is settled first: the guest is
        // taken back (it stops with this process) unless the target owns it.
        let keep_api = self.runtime.settle_for_exit();
        // After a migration the target serves the API socket: leave it.
        let api_socket = self.api_socket.as_deref().filter(|_| !keep_api);
        exit::teardown(api_socket, &self.runtime.control, &self.vcpu_threads);
        reason
    }
}
