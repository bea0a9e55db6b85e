//! Device and transport tests, driven as a guest driver would: registers
//! through the transport, rings and buffers written into guest memory, and
//! frames through a socketpair standing in for the TAP.

use std::sync::Arc;
use std::sync::atomic::AtomicU16;
use std::time::{Duration, Instant};

use net_datapath::fuzz::{
    Features, Fuzzer, Layout, RingKind, RingSetup, Rng, Served, Target, hostile_addr,
    seed_and_rounds,
};
use net_datapath::queue_pair::RxStatus;
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::mmio::{MmioError, MmioState, MmioTransport};
use super::net::backend::FrameIo;
use super::net::datapath::{MAX_FRAME_LEN, NetStats, RxState, VNET_HDR_LEN};
use super::net::event_handler::{CtrlQueue, PairBuffers, PairWorker};
use super::net::{NetDevice, NetState};
use super::testing::*;
use super::{
    ActiveQueue, GuestMemory, INT_VRING, Interrupt, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
    VirtioDevice, status,
};
use crate::devices::bus::BusDevice;
use crate::persist::Persist;

const ALL: u64 = u64::MAX;

fn without(bits: &[u32]) -> u64 {
    bits.iter().fold(ALL, |f, b| f & !(1u64 << b))
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(payload);
    f
}

fn payload(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| tag.wrapping_add(i as u8)).collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn registers_identify_a_modern_net_device() {
    let (b, _p) = mock_backend(1);
    let mut d = Driver::new_unstarted(b, memory());
    assert_eq!(d.read(0x000), 0x7472_6976);
    assert_eq!(d.read(0x004), 2);
    assert_eq!(d.read(0x008), 1);
    d.write(0x30, 0);
    assert_eq!(d.read(0x34), 256);
    d.write(0x30, 99);
    assert_eq!(d.read(0x34), 0);
    let f = d.device_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    assert_eq!(f & (1 << VIRTIO_NET_F_MQ), 0, "MQ only with several pairs");
    let mut mac = [0u8; 6];
    d.t.read(0x100, &mut mac);
    assert_eq!(mac, MAC);
    let mut st = [0u8; 2];
    d.t.read(0x106, &mut st);
    assert_eq!(u16::from_le_bytes(st), VIRTIO_NET_S_LINK_UP as u16);
    // Reads past the config space return zeros, never panic.
    let mut far = [0xffu8; 8];
    d.t.read(0xff8, &mut far);
    assert_eq!(far, [0; 8]);
    // Registers want 32-bit accesses.
    let mut two = [0xffu8; 2];
    d.t.read(0x000, &mut two);
    assert_eq!(two, [0, 0]);
}

#[test]
fn slots_follow_the_project_convention() {
    assert_eq!(super::mmio::slot(1), (0xD000_1000, 6));
    assert_eq!(
        super::mmio::cmdline_entry(0),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
}

#[test]
fn features_without_version_1_or_unoffered_are_refused() {
    let (b, _p) = mock_backend(1);
    let mut d = Driver::new_unstarted(b, memory());
    assert!(!d.negotiate(without(&[VIRTIO_F_VERSION_1])));
    assert!(d.negotiate(ALL));
    // A bit the device never offered.
    d.write(0x70, 0);
    d.write(0x70, 3);
    d.write(0x24, 1);
    d.write(0x20, 1 | (1 << 20));
    d.write(0x70, 3 | status::FEATURES_OK);
    assert_eq!(d.read(0x70) & status::FEATURES_OK, 0);
}

#[test]
fn tx_frame_reaches_backend_and_is_returned() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    let pl = payload(60, 1);
    let head = d.send(&pl);
    assert_eq!(p[0].recv().expect("frame on the backend"), frame(&pl));
    assert_eq!(d.wait_used(1, 1), vec![(u32::from(head), 0)]);
    wait_for("an interrupt", || d.interrupts() > 0);
    assert_ne!(d.read(0x60) & 1, 0, "InterruptStatus has the vring bit");
    d.write(0x64, 1);
    assert_eq!(d.read(0x60) & 1, 0);
}

#[test]
fn rx_frame_lands_in_buffer_with_num_buffers() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    let a = d.give_rx(2048);
    let pl = payload(100, 7);
    p[0].send(&frame(&pl));
    let used = d.wait_used(0, 1);
    assert_eq!(used, vec![(0, (VNET_HDR_LEN + 100) as u32)]);
    let mut got = vec![0u8; VNET_HDR_LEN + 100];
    d.mem.read_slice(&mut got, GuestAddress(a)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(&got[VNET_HDR_LEN..], &pl[..]);
}

