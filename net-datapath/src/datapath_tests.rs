//! The zero-copy rx/tx paths driven directly on a queue in test memory,
//! with a socketpair standing in for the TAP (it keeps frame boundaries
//! and, like a TAP, cuts a frame that does not fit the read).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::Mutex;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::{Peer, SockIo, sock_pair};

const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
const BUFS: u64 = 0x10_0000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Records the scatter lists the datapath hands the backend.
struct RecordingIo {
    inner: Arc<SockIo>,
    /// (entries, bytes) of every readv.
    reads: Mutex<Vec<(usize, usize)>>,
    /// Entries of every writev.
    writes: Mutex<Vec<usize>>,
}

impl AsRawFd for RecordingIo {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl FrameIo for RecordingIo {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_frame(buf)
    }
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write_frame(buf)
    }
    fn read_frame_vectored(&self, iov: &IoVecs<'_, Dest>) -> io::Result<usize> {
        self.reads.lock().unwrap().push((iov.len(), iov.total()));
        self.inner.read_frame_vectored(iov)
    }
    fn write_frame_vectored(&self, iov: &IoVecs<'_, Src>) -> io::Result<usize> {
        self.writes.lock().unwrap().push(iov.len());
        self.inner.write_frame_vectored(iov)
    }
    fn set_enabled(&self, _on: bool) -> io::Result<()> {
        Ok(())
    }
}

/// A driver's view of one queue in `mem`.
struct Ring {
    mem: GuestMemoryMmap,
    q: Queue,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
    size: u16,
}

impl Ring {
    fn new(mem: GuestMemoryMmap) -> Self {
        Self::with_size(mem, 64)
    }

    fn with_size(mem: GuestMemoryMmap, size: u16) -> Self {
        let mut q = Queue::new(256).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        Ring {
            mem,
            q,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf: BUFS,
            size,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += (len + 15) & !15;
        a
    }

    /// Publishes a chain of (addr, len, device-writable) buffers.
    fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.size;
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % size;
            let next = if k + 1 < bufs.len() {
                VIRTQ_DESC_F_NEXT
            } else {
                0
            };
            let flags = next | if w { VIRTQ_DESC_F_WRITE } else { 0 };
            let d = DESC + 16 * u64::from(i);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem
                .write_obj((i + 1) % size, GuestAddress(d + 14))
                .unwrap();
        }
        self.next_desc = (head + bufs.len() as u16) % size;
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        head
    }

    /// Writes descriptor `i` as it is, whatever it says.
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(&self.mem, DESC, i, addr, len, flags, next);
    }

    /// Makes `head` available (a chain written with `desc`).
    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// One device-writable buffer of `len` bytes; returns its address.
    fn rx_buf(&mut self, len: u32) -> u64 {
        let a = self.alloc(u64::from(len));
        self.chain(&[(a, len, true)]);
        a
    }

    fn used(&mut self) -> Vec<(u32, u32)> {
        let end: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != end {
            let e = USED + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// Guest RAM with a VMM's layout: low RAM up to the MMIO hole, more
/// above 4 GiB.
fn memory() -> GuestMemoryMmap {
    crate::testing::layout_memory()
}

/// Two regions meeting at 2 MiB (separate mappings, so a buffer across
/// the boundary is two host ranges).
fn split_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20), (GuestAddress(2 << 20), 2 << 20)])
        .unwrap()
}

/// Writes descriptor `i` of the table at `table`.
fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let d = table + 16 * u64::from(i);
    mem.write_obj(addr, GuestAddress(d)).unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
    mem.write_obj(next, GuestAddress(d + 14)).unwrap();
}

fn recording(io: Arc<SockIo>) -> RecordingIo {
    RecordingIo {
        inner: io,
        reads: Mutex::new(Vec::new()),
        writes: Mutex::new(Vec::new()),
    }
}

/// A frame: vnet header with num_buffers 0xeeee (the device must set it),
/// then `n` payload bytes.
fn frame(n: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[10] = 0xee;
    f[11] = 0xee;
    f.extend((0..n).map(|i| tag.wrapping_add(i as u8)));
    f
}

fn num_buffers(f: &[u8]) -> u16 {
    u16::from_le_bytes([f[10], f[11]])
}

fn rx(
    r: &mut Ring,
    io: &dyn FrameIo,
    st: &mut RxState,
    mrg: bool,
    stats: &mut NetStats,
) -> RxOutcome {
    let mem = r.mem.clone();
    process_rx(&mut r.q, &mem, io, st, mrg, stats).unwrap().0
}

fn setup() -> (Ring, RecordingIo, Peer, RxState, NetStats) {
    let (io, peer) = sock_pair();
    let mut st = RxState::default();
    st.set_guest_gso(false);
    (
        Ring::new(memory()),
        recording(io),
        peer,
        st,
        NetStats::default(),
    )
}

