//! Moving frames between virtqueues and a `FrameIo`: rx (TAP → guest, with
//! merged buffers), tx (guest → TAP) and the control queue. Every value read
//! from guest memory is untrusted: a broken chain is returned to the driver
//! with length 0 and counted, a broken ring is a `QueueFault` (the caller
//! stops that queue and asks for a reset); nothing here panics.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::GuestMemoryMmap;
use crate::frame_io::{Dest, FrameIo, IOV_MAX, IoVecs, Src};

/// The virtio 1.x net header (with num_buffers), which the TAP also uses.
pub const VNET_HDR_LEN: usize = common::netd::VNET_HDR_LEN as usize;
/// Largest frame: a 64 KiB GSO payload with Ethernet and VLAN headers,
/// behind the vnet header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65535 + 18;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueueFault(pub String);

fn fault(what: &str, e: impl std::fmt::Display) -> QueueFault {
    QueueFault(format!("{what}: {e}"))
}

pub use crate::counters::NetStats;

/// How many chains the driver has made available, checked against the
/// ring size (a larger jump is a broken or hostile driver).
pub fn available(q: &Queue, mem: &GuestMemoryMmap) -> Result<u16, QueueFault> {
    let idx = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| fault("avail ring unreadable", e))?;
    let n = (idx - Wrapping(q.next_avail())).0;
    if n > q.size() {
        return Err(QueueFault(format!(
            "avail index is {n} ahead of the device on a {}-entry ring",
            q.size()
        )));
    }
    Ok(n)
}

/// Returns a chain to the driver. A head outside the ring (which a hostile
/// avail ring can name) cannot be returned and is skipped.
fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), QueueFault> {
    match q.add_used(mem, head, len) {
        Ok(()) => Ok(()),
        Err(QueueError::InvalidDescriptorIndex) => {
            log::debug!("virtio-net: avail ring named head {head}, outside the ring");
            Ok(())
        }
        Err(e) => Err(fault("used ring unwritable", e)),
    }
}

/// Largest frame without guest GSO offloads: header + 1514-byte Ethernet frame.
pub const MAX_PLAIN_FRAME_LEN: usize = VNET_HDR_LEN + 1514;
/// A VLAN tag: a plain frame with one is this much longer (and must
/// still not fill a buffer read into alone).
const VLAN_TAG_LEN: usize = 4;
/// Where num_buffers sits in the vnet header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Small frames in a row after which rx lines up space for a plain frame
/// again.
const BIG_FRAME_MEMORY: u32 = 256;
/// Frames delivered per `process_rx` call before the guest is signalled
/// and the other queues get a turn.
pub const RX_BATCH: usize = 128;
/// Most guest-memory pieces one chain may have (descriptors, split where
/// they cross a memory region): more is refused as a broken chain.
const MAX_CHAIN_PIECES: usize = 256;

/// The rx side of a queue pair. Frames normally go straight from the
/// backend into the guest's rx buffers (readv); a frame that did not fit
/// the buffers at hand waits here, in the bounce buffer, for more.
pub struct RxState {
    buf: Vec<u8>,
    pending: usize,
    /// How much buffer space to line up before a read. Each lined-up
    /// buffer is one more iovec entry for the kernel to walk, so this is a
    /// plain Ethernet frame until longer frames show up (guest GSO, a large
    /// MTU); then the longest seen, until small frames have been the rule
    /// for a while again. A frame longer than the space lined up is still
    /// delivered, copied through the bounce buffer.
    want: usize,
    /// Frames left before `want` drops back to a plain frame.
    big_left: u32,
    /// The driver acked guest TSO/UFO: 64 KiB frames may come any time.
    gso: bool,
    /// The driver's avail index when buffers last ran short.
    pub seen_avail: u16,
}

impl Default for RxState {
    fn default() -> Self {
        Self::with_buffer(Vec::new())
    }
}

impl RxState {
    /// An rx side whose bounce buffer is `buf`, grown to `MAX_FRAME_LEN`
    /// if shorter: a VMM allocates it ahead of the moment it activates
    /// the queues (a migration's restore activates them while the guest
    /// is paused).
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        if buf.len() < MAX_FRAME_LEN {
            buf.resize(MAX_FRAME_LEN, 0);
        }
        Self {
            buf,
            pending: 0,
            want: MAX_PLAIN_FRAME_LEN,
            big_left: 0,
            gso: false,
            seen_avail: 0,
        }
    }

    /// The bounce buffer back, for the next rx side (what it held is
    /// dropped).
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