#[test]
fn rx_merges_small_buffers() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    let addrs: Vec<u64> = (0..4).map(|_| d.give_rx(100)).collect();
    let f = frame(&payload(300, 3));
    p[0].send(&f);
    let used = d.wait_used(0, 4);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![100, 100, 100, 12]
    );
    let mut got = Vec::new();
    for (a, (_, len)) in addrs.iter().zip(&used) {
        let mut part = vec![0u8; *len as usize];
        d.mem.read_slice(&mut part, GuestAddress(*a)).unwrap();
        got.extend(part);
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4);
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn rx_without_mrg_drops_oversized_frame_and_keeps_buffer() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, without(&[VIRTIO_NET_F_MRG_RXBUF]));
    d.give_rx(100);
    p[0].send(&frame(&payload(300, 1)));
    let small = frame(&payload(30, 9));
    p[0].send(&small);
    assert_eq!(d.wait_used(0, 1), vec![(0, small.len() as u32)]);
}

#[test]
fn rx_waits_for_buffers() {
    let (b, p) = mock_backend(1);
    let io = b.queues.clone();
    let mut d = Driver::start(b, ALL);
    p[0].send(&frame(&payload(50, 2)));
    // The device takes the frame off the backend (into its bounce buffer)
    // although no rx buffer is there; once it has, and its thread is
    // stopped, nothing may have been returned.
    wait_for("the device to read the frame", || io[0].queued() == 0);
    d.t.device_mut().pause().unwrap();
    assert_eq!(d.used_idx(0), 0, "a used entry without any rx buffer");
    assert_eq!(d.t.device().stats().rx_packets, 0);
    d.t.device_mut().resume().unwrap();
    d.give_rx(1500);
    assert_eq!(d.wait_used(0, 1), vec![(0, 62)]);
}

#[test]
fn hostile_tx_chains_are_dropped_and_device_keeps_working() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    let buf = d.alloc(0x2_0000);
    // 0: a descriptor that chains to itself.
    d.write_desc(1, 0, buf, 20, 1, 0);
    d.push_avail(1, 0);
    // 1: outside guest memory (in the MMIO hole).
    d.write_desc(1, 1, IN_HOLE, 100, 0, 0);
    d.push_avail(1, 1);
    // 2: zero length.
    d.write_desc(1, 2, buf, 0, 0, 0);
    d.push_avail(1, 2);
    // 3: shorter than the vnet header.
    d.write_desc(1, 3, buf, 5, 0, 0);
    d.push_avail(1, 3);
    // 4: larger than any frame.
    d.write_desc(1, 4, buf, (MAX_FRAME_LEN + 1) as u32, 0, 0);
    d.push_avail(1, 4);
    // 5: device-writable buffer on tx.
    d.write_desc(1, 5, buf, 64, 2, 0);
    d.push_avail(1, 5);
    // 6 -> 7 -> 6: a two-descriptor loop.
    d.write_desc(1, 6, buf, 20, 1, 7);
    d.write_desc(1, 7, buf, 20, 1, 6);
    d.push_avail(1, 6);
    // 8: next index outside the ring.
    d.write_desc(1, 8, buf, 20, 1, 200);
    d.push_avail(1, 8);
    // A head outside the ring: skipped, never returned.
    d.push_avail(1, 300);
    // 9: an indirect table that loops on itself.
    let ind = d.alloc(64);
    d.mem.write_obj(buf, GuestAddress(ind)).unwrap();
    d.mem.write_obj(20u32, GuestAddress(ind + 8)).unwrap();
    d.mem.write_obj(1u16, GuestAddress(ind + 12)).unwrap();
    d.mem.write_obj(0u16, GuestAddress(ind + 14)).unwrap();
    d.write_desc(1, 9, ind, 16, 4, 0);
    d.push_avail(1, 9);
    d.q[1].next_desc = 10;
    d.kick(1);
    // (Each of these is refused on its own, with its stats, in
    // datapath_tests::each_hostile_tx_chain_is_refused_on_its_own.)
    let used = d.wait_used(1, 9);
    let mut ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 6, 8, 9]);
    assert!(p[0].try_recv().is_none(), "no hostile chain became a frame");
    assert!(!d.needs_reset());
    // Overlapping buffers are the guest's business: the frame goes out.
    let good = frame(&payload(40, 5));
    d.mem.write_slice(&good, GuestAddress(buf)).unwrap();
    d.add_chain(1, &[(buf, 12, false), (buf + 12, 40, false)]);
    assert_eq!(p[0].recv().unwrap(), good);
    d.wait_used(1, 1);
    d.t.device_mut().pause().unwrap();
    let s: NetStats = d.t.device().stats();
    // Nine bad chains and the head outside the ring.
    assert_eq!((s.bad_chains(), s.tx_bad_chains), (10, 10));
    assert_eq!(s.tx_packets, 1);
}