#[test]
fn frame_spanning_merged_buffers_is_read_in_place() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    // 20 buffers of 100 bytes: 1526 bytes of space need 16 of them.
    let addrs: Vec<u64> = (0..20).map(|_| r.rx_buf(100)).collect();
    let f = frame(300, 3);
    peer.send(&f);
    assert!(matches!(
        rx(&mut r, &io, &mut st, true, &mut stats),
        RxOutcome::Drained
    ));
    // One readv: 16 guest buffers and the bounce buffer behind them.
    let reads = io.reads.lock().unwrap().clone();
    assert_eq!(reads[0], (17, 1600 + MAX_FRAME_LEN));
    let used = r.used();
    assert_eq!(used, vec![(0, 100), (1, 100), (2, 100), (3, 12)]);
    let mut got = Vec::new();
    for (a, &(_, len)) in addrs.iter().zip(&used) {
        got.extend(r.read(*a, len as usize));
    }
    assert_eq!(num_buffers(&got), 4);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    // The 16 buffers the frame did not need went back to the avail ring.
    assert_eq!(r.q.next_avail(), 4);
    assert!(!st.has_pending());
    assert_eq!(
        (stats.rx_packets, stats.rx_dropped(), stats.bad_chains()),
        (1, 0, 0)
    );
    // The next frame starts in the first buffer not used.
    let g = frame(50, 9);
    peer.send(&g);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(r.used(), vec![(4, 62)]);
    assert_eq!(r.read(addrs[4], 62)[VNET_HDR_LEN..], g[VNET_HDR_LEN..]);
    assert_eq!(num_buffers(&r.read(addrs[4], 12)), 1);
}

#[test]
fn read_shorter_than_the_chain_uses_only_what_it_needs() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    // Without MRG_RXBUF: one chain of three descriptors, a small frame.
    let a = r.alloc(3 * 2000);
    r.chain(&[
        (a, 2000, true),
        (a + 2000, 2000, true),
        (a + 4000, 2000, true),
    ]);
    let b = r.rx_buf(2000);
    let f = frame(100, 5);
    peer.send(&f);
    rx(&mut r, &io, &mut st, false, &mut stats);
    // A plain frame fits the first descriptor: the read goes there alone.
    assert_eq!(io.reads.lock().unwrap()[0], (1, 2000));
    assert_eq!(r.used(), vec![(0, 112)]);
    let got = r.read(a, 112);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(r.q.next_avail(), 1, "the second chain stays available");
    // With MRG_RXBUF, a frame that fits one buffer takes one.
    let g = frame(40, 1);
    peer.send(&g);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(r.used(), vec![(3, 52)]);
    assert_eq!(r.read(b, 52)[VNET_HDR_LEN..], g[VNET_HDR_LEN..]);
    assert_eq!(stats.rx_packets, 2);
}

#[test]
fn short_rx_buffers_are_returned_empty_and_skipped() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    r.rx_buf(8); // shorter than the vnet header: refused first
    let a = r.rx_buf(1000);
    r.rx_buf(4); // refused in the middle of what was lined up
    let b = r.rx_buf(1000);
    let f = frame(1500, 7);
    peer.send(&f);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(r.used(), vec![(0, 0), (1, 1000), (2, 0), (3, 512)]);
    let mut got = r.read(a, 1000);
    got.extend(r.read(b, 512));
    assert_eq!(num_buffers(&got), 2);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_bad_chains, stats.bad_chains()), (2, 2));
    assert_eq!(r.q.next_avail(), 4);
}

#[test]
fn frame_longer_than_the_buffers_waits_and_is_copied_once_they_come() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    let mut addrs = vec![r.rx_buf(100), r.rx_buf(100)];
    let f = frame(300, 4);
    peer.send(&f);
    // 200 bytes at hand for 312: the rest spills into the bounce buffer.
    assert!(matches!(
        rx(&mut r, &io, &mut st, true, &mut stats),
        RxOutcome::NoBuffers
    ));
    assert!(st.has_pending());
    assert!(r.used().is_empty());
    assert_eq!(
        r.q.next_avail(),
        0,
        "the buffers went back to the avail ring"
    );
    assert_eq!(st.seen_avail, 2);
    addrs.push(r.rx_buf(100));
    addrs.push(r.rx_buf(100));
    assert!(matches!(
        rx(&mut r, &io, &mut st, true, &mut stats),
        RxOutcome::Drained
    ));
    let used = r.used();
    assert_eq!(used, vec![(0, 100), (1, 100), (2, 100), (3, 12)]);
    let mut got = Vec::new();
    for (a, &(_, len)) in addrs.iter().zip(&used) {
        got.extend(r.read(*a, len as usize));
    }
    assert_eq!(num_buffers(&got), 4);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (1, 0));
}

#[test]
fn without_mrg_a_frame_longer_than_the_chain_is_dropped() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    let a = r.rx_buf(100);
    peer.send(&frame(300, 1));
    let small = frame(30, 2);
    peer.send(&small);
    rx(&mut r, &io, &mut st, false, &mut stats);
    assert_eq!(r.used(), vec![(0, 42)]);
    assert_eq!(r.read(a, 42)[VNET_HDR_LEN..], small[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (1, 1));
    assert_eq!((stats.rx_dropped_no_buffer, stats.rx_tap_errors), (1, 0));
}

