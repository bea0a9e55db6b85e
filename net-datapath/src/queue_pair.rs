//! Serving a queue pair's rings when something happened (a kick, a frame
//! at the backend): run the datapath, tell the driver when it asked to be
//! told (EVENT_IDX), and stop a ring the driver broke. The event loop that
//! decides when is the caller's: the vmm's device threads, or the
//! vhost-user backend's workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;
use crate::datapath::{
    NetStats, QueueFault, RxOutcome, RxState, process_ctrl, process_rx, process_tx,
};
use crate::frame_io::FrameIo;

/// How the datapath reaches the driver: the vmm's device interrupt (one
/// line for every queue), or a vhost-user ring's call eventfd.
pub trait Notify {
    /// The used ring changed and the driver wants to hear of it.
    fn signal_used_queue(&self);
    /// The driver broke a ring: that ring has stopped; ask for a reset.
    fn set_needs_reset(&self);
}

/// What serving one ring needs besides the ring and its own state.
pub struct RingCtx<'a> {
    pub mem: &'a GuestMemoryMmap,
    /// The queue pair's backend end (a TAP queue).
    pub io: &'a dyn FrameIo,
    /// Whom to tell about this ring.
    pub notify: &'a dyn Notify,
    /// The queue pair, for log lines.
    pub pair: usize,
}

/// Where a queue pair's rx stands after [`serve_rx`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxStatus {
    /// The backend is drained: the next frame arrives as an epoll event.
    Idle,
    /// A frame waits for rx buffers: the driver's kick resumes.
    WaitingForBuffers,
    /// A batch went in and the backend may hold more (edge-triggered
    /// epoll would not say so again).
    More,
}

fn broken(cx: &RingCtx<'_>, what: &str, e: &QueueFault) {
    common::warn_rate_limited!("virtio-net pair {}: {what} queue: {e}", cx.pair);
    cx.notify.set_needs_reset();
}

/// Signals the driver that `q`'s used ring changed, unless it said (with
/// EVENT_IDX, its `used_event`; or the avail ring's NO_INTERRUPT flag)
/// that it does not need it yet; counts either way.
pub fn notify_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    notify: &dyn Notify,
    stats: &mut NetStats,
) {
    // needs_notification errs only on unreadable used_event: notify then.
    if q.needs_notification(mem).unwrap_or(true) {
        notify.signal_used_queue();
        stats.interrupts += 1;
    } else if q.event_idx_enabled() {
        stats.interrupts_suppressed += 1;
    }
}

/// Serves rx until the backend is drained, a frame waits for buffers
/// (notifications are then enabled on the rx queue), or a batch went in
/// (the driver is signalled once per batch). A broken ring sets `broken`
/// and is left alone from then on.
pub fn serve_rx(
    q: &mut Queue,
    cx: &RingCtx<'_>,
    st: &mut RxState,
    mrg_rxbuf: bool,
    broken_ring: &mut bool,
    stats: &mut NetStats,
) -> RxStatus {
    if *broken_ring {
        return RxStatus::Idle;
    }
    loop {
        let (outcome, used) = match process_rx(q, cx.mem, cx.io, st, mrg_rxbuf, stats) {
            Ok(x) => x,
            Err(e) => {
                *broken_ring = true;
                broken(cx, "rx", &e);
                return RxStatus::Idle;
            }
        };
        if used {
            notify_used(q, cx.mem, cx.notify, stats);
        }
        match outcome {
            RxOutcome::Drained => return RxStatus::Idle,
            RxOutcome::More => return RxStatus::More,
            RxOutcome::NoBuffers => match wait_for_rx_buffers(q, cx.mem, st) {
                Ok(true) => continue,
                Ok(false) => return RxStatus::WaitingForBuffers,
                Err(e) => {
                    *broken_ring = true;
                    broken(cx, "rx", &e);
                    return RxStatus::Idle;
                }
            },
        }
    }
}