#[test]
fn hostile_rx_buffers_are_returned_empty() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    let buf = d.alloc(4096);
    d.write_desc(0, 0, buf, 1500, 0, 0); // device-readable
    d.push_avail(0, 0);
    d.write_desc(0, 1, buf, 8, 2, 0); // shorter than the header
    d.push_avail(0, 1);
    d.write_desc(0, 2, 0xF000_0000, 1500, 2, 0); // outside memory
    d.push_avail(0, 2);
    d.write_desc(0, 3, buf, 1500, 2, 0); // good
    d.push_avail(0, 3);
    d.q[0].next_desc = 4;
    d.kick(0);
    let f = frame(&payload(64, 4));
    p[0].send(&f);
    let used = d.wait_used(0, 4);
    assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (3, f.len() as u32)]);
}

#[test]
fn avail_index_jump_breaks_only_that_queue() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    let avail = d.q[1].avail;
    d.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    d.kick(1);
    assert!(d.wait_needs_reset());
    // rx still served.
    d.give_rx(1500);
    p[0].send(&frame(&payload(20, 1)));
    assert_eq!(d.wait_used(0, 1), vec![(0, 32)]);
    // Reset brings the device back.
    d.write(0x70, 0);
    assert_eq!(d.read(0x70), 0);
}

#[test]
fn notifications_and_queue_writes_outside_their_phase_are_ignored() {
    let (b, _p) = mock_backend(1);
    let mut d = Driver::new_unstarted(b, memory());
    assert!(d.negotiate(ALL));
    d.setup_queue(0, 16);
    d.setup_queue(1, 16);
    d.write(0x50, 1);
    assert!(
        d.t.queue_eventfds()[1].read().is_err(),
        "kick before DRIVER_OK"
    );
    d.driver_ok();
    d.write(0x30, 0);
    d.write(0x38, 8);
    assert_eq!(d.read(0x38), 16, "QueueNum is frozen after DRIVER_OK");
    d.write(0x50, 7); // no such queue
    assert!(!d.needs_reset());
}

#[test]
fn bad_queue_layouts_need_reset() {
    for (size, desc) in [
        (12u16, 0x1_0000u64),
        (512, 0x1_0000),
        (16, 0xF000_0000),
        (16, 0x1_0008),
    ] {
        let (b, _p) = mock_backend(1);
        let mut d = Driver::new_unstarted(b, memory());
        assert!(d.negotiate(ALL));
        d.setup_queue(0, 16);
        d.setup_queue(1, 16);
        d.write(0x30, 1);
        d.write(0x38, u32::from(size));
        d.write(0x80, desc as u32);
        d.driver_ok();
        assert!(d.needs_reset(), "size {size} desc {desc:#x}");
        assert!(!d.t.is_active());
    }
}

#[test]
fn driver_ok_without_queue_zero_needs_reset() {
    let (b, _p) = mock_backend(1);
    let mut d = Driver::new_unstarted(b, memory());
    assert!(d.negotiate(ALL));
    d.setup_queue(1, 16);
    d.driver_ok();
    assert!(d.needs_reset());
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    assert_ne!(
        d.t.device().acked_features() & (1 << VIRTIO_F_RING_EVENT_IDX),
        0
    );
    let used_event = GuestAddress(d.q[1].avail + 4 + 2 * 16);
    d.mem.write_obj(100u16, used_event).unwrap();
    d.interrupts();
    for i in 0..3 {
        d.send(&payload(20, i));
        p[0].recv().unwrap();
    }
    d.wait_used(1, 3);
    // Once paused, the device thread has done all it will for those three
    // (an interrupt comes right after its used entry, if at all).
    d.t.device_mut().pause().unwrap();
    assert_eq!(d.interrupts(), 0, "used_event 100 is not crossed");
    // Counted as saved (one per batch: 1 to 3 of them), none as sent.
    let s = d.t.device().stats();
    assert!((1..=3).contains(&s.interrupts_suppressed), "{s:?}");
    assert_eq!((s.interrupts, s.tx_packets), (0, 3), "{s:?}");
    d.t.device_mut().resume().unwrap();
    d.mem.write_obj(3u16, used_event).unwrap();
    d.send(&payload(20, 9));
    d.wait_used(1, 1);
    wait_for("an interrupt once used_event is crossed", || {
        d.interrupts() > 0
    });
    // Published by the running thread, per batch: no pause needed.
    wait_for("the interrupt counted", || {
        d.t.device().stats().interrupts == 1
    });
    let q = d.t.device().queue_stats();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].tx_packets, q[0].tx_bytes), (4, 80));
}