pub enum RxOutcome {
    /// The backend has nothing more.
    Drained,
    /// A frame waits for rx buffers.
    NoBuffers,
    /// `RX_BATCH` frames delivered; the backend may hold more.
    More,
}

impl RxState {
    pub fn has_pending(&self) -> bool {
        self.pending != 0
    }

    /// The frame (vnet header first) read from the backend that waits for
    /// rx buffers, if any: it travels in a migration's state.
    pub fn pending_frame(&self) -> Option<&[u8]> {
        self.buf.get(..self.pending).filter(|f| !f.is_empty())
    }

    /// Puts a migrated frame back in the bounce buffer; refuses an empty
    /// or over-long one.
    pub fn set_pending_frame(&mut self, frame: &[u8]) -> bool {
        match self.buf.get_mut(..frame.len()) {
            Some(dst) if !frame.is_empty() => {
                dst.copy_from_slice(frame);
                self.pending = frame.len();
                true
            }
            _ => false,
        }
    }

    /// Whether the driver acked guest TSO/UFO: then 64 KiB frames are
    /// expected from the start. (Any frame is delivered either way; one
    /// longer than the buffers lined up goes through the bounce buffer.)
    pub fn set_guest_gso(&mut self, gso: bool) {
        self.gso = gso;
        if gso {
            self.saw_frame(MAX_FRAME_LEN);
        } else {
            self.want = MAX_PLAIN_FRAME_LEN;
            self.big_left = 0;
        }
    }

    /// Adapts `want` to the length of a frame just read.
    fn saw_frame(&mut self, len: usize) {
        if len > MAX_PLAIN_FRAME_LEN {
            self.want = self.want.max(len.min(MAX_FRAME_LEN));
            self.big_left = BIG_FRAME_MEMORY;
        } else if self.big_left > 0 {
            self.big_left -= 1;
            if self.big_left == 0 {
                self.want = MAX_PLAIN_FRAME_LEN;
            }
        }
    }
}

/// An rx chain taken from the avail ring and not yet given back.
struct RxChain {
    head: u16,
    /// Its entries at the front of `Gathered::pieces`.
    pieces: usize,
    cap: usize,
    /// Unusable: returned with length 0 once it reaches the front.
    bad: bool,
}

/// Why gathering stopped short of the space wanted.
#[derive(PartialEq, Eq)]
enum Short {
    /// The driver has made no more buffers available (yet).
    NoAvail,
    /// No more may be held: one chain without MRG_RXBUF, the whole ring,
    /// or as many pieces as one readv takes.
    Limit,
}

/// Rx chains popped from the avail ring during one `process_rx` call, in
/// ring order. Unused ones go back by rewinding `next_avail` at the end.
struct Gathered<'m> {
    chains: VecDeque<RxChain>,
    pieces: VecDeque<VolatileSlice<'m, ()>>,
    /// Capacity of the usable chains.
    cap: usize,
    good: usize,
    /// A chain was returned to the used ring.
    used: bool,
}

impl<'m> Gathered<'m> {
    fn new() -> Self {
        Self {
            chains: VecDeque::new(),
            pieces: VecDeque::new(),
            cap: 0,
            good: 0,
            used: false,
        }
    }

