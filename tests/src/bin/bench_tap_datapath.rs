//! The shared virtio-net datapath alone (the `net-datapath` crate, the one
//! code behind both the vmm's in-process device and the vhost-user-net
//! backend; called here directly, not through either), on one thread:
//! `process_tx` and `process_rx` on a queue in guest memory against a real
//! TAP queue (`net_datapath::TapQueue`, checked as both users check it) in
//! a network namespace of its own. Prints ns per frame (a worker thread's
//! cost per frame, without wakeups, notifications or a guest competing for
//! the CPU): the minimum and the median of several trials, as other work
//! on a small machine only ever adds time. Run as root.
//!
//! The datapath's counters are on, as in both users: plain integers bumped
//! per frame, published to the pair's `CounterCell` once per batch (here,
//! per `process_*` call, as a worker does per wake-up).
//!
//! bench_tap_datapath [FRAMES_PER_TRIAL] [TRIALS]   (default 20000, 9)

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use net_datapath::counters::CounterCell;
use net_datapath::datapath::{NetStats, RxState, process_rx, process_tx};
use net_datapath::{FrameIo, GuestMemoryMmap, TapQueue, VNET_HDR_LEN};
use tests::NetNs;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const HDR: usize = VNET_HDR_LEN;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
const BUFS: u64 = 0x10_0000;
const MEM: usize = 64 << 20;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn queue() -> Queue {
    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

/// Descriptor i -> buffer i of `stride` bytes (`len` used), avail slot i -> head i.
fn fill_ring(mem: &GuestMemoryMmap, stride: u64, len: u32, write: bool) {
    for i in 0..u64::from(QSIZE) {
        let d = DESC + 16 * i;
        mem.write_obj(BUFS + i * stride, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(if write { 2u16 } else { 0 }, GuestAddress(d + 12))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        mem.write_obj(i as u16, GuestAddress(AVAIL + 4 + 2 * i))
            .unwrap();
    }
    mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
}

fn publish(mem: &GuestMemoryMmap, idx: u16) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// Guest -> TAP: `frames` frames of `size` bytes (Ethernet, to a MAC nobody
/// owns), 256 per batch. Returns ns per frame.
fn tx(mem: &GuestMemoryMmap, io: &dyn FrameIo, size: usize, frames: u64) -> f64 {
    let stride = ((size + HDR) as u64 + 0xfff) & !0xfff;
    fill_ring(mem, stride, (size + HDR) as u32, false);
    let mut f = vec![0u8; HDR + size];
    f[HDR..HDR + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[HDR + 6..HDR + 12].copy_from_slice(&GUEST_MAC);
    f[HDR + 12..HDR + 14].copy_from_slice(&[0x88, 0xb5]);
    for i in 0..u64::from(QSIZE) {
        mem.write_slice(&f, GuestAddress(BUFS + i * stride))
            .unwrap();
    }
    let mut q = queue();
    let mut buf = vec![0u8; 65565];
    let mut stats = NetStats::default();
    let cell = CounterCell::default();
    let mut avail = 0u16;
    let mut done = 0u64;
    let start = Instant::now();
    while done < frames {
        avail = avail.wrapping_add(QSIZE);
        publish(mem, avail);
        process_tx(&mut q, mem, io, &mut buf, &mut stats).expect("tx");
        cell.publish(&stats);
        done += u64::from(QSIZE);
    }
    let el = start.elapsed();
    let stats = cell.load();
    if stats.tx_packets != done {
        println!(
            "    ({} of {done} frames refused by the TAP)",
            stats.tx_tap_errors
        );
    }
    assert_eq!(stats.tx_bytes, stats.tx_packets * size as u64, "tx bytes");
    el.as_nanos() as f64 / done as f64
}

/// TAP -> guest: bursts of UDP datagrams (frames of `size` bytes) queued in
/// the TAP by a socket in the namespace, then drained by `process_rx` into
/// 2048-byte merged rx buffers. Only the draining is timed.
fn rx(mem: &GuestMemoryMmap, io: &dyn FrameIo, ns: &NetNs, size: usize, frames: u64) -> f64 {
    fill_ring(mem, 2048, 2048, true);
    let mut q = queue();
    let mut st = RxState::default();
    let mut stats = NetStats::default();
    let cell = CounterCell::default();
    let mut avail = QSIZE;
    publish(mem, avail);
    let sock = in_netns(ns, || {
        std::net::UdpSocket::bind("10.0.1.1:0").expect("bind")
    });
    let payload = vec![0u8; size - 42];
    let mut timed = Duration::ZERO;
    let mut got = 0u64;
    let mut last_used = 0u16;
    while got < frames {
        // The TAP queues up to txqueuelen (1000) frames.
        for _ in 0..800 {
            let _ = sock.send_to(&payload, "10.0.1.2:9");
        }
        loop {
            let t = Instant::now();
            let r = process_rx(&mut q, mem, io, &mut st, true, &mut stats).expect("rx");
            cell.publish(&stats);
            timed += t.elapsed();
            let u = used_idx(mem);
            let n = u.wrapping_sub(last_used);
            last_used = u;
            got += u64::from(n);
            // Give the used buffers back (they come back in ring order).
            avail = avail.wrapping_add(n);
            publish(mem, avail);
            if n == 0 && !st.has_pending() {
                break;
            }
            let _ = r;
        }
    }
    let stats = cell.load();
    // `got` counts buffers (a frame may take several); other traffic
    // (IPv6 neighbour discovery) may come with the datagrams.
    assert!(
        stats.rx_packets <= got && stats.rx_packets > 0,
        "rx packets"
    );
    assert!(stats.rx_bytes >= stats.rx_packets * 42, "rx bytes");
    timed.as_nanos() as f64 / stats.rx_packets.max(1) as f64
}

fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(move || {
            let nsf = File::open(&path).expect("netns file");
            // SAFETY: setns on a valid netns fd affects only this thread,
            // which runs nothing but `f`.
            let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn open_tap(ns: &NetNs, name: &str) -> OwnedFd {
    in_netns(ns, || {
        use common::tun::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, open_queue};
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let tun = open_queue(name, flags, Some(common::netd::VNET_HDR_LEN)).expect("TAP queue");
        OwnedFd::from(tun)
    })
}

fn main() {
    let arg = |i: usize, d: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let frames = arg(1, 20_000);
    let trials = arg(2, 9).max(1);
    let ns = NetNs::new("dpbench");
    // Release builds abort on panic, so NetNs's Drop would not run then.
    tests::leftovers::install_cleanup_on_panic();
    tests::leftovers::leftovers().netns.push(ns.name.clone());
    let fd = open_tap(&ns, "dptap0");
    ns.exec(&["ip", "link", "set", "dptap0", "mtu", "9000", "up"]);
    ns.exec(&["ip", "addr", "add", "10.0.1.1/24", "dev", "dptap0"]);
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "10.0.1.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        "dptap0",
        "nud",
        "permanent",
    ]);
    let io = TapQueue::from_fds("dptap0", vec![fd])
        .expect("the TAP queue")
        .pop()
        .expect("one queue");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    println!(
        "net-datapath (shared by the vmm's device and vhost-user-net), one thread on a TAP queue, ns per frame (lower is better): min / median of {trials}"
    );
    let row = |what: &str, size: usize, run: &mut dyn FnMut() -> f64| {
        let mut v: Vec<f64> = (0..trials).map(|_| run()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{what} {size:>6}-byte frames: {:>7.0} / {:>7.0} ns/frame",
            v[0],
            v[v.len() / 2]
        );
    };
    for size in [64usize, 1400, 9000, 65000] {
        row("tx", size, &mut || tx(&mem, &io, size, frames));
    }
    for size in [64usize, 1400, 8000] {
        row("rx", size, &mut || rx(&mem, &io, &ns, size, frames / 4));
    }
}