#[test]
fn offloads_follow_acked_features() {
    use common::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
    use net_datapath::tap::offload_flags;
    let (b, _p) = mock_backend(1);
    let calls = b.offload_calls.clone();
    let d = Driver::start(b, without(&[VIRTIO_NET_F_GUEST_TSO6]));
    let acked = d.t.device().acked_features();
    assert_eq!(calls.lock().unwrap().as_slice(), &[acked]);
    assert_eq!(offload_flags(acked), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UFO);
    assert_eq!(
        offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4),
        0,
        "TSO needs CSUM"
    );
    assert_eq!(
        offload_flags((1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO6)),
        TUN_F_CSUM | TUN_F_TSO6
    );
}

fn ctrl_cmd(d: &mut Driver, q: usize, req: &[u8]) -> u8 {
    let a = d.alloc(64);
    d.mem.write_slice(req, GuestAddress(a)).unwrap();
    let ack = d.alloc(16);
    d.mem.write_obj(0xeeu8, GuestAddress(ack)).unwrap();
    d.add_chain(q, &[(a, req.len() as u32, false), (ack, 1, true)]);
    assert_eq!(d.wait_used(q, 1).len(), 1);
    d.mem.read_obj(GuestAddress(ack)).unwrap()
}

#[test]
fn multiqueue_control_queue_switches_pairs() {
    let (b, p) = mock_backend(2);
    let io = b.queues.clone();
    let mut d = Driver::start(b, ALL);
    assert_eq!(d.t.device().queue_max_sizes().len(), 5);
    let acked = d.t.device().acked_features();
    assert_ne!(acked & (1 << VIRTIO_NET_F_MQ), 0);
    let mut mp = [0u8; 2];
    d.t.read(0x108, &mut mp);
    assert_eq!(u16::from_le_bytes(mp), 2);
    let on = |i: usize| io[i].enabled.load(std::sync::atomic::Ordering::SeqCst);
    assert!(on(0) && !on(1), "only pair 0 before VQ_PAIRS_SET");
    assert_eq!(ctrl_cmd(&mut d, 4, &[4, 0, 2, 0]), VIRTIO_NET_OK as u8);
    assert!(on(0) && on(1));
    assert_eq!(ctrl_cmd(&mut d, 4, &[4, 0, 3, 0]), VIRTIO_NET_ERR as u8);
    assert_eq!(ctrl_cmd(&mut d, 4, &[4, 0, 0, 0]), VIRTIO_NET_ERR as u8);
    assert_eq!(ctrl_cmd(&mut d, 4, &[9, 9]), VIRTIO_NET_ERR as u8);
    assert_eq!(ctrl_cmd(&mut d, 4, &[0, 0, 1]), VIRTIO_NET_OK as u8);
    // Pair 1's tx goes to pair 1's backend queue.
    let f = frame(&payload(30, 3));
    let a = d.alloc(64);
    d.mem.write_slice(&f, GuestAddress(a)).unwrap();
    d.add_chain(3, &[(a, f.len() as u32, false)]);
    assert_eq!(p[1].recv().unwrap(), f);
    assert!(p[0].try_recv().is_none());
    // Pair 1's rx.
    let a = d.alloc(2048);
    d.add_chain(2, &[(a, 2048, true)]);
    p[1].send(&f);
    assert_eq!(d.wait_used(2, 1), vec![(0, f.len() as u32)]);
}

