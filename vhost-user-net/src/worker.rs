//! One queue pair's worker: what its vring thread (vhost-user-backend's
//! epoll loop, one thread per pair) does on each event. Events are the rx
//! and tx kicks (read by the loop already), the pair's TAP queue becoming
//! readable (edge-triggered: rx drains it to EAGAIN or waits for buffers),
//! an "rx again" eventfd this worker writes itself after a full batch (the
//! loop has no zero timeout to go on with), and on pair 0 the control
//! queue's kick. The datapath itself is `net_datapath::queue_pair`, as in
//! the vmm's device threads.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use net_datapath::datapath::{MAX_FRAME_LEN, NetStats, RxState};
use net_datapath::queue_pair::{Notify, RingCtx, RxStatus, serve_ctrl, serve_rx, serve_tx};
use net_datapath::{FrameIo, GuestMemoryMmap};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::EventFd;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

/// A vring's call eventfd as the datapath's [`Notify`]. Holds the raw fd
/// only while the caller holds the vring's lock (SET_VRING_CALL, which
/// replaces the fd, takes that lock too).
struct CallFd {
    fd: Option<RawFd>,
    ring: &'static str,
    pair: usize,
}

impl CallFd {
    fn of(
        state: &VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        ring: &'static str,
        pair: usize,
    ) -> Self {
        CallFd {
            fd: state.get_call().as_ref().map(|c| c.as_raw_fd()),
            ring,
            pair,
        }
    }
}

impl Notify for CallFd {
    fn signal_used_queue(&self) {
        let Some(fd) = self.fd else { return };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to an eventfd the
        // vring (locked by our caller) owns; an error changes no memory.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        if n != 8 {
            common::warn_rate_limited!(
                "pair {} {}: cannot signal the frontend: {}",
                self.pair,
                self.ring,
                std::io::Error::last_os_error()
            );
        }
    }

    fn set_needs_reset(&self) {
        // vhost-user has no "needs reset" message a backend may send
        // unasked: the ring stays stopped (logged by the datapath) until
        // the frontend sets it up again.
        log::debug!("pair {} {}: ring stopped", self.pair, self.ring);
    }
}

/// What a pair's worker keeps between events (rings live in the vrings).
pub struct PairState {
    pub rx_state: RxState,
    pub rx_status: RxStatus,
    pub rx_broken: bool,
    pub tx_broken: bool,
    pub ctrl_broken: bool,
    pub stats: NetStats,
    tx_buf: Vec<u8>,
}

impl PairState {
    pub fn new(guest_gso: bool) -> Self {
        let mut rx_state = RxState::default();
        rx_state.set_guest_gso(guest_gso);
        PairState {
            rx_state,
            rx_status: RxStatus::Idle,
            rx_broken: false,
            tx_broken: false,
            ctrl_broken: false,
            stats: NetStats::default(),
            tx_buf: vec![0; MAX_FRAME_LEN],
        }
    }
}

/// Everything one event on pair `pair` needs.
pub struct Worker<'a> {
    pub pair: usize,
    pub mem: &'a GuestMemoryMmap,
    pub io: &'a dyn FrameIo,
    pub all_io: &'a [Arc<dyn FrameIo>],
    pub max_pairs: u16,
    pub active_pairs: &'a AtomicU16,
    pub mrg_rxbuf: bool,
    pub rx_again: &'a EventFd,
    pub st: &'a mut PairState,
}

/// Whether the frontend started and enabled the ring: before that its
/// addresses mean nothing and no data may pass (vhost-user spec).
pub fn live(state: &VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> bool {
    state.get_queue().ready() && state.is_enabled()
}

impl Worker<'_> {
    /// Rx: on the rx kick, a TAP event (unless a frame waits for buffers,
    /// when only a kick helps) or the rx-again event.
    pub fn rx(&mut self, rx: &Vring, from_kick: bool) {
        if !from_kick && self.st.rx_status == RxStatus::WaitingForBuffers {
            return;
        }
        let mut g = rx.get_mut();
        if !live(&g) {
            return;
        }
        let notify = CallFd::of(&g, "rx", self.pair);
        let cx = RingCtx {
            mem: self.mem,
            io: self.io,
            notify: &notify,
            pair: self.pair,
        };
        let st = &mut *self.st;
        st.rx_status = serve_rx(
            g.get_queue_mut(),
            &cx,
            &mut st.rx_state,
            self.mrg_rxbuf,
            &mut st.rx_broken,
            &mut st.stats,
        );
        if st.rx_status == RxStatus::More
            && let Err(e) = self.rx_again.write(1)
        {
            common::warn_rate_limited!("pair {}: rx-again event: {e}", self.pair);
        }
    }

    pub fn tx(&mut self, tx: &Vring) {
        let mut g = tx.get_mut();
        if !live(&g) {
            return;
        }
        let notify = CallFd::of(&g, "tx", self.pair);
        let cx = RingCtx {
            mem: self.mem,
            io: self.io,
            notify: &notify,
            pair: self.pair,
        };
        let st = &mut *self.st;
        serve_tx(
            g.get_queue_mut(),
            &cx,
            &mut st.tx_buf,
            &mut st.tx_broken,
            &mut st.stats,
        );
    }

    pub fn ctrl(&mut self, ctrl: &Vring) {
        let mut g = ctrl.get_mut();
        if !live(&g) {
            return;
        }
        let notify = CallFd::of(&g, "ctrl", self.pair);
        let st = &mut *self.st;
        serve_ctrl(
            g.get_queue_mut(),
            self.mem,
            self.all_io,
            self.max_pairs,
            self.active_pairs,
            &notify,
            &mut st.ctrl_broken,
            &mut st.stats,
        );
    }
}

/// When the frontend serves the control queue itself (QEMU's virtio-net
/// does: that ring never reaches a vhost-user backend), the driver's pair
/// switches show here only as rings enabled and disabled. Pair p's TAP
/// queue then follows its rx ring (attached while the ring is live), so
/// the kernel steers frames only to pairs the driver serves.
pub fn follow_ring(io: &dyn FrameIo, attached: &AtomicBool, rx_live: bool, pair: usize) {
    if attached.load(Ordering::SeqCst) == rx_live {
        return;
    }
    match io.set_enabled(rx_live) {
        Ok(()) => attached.store(rx_live, Ordering::SeqCst),
        Err(e) => common::warn_rate_limited!(
            "pair {pair}: cannot {} its TAP queue: {e}",
            if rx_live { "attach" } else { "detach" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use net_datapath::testing::sock_pair;

    #[test]
    fn a_tap_queue_follows_its_rx_ring() {
        let (io, _peer) = sock_pair();
        let attached = AtomicBool::new(false);
        follow_ring(&*io, &attached, true, 1);
        assert!(io.enabled.load(Ordering::SeqCst));
        assert!(attached.load(Ordering::SeqCst));
        follow_ring(&*io, &attached, false, 1);
        assert!(!io.enabled.load(Ordering::SeqCst));
        assert!(!attached.load(Ordering::SeqCst));
    }
}
