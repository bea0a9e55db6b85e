//! A hostile driver for whatever serves the datapath's rings (the vmm's
//! device threads, the vhost-user backend's workers, or `queue_pair`
//! alone): each round lays out one ring in guest memory with random
//! descriptors (loops, chains past the table, addresses outside RAM or
//! around its edges, overflowing lengths, indirect tables, wrong
//! directions), a random avail ring, flags, `used_event` and start index,
//! now and then an avail index that jumps past the ring, and has a
//! [`Target`] serve it as the ring's event would. What the used ring, the
//! counters and the "network" (the peer of a [`SockIo`]) show afterwards
//! is checked against what a correct device may do, and every so often a
//! clean ring must still move a frame both ways.
//!
//! Runs are deterministic: a seed and a number of rounds, printed;
//! `FUZZ_SEED=<n>` replays a run, `FUZZ_ROUNDS=<n>` makes it longer.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemoryMmap;
use crate::datapath::{MAX_FRAME_LEN, NetStats, VNET_HDR_LEN};
use crate::frame_io::FrameIo;
use crate::testing::{Peer, SockIo};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// xorshift64*: a tiny deterministic RNG, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift stays at 0 forever.
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// A fuzz test's seed and rounds: `FUZZ_SEED` when set (to replay a
/// failure), else the test's fixed seed; `FUZZ_ROUNDS` when set, else
/// `rounds`. Printed either way, so a failure names its replay.
pub fn seed_and_rounds(fixed: u64, rounds: u64) -> (u64, u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let seed = env("FUZZ_SEED").unwrap_or(fixed);
    let rounds = env("FUZZ_ROUNDS").unwrap_or(rounds).max(1);
    eprintln!("fuzz seed {seed} (FUZZ_SEED={seed} replays it), {rounds} rounds (FUZZ_ROUNDS)");
    (seed, rounds)
}

/// Where the fuzz writes in guest memory: ring slots from `rings`
/// ([`RING_SLOTS`] of [`RING_SPAN`] bytes), and the buffers most
/// descriptors point into (`bufs`). Both must be RAM, and apart.
#[derive(Clone, Debug)]
pub struct Layout {
    pub rings: u64,
    pub bufs: std::ops::Range<u64>,
}

pub const RING_SLOTS: u64 = 8;
pub const RING_SPAN: u64 = 0x1_0000;

impl Default for Layout {
    /// Rings from 256 KiB (clear of what a frame written near address 0
    /// reaches), buffers from 1 MiB to 4 MiB.
    fn default() -> Self {
        Layout {
            rings: 0x4_0000,
            bufs: 0x10_0000..0x40_0000,
        }
    }
}

/// A ring as a driver set it up (a split virtqueue).
#[derive(Clone, Debug)]
pub struct RingSetup {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where the device's next_avail and next_used start (vhost-user's
    /// SET_VRING_BASE; a restored queue), and the used ring's idx.
    pub start: u16,
    pub event_idx: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    Rx,
    Tx,
    Ctrl,
}

/// What the driver negotiated for a round.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub mrg_rxbuf: bool,
    pub guest_gso: bool,
}

/// Where a ring stands after a [`Target::kick`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    /// The counters moved since the ring's [`Target::setup`].
    pub stats: NetStats,
    /// The ring is stopped as broken (the device asked for a reset).
    pub broken: bool,
}

/// Something that serves the datapath's rings.
pub trait Target {
    /// Whether it has a control queue to fuzz.
    fn has_ctrl(&self) -> bool;

    /// A driver (re)starting `kind`'s ring as `ring` describes, with
    /// `features` and fresh per-driver state: no ring broken, no frame
    /// pending, counters from 0.
    fn setup(&mut self, kind: RingKind, ring: &RingSetup, features: Features);

    /// The ring's event served: its kick, or for rx with `from_kick` false
    /// the backend becoming readable. Rx is served until it waits (a full
    /// batch goes on as the target's event loop would go on).
    fn kick(&mut self, kind: RingKind, from_kick: bool) -> Served;
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rounds: u64,
    /// Rounds per ring kind: rx, tx, ctrl.
    pub per_kind: [u64; 3],
    /// Rings the target stopped as broken.
    pub faults: u64,
    pub frames_out: u64,
    pub frames_in: u64,
    /// Clean rounds that moved a frame both ways.
    pub clean_rounds: u64,
    pub stats: NetStats,
}