#[test]
fn buffer_across_two_memory_regions_is_read_and_written_in_place() {
    let (io, peer) = sock_pair();
    let io = recording(io);
    let mut r = Ring::new(split_memory());
    let mut st = RxState::default();
    let mut stats = NetStats::default();
    // 2000 bytes straddling 2 MiB.
    let a = (2 << 20) - 700;
    r.chain(&[(a, 2000, true)]);
    let f = frame(1200, 6);
    peer.send(&f);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(r.used(), vec![(0, 1212)]);
    assert_eq!(io.reads.lock().unwrap()[0], (3, 2000 + MAX_FRAME_LEN));
    let got = r.read(a, 1212);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);

    // tx: the same straddling buffer, gathered by one writev.
    let mut t = Ring::new(r.mem.clone());
    let out = frame(1500, 8);
    r.mem.write_slice(&out, GuestAddress(a)).unwrap();
    t.chain(&[(a, out.len() as u32, false)]);
    let mem = t.mem.clone();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    assert!(process_tx(&mut t.q, &mem, &io, &mut buf, &mut stats).unwrap());
    assert_eq!(*io.writes.lock().unwrap(), vec![2]);
    assert_eq!(peer.recv().unwrap(), out);
    assert_eq!(t.used(), vec![(0, 0)]);
}

#[test]
fn tx_gathers_a_chain_into_one_frame() {
    let (io, peer) = sock_pair();
    let io = recording(io);
    let mut t = Ring::new(memory());
    let mut stats = NetStats::default();
    let f = frame(200, 2);
    // Header split across descriptors, payload in three more.
    let parts = [5usize, 7, 50, 100, 50];
    let mut bufs = Vec::new();
    let mut at = 0;
    for &n in &parts {
        let a = t.alloc(n as u64);
        t.mem.write_slice(&f[at..at + n], GuestAddress(a)).unwrap();
        bufs.push((a, n as u32, false));
        at += n;
    }
    t.chain(&bufs);
    let mem = t.mem.clone();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    process_tx(&mut t.q, &mem, &io, &mut buf, &mut stats).unwrap();
    assert_eq!(*io.writes.lock().unwrap(), vec![5]);
    assert_eq!(peer.recv().unwrap(), f);
    assert_eq!(stats.tx_packets, 1);
}

#[test]
fn rx_stops_after_a_batch_and_resumes() {
    let (_, io, peer, mut st, mut stats) = setup();
    let mut r = Ring::with_size(memory(), 256);
    for _ in 0..256 {
        r.rx_buf(1600);
    }
    let frames = RX_BATCH + 3;
    for i in 0..frames {
        assert!(peer.try_send(&frame(60, i as u8)), "socket buffer full");
    }
    assert!(matches!(
        rx(&mut r, &io, &mut st, true, &mut stats),
        RxOutcome::More
    ));
    assert_eq!(r.used().len(), RX_BATCH);
    assert!(matches!(
        rx(&mut r, &io, &mut st, true, &mut stats),
        RxOutcome::Drained
    ));
    assert_eq!(r.used().len(), 3);
    assert_eq!(stats.rx_packets as usize, frames);
}

#[test]
fn after_a_long_frame_rx_lines_up_space_for_the_largest() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    let addrs: Vec<u64> = (0..40).map(|_| r.rx_buf(2048)).collect();
    // Without guest GSO a plain frame is due: the read goes into the first
    // buffer alone, and a frame that fills it was cut, so it is dropped.
    let big = frame(3000, 1);
    peer.send(&big);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(io.reads.lock().unwrap()[0], (1, 2048));
    assert!(r.used().is_empty());
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (0, 1));
    // From then on the bounce buffer is behind every read: the next long
    // frame spills into it and arrives whole (copied)...
    peer.send(&big);
    rx(&mut r, &io, &mut st, true, &mut stats);
    let reads = io.reads.lock().unwrap().clone();
    assert_eq!(reads[2], (2, 2048 + MAX_FRAME_LEN));
    assert_eq!(r.used(), vec![(0, 2048), (1, 964)]);
    let mut got = r.read(addrs[0], 2048);
    got.extend(r.read(addrs[1], 964));
    assert_eq!(num_buffers(&got), 2);
    assert_eq!(&got[VNET_HDR_LEN..], &big[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (1, 1));
    // ...and the next ones go straight into two buffers lined up for them.
    peer.send(&big);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(io.reads.lock().unwrap()[4], (3, 2 * 2048 + MAX_FRAME_LEN));
    assert_eq!(r.used(), vec![(2, 2048), (3, 964)]);
    let mut got = r.read(addrs[2], 2048);
    got.extend(r.read(addrs[3], 964));
    assert_eq!(&got[VNET_HDR_LEN..], &big[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (2, 1));
}

#[test]
fn with_guest_gso_long_frames_are_never_lost() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    st.set_guest_gso(true);
    let addrs: Vec<u64> = (0..40).map(|_| r.rx_buf(2048)).collect();
    let small = frame(100, 2);
    peer.send(&small);
    rx(&mut r, &io, &mut st, true, &mut stats);
    // A 64 KiB frame's worth lined up: 33 buffers and the bounce buffer.
    assert_eq!(io.reads.lock().unwrap()[0], (34, 33 * 2048 + MAX_FRAME_LEN));
    assert_eq!(r.used(), vec![(0, 112)]);
    // Many small frames later only a plain frame's worth is lined up, but
    // the bounce buffer stays behind it: a long frame spills and arrives.
    for i in 0..300u32 {
        peer.send(&frame(40, i as u8));
        rx(&mut r, &io, &mut st, true, &mut stats);
        let used = r.used();
        assert_eq!(used.len(), 1);
        r.rx_buf(2048);
    }
    let last = *io.reads.lock().unwrap().last().unwrap();
    assert_eq!(last, (2, 2048 + MAX_FRAME_LEN));
    let big = frame(5000, 3);
    peer.send(&big);
    rx(&mut r, &io, &mut st, true, &mut stats);
    let used = r.used();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![2048, 2048, 916]
    );
    assert_eq!(stats.rx_dropped(), 0);
    let _ = addrs;
}

