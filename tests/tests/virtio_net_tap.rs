//! The virtio-net device on a real TAP in a test-made network namespace,
//! with a simulated guest driver in guest memory: `ping` from the namespace
//! is answered by the simulated guest (ARP and ICMP echo through rx and
//! tx), and raw tx throughput is printed.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tun;
use tests::NetNs;
use tests::prereq::{Prerequisite, require_or_skip};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::net::{NetBackend, NetDevice, Tap, VhostNetBackend};
use vmm::devices::virtio::{GuestMemoryMmap, VirtioDevice};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const HDR: usize = 12;
const QSIZE: u16 = 256;
const MEM: usize = 16 << 20;
const BUF: u64 = 0x10_0000;
const BUF_LEN: u32 = 2048;
/// How long each throughput phase runs.
const PHASE: Duration = Duration::from_secs(2);

/// Opens a new TAP `name` inside `ns` (TUNSETIFF runs in the netns of the
/// calling thread, so a helper thread enters it first).
fn open_tap(ns: &NetNs, name: &str) -> OwnedFd {
    open_tap_queues(ns, name, 1).pop().expect("one queue")
}

/// Opens `queues` queues of TAP `name` (IFF_MULTI_QUEUE when more than one).
fn open_tap_queues(ns: &NetNs, name: &str, queues: usize) -> Vec<OwnedFd> {
    let path = format!("/var/run/netns/{}", ns.name);
    let name = name.to_string();
    std::thread::spawn(move || {
        let nsf = File::open(&path).expect("netns file");
        // SAFETY: setns on a valid netns fd affects only this thread, a
        // helper of this test that is spawned for it.
        let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        (0..queues)
            .map(|_| {
                // As netd makes it: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                // [| IFF_MULTI_QUEUE], a 12-byte vnet header.
                let mq = if queues > 1 { tun::IFF_MULTI_QUEUE } else { 0 };
                let flags = tun::IFF_TAP | tun::IFF_NO_PI | tun::IFF_VNET_HDR | mq;
                let tun = tun::open_queue(&name, flags, Some(common::netd::VNET_HDR_LEN))
                    .expect("TAP queue");
                OwnedFd::from(tun)
            })
            .collect::<Vec<OwnedFd>>()
    })
    .join()
    .expect("tap thread")
}

#[derive(Clone, Copy)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
}

/// A minimal virtio-mmio net driver over the transport's registers.
struct Driver {
    t: MmioTransport<NetDevice>,
    mem: Arc<GuestMemoryMmap>,
    rings: Vec<Ring>,
}

impl Driver {
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn start(name: &str, tap: OwnedFd) -> Self {
        let tap = Tap::from_fds(name, vec![tap]).expect("TAP backend");
        Self::start_backend(Box::new(tap))
    }

    fn start_backend(backend: Box<dyn NetBackend>) -> Self {
        Self::start_with(backend, false)
    }

    /// Rx buffer `id` of rx queue `q` (0 or 2).
    fn rx_buf(q: usize, id: u16) -> u64 {
        BUF + (q as u64 / 2) * 0x8_0000 + u64::from(id) * u64::from(BUF_LEN)
    }

