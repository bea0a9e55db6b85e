//! The freestanding test guest: PVH entry, serial banner, optional power-off,
//! a PIT heartbeat and a virtio-net (modern virtio-mmio) driver with a tiny
//! ARP/ICMP/UDP stack. Built by tests/build.rs with rustc directly.
//!
//! This host's nested KVM kills a guest on any exception and on any SSE
//! instruction, so: no SSE (target features), no core::fmt, no panics on
//! anything a peer controls, and only external interrupts.

#![no_std]
#![no_main]

mod arch;
mod busy;
mod cmdline;
mod entry;
mod firmware;
mod initrd;
mod intr;
mod mem;
mod net;
mod netdev;
mod phys;
mod serial;
mod smp;
mod text;
mod virtio;

use text::TextBuf;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No formatting here: core::fmt may contain SSE.
    serial::line(b"panic");
    power_off();
}

#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// isa-debug-exit (our vmm and QEMU), then an i8042 reset, then halt.
fn power_off() -> ! {
    arch::outb(0x501, 0);
    arch::outb(0x64, 0xfe);
    arch::halt_forever()
}

fn mix64(mut z: u64) -> u64 {
    // splitmix64 finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn make_boot_id(cmdline: &[u8]) -> u64 {
    let mut h = arch::rdtsc();
    for &b in cmdline {
        h = mix64(h ^ u64::from(b));
    }
    if arch::has_rdrand() {
        for _ in 0..10 {
            if let Some(r) = arch::rdrand() {
                h ^= r;
                break;
            }
        }
    }
    mix64(h ^ arch::rdtsc())
}

#[unsafe(no_mangle)]
extern "C" fn rust_main(start_info: u64) -> ! {
    // The entry already wrote the 't'.
    serial::write(b"estguest: start\n");
    // SAFETY: start_info is what the PVH loader handed over in EBX.
    let cmdline = unsafe { cmdline::from_start_info(start_info) };
    let cfg = cmdline::parse(cmdline);
    let boot_id = make_boot_id(cmdline);

    if cfg.bad_keys > 0 {
        let mut line = TextBuf::<64>::new();
        line.str("ignored ")
            .dec(u64::from(cfg.bad_keys))
            .str(" malformed command-line value(s)");
        serial::line(line.as_bytes());
    }

    intr::init();
    let mut net = cfg
        .devices
        .get(..cfg.n_devices)
        .and_then(|devs| start_net(devs, &cfg, boot_id));

    // SAFETY: as from_start_info above.
    let mut busy = (cfg.busy && unsafe { cmdline::ram_covers(start_info, busy::BASE, busy::LEN) })
        .then(|| busy::Busy::new(boot_id));
    if cfg.busy {
        let mut line = TextBuf::<80>::new();
        if busy.is_some() {
            line.str("busy: writing ")
                .dec(busy::LEN >> 20)
                .str(" MiB at 0x")
                .hex(busy::BASE, 8)
                .str(" between interrupts");
        } else {
            line.str("busy: no RAM at 0x")
                .hex(busy::BASE, 8)
                .str(" in the memory map, idling instead");
        }
        serial::line(line.as_bytes());
    }

    let mut line = TextBuf::<64>::new();
    line.str("up boot_id=").hex(boot_id, 16);
    serial::line(line.as_bytes());
    // The tables are read after the banner (nothing to print before it).
    let cpus = firmware::discover(
        start_info,
        rsdp_hint(start_info),
        !cfg.acpi_off,
        smp::lapic_id(),
    );
    let has_initrd = initrd::module0(start_info).is_some();
    if cfg.exit && cpus.n <= 1 && !has_initrd {
        power_off();
    }
    if cfg.reset {
        // The i8042 reset alone (no isa-debug-exit first).
        arch::outb(0x64, 0xfe);
        arch::halt_forever();
    }
    if cfg.fault {
        arch::triple_fault();
    }

    report_cpus(&cpus);
    smp::init(&cpus);
    let several = smp::count() > 1;
    if several && cfg.heartbeat_ms.is_some() {
        // Before the PIT starts: its first two interrupts time the LAPIC timer.
        smp::calibrate_start();
    }
    let mut heartbeat = cfg.heartbeat_ms.map(Heartbeat::start);
    if let (true, Some(hb)) = (several, heartbeat.as_ref())
        && !smp::calibrate_finish(hb.irqs_per_tick)
    {
        serial::line(b"lapic timer not calibrated (no PIT interrupts): APs will not tick");
    }
    smp::start_all(start_info, &|id| cfg.held(id));
    initrd::report(start_info);
    if cfg.exit {
        // With APs or an initrd, `exit` waits for their lines.
        power_off();
    }
    loop {
        arch::cli();
        let devices = intr::take_device_pending();
        let ticks_due = heartbeat.as_ref().is_some_and(Heartbeat::due);
        if devices == 0 && !ticks_due {
            match busy.as_mut() {
                Some(b) => {
                    arch::sti();
                    b.step();
                }
                None => arch::sti_hlt(),
            }
            continue;
        }
        arch::sti();
        if let Some(hb) = heartbeat.as_mut() {
            hb.print_due();
            if let Some((dev, _)) = net.as_mut() {
                dev.tick(hb.printed);
            }
        }
        if let (Some((dev, stack)), true) = (net.as_mut(), devices != 0) {
            stack.busy_passes = busy.as_ref().map(|b| b.passes);
            stack.cpus_up = several.then_some(smp::up as fn() -> u32);
            stack.start_ap = Some(smp::start_held);
            dev.poll(stack, heartbeat.as_ref().map(|h| h.printed));
        }
    }
}