    /// Pops chains until the usable ones hold `want` bytes. With `for_readv`
    /// their pieces must fit one readv beside the bounce buffer.
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &mut self,
        q: &mut Queue,
        mem: &'m GuestMemoryMmap,
        want: usize,
        mrg: bool,
        for_readv: bool,
        seen_avail: &mut u16,
        stats: &mut NetStats,
    ) -> Result<Option<Short>, QueueFault> {
        let mut avail = available(q, mem)?;
        *seen_avail = q.next_avail().wrapping_add(avail);
        while self.cap < want {
            if (!mrg && self.good > 0)
                || self.chains.len() >= usize::from(q.size())
                || (for_readv && self.pieces.len() + MAX_CHAIN_PIECES >= IOV_MAX)
            {
                return Ok(Some(Short::Limit));
            }
            if avail == 0 {
                return Ok(Some(Short::NoAvail));
            }
            let chain = q
                .pop_descriptor_chain(mem)
                .ok_or_else(|| QueueFault("avail ring entry unreadable".into()))?;
            avail -= 1;
            let head = chain.head_index();
            let before = self.pieces.len();
            match collect_rx(chain, mem, &mut self.pieces) {
                // Every rx buffer must hold at least a vnet header (virtio
                // 1.2 §5.1.6.3.1), so any chain can start a frame.
                Some(cap) if cap >= VNET_HDR_LEN => {
                    self.cap += cap;
                    self.good += 1;
                    self.chains.push_back(RxChain {
                        head,
                        pieces: self.pieces.len() - before,
                        cap,
                        bad: false,
                    });
                }
                _ => {
                    self.pieces.truncate(before);
                    stats.rx_bad_chains += 1;
                    if self.chains.is_empty() {
                        // Nothing held before it: give it back now.
                        add_used(q, mem, head, 0)?;
                        self.used = true;
                    } else {
                        self.chains.push_back(RxChain {
                            head,
                            pieces: 0,
                            cap: 0,
                            bad: true,
                        });
                    }
                }
            }
        }
        Ok(None)
    }

    /// Usable chains needed for `len` bytes.
    fn chains_for(&self, len: usize) -> usize {
        let mut left = len;
        let mut n = 0;
        for c in self.chains.iter().filter(|c| !c.bad) {
            if left == 0 {
                break;
            }
            left -= c.cap.min(left);
            n += 1;
        }
        n
    }

    /// Gives the driver the first usable chains holding a `len`-byte frame
    /// (and the broken ones before them, empty). The frame is already in
    /// them (readv), or is copied from `src`. Writes num_buffers.
    fn commit(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        len: usize,
        src: Option<&[u8]>,
    ) -> Result<(), QueueFault> {
        let k = self.chains_for(len);
        let nbuf = (k as u16).to_le_bytes();
        let mut off = 0usize;
        let mut left = k;
        while left > 0 {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            if c.bad {
                add_used(q, mem, c.head, 0)?;
                continue;
            }
            let n = c.cap.min(len - off);
            // Position of each piece in the frame.
            let mut at = off;
            for p in self.pieces.drain(..c.pieces.min(self.pieces.len())) {
                if let Some(src) = src {
                    let part = src.get(at..(at + p.len()).min(len)).unwrap_or_default();
                    p.copy_from(part);
                }
                // num_buffers is bytes 10..12 of the header, which the
                // backend leaves alone; the first chain holds them.
                for (i, b) in nbuf.iter().enumerate() {
                    let pos = NUM_BUFFERS_OFFSET + i;
                    if (at..at + p.len()).contains(&pos) {
                        let _ = p.write_obj(*b, pos - at);
                    }
                }
                at += p.len();
            }
            add_used(q, mem, c.head, n as u32)?;
            off += n;
            left -= 1;
            self.cap -= c.cap;
            self.good -= 1;
        }
        self.used = true;
        self.return_front_bad(q, mem)
    }

    fn return_front_bad(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), QueueFault> {
        while self.chains.front().is_some_and(|c| c.bad) {
            if let Some(c) = self.chains.pop_front() {
                add_used(q, mem, c.head, 0)?;
                self.used = true;
            }
        }
        Ok(())
    }

    /// Gives back every chain not used: the driver's next pop sees them
    /// again, and counts the bad ones among them again then.
    fn rewind(&mut self, q: &mut Queue, stats: &mut NetStats) {
        let bad = self.chains.iter().filter(|c| c.bad).count() as u64;
        stats.rx_bad_chains = stats.rx_bad_chains.saturating_sub(bad);
        let n = self.chains.len() as u16;
        q.set_next_avail(q.next_avail().wrapping_sub(n));
        self.chains.clear();
        self.pieces.clear();
        self.cap = 0;
        self.good = 0;
    }
}

/// Collects a chain's device-writable buffers as slices of guest memory
/// (a buffer crossing a region boundary becomes several); `None` for a
/// chain the device must not use.
fn collect_rx<'m>(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &'m GuestMemoryMmap,
    pieces: &mut VecDeque<VolatileSlice<'m, ()>>,
) -> Option<usize> {
    let mut total = 0usize;
    let mut truncated = false;
    let mut n = 0usize;
    for d in chain {
        // A chain that still says NEXT when the iterator stops was cut
        // short: a loop, longer than the ring, or a bad next index.
        truncated = d.has_next();
        if !d.is_write_only() {
            return None;
        }
        for s in mem.get_slices(d.addr(), d.len() as usize) {
            n += 1;
            if n > MAX_CHAIN_PIECES {
                return None;
            }
            pieces.push_back(s.ok()?);
        }
        total += d.len() as usize;
    }
    (!truncated).then_some(total)
}
/// Moves frames from `io` into the rx queue until the backend is empty,
/// the driver runs out of buffers, or `RX_BATCH` frames went in. Returns
/// whether the used ring changed.
///
/// Each read is one readv straight into the rx buffers lined up for it
/// (enough for the largest frame when the driver has them), followed by
/// the bounce buffer: a frame longer than the buffers at hand spills
/// there, is assembled, and waits for more buffers. Buffers a frame did
/// not need go back to the avail ring.
pub fn process_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    io: &dyn FrameIo,
    st: &mut RxState,
    mrg: bool,
    stats: &mut NetStats,
) -> Result<(RxOutcome, bool), QueueFault> {
    let mut g = Gathered::new();
    let r = rx_loop(q, mem, io, st, mrg, stats, &mut g);
    g.rewind(q, stats);
    r.map(|o| (o, g.used))
}