#[test]
fn save_restore_and_continue() {
    let (b, p) = mock_backend(1);
    let io = b.queues.clone();
    let mut d = Driver::start(b, ALL);
    d.send(&payload(20, 1));
    p[0].recv().unwrap();
    d.wait_used(1, 1);
    d.give_rx(1500);
    p[0].send(&frame(&payload(10, 1)));
    d.wait_used(0, 1);
    // Pause: a frame sent now waits in the backend.
    d.t.device_mut().pause().unwrap();
    p[0].send(&frame(&payload(33, 2)));
    let mmio = d.t.save(()).unwrap();
    let net = d.t.device().save(()).unwrap();
    let mmio_ron = ron::to_string(&mmio).unwrap();
    let net_ron = ron::to_string(&net).unwrap();
    let mmio2: MmioState = ron::from_str(&mmio_ron).unwrap();
    let net2: NetState = ron::from_str(&net_ron).unwrap();
    assert_eq!(mmio2, mmio);
    assert_eq!(net2, net);
    assert_eq!(mmio2.queues[1].0.next_avail, 1);
    assert_eq!(mmio2.queues[0].0.next_used, 1);
    // A new device and transport on the same backend and memory.
    let backend = MockBackend {
        queues: io,
        offload_calls: Default::default(),
    };
    let mut dev = NetDevice::new(Box::new(backend), None).unwrap();
    dev.restore((), &net2).unwrap();
    let mut t = MmioTransport::new(dev, d.mem.clone()).unwrap();
    t.restore((), &mmio2).unwrap();
    assert!(t.is_active());
    assert!(!t.device().is_running(), "restored paused");
    d.t = t;
    d.t.device_mut().resume().unwrap();
    let pl = payload(44, 3);
    d.send(&pl);
    assert_eq!(p[0].recv().unwrap(), frame(&pl));
    assert_eq!(d.wait_used(1, 1).len(), 1);
    assert_eq!(d.used_idx(1), 2);
    d.give_rx(1500);
    assert_eq!(d.wait_used(0, 1), vec![(1, 45)]);
    assert_eq!(d.read(0x70) & 0xf, 0xf);
}

#[test]
fn restore_rejects_inconsistent_state() {
    let (b, _p) = mock_backend(1);
    let d = Driver::start(b, ALL);
    let e = d.t.device().save(()).unwrap_err().to_string();
    assert!(e.contains("pause"), "{e}");
    let (b2, _p2) = mock_backend(2);
    let dev = NetDevice::new(Box::new(b2), None).unwrap();
    let st = dev.save(()).unwrap();
    let mut fresh = NetDevice::new(Box::new(mock_backend(2).0), None).unwrap();
    fresh.restore((), &st).unwrap();
    // Two queue pairs saved, one in the backend.
    let mut one = NetDevice::new(Box::new(mock_backend(1).0), None).unwrap();
    assert!(one.restore((), &st).is_err());
    let mut m = MmioTransport::new(dev, memory()).unwrap().save(()).unwrap();
    m.queues.pop();
    let dev = NetDevice::new(Box::new(mock_backend(2).0), None).unwrap();
    let mut t = MmioTransport::new(dev, memory()).unwrap();
    assert!(matches!(
        t.restore((), &m),
        Err(MmioError::QueueCount { .. })
    ));
}

#[test]
fn reset_and_reinitialise() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    // The pair's bounce buffers are lent to the worker, not allocated by
    // the activation, and come back with a reset.
    assert_eq!(d.t.device().spare_buffers(), 0);
    d.send(&payload(20, 1));
    p[0].recv().unwrap();
    d.write(0x70, 0);
    assert!(!d.t.is_active());
    assert_eq!(d.t.device().spare_buffers(), 1);
    assert!(d.negotiate(ALL));
    d.setup_queue(0, 16);
    d.setup_queue(1, 16);
    d.driver_ok();
    assert_eq!(d.t.device().spare_buffers(), 0);
    let pl = payload(21, 2);
    d.send(&pl);
    assert_eq!(p[0].recv().unwrap(), frame(&pl));
}

/// The in-vmm device's side of the shared ring fuzz
/// (`net_datapath::fuzz`): one queue pair's `PairWorker`, served through
/// its own `handle_*` with the device's `Interrupt` as what it tells.
struct WorkerTarget {
    w: PairWorker,
    interrupt: Arc<Interrupt>,
}

impl WorkerTarget {
    fn new(mem: &GuestMemory, io: Arc<SockIo>) -> Self {
        let aq = || ActiveQueue {
            queue: Queue::new(256).unwrap(),
            kick: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        };
        let interrupt = Arc::new(Interrupt::new().unwrap());
        let ctrl = CtrlQueue {
            queue: aq(),
            all_io: vec![io.clone() as Arc<dyn FrameIo>],
            broken: false,
        };
        let w = PairWorker::new(
            0,
            aq(),
            aq(),
            Some(ctrl),
            io,
            mem.clone(),
            interrupt.clone(),
            false,
            Arc::new(AtomicU16::new(1)),
            4,
            PairBuffers::default(),
        );
        WorkerTarget { w, interrupt }
    }
}