#[test]
fn a_vlan_tagged_full_frame_exactly_filling_a_buffer_arrives() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    // Linux's smallest plain rx buffer: header + 1518 bytes.
    let a = r.rx_buf(1530);
    r.rx_buf(1530);
    let f = frame(1518, 4);
    peer.send(&f);
    rx(&mut r, &io, &mut st, false, &mut stats);
    assert_eq!(r.used(), vec![(0, 1530)]);
    assert_eq!(r.read(a, 1530)[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (1, 0));
}

// ---- Hostile chains: what a broken or malicious driver can put in rings.

use crate::testing::{HIGH_RAM, HIGH_RAM_SIZE, IN_HOLE, LOW_RAM_END};

const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Indirect tables live here, below the buffers.
const TABLES: u64 = 0x4_0000;

/// An rx chain a driver must not offer, written at descriptor 0 onwards of
/// `r` (using descriptors below 8) and made available.
type HostileRx = fn(&mut Ring, u64);

fn hostile_rx_cases() -> Vec<(&'static str, HostileRx)> {
    const W: u16 = VIRTQ_DESC_F_WRITE;
    const N: u16 = VIRTQ_DESC_F_NEXT;
    const I: u16 = VIRTQ_DESC_F_INDIRECT;
    vec![
        ("a descriptor that chains to itself", |r, b| {
            r.desc(0, b, 2000, W | N, 0);
            r.publish(0);
        }),
        ("a two-descriptor loop", |r, b| {
            r.desc(0, b, 1000, W | N, 1);
            r.desc(1, b + 1000, 1000, W | N, 0);
            r.publish(0);
        }),
        ("next outside the ring", |r, b| {
            r.desc(0, b, 2000, W | N, 200);
            r.publish(0);
        }),
        ("a device-readable buffer", |r, b| {
            r.desc(0, b, 2000, 0, 0);
            r.publish(0);
        }),
        ("a readable descriptor after a writable one", |r, b| {
            r.desc(0, b, 1000, W | N, 1);
            r.desc(1, b + 1000, 1000, 0, 0);
            r.publish(0);
        }),
        ("zero length", |r, b| {
            r.desc(0, b, 0, W, 0);
            r.publish(0);
        }),
        ("shorter than the vnet header", |r, b| {
            r.desc(0, b, 8, W, 0);
            r.publish(0);
        }),
        ("running from low RAM into the MMIO hole", |r, _| {
            r.desc(0, LOW_RAM_END - 100, 2000, W, 0);
            r.publish(0);
        }),
        ("inside the MMIO hole", |r, _| {
            r.desc(0, IN_HOLE, 2000, W, 0);
            r.publish(0);
        }),
        ("running past the end of high RAM", |r, _| {
            r.desc(0, HIGH_RAM + HIGH_RAM_SIZE - 100, 2000, W, 0);
            r.publish(0);
        }),
        ("an address that wraps around", |r, _| {
            r.desc(0, u64::MAX - 5, 2000, W, 0);
            r.publish(0);
        }),
        ("a good descriptor, then one outside memory", |r, b| {
            r.desc(0, b, 1000, W | N, 1);
            r.desc(1, IN_HOLE, 1000, W, 0);
            r.publish(0);
        }),
        (
            "an indirect table of a length that is no multiple of 16",
            |r, b| {
                write_desc(&r.mem, TABLES, 0, b, 2000, W, 0);
                r.desc(0, TABLES, 24, I, 0);
                r.publish(0);
            },
        ),
        ("an indirect table outside memory", |r, _| {
            r.desc(0, IN_HOLE, 32, I, 0);
            r.publish(0);
        }),
        ("an indirect table running past the end of RAM", |r, _| {
            r.desc(0, HIGH_RAM + HIGH_RAM_SIZE - 16, 64, I, 0);
            r.publish(0);
        }),
        ("an indirect table inside an indirect table", |r, b| {
            write_desc(&r.mem, TABLES + 0x1000, 0, b, 2000, W, 0);
            write_desc(&r.mem, TABLES, 0, TABLES + 0x1000, 16, I, 0);
            r.desc(0, TABLES, 16, I, 0);
            r.publish(0);
        }),
        ("an indirect table that loops", |r, b| {
            write_desc(&r.mem, TABLES, 0, b, 1000, W | N, 1);
            write_desc(&r.mem, TABLES, 1, b + 1000, 1000, W | N, 0);
            r.desc(0, TABLES, 32, I, 0);
            r.publish(0);
        }),
        ("an indirect table whose next leaves it", |r, b| {
            write_desc(&r.mem, TABLES, 0, b, 2000, W | N, 5);
            r.desc(0, TABLES, 32, I, 0);
            r.publish(0);
        }),
        ("more pieces than one chain may have", |r, b| {
            // 300 writable 8-byte pieces (indirect, so no ring limit).
            for i in 0..300u16 {
                write_desc(&r.mem, TABLES, i, b + 8 * u64::from(i), 8, W | N, i + 1);
            }
            write_desc(&r.mem, TABLES, 299, b + 8 * 299, 8, W, 0);
            r.desc(0, TABLES, 300 * 16, I, 0);
            r.publish(0);
        }),
    ]
}