impl Report {
    /// The run reached what it is for: faults, bad chains, frames both
    /// ways, every kind of ring.
    pub fn assert_covered(&self, has_ctrl: bool) {
        assert!(
            self.faults > 0
                && self.stats.bad_chains() > 0
                && self.frames_out > 0
                && self.frames_in > 0
                && self.clean_rounds > 0
                && self.per_kind[..2].iter().all(|&n| n > 0)
                && (!has_ctrl || self.per_kind[2] > 0),
            "fuzz coverage too thin: {self:?}"
        );
    }
}

/// The hostile driver: guest memory, the layout it writes into, and the
/// two ends of the target's backend (the device end only to drain it
/// between rounds).
pub struct Fuzzer<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub layout: Layout,
    pub io: &'a SockIo,
    pub peer: &'a Peer,
}

/// One descriptor's fields.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemoryMmap, at: u64) -> Option<Desc> {
    let at = GuestAddress(at);
    Some(Desc {
        addr: mem.read_obj(at).ok()?,
        len: mem.read_obj(at.checked_add(8)?).ok()?,
        flags: mem.read_obj(at.checked_add(12)?).ok()?,
        next: mem.read_obj(at.checked_add(14)?).ok()?,
    })
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, d: Desc) {
    let at = GuestAddress(at);
    mem.write_obj(d.addr, at).unwrap();
    mem.write_obj(d.len, at.unchecked_add(8)).unwrap();
    mem.write_obj(d.flags, at.unchecked_add(12)).unwrap();
    mem.write_obj(d.next, at.unchecked_add(14)).unwrap();
}

/// An upper bound of the bytes (device-readable, device-writable) a
/// device may find in the chain at `head`: every descriptor a walk of at
/// most table-size steps reaches (loops counted again), indirect tables
/// included, whatever a stricter device would refuse. `None` when no
/// useful bound exists (a huge indirect table).
fn chain_bound(
    mem: &GuestMemoryMmap,
    table: u64,
    n: u64,
    head: u16,
    top: bool,
) -> Option<(u64, u64)> {
    let (mut r, mut w) = (0u64, 0u64);
    let mut i = u64::from(head);
    for _ in 0..=n {
        if i >= n {
            break;
        }
        let Some(d) = table.checked_add(16 * i).and_then(|a| read_desc(mem, a)) else {
            break;
        };
        if top && d.flags & F_INDIRECT != 0 {
            let entries = u64::from(d.len) / 16;
            if entries > 4096 {
                return None;
            }
            let (ir, iw) = chain_bound(mem, d.addr, entries, 0, false)?;
            r += ir;
            w += iw;
        }
        if d.flags & F_WRITE != 0 {
            w += u64::from(d.len);
        } else {
            r += u64::from(d.len);
        }
        if d.flags & F_NEXT == 0 {
            break;
        }
        i = u64::from(d.next);
    }
    Some((r, w))
}

/// The used entries (id, len) from index `from` to the used ring's idx.
fn used_entries(mem: &GuestMemoryMmap, ring: &RingSetup) -> (u16, Vec<(u32, u32)>) {
    let idx: u16 = mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
    let mut out = Vec::new();
    let mut i = ring.start;
    // Bounded: the caller checks the distance separately.
    while i != idx && out.len() <= usize::from(ring.size) {
        let e = ring.used + 4 + 8 * u64::from(i % ring.size);
        out.push((
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        ));
        i = i.wrapping_add(1);
    }
    (idx, out)
}

