//! The floor of a migration switch-over on this host: what each step costs
//! with nothing of ours around it. Per phase, p50/p90/p99 over `--reps`
//! repetitions (at least 200):
//!
//! - (a) save: each KVM get ioctl of a one-vCPU machine built as the vmm
//!   builds it (in-kernel irqchip + PIT2, CPUID set, run briefly), and
//!   their sum per repetition;
//! - (b) restore: each matching set into a second, pre-built VM;
//! - (c) one UNIX-stream `sendmsg` to another process, one way (the sender's
//!   CLOCK_MONOTONIC before the send, the blocked receiver's on return);
//! - (d) a condition-variable wake between two threads (notify → waiter
//!   running);
//! - (e) a vCPU kick: `pthread_kill` with the vmm's kick signal (SIGRTMIN,
//!   no SA_RESTART) to a thread in KVM_RUN → KVM_RUN returns EINTR, for a
//!   halted guest (`sti; hlt`) and a spinning one (`jmp $`);
//! - (f) RON encode and decode of the machine state fixture
//!   of the format this build writes (`tests/fixtures/machine-state-X.Y.ron`)
//!   as `vmm::persist::MachineState`: the codec's (its compact reader)
//!   and, beside it, `ron` alone.
//!
//! `bench_floor [--reps N]` (default 1000), as root (or with /dev/kvm).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::migration::monotonic_ns;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_irqchip,
    kvm_msr_entry,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use tests::stats::percentile;
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestRam;
use vmm::vcpu::Vcpu;
use vmm::vm::Vm;

/// Real-mode code at 0x1000: mask both 8259s (so no interrupt comes on an
/// unprogrammed vector; the in-kernel PIC takes these writes), one write
/// to port 0x80 (an exit to userspace), then `sti; 1: hlt; jmp 1b` (halted
/// with interrupts on, inside the kernel, as an idle guest).
const HALT_CODE: &[u8] = &[
    0xb0, 0xff, // mov al, 0xff
    0xe6, 0x21, // out 0x21, al
    0xe6, 0xa1, // out 0xa1, al
    0xe6, 0x80, // out 0x80, al
    0xfb, // sti
    0xf4, // 1: hlt
    0xeb, 0xfd, // jmp 1b
];
const HALT_AT: u64 = 0x1000;
/// `jmp $` at 0x2000: a guest that keeps its vCPU busy.
const SPIN_CODE: &[u8] = &[0xeb, 0xfe];
const SPIN_AT: u64 = 0x2000;
const RAM: u64 = 16 << 20;

/// One table row: samples in microseconds.
struct Row {
    phase: &'static str,
    what: String,
    us: Vec<f64>,
}

fn row(phase: &'static str, what: impl Into<String>, us: Vec<f64>) -> Row {
    Row {
        phase,
        what: what.into(),
        us,
    }
}

/// Times `f` once, in microseconds.
fn time_us(f: impl FnOnce()) -> f64 {
    let t0 = Instant::now();
    f();
    t0.elapsed().as_secs_f64() * 1e6
}

// ------------------------------------------------------------ machine ---

/// A one-vCPU VM as the vmm builds it: RAM slots, TSS, identity map,
/// in-kernel irqchip and PIT2 ([`Vm::new`]), one vCPU with the vmm's CPUID.
/// Its vCPU starts in real mode at `rip` (CS base 0).
struct Machine {
    vm: Vm,
    vcpu: Vcpu,
}