/// Each hostile rx chain alone, followed by a good buffer: the chain comes
/// back empty and counted, the frame lands whole in the good buffer, and a
/// write never reaches the hostile chain's memory.
#[test]
fn each_hostile_rx_chain_is_returned_empty_and_the_frame_goes_on() {
    for (what, make) in hostile_rx_cases() {
        for mrg in [true, false] {
            let (mut r, io, peer, mut st, mut stats) = setup();
            let bad_buf = r.alloc(4096);
            r.mem
                .write_slice(&[0x5a; 4096], GuestAddress(bad_buf))
                .unwrap();
            make(&mut r, bad_buf);
            r.next_desc = 8;
            let good = r.rx_buf(2048);
            let f = frame(300, 9);
            peer.send(&f);
            rx(&mut r, &io, &mut st, mrg, &mut stats);
            let ctx = format!("{what} (mrg {mrg})");
            assert_eq!(r.used(), vec![(0, 0), (8, 312)], "{ctx}");
            let got = r.read(good, 312);
            assert_eq!(num_buffers(&got), 1, "{ctx}");
            assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..], "{ctx}");
            assert_eq!(r.read(bad_buf, 4096), vec![0x5a; 4096], "{ctx}: written");
            assert_eq!(
                (stats.rx_packets, stats.rx_dropped(), stats.bad_chains()),
                (1, 0, 1),
                "{ctx}"
            );
        }
    }
}

/// A chain refused half-way (its first buffer was already collected) sits
/// between two good ones: its collected piece must not take part of the
/// frame, or the bytes after the first buffer would be lost in it.
#[test]
fn a_chain_refused_half_way_takes_no_part_of_the_frame() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    let a = r.rx_buf(100);
    let half = r.alloc(500);
    r.mem.write_slice(&[0x5a; 500], GuestAddress(half)).unwrap();
    r.chain(&[(half, 500, true), (IN_HOLE, 500, true)]);
    let c = r.rx_buf(2000);
    let f = frame(300, 3);
    peer.send(&f);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(r.used(), vec![(0, 100), (1, 0), (3, 212)]);
    let mut got = r.read(a, 100);
    got.extend(r.read(c, 212));
    assert_eq!(num_buffers(&got), 2);
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(r.read(half, 500), vec![0x5a; 500]);
    assert_eq!((stats.rx_packets, stats.bad_chains()), (1, 1));
}

/// Chains that are unusual but valid: indirect, with zero-length pieces,
/// the header split over tiny pieces, a buffer in high RAM and one ending
/// exactly where the MMIO hole starts.
#[test]
fn odd_but_valid_rx_chains_get_the_frame() {
    const W: u16 = VIRTQ_DESC_F_WRITE;
    const N: u16 = VIRTQ_DESC_F_NEXT;
    let (mut r, io, peer, mut st, mut stats) = setup();
    let b = r.alloc(4096);
    // Indirect: 5 + 0 + 7 + 2000 bytes (num_buffers lands in the third).
    write_desc(&r.mem, TABLES, 0, b, 5, W | N, 1);
    write_desc(&r.mem, TABLES, 1, IN_HOLE, 0, W | N, 2);
    write_desc(&r.mem, TABLES, 2, b + 5, 7, W | N, 3);
    write_desc(&r.mem, TABLES, 3, b + 12, 2000, W, 0);
    r.desc(0, TABLES, 64, VIRTQ_DESC_F_INDIRECT, 0);
    r.publish(0);
    // High RAM, and the last bytes below the hole.
    r.desc(1, HIGH_RAM + HIGH_RAM_SIZE - 2048, 2048, W, 0);
    r.publish(1);
    r.desc(2, LOW_RAM_END - 2048, 2048, W, 0);
    r.publish(2);
    for (i, at) in [b, HIGH_RAM + HIGH_RAM_SIZE - 2048, LOW_RAM_END - 2048]
        .into_iter()
        .enumerate()
    {
        let f = frame(400, i as u8);
        peer.send(&f);
        // The buffer in high RAM is served without MRG_RXBUF.
        rx(&mut r, &io, &mut st, i != 1, &mut stats);
        assert_eq!(r.used(), vec![(i as u32, 412)], "chain {i}");
        let got = r.read(at, 412);
        assert_eq!(num_buffers(&got), 1, "chain {i}");
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..], "chain {i}");
    }
    assert_eq!((stats.rx_packets, stats.bad_chains()), (3, 0));
}