/// A guest address a hostile driver might name: mostly inside `bufs`,
/// else around the edges of `mem`'s RAM regions (the MMIO hole, the end of
/// RAM), near the top of the address space, or anything.
pub fn hostile_addr(rng: &mut Rng, mem: &GuestMemoryMmap, bufs: &std::ops::Range<u64>) -> u64 {
    let near = |rng: &mut Rng, at: u64| at.wrapping_add(rng.below(0x2000)).wrapping_sub(0x1000);
    match rng.below(8) {
        0 => rng.next_u64(),
        1..=3 => {
            let edges: Vec<u64> = mem
                .iter()
                .flat_map(|r| {
                    let s = r.start_addr().raw_value();
                    [s, s.wrapping_add(r.len())]
                })
                .collect();
            let e = edges[rng.below(edges.len() as u64) as usize];
            near(rng, e)
        }
        4 => u64::MAX - rng.below(0x1000),
        _ => bufs.start + rng.below(bufs.end - bufs.start),
    }
}

fn pattern(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| tag.wrapping_add(i as u8)).collect()
}

impl Fuzzer<'_> {
    fn addr(&self, rng: &mut Rng) -> u64 {
        hostile_addr(rng, self.mem, &self.layout.bufs)
    }

    fn len(rng: &mut Rng) -> u32 {
        match rng.below(4) {
            0 => rng.next_u64() as u32,
            1 => 16 * rng.below(40) as u32,
            _ => rng.below(3000) as u32,
        }
    }

    fn random_desc(&self, rng: &mut Rng, n: u64) -> Desc {
        Desc {
            addr: self.addr(rng),
            len: Self::len(rng),
            flags: rng.below(8) as u16,
            next: rng.below(n + 2) as u16,
        }
    }

    /// Writes a random ring into a random slot; returns it, with the
    /// avail index it ends at.
    fn hostile_ring(&self, rng: &mut Rng) -> (RingSetup, u16) {
        let size: u16 = if rng.below(16) == 0 {
            1 << (6 + rng.below(3))
        } else {
            1 << rng.below(6)
        };
        let base = self.layout.rings + rng.below(RING_SLOTS) * RING_SPAN;
        let n = u64::from(size);
        for i in 0..n {
            let d = self.random_desc(rng, n);
            write_desc(self.mem, base + 16 * i, d);
            // Half the indirect tables in the buffers get plausible
            // contents (nested ones among them).
            let b = &self.layout.bufs;
            let entries = u64::from(d.len) / 16;
            if d.flags & F_INDIRECT != 0
                && rng.coin()
                && entries <= 64
                && d.addr >= b.start
                && d.addr.saturating_add(u64::from(d.len)) <= b.end
            {
                for j in 0..entries {
                    let e = self.random_desc(rng, entries);
                    write_desc(self.mem, d.addr + 16 * j, e);
                }
            }
        }
        let start = match rng.below(4) {
            0 => rng.next_u64() as u16,
            1 => u16::MAX - rng.below(n) as u16,
            _ => 0,
        };
        // Now and then an index that jumps past the ring.
        let count = match rng.below(8) {
            0 => rng.below(n * 2 + 1),
            _ => rng.below(n + 1),
        } as u16;
        let avail_idx = start.wrapping_add(count);
        let avail = base + 0x4000;
        let w16 = |v: u16, at: u64| self.mem.write_obj(v, GuestAddress(at)).unwrap();
        w16(rng.below(2) as u16 * AVAIL_F_NO_INTERRUPT, avail);
        w16(avail_idx, avail + 2);
        for i in 0..n {
            w16(rng.below(n + 4) as u16, avail + 4 + 2 * i);
        }
        // used_event.
        w16(rng.next_u64() as u16, avail + 4 + 2 * n);
        let used = base + 0x8000;
        w16(0, used);
        w16(start, used + 2);
        let ring = RingSetup {
            size,
            desc: base,
            avail,
            used,
            start,
            event_idx: rng.coin(),
        };
        (ring, avail_idx)
    }

    /// Empties the device end (a frame an earlier round left waiting).
    fn drain_device(&self) {
        let mut sink = vec![0u8; MAX_FRAME_LEN];
        while self.io.read_frame(&mut sink).is_ok_and(|n| n > 0) {}
    }

    /// Runs `rounds` hostile rounds from `seed` against `t`, a clean round
    /// every 64 and at the end; panics (naming the seed and round) at the
    /// first thing a correct device would not do.
    pub fn run(&self, t: &mut dyn Target, seed: u64, rounds: u64) -> Report {
        let mut rng = Rng::new(seed);
        let mut rep = Report::default();
        let kinds: &[RingKind] = if t.has_ctrl() {
            &[RingKind::Rx, RingKind::Tx, RingKind::Ctrl]
        } else {
            &[RingKind::Rx, RingKind::Tx]
        };
        for round in 0..rounds {
            let ctx = format!("round {round} of FUZZ_SEED={seed}");
            let kind = kinds[rng.below(kinds.len() as u64) as usize];
            self.hostile_round(t, kind, &mut rng, &mut rep, &ctx);
            rep.rounds += 1;
            if round % 64 == 63 {
                self.clean_round(t, &mut rng, &mut rep, &ctx);
            }
        }
        self.clean_round(
            t,
            &mut rng,
            &mut rep,
            &format!("after the run of FUZZ_SEED={seed}"),
        );
        eprintln!("datapath fuzz: {rep:?}");
        rep
    }

    fn hostile_round(
        &self,
        t: &mut dyn Target,
        kind: RingKind,
        rng: &mut Rng,
        rep: &mut Report,
        ctx: &str,
    ) {
        let (ring, avail_idx) = self.hostile_ring(rng);
        let size = ring.size;
        let offered = avail_idx.wrapping_sub(ring.start);
        let jumped = offered > size;
        // What the device may find, measured before it writes anything.
        let heads: Vec<u16> = (0..offered.min(size))
            .map(|k| {
                let slot = ring.avail + 4 + 2 * u64::from(ring.start.wrapping_add(k) % size);
                self.mem.read_obj(GuestAddress(slot)).unwrap()
            })
            .collect();
        let bound = |h: u32| {
            u16::try_from(h)
                .ok()
                .filter(|&h| h < size)
                .map(|h| chain_bound(self.mem, ring.desc, u64::from(size), h, true))
        };
        let features = Features {
            mrg_rxbuf: rng.coin(),
            guest_gso: rng.coin(),
        };
        let from_kick = rng.below(4) != 0;
        let no_interrupt = {
            let f: u16 = self.mem.read_obj(GuestAddress(ring.avail)).unwrap();
            f & AVAIL_F_NO_INTERRUPT != 0
        };
        let mut rx_len = 0;
        if kind == RingKind::Rx {
            self.drain_device();
            rx_len = if rng.below(8) == 0 {
                rng.below(MAX_FRAME_LEN as u64) as usize + 1
            } else {
                rng.below(2000) as usize + 1
            };
            assert!(
                self.peer.try_send(&pattern(rx_len, rng.next_u64() as u8)),
                "{ctx}"
            );
        }
        t.setup(kind, &ring, features);
        let served = t.kick(kind, from_kick);
        let s = served.stats;
        rep.per_kind[kind as usize] += 1;
        rep.stats = rep.stats.plus(&s);
        assert_eq!(
            served.broken, jumped,
            "{ctx}: {kind:?} ring stopped iff its avail index jumped ({offered} for {size})"
        );
        rep.faults += u64::from(served.broken);
        let (used_idx, used) = used_entries(self.mem, &ring);
        let moved = used_idx.wrapping_sub(ring.start);
        assert!(
            moved <= size,
            "{ctx}: used idx {used_idx} ahead of its start {} by more than the ring ({size})",
            ring.start
        );
        assert!(
            used.len() <= usize::from(offered),
            "{ctx}: {} used for {offered} offered",
            used.len()
        );
        for &(id, len) in &used {
            assert!(
                id < u32::from(size) && heads.iter().any(|&h| u32::from(h) == id),
                "{ctx}: used id {id} was never offered ({heads:?})"
            );
            if let Some(Some((_, w))) = bound(id) {
                assert!(
                    u64::from(len) <= w,
                    "{ctx}: used len {len} for chain {id} of at most {w} writable bytes"
                );
            }
        }
        if !used.is_empty() && !ring.event_idx && !no_interrupt {
            assert!(s.interrupts > 0, "{ctx}: used ring changed, no interrupt");
        }
        match kind {
            RingKind::Tx => {
                let mut sent = 0u64;
                let mut bytes = 0u64;
                while let Some(f) = self.peer.try_recv() {
                    assert!(
                        f.len() >= VNET_HDR_LEN && f.len() <= MAX_FRAME_LEN,
                        "{ctx}: a {}-byte frame out",
                        f.len()
                    );
                    sent += 1;
                    bytes += f.len() as u64;
                }
                rep.frames_out += sent;
                assert_eq!(sent, s.tx_packets, "{ctx}: frames out vs counted");
                let readable: u64 = heads
                    .iter()
                    .map(|&h| match bound(u32::from(h)) {
                        Some(Some((r, _))) => r,
                        _ => u64::MAX / 2 / u64::from(size),
                    })
                    .sum();
                assert!(bytes <= readable, "{ctx}: {bytes} bytes out of {readable}");
                assert!(used.iter().all(|&(_, len)| len == 0), "{ctx}: {used:?}");
                if !jumped {
                    assert_eq!(
                        s.tx_packets + s.tx_tap_errors + s.tx_bad_chains,
                        u64::from(offered),
                        "{ctx}: every tx chain sent, refused or counted bad"
                    );
                    // A head outside the ring has no used entry to name it.
                    let valid = heads.iter().filter(|&&h| h < size).count();
                    assert_eq!(used.len(), valid, "{ctx}: every valid chain used");
                }
            }
            RingKind::Rx => {
                let delivered = s.rx_packets;
                assert!(
                    delivered + s.rx_dropped() <= 1,
                    "{ctx}: one frame was sent: {s:?}"
                );
                rep.frames_in += delivered;
                let filled: u64 = used.iter().map(|&(_, len)| u64::from(len)).sum();
                let expect = if delivered == 1 { rx_len as u64 } else { 0 };
                assert_eq!(
                    filled, expect,
                    "{ctx}: used lengths {used:?} for a {rx_len}-byte frame"
                );
                if rx_len < VNET_HDR_LEN {
                    assert_eq!(delivered, 0, "{ctx}: a frame shorter than its header");
                }
                if !features.mrg_rxbuf {
                    // Bad chains come back empty; the frame takes one.
                    let filled = used.iter().filter(|&&(_, len)| len > 0).count();
                    assert!(filled <= 1, "{ctx}: one buffer per frame: {used:?}");
                }
            }
            RingKind::Ctrl => {
                assert!(
                    used.iter().all(|&(_, len)| len <= 1),
                    "{ctx}: a control ack is one byte: {used:?}"
                );
            }
        }
        // Kicked again with nothing new (a stopped ring: with an avail
        // index that would be fine now): nothing moves.
        if served.broken {
            let at = GuestAddress(ring.avail + 2);
            self.mem.write_obj(ring.start.wrapping_add(1), at).unwrap();
        }
        let again = t.kick(kind, true);
        assert_eq!(again.broken, served.broken, "{ctx}: {kind:?} kicked again");
        assert_eq!(
            again.stats, s,
            "{ctx}: {kind:?} kicked again with nothing new"
        );
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        assert_eq!(
            idx, used_idx,
            "{ctx}: {kind:?} kicked again with nothing new"
        );
        assert!(
            self.peer.try_recv().is_none(),
            "{ctx}: a frame out of nothing"
        );
    }

    /// A clean ring of each direction, served as a driver would: one frame
    /// out and one in, whole and where they belong.
    fn clean_round(&self, t: &mut dyn Target, rng: &mut Rng, rep: &mut Report, ctx: &str) {
        let base = self.layout.rings + rng.below(RING_SLOTS) * RING_SPAN;
        let start = rng.next_u64() as u16;
        let ring = RingSetup {
            size: 16,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x8000,
            start,
            event_idx: rng.coin(),
        };
        let features = Features {
            mrg_rxbuf: rng.coin(),
            guest_gso: rng.coin(),
        };
        let buf = self.layout.bufs.start;
        let w16 = |v: u16, at: u64| self.mem.write_obj(v, GuestAddress(at)).unwrap();
        let head = start % ring.size;
        let offer = |d: Desc| {
            write_desc(self.mem, ring.desc + 16 * u64::from(head), d);
            w16(0, ring.avail);
            w16(head, ring.avail + 4 + 2 * u64::from(start % ring.size));
            // used_event: tell us at once.
            w16(start, ring.avail + 4 + 2 * u64::from(ring.size));
            w16(start.wrapping_add(1), ring.avail + 2);
            w16(0, ring.used);
            w16(start, ring.used + 2);
        };
        // Out.
        let n = 60 + rng.below(1400) as usize;
        let out = pattern(VNET_HDR_LEN + n, rng.next_u64() as u8);
        let mut out_frame = out.clone();
        out_frame[..VNET_HDR_LEN].fill(0);
        self.mem.write_slice(&out_frame, GuestAddress(buf)).unwrap();
        while self.peer.try_recv().is_some() {}
        offer(Desc {
            addr: buf,
            len: out_frame.len() as u32,
            flags: 0,
            next: 0,
        });
        t.setup(RingKind::Tx, &ring, features);
        let s = t.kick(RingKind::Tx, true);
        assert!(!s.broken, "{ctx}: clean tx ring broken");
        assert_eq!(
            self.peer.try_recv().as_deref(),
            Some(&out_frame[..]),
            "{ctx}: the clean tx frame"
        );
        assert_eq!(
            used_entries(self.mem, &ring).1,
            vec![(u32::from(head), 0)],
            "{ctx}"
        );
        // In.
        self.drain_device();
        let inb = buf + 0x1_0000;
        let mut in_frame = pattern(VNET_HDR_LEN + n, rng.next_u64() as u8);
        in_frame[..VNET_HDR_LEN].fill(0);
        self.peer.send(&in_frame);
        offer(Desc {
            addr: inb,
            len: 0x1_0000,
            flags: F_WRITE,
            next: 0,
        });
        t.setup(RingKind::Rx, &ring, features);
        let s = t.kick(RingKind::Rx, true);
        assert!(!s.broken, "{ctx}: clean rx ring broken");
        assert_eq!(
            s.stats.rx_packets, 1,
            "{ctx}: the clean rx frame: {:?}",
            s.stats
        );
        assert_eq!(
            used_entries(self.mem, &ring).1,
            vec![(u32::from(head), in_frame.len() as u32)],
            "{ctx}"
        );
        let mut got = vec![0u8; in_frame.len()];
        self.mem.read_slice(&mut got, GuestAddress(inb)).unwrap();
        assert_eq!(
            got[VNET_HDR_LEN..],
            in_frame[VNET_HDR_LEN..],
            "{ctx}: the clean rx frame's bytes"
        );
        rep.clean_rounds += 1;
        rep.frames_out += 1;
        rep.frames_in += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU16;

    use virtio_queue::{Queue, QueueT};

    use super::*;
    use crate::datapath::RxState;
    use crate::queue_pair::{Notify, RingCtx, RxStatus, serve_ctrl, serve_rx, serve_tx};
    use crate::testing::{layout_memory, sock_pair};

    #[derive(Default)]
    struct Counting {
        signals: Cell<u64>,
        needs_reset: Cell<bool>,
    }

    impl Notify for Counting {
        fn signal_used_queue(&self) {
            self.signals.set(self.signals.get() + 1);
        }
        fn set_needs_reset(&self) {
            self.needs_reset.set(true);
        }
    }

    /// `queue_pair` alone: what both the vmm's device threads and the
    /// backend's workers call on each event.
    struct PairTarget {
        mem: GuestMemoryMmap,
        io: Arc<SockIo>,
        all_io: Vec<Arc<dyn FrameIo>>,
        active: AtomicU16,
        tx_buf: Vec<u8>,
        q: Queue,
        rx: RxState,
        mrg_rxbuf: bool,
        broken: bool,
        stats: NetStats,
        notify: Counting,
    }

    impl PairTarget {
        fn new(mem: &GuestMemoryMmap, io: Arc<SockIo>) -> Self {
            PairTarget {
                mem: mem.clone(),
                all_io: vec![io.clone()],
                io,
                active: AtomicU16::new(1),
                tx_buf: vec![0; MAX_FRAME_LEN],
                q: Queue::new(256).unwrap(),
                rx: RxState::default(),
                mrg_rxbuf: false,
                broken: false,
                stats: NetStats::default(),
                notify: Counting::default(),
            }
        }
    }

    impl Target for PairTarget {
        fn has_ctrl(&self) -> bool {
            true
        }

        fn setup(&mut self, _kind: RingKind, r: &RingSetup, f: Features) {
            let mut q = Queue::new(256).unwrap();
            q.set_size(r.size);
            q.try_set_desc_table_address(GuestAddress(r.desc)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(r.avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(r.used)).unwrap();
            q.set_event_idx(r.event_idx);
            q.set_next_avail(r.start);
            q.set_next_used(r.start);
            q.set_ready(true);
            self.q = q;
            self.rx = RxState::default();
            self.rx.set_guest_gso(f.guest_gso);
            self.mrg_rxbuf = f.mrg_rxbuf;
            self.broken = false;
            self.stats = NetStats::default();
            self.notify = Counting::default();
        }

        fn kick(&mut self, kind: RingKind, _from_kick: bool) -> Served {
            let cx = RingCtx {
                mem: &self.mem,
                io: &*self.io,
                notify: &self.notify,
                pair: 0,
            };
            let (q, broken, stats) = (&mut self.q, &mut self.broken, &mut self.stats);
            match kind {
                RingKind::Rx => {
                    while serve_rx(q, &cx, &mut self.rx, self.mrg_rxbuf, broken, stats)
                        == RxStatus::More
                    {}
                }
                RingKind::Tx => serve_tx(q, &cx, &mut self.tx_buf, broken, stats),
                RingKind::Ctrl => serve_ctrl(
                    q,
                    &self.mem,
                    &self.all_io,
                    4,
                    &self.active,
                    &self.notify,
                    broken,
                    stats,
                ),
            }
            assert_eq!(
                self.notify.needs_reset.get(),
                *broken,
                "a broken ring asks for a reset"
            );
            assert_eq!(
                self.notify.signals.get(),
                stats.interrupts,
                "interrupts counted as sent"
            );
            // The used_event of rings in memory is always readable.
            assert!(q.needs_notification(&self.mem).is_ok());
            Served {
                stats: *stats,
                broken: *broken,
            }
        }
    }

    #[test]
    fn fuzz_queue_pair_with_hostile_rings() {
        let mem = layout_memory();
        let (io, peer) = sock_pair();
        let mut t = PairTarget::new(&mem, io.clone());
        let fz = Fuzzer {
            mem: &mem,
            layout: Layout::default(),
            io: &io,
            peer: &peer,
        };
        let (seed, rounds) = seed_and_rounds(0x5eed_1234_abcd_0001, 60_000);
        fz.run(&mut t, seed, rounds).assert_covered(true);
    }

    #[test]
    fn the_bound_follows_chains_loops_and_indirect_tables() {
        let mem = layout_memory();
        let t = 0x4_0000;
        let d = |i: u64, addr, len, flags, next| {
            write_desc(
                &mem,
                t + 16 * i,
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                },
            )
        };
        d(0, 0x10_0000, 100, F_NEXT, 1);
        d(1, 0x10_1000, 200, F_WRITE | F_NEXT, 2);
        d(2, 0x10_2000, 300, F_WRITE, 0);
        assert_eq!(chain_bound(&mem, t, 4, 0, true), Some((100, 500)));
        // A loop counts each pass, at most table-size + 1 steps: 1 2 0 1 2.
        d(2, 0x10_2000, 300, F_WRITE | F_NEXT, 0);
        assert_eq!(chain_bound(&mem, t, 4, 1, true), Some((100, 1000)));
        // An indirect table: its entries and the descriptor itself.
        d(3, 0x20_0000, 32, F_INDIRECT, 0);
        write_desc(
            &mem,
            0x20_0000,
            Desc {
                addr: 1,
                len: 7,
                flags: F_WRITE | F_NEXT,
                next: 1,
            },
        );
        write_desc(
            &mem,
            0x20_0010,
            Desc {
                addr: 1,
                len: 9,
                flags: 0,
                next: 0,
            },
        );
        assert_eq!(chain_bound(&mem, t, 4, 3, true), Some((32 + 9, 7)));
        // A head outside the table finds nothing.
        assert_eq!(chain_bound(&mem, t, 4, 4, true), Some((0, 0)));
    }
}
