//! Moving frames between virtqueues and a `FrameIo`: rx (TAP → guest, with
//! merged buffers), tx (guest → TAP) and the control queue. Every value read
//! from guest memory is untrusted: a broken chain is returned to the driver
//! with length 0 and counted, a broken ring is a `QueueFault` (the caller
//! stops that queue and asks for a reset); nothing here panics.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::super::GuestMemoryMmap;
use super::backend::FrameIo;

/// The virtio 1.x net header (with num_buffers), which the TAP also uses.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame: a 64 KiB GSO payload with Ethernet and VLAN headers,
/// behind the vnet header.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65535 + 18;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QueueFault(pub String);

fn fault(what: &str, e: impl std::fmt::Display) -> QueueFault {
    QueueFault(format!("{what}: {e}"))
}

/// What the device saw, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    /// Chains the device could not use (wrong direction, outside memory,
    /// too short, too long) and returned with length 0.
    pub bad_chains: u64,
}

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

#[derive(Clone, Copy, Debug)]
struct Buf {
    addr: GuestAddress,
    len: u32,
}

struct RxChain {
    head: u16,
    first: usize,
    end: usize,
}

/// The rx side of a queue pair: a frame read from the backend that found
/// no buffer yet waits here.
pub struct RxState {
    buf: Vec<u8>,
    pending: usize,
    bufs: Vec<Buf>,
    chains: Vec<RxChain>,
    bad: Vec<u16>,
    /// The driver's avail index when buffers last ran short.
    pub seen_avail: u16,
}

impl Default for RxState {
    fn default() -> Self {
        Self {
            buf: vec![0; MAX_FRAME_LEN],
            pending: 0,
            bufs: Vec::new(),
            chains: Vec::new(),
            bad: Vec::new(),
            seen_avail: 0,
        }
    }
}

pub enum RxOutcome {
    /// The backend has nothing more.
    Drained,
    /// A frame waits for rx buffers.
    NoBuffers,
}

enum Delivery {
    Done,
    NoBuffers,
    Dropped,
}

impl RxState {
    pub fn has_pending(&self) -> bool {
        self.pending != 0
    }

    /// Collects a chain's device-writable buffers; `None` for a chain the
    /// device must not use.
    fn collect(
        &mut self,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Option<u64> {
        let mut total = 0u64;
        let mut truncated = false;
        for d in chain {
            // A chain that still says NEXT when the iterator stops was cut
            // short: a loop, longer than the ring, or a bad next index.
            truncated = d.has_next();
            if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize) {
                return None;
            }
            if d.len() == 0 {
                continue;
            }
            total += u64::from(d.len());
            self.bufs.push(Buf {
                addr: d.addr(),
                len: d.len(),
            });
        }
        (!truncated).then_some(total)
    }

