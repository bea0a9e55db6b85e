//! The shared hostile-ring fuzz (`net_datapath::fuzz`) against the
//! backend as vhost-user-backend drives it: its vrings (`VringRwLock`)
//! set up by a frontend over hostile layouts in memfd-backed guest
//! memory, its `handle_event` called for the rx and tx kicks, the TAP
//! event, its own rx-again event and the control queue's kick, a
//! socketpair in place of each TAP queue. Nothing may panic or end the
//! process, bad chains and broken rings are counted, each call fd hears
//! exactly the interrupts counted, and clean rings keep moving frames.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

use net_datapath::fuzz::{
    Features, Fuzzer, Layout, RingKind, RingSetup, Served, Target, seed_and_rounds,
};
use net_datapath::testing::sock_pair;
use vhost_user_backend::VringT;
use vm_memory::{FileOffset, GuestAddress};

use super::*;

const LOW: usize = 8 << 20;
const HIGH: u64 = 1 << 32;
const HIGH_LEN: usize = 2 << 20;

fn sealed_memfd(len: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).unwrap();
    // SAFETY: fcntl with integer arguments on our fd.
    let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(r, 0);
    f
}

/// Is `fd` readable now?
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, no timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    assert!(r >= 0);
    r == 1
}

struct BackendTarget {
    b: NetBackend,
    vrings: Vec<Vring>,
    /// The frontend's ends of the rx, tx and ctrl call eventfds.
    calls: Vec<EventFd>,
    /// Signals on the current ring's call fd since its set-up.
    heard: u64,
}

impl BackendTarget {
    fn new(mem: &GuestMemoryAtomic<GuestMemoryMmap>, io: Vec<Arc<dyn FrameIo>>) -> Self {
        let gate = Arc::new(PeerGate::default());
        gate.decide(true);
        let b = NetBackend::build(Vec::new(), io, mem.clone(), gate).unwrap();
        // The memory table as a frontend's SET_MEM_TABLE installs it.
        b.update_memory(mem.clone()).unwrap();
        let mut vrings = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..3 {
            let v = Vring::new(mem.clone(), QUEUE_SIZE as u16).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            let theirs = call.try_clone().unwrap();
            // SAFETY: into_raw_fd hands over a fresh fd (the clone's).
            v.set_call(Some(unsafe { File::from_raw_fd(theirs.into_raw_fd()) }));
            vrings.push(v);
            calls.push(call);
        }
        BackendTarget {
            b,
            vrings,
            calls,
            heard: 0,
        }
    }

    fn event(&self, ev: u64) {
        self.b
            .handle_event(ev as u16, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }
}

impl Target for BackendTarget {
    fn has_ctrl(&self) -> bool {
        true
    }

    fn setup(&mut self, kind: RingKind, r: &RingSetup, f: Features) {
        // A driver's renegotiation: fresh pair state.
        let gso = bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
        let mut acked = offered_features(2) & !(gso | bit(VIRTIO_NET_F_MRG_RXBUF));
        if f.guest_gso {
            acked |= gso;
        }
        if f.mrg_rxbuf {
            acked |= bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        self.b.acked_features(acked);
        // The ring as SET_VRING_NUM/ADDR/BASE and ENABLE set it.
        let i = kind as usize;
        let v = &self.vrings[i];
        v.set_queue_ready(false);
        v.set_queue_size(r.size);
        v.set_queue_info(r.desc, r.avail, r.used).unwrap();
        v.set_queue_next_avail(r.start);
        v.set_queue_next_used(r.start);
        v.set_queue_event_idx(r.event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        let _ = self.calls[i].read();
        self.heard = 0;
    }

    fn kick(&mut self, kind: RingKind, from_kick: bool) -> Served {
        let i = kind as usize;
        let ev = match kind {
            RingKind::Rx if !from_kick => self.b.tap_id(0),
            k => k as u64,
        };
        self.event(ev);
        // The worker's loop: a full rx batch asked to go on.
        let again = self.b.0.rx_again[0].as_raw_fd();
        let mut n = 0;
        while readable(again) {
            self.event(self.b.again_id(0));
            n += 1;
            assert!(n < 10_000, "rx goes on forever");
        }
        let st = self.b.0.state[0].lock().unwrap();
        let broken = match kind {
            RingKind::Rx => st.rx_broken,
            RingKind::Tx => st.tx_broken,
            RingKind::Ctrl => st.ctrl_broken,
        };
        self.heard += self.calls[i].read().unwrap_or(0);
        assert_eq!(
            self.heard, st.stats.interrupts,
            "the call fd hears each interrupt"
        );
        Served {
            stats: st.stats,
            broken,
        }
    }
}

#[test]
fn fuzz_backend_with_hostile_rings() {
    let mem = GuestMemoryMmap::from_ranges_with_files([
        (
            GuestAddress(0),
            LOW,
            Some(FileOffset::new(sealed_memfd(LOW), 0)),
        ),
        (
            GuestAddress(HIGH),
            HIGH_LEN,
            Some(FileOffset::new(sealed_memfd(HIGH_LEN), 0)),
        ),
    ])
    .unwrap();
    let mem = GuestMemoryAtomic::new(mem);
    let (io, peer) = sock_pair();
    let (io1, _peer1) = sock_pair();
    let all_io: Vec<Arc<dyn FrameIo>> = vec![io.clone(), io1];
    let mut t = BackendTarget::new(&mem, all_io);
    let guard = mem.memory();
    let fz = Fuzzer {
        mem: &guard,
        layout: Layout::default(),
        io: &io,
        peer: &peer,
    };
    let (seed, rounds) = seed_and_rounds(0xbac_0e0d_f022_0001, 50_000);
    fz.run(&mut t, seed, rounds).assert_covered(true);
    // Still the same backend: the memory table kept, the control queue
    // switched pairs on the SockIos without harm.
    assert!(t.b.0.has_mem.load(Ordering::SeqCst));
}