    /// With `mq`, negotiates MQ + CTRL_VQ and sets up both pairs and the
    /// control queue (the device must expose 5 queues).
    fn start_with(backend: Box<dyn NetBackend>, mq: bool) -> Self {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let dev = NetDevice::new(backend, Some(GUEST_MAC)).unwrap();
        let t = MmioTransport::new(dev, mem.clone()).unwrap();
        let ring = |i: u64| Ring {
            desc: 0x1_0000 + i * 0x1_0000,
            avail: 0x1_0000 + i * 0x1_0000 + 0x2000,
            used: 0x1_0000 + i * 0x1_0000 + 0x4000,
            avail_idx: 0,
            used_seen: 0,
        };
        let mut d = Driver {
            t,
            mem,
            rings: (0..if mq { 5 } else { 2 }).map(ring).collect(),
        };
        assert_eq!(d.r(0), 0x7472_6976);
        d.w(0x70, 1);
        d.w(0x70, 3);
        d.w(0x14, 0);
        let lo = d.r(0x10);
        d.w(0x14, 1);
        let hi = d.r(0x10);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        // VERSION_1, EVENT_IDX, MRG_RXBUF, MAC, STATUS.
        let mut want = (1u64 << 32) | (1 << 29) | (1 << 15) | (1 << 5) | (1 << 16);
        if mq {
            want |= (1 << 22) | (1 << 17);
        }
        assert_eq!(offered & want, want);
        d.w(0x24, 0);
        d.w(0x20, want as u32);
        d.w(0x24, 1);
        d.w(0x20, (want >> 32) as u32);
        d.w(0x70, 3 | 8);
        assert_ne!(d.r(0x70) & 8, 0, "FEATURES_OK");
        for i in 0..d.rings.len() {
            let g = d.rings[i];
            d.w(0x30, i as u32);
            d.w(0x38, u32::from(QSIZE));
            d.w(0x80, g.desc as u32);
            d.w(0x84, 0);
            d.w(0x90, g.avail as u32);
            d.w(0x94, 0);
            d.w(0xa0, g.used as u32);
            d.w(0xa4, 0);
            d.w(0x44, 1);
        }
        d.w(0x70, 3 | 8 | 4);
        assert_eq!(d.r(0x70), 3 | 8 | 4, "device running, no reset needed");
        // Every rx descriptor i owns buffer i, all posted.
        for q in d.rx_queues() {
            for i in 0..QSIZE {
                d.desc(q, i, Self::rx_buf(q, i), BUF_LEN, 2);
                d.push(q, i);
            }
            d.w(0x50, q as u32);
        }
        d
    }