/// hvm_start_info's rsdp_paddr (0: none).
fn rsdp_hint(start_info: u64) -> u64 {
    const HVM_START_MAGIC: u32 = 0x336e_c578;
    if start_info == 0 || phys::read32(start_info) != HVM_START_MAGIC {
        return 0;
    }
    phys::read64(start_info + 32)
}

/// `testguest: acpi madt: 4 cpus, ioapic 0xfec00000` and the like.
fn report_cpus(cpus: &firmware::Cpus) {
    let mut line = TextBuf::<96>::new();
    line.str(match cpus.source {
        firmware::Source::AcpiMadt => "acpi madt: ",
        firmware::Source::MpTable => "mp table: ",
        firmware::Source::Nothing => "no acpi madt or mp table: ",
    });
    line.dec(cpus.n as u64)
        .str(if cpus.n == 1 { " cpu" } else { " cpus" });
    if let Some(a) = cpus.ioapic {
        line.str(", ioapic 0x").hex(u64::from(a), 8);
    }
    serial::line(line.as_bytes());
    if cpus.dropped > 0 {
        let mut line = TextBuf::<96>::new();
        line.dec(cpus.dropped as u64)
            .str(" more cpus not started: this guest handles at most ")
            .dec(firmware::MAX_CPUS as u64);
        serial::line(line.as_bytes());
    }
}

/// Brings up the first virtio-net device of the command line.
fn start_net(
    devices: &[cmdline::MmioDevice],
    cfg: &cmdline::Config,
    boot_id: u64,
) -> Option<(netdev::NetDevice, net::Stack)> {
    for (slot, dev) in devices.iter().enumerate() {
        let mut line = TextBuf::<96>::new();
        line.str("virtio-mmio at 0x")
            .hex(dev.addr, 8)
            .str(" irq ")
            .dec(u64::from(dev.irq))
            .str(": ");
        match netdev::NetDevice::probe(dev, cfg.tx_queue_max.map_or(usize::MAX, |n| n as usize)) {
            netdev::Probe::NotNet => {
                line.str("not a network device");
                serial::line(line.as_bytes());
            }
            netdev::Probe::Failed(why) => {
                line.str("virtio-net failed: ").str(why);
                serial::line(line.as_bytes());
            }
            netdev::Probe::Ready(nd) => {
                line.str("virtio-net mac ");
                for (i, b) in nd.mac.iter().enumerate() {
                    if i > 0 {
                        line.byte(b':');
                    }
                    line.hex(u64::from(*b), 2);
                }
                line.str(" features 0x").hex(nd.features, 16);
                serial::line(line.as_bytes());
                let (ip, prefix) = cfg.ip.unwrap_or(([0; 4], 0));
                let mut line = TextBuf::<64>::new();
                line.str("ip ").ipv4(ip).byte(b'/').dec(u64::from(prefix));
                serial::line(line.as_bytes());
                let slot = slot as u8;
                if dev.irq < 24 && slot < intr::MAX_DEVICE_VECTORS {
                    intr::register_virtio_mmio(slot, dev.addr as usize, dev.irq);
                }
                // Look at the rings once: an interrupt raised before the
                // IOAPIC entry existed would otherwise never be seen.
                intr::DEVICE_PENDING.fetch_or(1 << slot, core::sync::atomic::Ordering::AcqRel);
                let mac = nd.mac;
                return Some((nd, net::Stack::new(mac, ip, boot_id)));
            }
        }
    }
    None
}

/// `testguest: tick <n>` every `ms` milliseconds, counted in delivered PIT
/// interrupts (a paused VM resumes the count where it stopped). With
/// several CPUs: `testguest: tick <n> cpus <n>,<a1>,<a2>...`, the BSP's
/// count then each AP's own LAPIC timer ticks, in table order.
struct Heartbeat {
    irqs_per_tick: u64,
    printed: u64,
}

impl Heartbeat {
    fn start(ms: u32) -> Self {
        // The PIT period is at most 54 ms: use the largest divisor of ms that fits.
        let period = (1..=ms.min(54))
            .rev()
            .find(|p| ms.is_multiple_of(*p))
            .unwrap_or(1);
        intr::start_pit(period);
        Heartbeat {
            irqs_per_tick: u64::from(ms / period).max(1),
            printed: 0,
        }
    }

    fn due(&self) -> bool {
        intr::TIMER_IRQS.load(core::sync::atomic::Ordering::Acquire) / self.irqs_per_tick
            > self.printed
    }

    fn print_due(&mut self) {
        while self.due() {
            self.printed += 1;
            let mut line = TextBuf::<{ 32 + 21 * firmware::MAX_CPUS }>::new();
            line.str("tick ").dec(self.printed);
            let n = smp::count();
            if n > 1 {
                line.str(" cpus ").dec(self.printed);
                for i in 1..n {
                    line.byte(b',').dec(smp::ticks(i));
                }
            }
            serial::line(line.as_bytes());
        }
    }
}