impl Target for WorkerTarget {
    fn has_ctrl(&self) -> bool {
        true
    }

    fn setup(&mut self, kind: RingKind, r: &RingSetup, f: Features) {
        let mut q = Queue::new(256).unwrap();
        q.set_size(r.size);
        q.try_set_desc_table_address(GuestAddress(r.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(r.avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(r.used)).unwrap();
        q.set_event_idx(r.event_idx);
        q.set_next_avail(r.start);
        q.set_next_used(r.start);
        q.set_ready(true);
        // A driver's reset and renegotiation: fresh rings and state.
        let w = &mut self.w;
        w.stats = NetStats::default();
        w.rx_state = RxState::default();
        w.rx_state.set_guest_gso(f.guest_gso);
        w.mrg_rxbuf = f.mrg_rxbuf;
        w.rx_broken = false;
        w.tx_broken = false;
        self.interrupt.clear();
        match kind {
            RingKind::Rx => w.rx.queue = q,
            RingKind::Tx => w.tx.queue = q,
            RingKind::Ctrl => {
                let c = w.ctrl.as_mut().unwrap();
                c.queue.queue = q;
                c.broken = false;
            }
        }
    }

    fn kick(&mut self, kind: RingKind, _from_kick: bool) -> Served {
        let w = &mut self.w;
        let broken = match kind {
            RingKind::Rx => {
                while w.handle_rx() == RxStatus::More {}
                w.rx_broken
            }
            RingKind::Tx => {
                w.handle_tx();
                w.tx_broken
            }
            RingKind::Ctrl => {
                w.handle_ctrl();
                w.ctrl.as_ref().unwrap().broken
            }
        };
        assert_eq!(
            self.interrupt.needs_reset(),
            broken,
            "a broken ring needs reset"
        );
        assert_eq!(
            self.interrupt.status() & INT_VRING != 0,
            w.stats.interrupts > 0,
            "the used-ring interrupt iff counted"
        );
        Served {
            stats: w.stats,
            broken,
        }
    }
}

/// The shared hostile-ring fuzz against the device's queue-pair worker.
#[test]
fn fuzz_pair_worker_with_hostile_rings() {
    let mem = memory();
    // The region edges the fuzz aims at are the vmm's MMIO hole and the
    // end of RAM.
    let regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    assert_eq!(regions, [(0, LOW_RAM_END), (HIGH_RAM, HIGH_RAM_SIZE)]);
    let (io, peer) = sock_pair();
    let mut t = WorkerTarget::new(&mem, io.clone());
    let fz = Fuzzer {
        mem: &mem,
        layout: Layout {
            rings: 0x4_0000,
            bufs: BUF_BASE..MEM_SIZE as u64,
        },
        io: &io,
        peer: &peer,
    };
    let (seed, rounds) = seed_and_rounds(0x5eed_1234_abcd_0001, 40_000);
    fz.run(&mut t, seed, rounds).assert_covered(true);
}

/// Random register writes and ring contents against the whole device with
/// its threads; afterwards a reset device must work normally.
#[test]
fn fuzz_device_registers_then_still_usable() {
    let (b, p) = mock_backend(2);
    let mut d = Driver::start(b, ALL);
    let (seed, rounds) = seed_and_rounds(0xfeed_beef_0000_0042, 100_000);
    let mut rng = Rng::new(seed);
    let bufs = BUF_BASE..MEM_SIZE as u64;
    let regs = [
        0x14u64, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xa0,
        0xa4, 0x100, 0x104,
    ];
    for _ in 0..rounds {
        match rng.below(6) {
            0 => {
                let r = regs[rng.below(regs.len() as u64) as usize];
                let v = match rng.below(3) {
                    0 => rng.next_u64() as u32,
                    1 => rng.below(16) as u32,
                    _ => 1 << rng.below(32),
                };
                d.write(r, v);
            }
            1 => {
                let off = rng.below(0x1000);
                let mut buf = [0u8; 4];
                let n = 1usize << rng.below(3);
                d.t.read(off, &mut buf[..n.min(4)]);
            }
            2 => {
                let q = rng.below(5) as usize;
                let i = rng.below(16) as u16;
                let addr = hostile_addr(&mut rng, &d.mem, &bufs);
                d.write_desc(
                    q,
                    i,
                    addr,
                    rng.below(4000) as u32,
                    rng.below(8) as u16,
                    rng.below(20) as u16,
                );
                d.push_avail(q, rng.below(20) as u16);
                d.kick(q);
            }
            3 => {
                let n = rng.below(1600) as usize + 1;
                p[rng.below(2) as usize].try_send(&payload(n, 1));
            }
            4 => {
                // Renegotiate from scratch now and then.
                if d.negotiate(rng.next_u64()) {
                    for i in 0..5 {
                        d.setup_queue(i, 1 << rng.below(6));
                    }
                    d.driver_ok();
                }
            }
            _ => {
                for q in &p {
                    while q.try_recv().is_some() {}
                }
            }
        }
    }
    // The device threads are alive and give their queues back.
    d.t.device_mut().pause().unwrap();
    d.t.device_mut().resume().unwrap();
    d.write(0x70, 0);
    for q in &p {
        while q.try_recv().is_some() {}
    }
    assert!(d.negotiate(ALL));
    for i in 0..5 {
        d.setup_queue(i, 16);
    }
    // Fresh rings.
    for g in d.q.iter() {
        d.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(g.desc))
            .unwrap();
    }
    d.driver_ok();
    assert!(!d.needs_reset());
    let pl = payload(64, 6);
    d.send(&pl);
    assert_eq!(p[0].recv().unwrap(), frame(&pl));
}

#[test]
fn rx_frame_waits_until_enough_merged_buffers() {
    let (b, p) = mock_backend(1);
    let mut d = Driver::start(b, ALL);
    d.give_rx(100);
    let f = frame(&payload(300, 8));
    p[0].send(&f);
    // With EVENT_IDX the device asks for a kick past the buffer it saw
    // once it found that buffer too small (avail_event was 0 before).
    let avail_event = GuestAddress(d.q[0].used + 4 + 8 * 16);
    let mem = d.mem.clone();
    wait_for("avail_event past the one buffer", || {
        mem.read_obj::<u16>(avail_event).unwrap() == 1
    });
    d.t.device_mut().pause().unwrap();
    assert_eq!(
        d.used_idx(0),
        0,
        "one 100-byte buffer cannot hold 312 bytes"
    );
    assert_eq!(d.mem.read_obj::<u16>(avail_event).unwrap(), 1);
    d.t.device_mut().resume().unwrap();
    for _ in 0..3 {
        d.give_rx(100);
    }
    assert_eq!(d.wait_used(0, 4).len(), 4);
}

/// The device threads run under a seccomp filter allowing exactly
/// `DEVICE_THREAD_SYSCALLS` (ioctl only with the TUN requests); anything
/// else kills the process, so a missing entry fails loudly here.
#[test]
fn device_threads_run_under_their_seccomp_allow_list() {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };

    use super::net::event_handler::DEVICE_THREAD_SYSCALLS;
    use net_datapath::tap::DATAPATH_IOCTLS as DEVICE_THREAD_IOCTLS;

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in DEVICE_THREAD_SYSCALLS {
        let r = if nr == libc::SYS_ioctl {
            DEVICE_THREAD_IOCTLS
                .iter()
                .map(|&req| {
                    SeccompRule::new(vec![
                        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                            .unwrap(),
                    ])
                    .unwrap()
                })
                .collect()
        } else {
            Vec::new()
        };
        rules.insert(nr, r);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let prog: BpfProgram = filter.try_into().unwrap();
    let prog = std::sync::Arc::new(prog);
    let applied = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));

    let (b, p) = mock_backend(2);
    let mem = memory();
    let mut dev = NetDevice::new(Box::new(b), Some(MAC)).unwrap();
    let (pr, ap) = (prog.clone(), applied.clone());
    dev.set_thread_hook(std::sync::Arc::new(move |_name: &str| {
        seccompiler::apply_filter(&pr).expect("seccomp filter");
        ap.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    // Threads exist (and are sandboxed) before the driver shows up.
    dev.start_threads().unwrap();
    wait_for("both device threads", || {
        applied.load(std::sync::atomic::Ordering::SeqCst) == 2
    });
    let t = MmioTransport::new(dev, mem.clone()).unwrap();
    let mut d = Driver::wrap(t, mem);
    assert!(d.negotiate(ALL));
    for i in 0..5 {
        d.setup_queue(i, 16);
    }
    d.driver_ok();
    // tx, rx, a control command (TUNSETQUEUE on the mock is a no-op, so
    // the ioctl path is exercised by the TAP integration test), pause, resume.
    let pl = payload(60, 1);
    d.send(&pl);
    assert_eq!(p[0].recv().unwrap(), frame(&pl));
    d.give_rx(2048);
    p[0].send(&frame(&pl));
    d.wait_used(0, 1);
    assert_eq!(ctrl_cmd(&mut d, 4, &[4, 0, 2, 0]), VIRTIO_NET_OK as u8);
    d.t.device_mut().pause().unwrap();
    d.t.device_mut().resume().unwrap();
    d.send(&pl);
    assert_eq!(p[0].recv().unwrap(), frame(&pl));
    d.write(0x70, 0);
    assert!(!d.needs_reset());
    // Reactivation reuses the same threads.
    assert!(d.negotiate(ALL));
    for i in 0..5 {
        d.setup_queue(i, 16);
    }
    d.driver_ok();
    d.send(&pl);
    assert_eq!(p[0].recv().unwrap(), frame(&pl));
    assert_eq!(applied.load(std::sync::atomic::Ordering::SeqCst), 2);
    drop(d);
}

/// An interrupt the driver had not acknowledged when the state was saved
/// may never have reached the source's irqchip (irqfd injection is
/// asynchronous): restoring raises it again, and a clean status raises
/// nothing.
#[test]
fn restored_pending_interrupt_is_raised_again() {
    let irq = super::Interrupt::new().unwrap();
    irq.restore(super::INT_VRING, false);
    assert_eq!(irq.eventfd().read().unwrap(), 1);
    assert_eq!(irq.status(), super::INT_VRING);

    let quiet = super::Interrupt::new().unwrap();
    quiet.restore(0, false);
    assert!(
        quiet.eventfd().read().is_err(),
        "nothing pending, no interrupt"
    );
}

/// More frames waiting than one rx batch when the device starts: the
/// device thread delivers them all, in batches, each frame whole.
#[test]
fn device_thread_delivers_more_than_one_batch() {
    use net_datapath::datapath::RX_BATCH;
    let (b, p) = mock_backend(1);
    let mem = memory();
    let mut d = Driver::new_unstarted(b, mem);
    assert!(d.negotiate(u64::MAX));
    d.setup_queue(0, 256);
    d.setup_queue(1, 256);
    // Buffers posted before DRIVER_OK (the kicks are ignored until then).
    for _ in 0..200 {
        d.give_rx(256);
    }
    let n = RX_BATCH + 20;
    for i in 0..n {
        assert!(
            p[0].try_send(&frame(&payload(40, i as u8))),
            "socket buffer full"
        );
    }
    d.driver_ok();
    let used = d.wait_used(0, n);
    assert_eq!(used.len(), n);
    assert!(used.iter().all(|&(_, len)| len == 52));
    assert!(d.interrupts() >= 1);
}

/// Pausing takes the queues from the device thread between two of its
/// batches, also while frames keep arriving: once `pause` returned the
/// thread leaves the rings alone (frames wait in the backend) until
/// `resume`, and every frame of the stream arrives whole, once.
#[test]
fn pause_takes_the_queues_while_frames_arrive() {
    const FRAMES: usize = 240;
    let (b, p) = mock_backend(1);
    let mut d = Driver::new_unstarted(b, memory());
    assert!(d.negotiate(ALL));
    d.setup_queue(0, 256);
    d.setup_queue(1, 256);
    for _ in 0..FRAMES {
        d.give_rx(256);
    }
    d.driver_ok();
    let peer = p.into_iter().next().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..FRAMES {
            while !peer.try_send(&frame(&payload(40, i as u8))) {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        peer
    });
    wait_for("the stream to start", || d.used_idx(0) > 0);
    d.t.device_mut().pause().unwrap();
    let used = d.used_idx(0);
    let counted = d.t.device().stats().rx_packets;
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(d.used_idx(0), used, "the ring moved after the pause");
    assert_eq!(d.t.device().stats().rx_packets, counted);
    d.t.device_mut().resume().unwrap();
    let _peer = sender.join().unwrap();
    let got = d.wait_used(0, FRAMES);
    assert_eq!(got.len(), FRAMES);
    assert!(got.iter().all(|&(_, len)| len == 52), "{got:?}");
    assert_eq!(d.t.device().stats().rx_packets, FRAMES as u64);
}