/// Asks the driver for a kick when it adds rx buffers beyond those
/// already seen (too few for the waiting frame). Returns true when
/// more arrived meanwhile. virtio-queue's `enable_notification` would
/// ask for a kick at `next_avail`, which the driver has already passed
/// when we rewound over buffers too small to use: with EVENT_IDX no
/// kick would ever come.
fn wait_for_rx_buffers(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    st: &RxState,
) -> Result<bool, QueueFault> {
    q.enable_notification(mem)
        .map_err(|e| QueueFault(e.to_string()))?;
    let seen = st.seen_avail;
    if q.event_idx_enabled() {
        let at = q
            .used_ring()
            .checked_add(4 + 8 * u64::from(q.size()))
            .ok_or_else(|| QueueFault("used ring address overflows".into()))?;
        mem.store(seen.to_le(), GuestAddress(at), Ordering::Relaxed)
            .map_err(|e| QueueFault(format!("avail_event unwritable: {e}")))?;
    }
    fence(Ordering::SeqCst);
    let now = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| QueueFault(e.to_string()))?;
    Ok(now.0 != seen)
}

/// Sends every tx chain the driver made available, with notifications
/// off while there is work and back on (checked once more) before
/// returning. `buf` (at least `MAX_FRAME_LEN`) is for chains too
/// fragmented for one writev.
pub fn serve_tx(
    q: &mut Queue,
    cx: &RingCtx<'_>,
    buf: &mut [u8],
    broken_ring: &mut bool,
    stats: &mut NetStats,
) {
    if *broken_ring {
        return;
    }
    let mut fail = |e: QueueFault| {
        *broken_ring = true;
        broken(cx, "tx", &e);
    };
    loop {
        if let Err(e) = q.disable_notification(cx.mem) {
            return fail(QueueFault(e.to_string()));
        }
        match process_tx(q, cx.mem, cx.io, buf, stats) {
            Ok(true) => notify_used(q, cx.mem, cx.notify, stats),
            Ok(false) => {}
            Err(e) => return fail(e),
        }
        match q.enable_notification(cx.mem) {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => return fail(QueueFault(e.to_string())),
        }
    }
}

/// Attaches the first `n` TAP queues and detaches the rest, so the kernel
/// steers frames only to queues the driver serves.
pub fn set_active_pairs(all_io: &[Arc<dyn FrameIo>], n: u16, active: &AtomicU16) -> bool {
    if all_io.len() <= 1 {
        active.store(n, Ordering::SeqCst);
        return true;
    }
    let mut ok = true;
    // Attach first so there is always at least one attached queue.
    for (i, io) in all_io.iter().enumerate() {
        if i < usize::from(n) {
            ok &= io.set_enabled(true).is_ok();
        }
    }
    for (i, io) in all_io.iter().enumerate() {
        if i >= usize::from(n) {
            ok &= io.set_enabled(false).is_ok();
        }
    }
    if ok {
        active.store(n, Ordering::SeqCst);
    }
    ok
}

/// Serves the control queue once (queue-pair switches attach and detach
/// TAP queues among `all_io`); a broken ring sets `broken` and asks for a
/// reset.
#[allow(clippy::too_many_arguments)]
pub fn serve_ctrl(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    all_io: &[Arc<dyn FrameIo>],
    max_pairs: u16,
    active: &AtomicU16,
    notify: &dyn Notify,
    broken_ring: &mut bool,
    stats: &mut NetStats,
) {
    let mut set_pairs = |n: u16| set_active_pairs(all_io, n, active);
    serve_ctrl_switching(
        q,
        mem,
        max_pairs,
        &mut set_pairs,
        notify,
        broken_ring,
        stats,
    );
}

/// [`serve_ctrl`] where a queue-pair switch is `set_pairs(n)` (true when
/// done): e.g. enabling and disabling a vhost-user backend's rings.
pub fn serve_ctrl_switching(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    max_pairs: u16,
    set_pairs: &mut dyn FnMut(u16) -> bool,
    notify: &dyn Notify,
    broken_ring: &mut bool,
    stats: &mut NetStats,
) {
    if *broken_ring {
        return;
    }
    match process_ctrl(q, mem, max_pairs, set_pairs, stats) {
        Ok(true) => notify_used(q, mem, notify, stats),
        Ok(false) => {}
        Err(e) => {
            *broken_ring = true;
            common::warn_rate_limited!("virtio-net: control queue: {e}");
            notify.set_needs_reset();
        }
    }
}
