//! The `VhostUserBackend` of vhost-user-backend: what the device offers
//! (the in-vmm virtio-net device's features), where each ring is served
//! (one worker thread per queue pair, the control queue on pair 0's), and
//! the events each worker waits for besides its kicks (its TAP queue, its
//! rx-again eventfd). The rings themselves, the memory table and the
//! vhost-user messages are the crate's; every value in them is the
//! frontend's and untrusted.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use net_datapath::queue_pair::set_active_pairs;
use net_datapath::{FrameIo, GuestMemoryMmap, TapQueue};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_net::*;
use vm_memory::{
    Address, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::peer::PeerGate;
use crate::sandbox::{self, ThreadKind};
use crate::worker::{PairState, Vring, Worker, follow_ring, live};

/// Ring size offered (the frontend picks at most this).
pub const QUEUE_SIZE: usize = 256;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// What the device offers: what the datapath serves (the in-vmm device's
/// set less its MAC), and vhost-user's PROTOCOL_FEATURES
/// (QEMU 7.2 does not start a vhost-user NIC without them). The MAC stays
/// the frontend's (its device config space).
pub fn offered_features(pairs: u16) -> u64 {
    net_datapath::features::datapath_features(pairs)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Why a frontend's memory table is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("region at {gpa:#x} has no file")]
    NoFile { gpa: u64 },
    #[error("region at {gpa:#x}: cannot inspect its file: {err}")]
    Inspect { gpa: u64, err: String },
    #[error(
        "region at {gpa:#x}: bytes {start:#x}..+{len:#x} of a {size:#x}-byte file (reading past its end kills the reader)"
    )]
    PastEnd {
        gpa: u64,
        start: u64,
        len: u64,
        size: u64,
    },
    #[error(
        "region at {gpa:#x}: its file is not sealed against shrinking (F_SEAL_SHRINK), so it could end under the mapping later"
    )]
    NotSealed { gpa: u64 },
}

/// Every region must lie inside its file, and the file must be sealed
/// against shrinking (QEMU's `memory-backend-memfd` seals by default): a
/// mapping past a file's end turns the first access there into SIGBUS,
/// which would kill the backend on a frontend's say-so. (vm-memory maps
/// what it is given without this check.)
pub fn check_memory(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for r in mem.iter() {
        let gpa = r.start_addr().raw_value();
        let fo = r.file_offset().ok_or(MemoryError::NoFile { gpa })?;
        let inspect = |err: io::Error| MemoryError::Inspect {
            gpa,
            err: err.to_string(),
        };
        let size = fo.file().metadata().map_err(inspect)?.len();
        let (start, len) = (fo.start(), r.len());
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(MemoryError::PastEnd {
                gpa,
                start,
                len,
                size,
            });
        }
        // SAFETY: F_GET_SEALS on an fd the region owns; no memory passed.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(inspect(io::Error::last_os_error()));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(MemoryError::NotSealed { gpa });
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot create pair {pair}'s rx-again eventfd: {err}")]
    EventFd { pair: usize, err: io::Error },
    #[error("{0} worker threads for {1} queue pairs")]
    Workers(usize, usize),
    #[error("cannot watch pair {pair}'s {what}: {err}")]
    Register {
        pair: usize,
        what: &'static str,
        err: io::Error,
    },
}

struct Inner {
    pairs: u16,
    taps: Vec<Arc<TapQueue>>,
    all_io: Vec<Arc<dyn FrameIo>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    acked: AtomicU64,
    active_pairs: AtomicU16,
    /// Memory arrived for this connection (and its peer was allowed).
    has_mem: AtomicBool,
    rx_again: Vec<EventFd>,
    /// Per pair: its TAP queue is attached (while following its rx ring).
    attached: Vec<AtomicBool>,
    /// The driver's control queue reached us: it switches the pairs.
    ctrl_seen: AtomicBool,
    state: Vec<Mutex<PairState>>,
    gate: Arc<PeerGate>,
}

/// The backend; cheap to clone (vhost-user-backend hands a clone to each
/// worker thread).
#[derive(Clone)]
pub struct NetBackend(Arc<Inner>);

impl NetBackend {
    pub fn new(
        taps: Vec<TapQueue>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        gate: Arc<PeerGate>,
    ) -> Result<Self, BackendError> {
        let taps: Vec<Arc<TapQueue>> = taps.into_iter().map(Arc::new).collect();
        let all_io = taps.iter().map(|t| t.clone() as Arc<dyn FrameIo>).collect();
        Self::build(taps, all_io, mem, gate)
    }