/// Chains of many small pieces: one readv never gets more than IOV_MAX
/// entries, and a frame whose buffers have more pieces than that arrives
/// whole through the copy from the bounce buffer.
#[test]
fn a_frame_over_more_pieces_than_one_readv_takes_arrives_by_copy() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    // 20 chains, each an indirect table of 250 four-byte pieces.
    const PIECES: u16 = 250;
    let mut bufs = Vec::new();
    for c in 0..20u16 {
        let table = TABLES + u64::from(c) * 0x1000;
        let b = r.alloc(4 * u64::from(PIECES));
        for i in 0..PIECES {
            let flags = VIRTQ_DESC_F_WRITE | if i + 1 < PIECES { VIRTQ_DESC_F_NEXT } else { 0 };
            write_desc(&r.mem, table, i, b + 4 * u64::from(i), 4, flags, i + 1);
        }
        r.desc(c, table, u32::from(PIECES) * 16, VIRTQ_DESC_F_INDIRECT, 0);
        r.publish(c);
        bufs.push(b);
    }
    r.next_desc = 20;
    let mut next = 0usize;
    for round in 0..2u8 {
        // 9000 bytes: nine chains, 2250 pieces.
        let f = frame(9000 - VNET_HDR_LEN, round);
        peer.send(&f);
        assert!(matches!(
            rx(&mut r, &io, &mut st, true, &mut stats),
            RxOutcome::Drained
        ));
        let used = r.used();
        let want: Vec<(u32, u32)> = (next..next + 9).map(|c| (c as u32, 1000)).collect();
        assert_eq!(used, want, "round {round}");
        let mut got = Vec::new();
        for b in &bufs[next..next + 9] {
            got.extend(r.read(*b, 1000));
        }
        assert_eq!(num_buffers(&got), 9, "round {round}");
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..], "round {round}");
        next += 9;
    }
    let reads = io.reads.lock().unwrap().clone();
    assert!(
        reads.iter().all(|&(n, _)| n <= IOV_MAX),
        "a readv with more than IOV_MAX entries: {reads:?}"
    );
    // The second frame, expected long, had as many pieces lined up as one
    // readv takes.
    assert!(reads.iter().any(|&(n, _)| n > 900), "{reads:?}");
    assert_eq!((stats.rx_packets, stats.rx_dropped()), (2, 0));
}

/// A tx chain of more pieces than one writev takes goes out whole, copied.
#[test]
fn a_tx_chain_over_more_pieces_than_one_writev_takes_is_copied() {
    let (io, peer) = sock_pair();
    let io = recording(io);
    let mut t = Ring::new(memory());
    let mut stats = NetStats::default();
    const PIECES: u16 = 1100;
    let f = frame(2 * usize::from(PIECES) - VNET_HDR_LEN, 7);
    let b = t.alloc(f.len() as u64);
    t.mem.write_slice(&f, GuestAddress(b)).unwrap();
    for i in 0..PIECES {
        let flags = if i + 1 < PIECES { VIRTQ_DESC_F_NEXT } else { 0 };
        write_desc(&t.mem, TABLES, i, b + 2 * u64::from(i), 2, flags, i + 1);
    }
    t.desc(0, TABLES, u32::from(PIECES) * 16, VIRTQ_DESC_F_INDIRECT, 0);
    t.publish(0);
    let mem = t.mem.clone();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    assert!(process_tx(&mut t.q, &mem, &io, &mut buf, &mut stats).unwrap());
    assert!(io.writes.lock().unwrap().is_empty(), "no writev");
    assert_eq!(peer.recv().unwrap(), f);
    assert_eq!(t.used(), vec![(0, 0)]);
    assert_eq!((stats.tx_packets, stats.bad_chains()), (1, 0));
}

/// Each hostile tx chain alone: returned, counted as bad, never sent.
#[test]
fn each_hostile_tx_chain_is_refused_on_its_own() {
    const N: u16 = VIRTQ_DESC_F_NEXT;
    const I: u16 = VIRTQ_DESC_F_INDIRECT;
    type Make = fn(&Ring, u64);
    let cases: Vec<(&str, Make)> = vec![
        ("a descriptor that chains to itself", |r, b| {
            r.desc(0, b, 20, N, 0)
        }),
        ("a two-descriptor loop", |r, b| {
            r.desc(0, b, 20, N, 1);
            r.desc(1, b, 20, N, 0);
        }),
        ("next outside the ring", |r, b| r.desc(0, b, 20, N, 200)),
        ("zero length", |r, b| r.desc(0, b, 0, 0, 0)),
        ("shorter than the vnet header", |r, b| r.desc(0, b, 5, 0, 0)),
        ("longer than any frame", |r, b| {
            r.desc(0, b, (MAX_FRAME_LEN + 1) as u32, 0, 0)
        }),
        ("a device-writable buffer", |r, b| {
            r.desc(0, b, 64, VIRTQ_DESC_F_WRITE, 0)
        }),
        ("running into the MMIO hole", |r, _| {
            r.desc(0, LOW_RAM_END - 10, 64, 0, 0)
        }),
        ("running past the end of RAM", |r, _| {
            r.desc(0, HIGH_RAM + HIGH_RAM_SIZE - 10, 64, 0, 0)
        }),
        ("an address that wraps around", |r, _| {
            r.desc(0, u64::MAX - 5, 64, 0, 0)
        }),
        ("a good header, then a buffer outside memory", |r, b| {
            r.desc(0, b, 12, N, 1);
            r.desc(1, IN_HOLE, 64, 0, 0);
        }),
        ("an indirect table outside memory", |r, _| {
            r.desc(0, IN_HOLE, 32, I, 0)
        }),
        ("an indirect table inside an indirect table", |r, b| {
            write_desc(&r.mem, TABLES + 0x1000, 0, b, 64, 0, 0);
            write_desc(&r.mem, TABLES, 0, TABLES + 0x1000, 16, I, 0);
            r.desc(0, TABLES, 16, I, 0);
        }),
        ("lengths that add up past u32", |r, b| {
            for i in 0..4u16 {
                write_desc(
                    &r.mem,
                    TABLES,
                    i,
                    b,
                    u32::MAX / 2,
                    if i < 3 { N } else { 0 },
                    i + 1,
                );
            }
            r.desc(0, TABLES, 64, I, 0);
        }),
    ];
    for (what, make) in cases {
        let (io, peer) = sock_pair();
        let mut t = Ring::new(memory());
        let mut stats = NetStats::default();
        let b = t.alloc(4096);
        t.mem.write_slice(&frame(100, 1), GuestAddress(b)).unwrap();
        make(&t, b);
        t.publish(0);
        let mem = t.mem.clone();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert!(
            process_tx(&mut t.q, &mem, &*io, &mut buf, &mut stats).unwrap(),
            "{what}"
        );
        assert_eq!(t.used(), vec![(0, 0)], "{what}");
        assert_eq!((stats.tx_packets, stats.bad_chains()), (0, 1), "{what}");
        assert_eq!(stats.tx_bad_chains, 1, "{what}");
        assert!(peer.try_recv().is_none(), "{what}: became a frame");
    }
}