fn rx_loop<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
    io: &dyn FrameIo,
    st: &mut RxState,
    mrg: bool,
    stats: &mut NetStats,
    g: &mut Gathered<'m>,
) -> Result<RxOutcome, QueueFault> {
    let mut store: Vec<libc::iovec> = Vec::with_capacity(64);
    let mut frames = 0usize;
    loop {
        if frames >= RX_BATCH {
            return Ok(RxOutcome::More);
        }
        if st.pending != 0 {
            // A frame in the bounce buffer: copy it once buffers suffice.
            let len = st.pending;
            match g.gather(q, mem, len, mrg, false, &mut st.seen_avail, stats)? {
                None => {
                    g.commit(q, mem, len, st.buf.get(..len))?;
                    stats.rx(len.saturating_sub(VNET_HDR_LEN));
                    frames += 1;
                }
                Some(Short::NoAvail) if mrg || g.good == 0 => return Ok(RxOutcome::NoBuffers),
                // Cannot ever hold it: one chain without MRG_RXBUF, or the
                // whole ring. The chains stay for the next frame.
                Some(_) => stats.rx_dropped_no_buffer += 1,
            }
            st.pending = 0;
            continue;
        }
        let want = if mrg { st.want } else { 1 };
        g.gather(q, mem, want, mrg, true, &mut st.seen_avail, stats)?;
        let mut iov: IoVecs<'_, Dest> = IoVecs::from_vec(std::mem::take(&mut store));
        // Without guest GSO only plain frames are due (virtio 1.2
        // §5.1.6.3.1); when no longer one came lately and the first buffer
        // is larger, read into it alone: one segment is the kernel's
        // cheapest read (two cost ~15% more per small frame here). A read
        // that fills it was cut, as the backend silently cuts a frame
        // longer than the read: that (out of spec) frame is lost, and for
        // a while the bounce buffer is behind every read again.
        let single = !st.gso
            && st.want == MAX_PLAIN_FRAME_LEN
            && g.pieces
                .front()
                .is_some_and(|p| p.len() > MAX_PLAIN_FRAME_LEN + VLAN_TAG_LEN);
        if single {
            if let Some(p) = g.pieces.front() {
                iov.push_guest(p);
            }
        } else {
            // The bounce buffer always gets the last entry.
            for p in g.pieces.iter().take(IOV_MAX - 1) {
                iov.push_guest(p);
            }
        }
        let in_guest = iov.total();
        if !single {
            iov.push_host(&mut st.buf);
        }
        let r = io.read_frame_vectored(&iov);
        store = iov.into_vec();
        let n = match r {
            Ok(0) => return Ok(RxOutcome::Drained),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // WouldBlock when empty; EBADFD for a detached queue.
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    log::debug!("virtio-net: backend read: {e}");
                }
                return Ok(RxOutcome::Drained);
            }
        };
        if single && n >= in_guest {
            log::debug!("virtio-net: rx frame longer than {in_guest} bytes dropped");
            stats.rx_dropped_no_buffer += 1;
            // Its length is unknown: the next long frame spills (and is
            // copied) and sets how much is lined up after it.
            st.saw_frame(MAX_PLAIN_FRAME_LEN + 1);
            continue;
        }
        st.saw_frame(n);
        if n < VNET_HDR_LEN || (n > in_guest && n > MAX_FRAME_LEN) {
            // Too short for a header, or too long to assemble (maybe cut).
            stats.rx_tap_errors += 1;
            continue;
        }
        if n <= in_guest {
            g.commit(q, mem, n, None)?;
            stats.rx(n - VNET_HDR_LEN);
            frames += 1;
            continue;
        }
        // Spilled: the head is in the guest's buffers, the rest in the
        // bounce buffer. Assemble it there; it waits for more buffers.
        let tail = n - in_guest;
        st.buf.copy_within(..tail, in_guest);
        let mut at = 0usize;
        for p in &g.pieces {
            if at >= in_guest {
                break;
            }
            if let Some(dst) = st.buf.get_mut(at..at + p.len()) {
                p.copy_to(dst);
            }
            at += p.len();
        }
        st.pending = n;
    }
}