    /// `all_io`: every pair's frame I/O; `taps`: the same queues as TAPs
    /// (offloads, epoll), left empty by unit tests that put a socketpair
    /// in their place.
    fn build(
        taps: Vec<Arc<TapQueue>>,
        all_io: Vec<Arc<dyn FrameIo>>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        gate: Arc<PeerGate>,
    ) -> Result<Self, BackendError> {
        let pairs = u16::try_from(all_io.len()).unwrap_or(u16::MAX);
        let rx_again = (0..all_io.len())
            .map(|pair| {
                EventFd::new(EFD_NONBLOCK).map_err(|err| BackendError::EventFd { pair, err })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetBackend(Arc::new(Inner {
            pairs,
            state: (0..all_io.len())
                .map(|_| Mutex::new(PairState::new(false)))
                .collect(),
            taps,
            all_io,
            mem,
            acked: AtomicU64::new(0),
            active_pairs: AtomicU16::new(1),
            has_mem: AtomicBool::new(false),
            rx_again,
            attached: (0..pairs).map(|p| AtomicBool::new(p == 0)).collect(),
            ctrl_seen: AtomicBool::new(false),
            gate,
        })))
    }

    fn has_ctrl(&self) -> bool {
        self.0.pairs > 1
    }

    /// The epoll ids past the vrings and the crate's own exit/enable id
    /// (`num_queues`): pair p's TAP queue and rx-again eventfd.
    fn tap_id(&self, pair: usize) -> u64 {
        (self.num_queues() + 1 + 2 * pair) as u64
    }

    fn again_id(&self, pair: usize) -> u64 {
        self.tap_id(pair) + 1
    }

    /// Registers each pair's TAP queue (edge-triggered) and rx-again
    /// eventfd with that pair's worker.
    pub fn register(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> Result<(), BackendError> {
        if handlers.len() != self.0.taps.len() {
            return Err(BackendError::Workers(handlers.len(), self.0.taps.len()));
        }
        for (pair, h) in handlers.iter().enumerate() {
            let err = |what| move |err| BackendError::Register { pair, what, err };
            h.register_listener(
                self.0.taps[pair].as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                self.tap_id(pair),
            )
            .map_err(err("TAP queue"))?;
            h.register_listener(
                self.0.rx_again[pair].as_raw_fd(),
                EventSet::IN,
                self.again_id(pair),
            )
            .map_err(err("rx-again eventfd"))?;
            // Wakes the worker once, so that it installs its own seccomp
            // filter now, not at its first frame or kick (a pair the
            // driver never uses would keep the broader inherited one).
            self.0.rx_again[pair]
                .write(1)
                .map_err(err("rx-again eventfd"))?;
        }
        Ok(())
    }

    /// A connection ended: forget its memory until the next one's table.
    pub fn disconnected(&self) {
        self.0.has_mem.store(false, Ordering::SeqCst);
    }

    fn acked_has(&self, b: u32) -> bool {
        self.0.acked.load(Ordering::SeqCst) & bit(b) != 0
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.0.pairs) + usize::from(self.has_ctrl())
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        sandbox::enter_thread_or_exit(ThreadKind::Frontend);
        offered_features(self.0.pairs)
    }

    fn acked_features(&self, features: u64) {
        sandbox::enter_thread_or_exit(ThreadKind::Frontend);
        self.0.acked.store(features, Ordering::SeqCst);
        let gso = features
            & (bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_UFO))
            != 0;
        // A new driver: fresh rx state and unbroken rings for every pair.
        for s in &self.0.state {
            *s.lock().unwrap_or_else(|p| p.into_inner()) = PairState::new(gso);
        }
        // TUNSETOFFLOAD acts on the device: one queue sets it for all.
        if let Some(t) = self.0.taps.first() {
            match t.set_offload(features) {
                Ok(flags) => log::debug!("offloads {flags:#x} for features {features:#x}"),
                Err(e) => log::warn!("TUNSETOFFLOAD for features {features:#x}: {e}"),
            }
        }
        // A driver starts on one pair; the control queue switches (or,
        // when the frontend keeps it, the rings: see `follow_ring`).
        if !set_active_pairs(&self.0.all_io, 1, &self.0.active_pairs) {
            log::warn!("cannot attach/detach TAP queues");
        }
        self.0.ctrl_seen.store(false, Ordering::SeqCst);
        for (p, a) in self.0.attached.iter().enumerate() {
            a.store(p == 0, Ordering::SeqCst);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        sandbox::enter_thread_or_exit(ThreadKind::Frontend);
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The crate sets EVENT_IDX on each vring; the datapath asks the queue.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        sandbox::enter_thread_or_exit(ThreadKind::Frontend);
        // The crate has installed the table already: until it is checked,
        // the datapath must not touch it.
        self.0.has_mem.store(false, Ordering::SeqCst);
        if !self.0.gate.wait_allowed() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "frontend refused",
            ));
        }
        check_memory(&mem.memory()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("memory table refused: {e}"),
            )
        })?;
        // `self.0.mem` is the crate's own atomic: it holds the new table.
        self.0.has_mem.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Pair p: rings 2p (rx) and 2p+1 (tx); the control queue, last,
        // rides on pair 0's thread.
        let mut v: Vec<u64> = (0..usize::from(self.0.pairs))
            .map(|p| 0b11 << (2 * p))
            .collect();
        if self.has_ctrl()
            && let Some(first) = v.first_mut()
        {
            *first |= 1 << (2 * usize::from(self.0.pairs));
        }
        v
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("cannot create a worker's exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        sandbox::enter_thread_or_exit(ThreadKind::Worker);
        let pair = thread_id;
        let (Some(io), Some(state), Some(rx_again)) = (
            self.0.all_io.get(pair),
            self.0.state.get(pair),
            self.0.rx_again.get(pair),
        ) else {
            return Ok(());
        };
        if !self.0.has_mem.load(Ordering::SeqCst) || !self.0.gate.allowed() {
            // No rings yet: a TAP frame waits in the kernel, a kick is
            // replayed when the ring is set up.
            if u64::from(device_event) == self.again_id(pair) {
                let _ = rx_again.read();
            }
            return Ok(());
        }
        let guard = self.0.mem.memory();
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = Worker {
            pair,
            mem: &guard,
            io: &**io,
            all_io: &self.0.all_io,
            max_pairs: self.0.pairs,
            active_pairs: &self.0.active_pairs,
            mrg_rxbuf: self.acked_has(VIRTIO_NET_F_MRG_RXBUF),
            rx_again,
            st: &mut st,
        };
        if pair > 0
            && !self.0.ctrl_seen.load(Ordering::SeqCst)
            && let (Some(attached), Some(rx)) = (self.0.attached.get(pair), vrings.first())
        {
            let rx_live = live(&rx.get_ref());
            follow_ring(&**io, attached, rx_live, pair);
        }
        let ev = u64::from(device_event);
        match (device_event, vrings) {
            (0, [rx, ..]) => w.rx(rx, true),
            (1, [_, tx, ..]) => w.tx(tx),
            (2, [_, _, ctrl]) => {
                self.0.ctrl_seen.store(true, Ordering::SeqCst);
                w.ctrl(ctrl)
            }
            (_, [rx, ..]) if ev == self.tap_id(pair) => w.rx(rx, false),
            (_, [rx, ..]) if ev == self.again_id(pair) => {
                let _ = rx_again.read();
                w.rx(rx, false)
            }
            _ => log::debug!("pair {pair}: event {device_event} ignored"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress};

    fn memfd(len: u64, seal: bool) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; owned below.
        let fd = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        if seal {
            // SAFETY: fcntl with integer arguments on our fd.
            let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(r, 0);
        }
        f
    }

    fn mem(f: File, start: u64, len: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0x1000),
            len,
            Some(FileOffset::new(f, start)),
        )])
        .unwrap()
    }

    #[test]
    fn regions_must_lie_in_a_sealed_file() {
        assert_eq!(check_memory(&mem(memfd(0x10000, true), 0, 0x10000)), Ok(()));
        assert!(matches!(
            check_memory(&mem(memfd(0x10000, true), 0, 0x20000)),
            Err(MemoryError::PastEnd { .. })
        ));
        assert!(matches!(
            check_memory(&mem(memfd(0x10000, true), 0x1000, 0x10000)),
            Err(MemoryError::PastEnd { .. })
        ));
        assert_eq!(
            check_memory(&mem(memfd(0x10000, false), 0, 0x10000)),
            Err(MemoryError::NotSealed { gpa: 0x1000 })
        );
        let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(check_memory(&anon), Err(MemoryError::NoFile { gpa: 0 }));
    }
}