/// The control queue against hostile chains: every chain comes back, the
/// ack says ERR unless the command was whole and valid, a missing or
/// unwritable ack is counted, and the pair count changes only on a valid
/// VQ_PAIRS_SET.
#[test]
fn hostile_control_chains_are_answered_and_change_nothing() {
    const W: u16 = VIRTQ_DESC_F_WRITE;
    const N: u16 = VIRTQ_DESC_F_NEXT;
    const I: u16 = VIRTQ_DESC_F_INDIRECT;
    const OK: u8 = VIRTIO_NET_OK as u8;
    const ERR: u8 = VIRTIO_NET_ERR as u8;
    // (what, build(ring, request buffer, ack buffer), expected ack byte or
    // None when none can be written, pairs set)
    type Make = fn(&Ring, u64, u64);
    let cases: Vec<(&str, Make, Option<u8>, Option<u16>)> = vec![
        (
            "a valid VQ_PAIRS_SET",
            |r, q, a| {
                r.desc(0, q, 4, N, 1);
                r.desc(1, a, 1, W, 0);
            },
            Some(OK),
            Some(2),
        ),
        (
            "the request split over three descriptors",
            |r, q, a| {
                r.desc(0, q, 1, N, 1);
                r.desc(1, q + 1, 1, N, 2);
                r.desc(2, q + 2, 2, N, 3);
                r.desc(3, a, 1, W, 0);
            },
            Some(OK),
            Some(2),
        ),
        (
            "an indirect chain",
            |r, q, a| {
                write_desc(&r.mem, TABLES, 0, q, 4, N, 1);
                write_desc(&r.mem, TABLES, 1, a, 1, W, 0);
                r.desc(0, TABLES, 32, I, 0);
            },
            Some(OK),
            Some(2),
        ),
        (
            "a long request",
            |r, q, a| {
                r.desc(0, q, 3000, N, 1);
                r.desc(1, a, 1, W, 0);
            },
            Some(OK),
            Some(2),
        ),
        (
            "no ack descriptor",
            |r, q, _| r.desc(0, q, 4, 0, 0),
            None,
            None,
        ),
        (
            "a zero-length ack",
            |r, q, a| {
                r.desc(0, q, 4, N, 1);
                r.desc(1, a, 0, W, 0);
            },
            None,
            None,
        ),
        (
            "an ack outside memory",
            |r, q, _| {
                r.desc(0, q, 4, N, 1);
                r.desc(1, IN_HOLE, 1, W, 0);
            },
            None,
            None,
        ),
        (
            "an ack that wraps around",
            |r, q, _| {
                r.desc(0, q, 4, N, 1);
                r.desc(1, u64::MAX, 1, W, 0);
            },
            None,
            None,
        ),
        (
            "a readable descriptor after the ack",
            |r, q, a| {
                r.desc(0, q, 2, N, 1);
                r.desc(1, a, 1, W | N, 2);
                r.desc(2, q + 2, 2, 0, 0);
            },
            Some(ERR),
            None,
        ),
        (
            "a request outside memory",
            |r, _, a| {
                r.desc(0, IN_HOLE, 4, N, 1);
                r.desc(1, a, 1, W, 0);
            },
            Some(ERR),
            None,
        ),
        (
            "a loop",
            |r, q, a| {
                r.desc(0, q, 4, N, 1);
                r.desc(1, a, 1, W | N, 0);
            },
            Some(ERR),
            None,
        ),
        (
            "next outside the ring",
            |r, q, a| {
                r.desc(0, q, 4, N, 1);
                r.desc(1, a, 1, W | N, 300);
            },
            Some(ERR),
            None,
        ),
        (
            "a request cut after the command",
            |r, q, a| {
                r.desc(0, q, 3, N, 1);
                r.desc(1, a, 1, W, 0);
            },
            Some(ERR),
            None,
        ),
        (
            "only one byte",
            |r, q, a| {
                r.desc(0, q, 1, N, 1);
                r.desc(1, a, 1, W, 0);
            },
            Some(ERR),
            None,
        ),
    ];
    for (what, make, ack_byte, pairs) in cases {
        let mut t = Ring::new(memory());
        let mut stats = NetStats::default();
        let q = t.alloc(4096);
        t.mem.write_slice(&[4, 0, 2, 0], GuestAddress(q)).unwrap();
        let ack = t.alloc(16);
        t.mem.write_obj(0xeeu8, GuestAddress(ack)).unwrap();
        make(&t, q, ack);
        t.publish(0);
        let mem = t.mem.clone();
        let mut set = Vec::new();
        let mut set_pairs = |n: u16| {
            set.push(n);
            true
        };
        assert!(
            process_ctrl(&mut t.q, &mem, 4, &mut set_pairs, &mut stats).unwrap(),
            "{what}"
        );
        let written = u32::from(ack_byte.is_some());
        assert_eq!(t.used(), vec![(0, written)], "{what}");
        let got: u8 = t.mem.read_obj(GuestAddress(ack)).unwrap();
        match ack_byte {
            Some(b) => assert_eq!(got, b, "{what}"),
            None => {
                assert_eq!(got, 0xee, "{what}: ack written");
                assert_eq!(stats.bad_chains(), 1, "{what}");
                assert_eq!(stats.ctrl_bad_chains, 1, "{what}");
            }
        }
        if ack_byte.is_some() {
            assert_eq!(set, pairs.into_iter().collect::<Vec<_>>(), "{what}");
        }
    }
    // Values a valid chain may still carry: refused, nothing switched.
    for (req, accept) in [
        ([4u8, 0, 0, 0], true),
        ([4, 0, 5, 0], true),
        ([4, 0, 3, 0], false),
        ([4, 1, 2, 0], true),
        ([99, 0, 2, 0], true),
    ] {
        let mut t = Ring::new(memory());
        let mut stats = NetStats::default();
        let q = t.alloc(16);
        t.mem.write_slice(&req, GuestAddress(q)).unwrap();
        let ack = t.alloc(16);
        t.chain(&[(q, 4, false), (ack, 1, true)]);
        let mem = t.mem.clone();
        let mut set = Vec::new();
        let mut set_pairs = |n: u16| {
            set.push(n);
            accept
        };
        process_ctrl(&mut t.q, &mem, 4, &mut set_pairs, &mut stats).unwrap();
        let got: u8 = t.mem.read_obj(GuestAddress(ack)).unwrap();
        assert_eq!(got, ERR, "{req:?}");
        // Only an in-range VQ_PAIRS_SET reaches set_pairs (which refused).
        let reached: Vec<u16> = if req == [4, 0, 3, 0] { vec![3] } else { vec![] };
        assert_eq!(set, reached, "{req:?}");
    }
}