fn machine(rip: u64) -> Machine {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let ram = GuestRam::new(RAM).expect("guest RAM");
    ram.memory
        .write_slice(HALT_CODE, GuestAddress(HALT_AT))
        .expect("write guest code");
    ram.memory
        .write_slice(SPIN_CODE, GuestAddress(SPIN_AT))
        .expect("write guest code");
    let vm = Vm::new(kvm, ram).expect("create the VM");
    let vcpu = Vcpu::new(&vm.fd, 0).expect("create the vCPU");
    vcpu.configure_cpuid(&vm.kvm, 1).expect("set CPUID");
    let mut sregs = vcpu.fd.get_sregs().expect("get sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.fd.get_regs().expect("get regs");
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.fd.set_regs(&regs).expect("set regs");
    Machine { vm, vcpu }
}

/// Runs the halting guest up to its port 0x80 write (it would halt next):
/// a vCPU that has run, with a pending I/O completion as a paused vmm vCPU
/// may have.
fn run_briefly(fd: &mut VcpuFd) {
    match fd.run() {
        Ok(VcpuExit::IoOut(0x80, _)) => {}
        other => panic!("guest: expected a write to port 0x80, got {other:?}"),
    }
}

fn msr_template(indices: &[u32]) -> Msrs {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).expect("MSR list")
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

/// The names of the KVM items, in the order (a) and (b) time them.
const ITEMS: [&str; 15] = [
    "regs",
    "sregs",
    "fpu",
    "xsave",
    "xcrs",
    "lapic",
    "msrs",
    "mp_state",
    "vcpu_events",
    "debugregs",
    "irqchip PIC master",
    "irqchip PIC slave",
    "irqchip IOAPIC",
    "pit2",
    "clock",
];

/// (a) and (b): every get on the source, every set into the pre-built
/// target, `reps` times each; the last row of each is the per-repetition sum.
fn kvm_state(reps: usize) -> Vec<Row> {
    let mut src = machine(HALT_AT);
    run_briefly(&mut src.vcpu.fd);
    let dst = machine(HALT_AT);
    let msr_list = Vcpu::saveable_msrs(&src.vm.kvm).expect("MSR list");
    let n = ITEMS.len();
    let mut get = vec![Vec::with_capacity(reps); n];
    let mut set = vec![Vec::with_capacity(reps); n];
    let (s, v) = (&src.vcpu.fd, &src.vm.fd);
    let (ds, dv) = (&dst.vcpu.fd, &dst.vm.fd);
    for _ in 0..reps {
        let mut t = Vec::with_capacity(n);
        let mut regs = None;
        t.push(time_us(|| regs = Some(s.get_regs().expect("get regs"))));
        let mut sregs = None;
        t.push(time_us(|| sregs = Some(s.get_sregs().expect("get sregs"))));
        let mut fpu = None;
        t.push(time_us(|| fpu = Some(s.get_fpu().expect("get fpu"))));
        let mut xsave = None;
        t.push(time_us(|| xsave = Some(s.get_xsave().expect("get xsave"))));
        let mut xcrs = None;
        t.push(time_us(|| xcrs = Some(s.get_xcrs().expect("get xcrs"))));
        let mut lapic = None;
        t.push(time_us(|| lapic = Some(s.get_lapic().expect("get lapic"))));
        let mut msrs = msr_template(&msr_list);
        t.push(time_us(|| {
            let got = s.get_msrs(&mut msrs).expect("get msrs");
            assert_eq!(got, msr_list.len(), "KVM read {got} MSRs");
        }));
        let mut mp = None;
        t.push(time_us(|| {
            mp = Some(s.get_mp_state().expect("get mp_state"))
        }));
        let mut events = None;
        t.push(time_us(|| {
            events = Some(s.get_vcpu_events().expect("get vcpu_events"))
        }));
        let mut debug = None;
        t.push(time_us(|| {
            debug = Some(s.get_debug_regs().expect("get debugregs"))
        }));
        let mut chips = [
            chip(KVM_IRQCHIP_PIC_MASTER),
            chip(KVM_IRQCHIP_PIC_SLAVE),
            chip(KVM_IRQCHIP_IOAPIC),
        ];
        for c in &mut chips {
            t.push(time_us(|| v.get_irqchip(c).expect("get irqchip")));
        }
        let mut pit = None;
        t.push(time_us(|| pit = Some(v.get_pit2().expect("get pit2"))));
        let mut clock = None;
        t.push(time_us(|| clock = Some(v.get_clock().expect("get clock"))));
        for (i, us) in t.into_iter().enumerate() {
            get[i].push(us);
        }

        let (regs, sregs, fpu) = (
            regs.expect("regs"),
            sregs.expect("sregs"),
            fpu.expect("fpu"),
        );
        let (xsave, xcrs, lapic) = (
            xsave.expect("xsave"),
            xcrs.expect("xcrs"),
            lapic.expect("lapic"),
        );
        let (mp, events, debug) = (mp.expect("mp"), events.expect("events"), debug.expect("dr"));
        let (pit, mut clock) = (pit.expect("pit"), clock.expect("clock"));
        clock.flags = 0;
        let mut t = Vec::with_capacity(n);
        t.push(time_us(|| ds.set_regs(&regs).expect("set regs")));
        t.push(time_us(|| ds.set_sregs(&sregs).expect("set sregs")));
        t.push(time_us(|| ds.set_fpu(&fpu).expect("set fpu")));
        t.push(time_us(|| {
            // SAFETY: the buffer came from KVM_GET_XSAVE of a vCPU with the
            // same CPUID, so its size is what KVM_SET_XSAVE reads.
            unsafe { ds.set_xsave(&xsave) }.expect("set xsave")
        }));
        t.push(time_us(|| ds.set_xcrs(&xcrs).expect("set xcrs")));
        t.push(time_us(|| ds.set_lapic(&lapic).expect("set lapic")));
        t.push(time_us(|| {
            let put = ds.set_msrs(&msrs).expect("set msrs");
            assert_eq!(put, msr_list.len(), "KVM set {put} MSRs");
        }));
        t.push(time_us(|| ds.set_mp_state(mp).expect("set mp_state")));
        t.push(time_us(|| {
            ds.set_vcpu_events(&events).expect("set vcpu_events")
        }));
        t.push(time_us(|| {
            ds.set_debug_regs(&debug).expect("set debugregs")
        }));
        for c in &chips {
            t.push(time_us(|| dv.set_irqchip(c).expect("set irqchip")));
        }
        t.push(time_us(|| dv.set_pit2(&pit).expect("set pit2")));
        t.push(time_us(|| dv.set_clock(&clock).expect("set clock")));
        for (i, us) in t.into_iter().enumerate() {
            set[i].push(us);
        }
    }
    let sum = |cols: &[Vec<f64>]| -> Vec<f64> {
        (0..reps).map(|r| cols.iter().map(|c| c[r]).sum()).collect()
    };
    let (get_sum, set_sum) = (sum(&get), sum(&set));
    let sync_regs = src.vm.kvm.check_extension(Cap::SyncRegs);
    println!(
        "bench_floor: KVM_CAP_SYNC_REGS {} (regs, sregs and events through kvm_run, no ioctl)",
        if sync_regs { "offered" } else { "not offered" }
    );
    let mut rows = Vec::new();
    for (i, us) in get.into_iter().enumerate() {
        rows.push(row("(a) save", format!("get {}", ITEMS[i]), us));
    }
    rows.push(row(
        "(a) save",
        format!("sum of the {n} gets ({} MSRs)", msr_list.len()),
        get_sum,
    ));
    for (i, us) in set.into_iter().enumerate() {
        rows.push(row("(b) restore", format!("set {}", ITEMS[i]), us));
    }
    rows.push(row("(b) restore", format!("sum of the {n} sets"), set_sum));
    rows
}

// ----------------------------------------------------------- sendmsg ---

/// What the sender puts first in each message: its length and the
/// sender's clock just before `sendmsg`.
const HEADER: usize = 16;

/// The receiver (a forked child): blocks in `recvmsg`, takes the clock
/// once a whole message is in, answers with the one-way latency (ns).
fn receiver(sock: OwnedFd) -> ! {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut have = 0usize;
        let mut want = HEADER;
        while have < want {
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf[have..])];
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                // SAFETY: _exit ends this forked child at once, running
                // nothing the parent's state could be inconsistent for.
                Err(_) => unsafe { libc::_exit(1) },
            };
            let bytes = msg.bytes;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: an fd just received, owned by nobody else.
                            unsafe { libc::close(fd) };
                        }
                    }
                }
            }
            if bytes == 0 {
                // SAFETY: as above; the parent closed its end, we are done.
                unsafe { libc::_exit(0) };
            }
            have += bytes;
            if have >= HEADER {
                let len = u64::from_le_bytes(buf[0..8].try_into().expect("8 bytes"));
                want = (len as usize).clamp(HEADER, buf.len());
            }
        }
        let now = monotonic_ns();
        let sent = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let reply = now.wrapping_sub(sent).to_le_bytes();
        let iov = [IoSlice::new(&reply)];
        if sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), None).is_err() {
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
    }
}