/// Sends every available tx chain to `io`, each with one writev straight
/// from guest memory (`buf` is only for chains too fragmented for one
/// writev). Returns whether the used ring changed.
pub fn process_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    io: &dyn FrameIo,
    buf: &mut [u8],
    stats: &mut NetStats,
) -> Result<bool, QueueFault> {
    let mut used = false;
    let mut pieces: Vec<VolatileSlice<'_, ()>> = Vec::with_capacity(16);
    let mut iov: IoVecs<'_, Src> = IoVecs::with_capacity(16);
    while available(q, mem)? > 0 {
        let chain = q
            .pop_descriptor_chain(mem)
            .ok_or_else(|| QueueFault("avail ring entry unreadable".into()))?;
        let head = chain.head_index();
        pieces.clear();
        let mut len = 0usize;
        let mut ok = true;
        let mut truncated = false;
        for d in chain {
            truncated = d.has_next();
            len = len.saturating_add(d.len() as usize);
            if d.is_write_only() || len > MAX_FRAME_LEN {
                ok = false;
                break;
            }
            for s in mem.get_slices(d.addr(), d.len() as usize) {
                match s {
                    Ok(s) => pieces.push(s),
                    Err(_) => ok = false,
                }
            }
            if !ok {
                break;
            }
        }
        if ok && !truncated && len >= VNET_HDR_LEN {
            let r = if pieces.len() <= IOV_MAX {
                iov.clear();
                for p in &pieces {
                    iov.push_guest(p);
                }
                let r = io.write_frame_vectored(&iov);
                iov.clear();
                r
            } else {
                // Too many pieces for one writev: copy (len <= MAX_FRAME_LEN).
                let mut at = 0usize;
                for p in &pieces {
                    if let Some(dst) = buf.get_mut(at..at + p.len()) {
                        p.copy_to(dst);
                    }
                    at += p.len();
                }
                io.write_frame(buf.get(..len).unwrap_or_default())
            };
            match r {
                Ok(_) => stats.tx(len - VNET_HDR_LEN),
                Err(e) => {
                    log::debug!("virtio-net: backend write: {e}");
                    stats.tx_tap_errors += 1;
                }
            }
        } else {
            stats.tx_bad_chains += 1;
        }
        add_used(q, mem, head, 0)?;
        used = true;
    }
    Ok(used)
}

/// Serves the control queue. `set_pairs(n)` switches to n queue pairs and
/// says whether that worked.
pub fn process_ctrl(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    max_pairs: u16,
    set_pairs: &mut dyn FnMut(u16) -> bool,
    stats: &mut NetStats,
) -> Result<bool, QueueFault> {
    let mut used = false;
    while available(q, mem)? > 0 {
        let chain = q
            .pop_descriptor_chain(mem)
            .ok_or_else(|| QueueFault("avail ring entry unreadable".into()))?;
        let head = chain.head_index();
        let mut req = [0u8; 64];
        let mut rlen = 0usize;
        let mut ack: Option<GuestAddress> = None;
        let mut ok = true;
        let mut truncated = false;
        for d in chain {
            truncated = d.has_next();
            if d.is_write_only() {
                if d.len() >= 1 {
                    ack = Some(d.addr());
                }
            } else if ack.is_some() {
                ok = false;
            } else {
                // Only the head of a long request matters (class, command, pairs).
                let take = (d.len() as usize).min(req.len() - rlen);
                if let Some(dst) = req.get_mut(rlen..rlen + take) {
                    ok &= mem.read_slice(dst, d.addr()).is_ok();
                }
                rlen += take;
            }
        }
        let class = u32::from(req[0]);
        let cmd = u32::from(req[1]);
        let status = if !ok || truncated || rlen < 2 {
            VIRTIO_NET_ERR
        } else if class == VIRTIO_NET_CTRL_MQ && cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
            let n = u16::from_le_bytes([req[2], req[3]]);
            if rlen >= 4 && (1..=max_pairs).contains(&n) && set_pairs(n) {
                VIRTIO_NET_OK
            } else {
                VIRTIO_NET_ERR
            }
        } else if class == VIRTIO_NET_CTRL_RX || class == VIRTIO_NET_CTRL_MAC {
            // The TAP delivers everything; filtering is the guest's.
            VIRTIO_NET_OK
        } else {
            VIRTIO_NET_ERR
        };
        let len = match ack {
            Some(a) if mem.write_obj(status as u8, a).is_ok() => 1,
            _ => {
                stats.ctrl_bad_chains += 1;
                0
            }
        };
        add_used(q, mem, head, len)?;
        used = true;
    }
    Ok(used)
}

#[cfg(test)]
#[path = "datapath_tests.rs"]
mod tests;
