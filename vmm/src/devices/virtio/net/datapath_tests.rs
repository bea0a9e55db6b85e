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
use crate::devices::virtio::testing::{Peer, SockIo, sock_pair};

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

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

/// Two regions meeting at 2 MiB (separate mappings, so a buffer across
/// the boundary is two host ranges).
fn split_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20), (GuestAddress(2 << 20), 2 << 20)])
        .unwrap()
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
        (stats.rx_frames, stats.rx_dropped, stats.bad_chains),
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
    assert_eq!(stats.rx_frames, 2);
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
    assert_eq!(stats.bad_chains, 2);
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
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 0));
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
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 1));
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
    assert_eq!(stats.tx_frames, 1);
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
    assert_eq!(stats.rx_frames as usize, frames);
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
    assert_eq!((stats.rx_frames, stats.rx_dropped), (0, 1));
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
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 1));
    // ...and the next ones go straight into two buffers lined up for them.
    peer.send(&big);
    rx(&mut r, &io, &mut st, true, &mut stats);
    assert_eq!(io.reads.lock().unwrap()[4], (3, 2 * 2048 + MAX_FRAME_LEN));
    assert_eq!(r.used(), vec![(2, 2048), (3, 964)]);
    let mut got = r.read(addrs[2], 2048);
    got.extend(r.read(addrs[3], 964));
    assert_eq!(&got[VNET_HDR_LEN..], &big[VNET_HDR_LEN..]);
    assert_eq!((stats.rx_frames, stats.rx_dropped), (2, 1));
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
    assert_eq!(stats.rx_dropped, 0);
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
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 0));
}

/// More frames waiting than one rx batch when the device starts: the
/// device thread delivers them all, in batches, each frame whole.
#[test]
fn device_thread_delivers_more_than_one_batch() {
    use crate::devices::virtio::testing::{Driver, mock_backend};
    let (b, p) = mock_backend(1);
    let mem = crate::devices::virtio::testing::memory();
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
        assert!(p[0].try_send(&frame(40, i as u8)), "socket buffer full");
    }
    d.driver_ok();
    let used = d.wait_used(0, n);
    assert_eq!(used.len(), n);
    assert!(used.iter().all(|&(_, len)| len == 52));
    assert!(d.interrupts() >= 1);
}