/// (c): one-way latency of one message of `size` bytes (with `fds`
/// attached) to a blocked receiver in another process.
fn unix_send(reps: usize) -> Vec<Row> {
    let (mine, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    // SAFETY: called before this process starts any thread (main runs this
    // first), so the child is a full copy; it only does syscalls and exits.
    let child = match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(mine);
            receiver(theirs)
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(theirs);
    let passed = std::fs::File::open("/dev/null").expect("open /dev/null");
    let mut rows = Vec::new();
    for (what, size, with_fd) in [
        ("sendmsg 64 B", 64usize, false),
        ("sendmsg 64 B + 1 fd", 64, true),
        ("sendmsg 10 KB", 10 << 10, false),
    ] {
        let mut msg = vec![0x5au8; size];
        msg[0..8].copy_from_slice(&(size as u64).to_le_bytes());
        let mut us = Vec::with_capacity(reps);
        for _ in 0..reps {
            // The receiver is blocked in recvmsg again by then.
            std::thread::sleep(Duration::from_micros(500));
            let fds = [passed.as_fd().as_raw_fd()];
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if with_fd { &rights } else { &[] };
            let t0 = monotonic_ns();
            msg[8..16].copy_from_slice(&t0.to_le_bytes());
            let iov = [IoSlice::new(&msg)];
            let n = sendmsg::<()>(mine.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
                .expect("sendmsg");
            assert_eq!(n, size, "a short send");
            let mut reply = [0u8; 8];
            let mut iov = [IoSliceMut::new(&mut reply)];
            let got = recvmsg::<()>(mine.as_raw_fd(), &mut iov, None, MsgFlags::MSG_WAITALL)
                .expect("the receiver's reply")
                .bytes;
            assert_eq!(got, 8, "the receiver died");
            us.push(u64::from_le_bytes(reply) as f64 / 1000.0);
        }
        rows.push(row("(c) message", what, us));
    }
    drop(mine);
    nix::sys::wait::waitpid(child, None).expect("reap the receiver");
    rows
}

// ------------------------------------------------------------ condvar ---

/// (d): notify → the waiting thread runs. The notifier then blocks for
/// the waiter's report (a spinning notifier could take the waiter's core).
fn condvar_wake(reps: usize) -> Vec<Row> {
    struct Shared {
        ready: Mutex<bool>,
        cv: Condvar,
    }
    let sh = Arc::new(Shared {
        ready: Mutex::new(false),
        cv: Condvar::new(),
    });
    let (woke_tx, woke_rx) = mpsc::channel::<u64>();
    let waiter = {
        let sh = sh.clone();
        std::thread::spawn(move || {
            loop {
                let mut g = sh.ready.lock().expect("lock");
                while !*g {
                    g = sh.cv.wait(g).expect("wait");
                }
                let t = monotonic_ns();
                *g = false;
                drop(g);
                if woke_tx.send(t).is_err() {
                    return;
                }
            }
        })
    };
    let mut us = Vec::with_capacity(reps);
    for _ in 0..reps {
        std::thread::sleep(Duration::from_micros(500));
        let t0 = monotonic_ns();
        *sh.ready.lock().expect("lock") = true;
        sh.cv.notify_one();
        let woke = woke_rx.recv().expect("the waiter's report");
        us.push(woke.saturating_sub(t0) as f64 / 1000.0);
    }
    drop(woke_rx);
    *sh.ready.lock().expect("lock") = true;
    sh.cv.notify_one();
    waiter.join().expect("waiter");
    vec![row("(d) wake", "condvar notify → waiter running", us)]
}

// --------------------------------------------------------------- kick ---

/// (e): `pthread_kill(SIGRTMIN)` → KVM_RUN returns EINTR, for a guest
/// halted with interrupts on and for one spinning.
fn vcpu_kick(reps: usize) -> Vec<Row> {
    vmm::control::install_kick_handler().expect("install the kick handler");
    let mut rows = Vec::new();
    for (what, rip) in [
        ("kick a halted vCPU → EINTR", HALT_AT),
        ("kick a spinning vCPU → EINTR", SPIN_AT),
    ] {
        let m = machine(rip);
        let entered = Arc::new(AtomicU64::new(0));
        let (returned_tx, returned) = mpsc::channel::<u64>();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (entered, stop) = (entered.clone(), stop.clone());
            let mut fd = m.vcpu.fd;
            std::thread::spawn(move || {
                loop {
                    entered.fetch_add(1, Ordering::SeqCst);
                    match fd.run() {
                        Ok(VcpuExit::IoOut(_, _)) => {}
                        Err(e) if e.errno() == libc::EINTR => {
                            let t = monotonic_ns();
                            if stop.load(Ordering::SeqCst) || returned_tx.send(t).is_err() {
                                return;
                            }
                        }
                        other => panic!("guest: unexpected {other:?}"),
                    }
                }
            })
        };
        let tid = thread.as_pthread_t();
        let mut us = Vec::with_capacity(reps);
        let mut lost = 0usize;
        while us.len() < reps {
            // Inside KVM_RUN (a kick before it would be lost) and settled.
            let seen = entered.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
            if seen == 0 || entered.load(Ordering::SeqCst) != seen {
                continue;
            }
            // A late report of a kick given up on below.
            while returned.try_recv().is_ok() {}
            let t0 = monotonic_ns();
            // SAFETY: `tid` is the live vCPU thread (joined only below); the
            // signal's handler is installed.
            unsafe { libc::pthread_kill(tid, vmm::control::kick_signal()) };
            // Blocking, not spinning: a spinning kicker could take the
            // vCPU thread's core.
            match returned.recv_timeout(Duration::from_millis(100)) {
                Ok(t) => us.push(t.saturating_sub(t0) as f64 / 1000.0),
                Err(_) => lost += 1,
            }
        }
        stop.store(true, Ordering::SeqCst);
        while !thread.is_finished() {
            // SAFETY: as above; the thread exits on the next EINTR.
            unsafe { libc::pthread_kill(tid, vmm::control::kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        thread.join().expect("vCPU thread");
        if lost > 0 {
            eprintln!("bench_floor: {what}: {lost} kicks found the thread outside KVM_RUN");
        }
        rows.push(row("(e) kick", what, us));
    }
    rows
}

// ---------------------------------------------------------------- RON ---

/// (f): the fixture's machine state through the codec, both ways.
fn ron_state(reps: usize) -> Vec<Row> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!(
            "machine-state-{}.ron",
            vmm::persist::MACHINE_STATE_FORMAT
        ));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let state: vmm::persist::MachineState =
        common::codec::decode(&text).expect("decode the fixture");
    let encoded = common::codec::encode(&state).expect("encode");
    let (mut enc, mut dec) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    let mut fast = Vec::with_capacity(reps);
    let mut by_ron = Vec::with_capacity(reps);
    assert!(
        common::codec::decode_compact::<vmm::persist::MachineState>(&encoded).is_some(),
        "the codec's compact reader refuses the state"
    );
    for _ in 0..reps {
        let mut out = String::new();
        enc.push(time_us(|| {
            out = common::codec::encode(&state).expect("encode")
        }));
        std::hint::black_box(&out);
        fast.push(time_us(|| {
            out = common::codec::encode_unescaped(&state).expect("encode")
        }));
        std::hint::black_box(&out);
        let mut back = None;
        dec.push(time_us(|| {
            back = Some(
                common::codec::decode::<vmm::persist::MachineState>(encoded.as_bytes())
                    .expect("decode"),
            )
        }));
        std::hint::black_box(&back);
        by_ron.push(time_us(|| {
            back =
                Some(ron::from_str::<vmm::persist::MachineState>(&encoded).expect("decode by ron"))
        }));
        std::hint::black_box(&back);
    }
    let size = format!("{:.1} KB", encoded.len() as f64 / 1000.0);
    vec![
        row("(f) RON", format!("encode MachineState ({size})"), enc),
        row(
            "(f) RON",
            format!("encode_unescaped (the State's; {size})"),
            fast,
        ),
        row("(f) RON", format!("decode MachineState ({size})"), dec),
        row("(f) RON", format!("decode, ron alone ({size})"), by_ron),
    ]
}

fn main() {
    let usage = "usage: bench_floor [--reps N] (N >= 200)";
    let mut reps = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--reps", Some(n)) if n >= 200 => reps = n,
            _ => {
                eprintln!("{usage}");
                std::process::exit(2);
            }
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    // The fork comes first, while this process has one thread.
    let mut rows = unix_send(reps);
    let mut all = kvm_state(reps);
    all.append(&mut rows);
    all.extend(condvar_wake(reps));
    all.extend(vcpu_kick(reps));
    all.extend(ron_state(reps));

    println!(
        "bench_floor: {reps} reps per row, load average {load} before, {} after",
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".into())
    );
    println!(
        "{:<12} {:<40} {:>9} {:>9} {:>9}",
        "phase", "what", "p50 (µs)", "p90 (µs)", "p99 (µs)"
    );
    for r in &all {
        println!(
            "{:<12} {:<40} {:>9.2} {:>9.2} {:>9.2}",
            r.phase,
            r.what,
            percentile(&r.us, 0.5),
            percentile(&r.us, 0.9),
            percentile(&r.us, 0.99)
        );
    }
}