/// Counters: packets and Ethernet bytes (the vnet header left out, as the
/// TAP counts them) each way, copied frames included.
#[test]
fn packets_and_bytes_are_counted_each_way() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    for _ in 0..4 {
        r.rx_buf(1000);
    }
    peer.send(&frame(100, 1));
    peer.send(&frame(1400, 2)); // two buffers, merged
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!((stats.rx_packets, stats.rx_bytes), (2, 1500));
    // A frame waiting in the bounce buffer counts once delivered.
    peer.send(&frame(1500, 3));
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert!(st.has_pending());
    assert_eq!(stats.rx_packets, 2);
    r.rx_buf(2000);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!((stats.rx_packets, stats.rx_bytes), (3, 3000));

    let mut t = Ring::new(memory());
    let mem = t.mem.clone();
    for n in [60usize, 1514] {
        let a = t.alloc(2000);
        mem.write_slice(&frame(n, 4), GuestAddress(a)).unwrap();
        t.chain(&[(a, (VNET_HDR_LEN + n) as u32, false)]);
    }
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    process_tx(&mut t.q, &mem, &io, &mut buf, &mut stats).unwrap();
    assert_eq!((stats.tx_packets, stats.tx_bytes), (2, 1574));
    assert_eq!(
        stats.rx_dropped() + stats.tx_tap_errors + stats.bad_chains(),
        0
    );
}

/// A read shorter than a vnet header is the TAP's fault, not the guest's.
#[test]
fn an_unusable_frame_from_the_tap_is_a_tap_error() {
    let (mut r, io, peer, mut st, mut stats) = setup();
    let a = r.rx_buf(1000);
    peer.send(&[0u8; VNET_HDR_LEN - 1]);
    let good = frame(64, 5);
    peer.send(&good);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(r.used(), vec![(0, 76)]);
    assert_eq!(r.read(a, 76)[VNET_HDR_LEN..], good[VNET_HDR_LEN..]);
    assert_eq!(
        (
            stats.rx_tap_errors,
            stats.rx_dropped_no_buffer,
            stats.rx_packets
        ),
        (1, 0, 1)
    );
}

/// A write the TAP refuses drops that frame, counted; the chain comes back.
#[test]
fn a_write_the_tap_refuses_is_a_tx_tap_error() {
    let (io, peer) = sock_pair();
    drop(peer); // writes now fail (EPIPE)
    let mut t = Ring::new(memory());
    let mem = t.mem.clone();
    let a = t.alloc(200);
    mem.write_slice(&frame(100, 6), GuestAddress(a)).unwrap();
    t.chain(&[(a, 112, false)]);
    let mut stats = NetStats::default();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    assert!(process_tx(&mut t.q, &mem, &*io, &mut buf, &mut stats).unwrap());
    assert_eq!(t.used(), vec![(0, 0)]);
    assert_eq!(
        (
            stats.tx_tap_errors,
            stats.tx_packets,
            stats.tx_bytes,
            stats.tx_bad_chains
        ),
        (1, 0, 0, 0)
    );
}