    /// Puts the pending frame into rx chains.
    fn deliver(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        mrg: bool,
        stats: &mut NetStats,
    ) -> Result<Delivery, QueueFault> {
        let len = self.pending;
        let mut start = q.next_avail();
        let mut avail = available(q, mem)?;
        self.seen_avail = start.wrapping_add(avail);
        self.bufs.clear();
        self.chains.clear();
        self.bad.clear();
        let mut cap = 0u64;
        let rewind = |q: &mut Queue, start: u16| q.set_next_avail(start);
        while cap < len as u64 {
            if self.chains.len() >= usize::from(q.size()) || (!mrg && !self.chains.is_empty()) {
                // Cannot hold it: one chain without MRG_RXBUF, or the whole ring.
                rewind(q, start);
                return Ok(Delivery::Dropped);
            }
            if avail == 0 {
                rewind(q, start);
                return Ok(Delivery::NoBuffers);
            }
            let chain = q
                .pop_descriptor_chain(mem)
                .ok_or_else(|| QueueFault("avail ring entry unreadable".into()))?;
            avail -= 1;
            let head = chain.head_index();
            let first = self.bufs.len();
            let min = if self.chains.is_empty() {
                VNET_HDR_LEN as u64
            } else {
                1
            };
            match self.collect(chain, mem) {
                Some(c) if c >= min => {
                    cap += c;
                    self.chains.push(RxChain {
                        head,
                        first,
                        end: self.bufs.len(),
                    });
                }
                _ => {
                    self.bufs.truncate(first);
                    stats.bad_chains += 1;
                    if self.chains.is_empty() {
                        // Nothing held before it: give it back now.
                        add_used(q, mem, head, 0)?;
                        start = q.next_avail();
                    } else {
                        self.bad.push(head);
                    }
                }
            }
        }
        let nbuf = self.chains.len() as u16;
        if let Some(n) = self.buf.get_mut(10..12) {
            n.copy_from_slice(&nbuf.to_le_bytes());
        }
        let frame = self.buf.get(..len).unwrap_or_default();
        let mut off = 0usize;
        for c in &self.chains {
            let mut written = 0u32;
            for b in self.bufs.get(c.first..c.end).unwrap_or_default() {
                let n = (b.len as usize).min(len - off);
                if n == 0 {
                    break;
                }
                let part = frame.get(off..off + n).unwrap_or_default();
                if let Err(e) = mem.write_slice(part, b.addr) {
                    log::debug!("virtio-net: rx write failed: {e}");
                }
                off += n;
                written += n as u32;
            }
            add_used(q, mem, c.head, written)?;
        }
        for &h in &self.bad {
            add_used(q, mem, h, 0)?;
        }
        Ok(Delivery::Done)
    }
}

/// Moves frames from `io` into the rx queue until the backend is empty or
/// the driver runs out of buffers. Returns whether the used ring changed.
pub fn process_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    io: &dyn FrameIo,
    st: &mut RxState,
    mrg: bool,
    stats: &mut NetStats,
) -> Result<(RxOutcome, bool), QueueFault> {
    let mut used = false;
    loop {
        if st.pending == 0 {
            match io.read_frame(&mut st.buf) {
                Ok(n) if n >= VNET_HDR_LEN => st.pending = n,
                Ok(0) => return Ok((RxOutcome::Drained, used)),
                Ok(_) => {
                    stats.rx_dropped += 1;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // WouldBlock when empty; EBADFD for a detached queue.
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        log::debug!("virtio-net: backend read: {e}");
                    }
                    return Ok((RxOutcome::Drained, used));
                }
            }
        }
        match st.deliver(q, mem, mrg, stats)? {
            Delivery::Done => {
                stats.rx_frames += 1;
                used = true;
            }
            Delivery::Dropped => stats.rx_dropped += 1,
            Delivery::NoBuffers => return Ok((RxOutcome::NoBuffers, used)),
        }
        st.pending = 0;
    }
}

/// Sends every available tx chain to `io`. Returns whether the used ring
/// changed.
pub fn process_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    io: &dyn FrameIo,
    buf: &mut [u8],
    stats: &mut NetStats,
) -> Result<bool, QueueFault> {
    let mut used = false;
    while available(q, mem)? > 0 {
        let chain = q
            .pop_descriptor_chain(mem)
            .ok_or_else(|| QueueFault("avail ring entry unreadable".into()))?;
        let head = chain.head_index();
        let mut len = 0usize;
        let mut ok = true;
        let mut truncated = false;
        for d in chain {
            truncated = d.has_next();
            let dl = d.len() as usize;
            let read = match buf.get_mut(len..len.saturating_add(dl)) {
                Some(dst) if !d.is_write_only() => mem.read_slice(dst, d.addr()).is_ok(),
                _ => false,
            };
            if !read {
                ok = false;
                break;
            }
            len += dl;
        }
        if ok && !truncated && len >= VNET_HDR_LEN {
            match io.write_frame(buf.get(..len).unwrap_or_default()) {
                Ok(_) => stats.tx_frames += 1,
                Err(e) => {
                    log::debug!("virtio-net: backend write: {e}");
                    stats.tx_dropped += 1;
                }
            }
        } else {
            stats.bad_chains += 1;
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
                stats.bad_chains += 1;
                0
            }
        };
        add_used(q, mem, head, len)?;
        used = true;
    }
    Ok(used)
}