    fn rx_queues(&self) -> Vec<usize> {
        if self.rings.len() > 2 {
            vec![0, 2]
        } else {
            vec![0]
        }
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16) {
        let a = self.rings[q].desc + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(a + 14)).unwrap();
    }

    fn push(&mut self, q: usize, head: u16) {
        let g = &mut self.rings[q];
        let slot = g.avail + 4 + 2 * u64::from(g.avail_idx % QSIZE);
        g.avail_idx = g.avail_idx.wrapping_add(1);
        let (idx, avail) = (g.avail_idx, g.avail);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let g = self.rings[q];
        let end: u16 = self.mem.read_obj(GuestAddress(g.used + 2)).unwrap();
        let mut out = Vec::new();
        let mut i = g.used_seen;
        while i != end {
            let e = g.used + 4 + 8 * u64::from(i % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            i = i.wrapping_add(1);
        }
        self.rings[q].used_seen = end;
        // Tell the device where we are, so EVENT_IDX interrupts keep coming.
        let ue = g.avail + 4 + 2 * u64::from(QSIZE);
        self.mem.write_obj(end, GuestAddress(ue)).unwrap();
        out
    }

    /// Sleeps until the device raises an interrupt (it does once a used
    /// ring passes the used_event `used()` wrote), at most `max`, and
    /// clears it. The bound covers the window in which an entry lands just
    /// before used_event moves: callers re-check their rings in a loop
    /// with a deadline.
    fn wait_irq(&self, max: Duration) {
        let evt = self.t.interrupt_eventfd();
        let mut p = libc::pollfd {
            fd: evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = max.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll(2) on one pollfd that lives on this stack frame.
        unsafe { libc::poll(&mut p, 1, ms) };
        let _ = evt.read();
    }

    /// Received frames (without vnet header); their buffers go back.
    fn recv(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        for q in self.rx_queues() {
            let used = self.used(q);
            for &(id, len) in &used {
                let mut f = vec![0u8; len as usize];
                let a = Self::rx_buf(q, id);
                self.mem.read_slice(&mut f, GuestAddress(a)).unwrap();
                assert_eq!(u16::from_le_bytes([f[10], f[11]]), 1, "num_buffers");
                frames.push(f.split_off(HDR));
                self.push(q, id);
            }
            if !used.is_empty() {
                self.w(0x50, q as u32);
            }
        }
        frames
    }

    /// Sends a control command on queue 4; returns the device's ack byte.
    fn ctrl(&mut self, req: &[u8]) -> u8 {
        let (a, ack) = (0xF0_0000u64, 0xF0_1000u64);
        self.mem.write_slice(req, GuestAddress(a)).unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(ack)).unwrap();
        let g = self.rings[4].desc;
        self.mem.write_obj(a, GuestAddress(g)).unwrap();
        self.mem
            .write_obj(req.len() as u32, GuestAddress(g + 8))
            .unwrap();
        self.mem.write_obj(1u16, GuestAddress(g + 12)).unwrap();
        self.mem.write_obj(1u16, GuestAddress(g + 14)).unwrap();
        self.desc(4, 1, ack, 1, 2);
        self.push(4, 0);
        self.w(0x50, 4);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used(4).is_empty() {
            assert!(Instant::now() < deadline, "control command not answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.mem.read_obj(GuestAddress(ack)).unwrap()
    }

    /// Sends one frame from tx descriptor `slot`.
    fn send(&mut self, slot: u16, frame: &[u8]) {
        let a = 0x80_0000 + u64::from(slot) * 0x1000;
        let mut f = vec![0u8; HDR];
        f.extend_from_slice(frame);
        self.mem.write_slice(&f, GuestAddress(a)).unwrap();
        self.desc(1, slot, a, f.len() as u32, 0);
        self.push(1, slot);
        self.w(0x50, 1);
    }
}

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The simulated guest's network stack: ARP and ICMP echo replies.
fn answer(f: &[u8]) -> Option<Vec<u8>> {
    if f.len() < 42 {
        return None;
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let mut r = f.to_vec();
    r[0..6].copy_from_slice(&f[6..12]);
    r[6..12].copy_from_slice(&GUEST_MAC);
    if ethertype == 0x0806 && f[21] == 1 && f[38..42] == GUEST_IP {
        r[21] = 2;
        r[22..28].copy_from_slice(&GUEST_MAC);
        r[28..32].copy_from_slice(&GUEST_IP);
        r[32..38].copy_from_slice(&f[22..28]);
        r[38..42].copy_from_slice(&f[28..32]);
        return Some(r);
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    if ethertype == 0x0800 && f[23] == 1 && f[30..34] == GUEST_IP && f.get(14 + ihl) == Some(&8) {
        r[26..30].copy_from_slice(&f[30..34]);
        r[30..34].copy_from_slice(&f[26..30]);
        let icmp = 14 + ihl;
        r[icmp] = 0;
        r[icmp + 2] = 0;
        r[icmp + 3] = 0;
        let c = csum(&r[icmp..]);
        r[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
        return Some(r);
    }
    None
}

fn link_stat(ns: &NetNs, dev: &str, dir: &str, what: &str) -> u64 {
    let out = ns.exec(&["ip", "-j", "-s", "link", "show", dev]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"][dir][what].as_u64().unwrap()
}

/// Pings the simulated guest from the namespace while answering its rx.
fn ping_guest(ns: &NetNs, dev: &str, d: &mut Driver) {
    let tap_rx_before = link_stat(ns, dev, "rx", "packets");
    let mut ping = ns
        .command(&["ping", "-c", "5", "-i", "0.2", "-W", "5", "10.0.0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ping (apt-get install iputils-ping)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut arp, mut echo, mut slot) = (0, 0, 0u16);
    let status = loop {
        for f in d.recv() {
            if let Some(reply) = answer(&f) {
                if f[12..14] == [8, 6] {
                    arp += 1;
                } else {
                    echo += 1;
                }
                d.send(slot, &reply);
                slot = (slot + 1) % QSIZE;
            }
        }
        if let Some(st) = ping.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "ping did not finish");
        d.wait_irq(Duration::from_millis(5));
    };
    let out = ping.wait_with_output().unwrap();
    assert!(
        status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(arp >= 1, "the ARP request reached the guest's rx queue");
    assert!(echo >= 5, "every echo request reached the guest ({echo})");
    let tx_used = d.used(1).len();
    assert!(tx_used >= 6, "tx chains returned: {tx_used}");
    // Our replies entered the namespace through the TAP.
    assert!(link_stat(ns, dev, "rx", "packets") >= tap_rx_before + 6);
    assert_eq!(d.r(0x70) & 0x40, 0, "no DEVICE_NEEDS_RESET");
}

#[test]
fn ping_from_namespace_is_answered_through_tap() {
    let ns = NetNs::new("vnet");
    let tap = open_tap(&ns, "vtap0");
    ns.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "vtap0"]);
    ns.exec(&["ip", "link", "set", "vtap0", "up"]);
    let mut d = Driver::start("vtap0", tap);
    assert_eq!(d.t.device().queue_max_sizes().len(), 2);
    ping_guest(&ns, "vtap0", &mut d);
}

/// A two-queue TAP and a driver that sets up only the first pair (no MQ):
/// the device detaches the second TAP queue, so the kernel steers every
/// frame to the queue that is served and no ping is lost.
#[test]
fn multiqueue_tap_with_single_pair_driver_loses_nothing() {
    let ns = NetNs::new("vnmq");
    let fds = open_tap_queues(&ns, "vtap3", 2);
    ns.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "vtap3"]);
    ns.exec(&["ip", "link", "set", "vtap3", "up"]);
    let tap = Tap::from_fds("vtap3", fds).expect("multiqueue TAP backend");
    assert_eq!(tap.ifname(), "vtap3");
    let mut d = Driver::start_backend(Box::new(tap));
    assert_eq!(d.t.device().queue_max_sizes().len(), 5, "2 pairs + control");
    ping_guest(&ns, "vtap3", &mut d);
}

/// A two-queue TAP and a driver with MQ that enables both pairs through
/// the control queue (TUNSETQUEUE attaches the second TAP queue): frames
/// may arrive on either rx queue, and ping still answers.
#[test]
fn multiqueue_tap_with_both_pairs_enabled() {
    let ns = NetNs::new("vnmq2");
    let fds = open_tap_queues(&ns, "vtap4", 2);
    ns.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "vtap4"]);
    ns.exec(&["ip", "link", "set", "vtap4", "up"]);
    let tap = Tap::from_fds("vtap4", fds).expect("multiqueue TAP backend");
    let mut d = Driver::start_with(Box::new(tap), true);
    assert_eq!(d.ctrl(&[4, 0, 2, 0]), 0, "VQ_PAIRS_SET 2 accepted");
    assert_eq!(d.ctrl(&[4, 0, 3, 0]), 1, "VQ_PAIRS_SET 3 refused");
    ping_guest(&ns, "vtap4", &mut d);
}

#[test]
fn ping_through_vhost_net() {
    // Skipped (loudly) only where /dev/vhost-net is absent; a failure where
    // REQUIRE_VHOST_NET=1.
    if !require_or_skip(Prerequisite::VhostNet, "the whole test") {
        return;
    }
    assert!(VhostNetBackend::host_supported());
    let ns = NetNs::new("vhost");
    let tap = open_tap(&ns, "vtap2");
    ns.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", "vtap2"]);
    ns.exec(&["ip", "link", "set", "vtap2", "up"]);
    let vhost = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
        .expect("/dev/vhost-net");
    let tap = Tap::from_fds("vtap2", vec![tap]).expect("TAP backend");
    let backend = VhostNetBackend::new(tap, vec![vhost]).expect("vhost backend");
    let mut d = Driver::start_backend(Box::new(backend));
    ping_guest(&ns, "vtap2", &mut d);
}

#[test]
fn throughput_tx_and_rx_on_tap() {
    throughput(64, "vnbench", "vtap1");
}

#[test]
fn throughput_tx_and_rx_on_tap_1400_bytes() {
    throughput(1400, "vnbench14", "vtap5");
}

/// CPU time (user + system, in clock ticks) the thread named `name` has
/// used so far, from /proc.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

/// Nanoseconds of device-thread CPU per frame between two tick readings.
fn cpu_per_frame(before: Option<u64>, after: Option<u64>, frames: u64) -> String {
    // SAFETY: sysconf has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    match (before, after) {
        (Some(b), Some(a)) if frames > 0 => {
            format!("{:.0} ns", (a - b) as f64 * 1e9 / hz / frames as f64)
        }
        _ => "n/a".into(),
    }
}

/// Stops the load thread when dropped, also when the test fails first.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Prints tx and rx frames/s for `size`-byte Ethernet frames, and the
/// device thread's CPU time per frame (the datapath's cost, less
/// sensitive to the load on the machine than the rate).
fn throughput(size: usize, ns_name: &str, dev: &str) {
    let ns = NetNs::new(ns_name);
    let tap = open_tap(&ns, dev);
    ns.exec(&["ip", "link", "set", dev, "up"]);
    let mut d = Driver::start(dev, tap);
    let before = link_stat(&ns, dev, "rx", "packets");
    // Frames to a MAC nobody owns: the TAP counts them, the namespace's
    // stack drops them.
    let mut frame = vec![0u8; size];
    frame[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame[6..12].copy_from_slice(&GUEST_MAC);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    for s in 0..QSIZE {
        let a = 0x80_0000 + u64::from(s) * 0x1000;
        let mut f = vec![0u8; HDR];
        f.extend_from_slice(&frame);
        d.mem.write_slice(&f, GuestAddress(a)).unwrap();
        d.desc(1, s, a, f.len() as u32, 0);
    }
    let cpu0 = thread_cpu_ticks("virtio-net-q0");
    let start = Instant::now();
    let mut sent = 0u64;
    let mut free: Vec<u16> = (0..QSIZE).collect();
    while start.elapsed() < PHASE {
        while let Some(s) = free.pop() {
            d.push(1, s);
        }
        d.w(0x50, 1);
        let wait = Instant::now() + Duration::from_secs(10);
        loop {
            let used = d.used(1);
            if !used.is_empty() {
                sent += used.len() as u64;
                free.extend(used.into_iter().map(|u| u.0));
                break;
            }
            assert!(Instant::now() < wait, "tx chains never came back");
            d.wait_irq(Duration::from_millis(10));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_per_frame(cpu0, thread_cpu_ticks("virtio-net-q0"), sent);
    let counted = link_stat(&ns, dev, "rx", "packets") - before;
    println!(
        "virtio-net tx -> TAP, {size}-byte frames, simulated guest: {:.0} frames/s, device thread {cpu}/frame ({sent} in {secs:.2} s, TAP counted {counted})",
        sent as f64 / secs
    );
    assert!(sent > 0);
    assert!(counted >= sent, "every returned frame went through the TAP");

    // Host -> guest: a UDP sender in the namespace, `size`-byte frames
    // (42 bytes of headers), the simulated guest returning rx buffers.
    ns.exec(&["ip", "addr", "add", "10.0.1.1/24", "dev", dev]);
    let mac = "52:54:00:12:34:56";
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "10.0.1.2",
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
    let stop = StopOnDrop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let path = format!("/var/run/netns/{}", ns.name);
    let st = stop.0.clone();
    let payload = vec![0u8; size - 42];
    let sender = std::thread::spawn(move || {
        let nsf = File::open(&path).expect("netns file");
        // SAFETY: setns on a valid netns fd affects only this thread, a
        // helper of this test that is spawned for it.
        let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let sock = std::net::UdpSocket::bind("10.0.1.1:0").unwrap();
        let mut n = 0u64;
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if sock.send_to(&payload, "10.0.1.2:9").is_ok() {
                n += 1;
            }
        }
        n
    });
    let cpu0 = thread_cpu_ticks("virtio-net-q0");
    let start = Instant::now();
    let mut received = 0u64;
    while start.elapsed() < PHASE {
        let frames = d.recv();
        if frames.is_empty() {
            d.wait_irq(Duration::from_millis(10));
        }
        received += frames.iter().filter(|f| f.len() == size).count() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_per_frame(cpu0, thread_cpu_ticks("virtio-net-q0"), received);
    drop(stop);
    let offered = sender.join().unwrap();
    println!(
        "virtio-net TAP -> rx, {size}-byte UDP frames, simulated guest: {:.0} frames/s, device thread {cpu}/frame ({received} of {offered} sent in {secs:.2} s)",
        received as f64 / secs
    );
    assert!(received > 0, "frames reached the rx queue");
}
