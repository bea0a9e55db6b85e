//! A minimal IPv4 stack on one address: ARP replies, ICMP echo, and the UDP
//! services of INTERFACES.md. Every header field is bounds-checked; frames
//! that do not parse are dropped (and still counted as received).
//!
//! Counters reported by UDP 5000 (`boot_id=<hex> rx=<n> tx=<n> echo=<n>`):
//! rx = frames taken from the rx ring (all of them, dropped ones included),
//! tx = frames handed to the tx ring before this reply, echo = ICMP echo
//! replies plus UDP port 7 replies. With `testguest.busy` the reply ends in
//! ` busy=<n>`, n = passes of the busy loop over its region so far.
//!
//! UDP 5001 blast: request `<count> <size>` (decimal); the guest sends
//! `count` datagrams of `size` payload bytes (at most 1472, count at most
//! 1,000,000) to the sender's address and port, from port 5001. Payload: the
//! datagram's sequence number (from 0) as a big-endian u32 in the first four
//! bytes (as far as size allows), then bytes i % 256 at offset i.
//!
//! UDP 5002 probe: request `A.B.C.D`; the guest asks for that address with
//! an ARP request, then pings it (ICMP echo), and answers the requester
//! `probe A.B.C.D ok mac=<mac>` once the echo reply is back. One probe at a
//! time (a new request replaces the pending one); no timeout: a requester
//! that gets no answer asks again.
//!
//! With several CPUs in the firmware tables the stats reply ends in
//! ` cpus=<n>` (after ` busy=` if any), n = CPUs up, the BSP included.
//!
//! UDP 5004 AP start: request `start <apic id>` (decimal); the guest starts
//! that AP if `testguest.hold_ap` held it back and answers `started <id>`,
//! else `error: <why>`.
//!
//! UDP 5003 rx hold: request `<ticks>` (decimal, 1 to 100,000); the driver
//! stops giving rx buffers back to the device for that many heartbeat
//! ticks (needs `testguest.heartbeat`), then gives them all back. The
//! guest answers `hold <ticks>` from port 5003 and reports on the serial
//! port (see `netdev.rs`). It lets a test make the device hold a frame it
//! read but cannot deliver.
//!
//! UDP 5005 bad chains (a hostile driver, on request): request `<tx> <rx>`
//! (decimal, each 0 to 64); the driver posts `tx` tx chains of 2 bytes and
//! gives its next `rx` rx buffers back 4 bytes long, all shorter than a
//! vnet header, so the device must return them unused (and count them).
//! The guest answers `bad <tx> <rx>` from port 5005 before posting them.

use crate::text::TextBuf;

pub trait Transmit {
    /// Sends one Ethernet frame that `build` writes into the buffer it gets,
    /// returning the frame length (0: nothing to send). Waits for ring space.
    fn send(&mut self, build: &mut dyn FnMut(&mut [u8]) -> usize) -> bool;
    /// Makes every sent frame visible to the device.
    fn flush(&mut self);
    /// How often `send` had to wait for ring space so far.
    fn waits(&self) -> u64;
}

const ETH_HDR: usize = 14;
const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;
const ETH_MIN_FRAME: usize = 60;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
/// Largest UDP payload in a 1500-byte MTU without fragmentation.
pub const MAX_UDP_PAYLOAD: usize = 1500 - IP_HDR - UDP_HDR;
const MAX_BLAST_COUNT: u64 = 1_000_000;

pub const PORT_ECHO: u16 = 7;
pub const PORT_DISCARD: u16 = 9;
pub const PORT_STATS: u16 = 5000;
pub const PORT_BLAST: u16 = 5001;
pub const PORT_PROBE: u16 = 5002;
pub const PORT_HOLD: u16 = 5003;
pub const PORT_START_AP: u16 = 5004;
pub const PORT_BAD_CHAINS: u16 = 5005;
/// Most bad chains of each kind one UDP 5005 request may ask for.
const MAX_BAD_CHAINS: u64 = 64;
/// Longest rx hold a request may ask for, in heartbeat ticks.
const MAX_HOLD_TICKS: u64 = 100_000;
/// ICMP echo identifier of the probe's pings.
const PROBE_ICMP_ID: u16 = 0x7e57;

pub struct Stack {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub boot_id: u64,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub echo_replies: u64,
    pub discarded: u64,
    /// An rx hold asked for on UDP 5003 (ticks), for the driver to take.
    pub hold_request: Option<u32>,
    /// Bad tx chains and short rx buffers asked for on UDP 5005, for the
    /// driver to post.
    pub bad_chains_request: Option<(u16, u16)>,
    /// With `testguest.busy`: the busy loop's completed passes, reported
    /// as ` busy=<n>` at the end of the stats reply.
    pub busy_passes: Option<u64>,
    /// With several CPUs: how many are up (read when a stats request
    /// comes, so an AP started earlier in the same poll counts), reported
    /// as ` cpus=<n>`.
    pub cpus_up: Option<fn() -> u32>,
    /// Starts a held AP by APIC id (UDP 5004); None: this guest cannot.
    pub start_ap: Option<StartAp>,
    ip_id: u16,
    probe: Option<Probe>,
}

/// Starts a held AP by APIC id, or says why not.
pub type StartAp = fn(u32) -> Result<(), &'static str>;

/// A pending UDP 5002 probe: who asked, whom to reach, what is known.
#[derive(Clone, Copy)]
struct Probe {
    requester: Peer,
    target: [u8; 4],
    target_mac: Option<[u8; 6]>,
    seq: u16,
}

/// Where a reply goes: the requester's MAC, IP and (for UDP) port.
#[derive(Clone, Copy)]
struct Peer {
    mac: [u8; 6],
    ip: [u8; 4],
    port: u16,
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off + 2)?;
    Some(u16::from_be_bytes(<[u8; 2]>::try_from(s).ok()?))
}

fn arr<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    <[u8; N]>::try_from(b.get(off..off + N)?).ok()
}

/// Writes `src` at `off` in `dst` if it fits.
fn put(dst: &mut [u8], off: usize, src: &[u8]) {
    if let Some(d) = dst.get_mut(off..off + src.len()) {
        d.copy_from_slice(src);
    }
}

/// Internet checksum partial sum (not folded, not inverted).
fn sum16(mut acc: u64, data: &[u8]) -> u64 {
    // Eight bytes at a time: a big-endian 32-bit word hi:lo is congruent to
    // hi + lo modulo 0xffff, which is all the folded sum keeps.
    let mut wide = data.chunks_exact(8);
    for c in &mut wide {
        let w = u64::from_be_bytes(<[u8; 8]>::try_from(c).unwrap_or([0; 8]));
        acc += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut chunks = wide.remainder().chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([
            c.first().copied().unwrap_or(0),
            c.get(1).copied().unwrap_or(0),
        ]));
    }
    if let Some(&last) = chunks.remainder().first() {
        acc += u64::from(last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

fn udp_pseudo(src: [u8; 4], dst: [u8; 4], len: u16) -> u64 {
    let mut acc = sum16(0, &src);
    acc = sum16(acc, &dst);
    acc + u64::from(PROTO_UDP) + u64::from(len)
}

impl Stack {
    pub fn new(mac: [u8; 6], ip: [u8; 4], boot_id: u64) -> Self {
        Stack {
            mac,
            ip,
            boot_id,
            rx_frames: 0,
            tx_frames: 0,
            echo_replies: 0,
            discarded: 0,
            hold_request: None,
            bad_chains_request: None,
            busy_passes: None,
            cpus_up: None,
            start_ap: None,
            ip_id: 0,
            probe: None,
        }
    }

    /// Handles one received Ethernet frame (without the virtio header).
    pub fn handle(&mut self, frame: &[u8], tx: &mut dyn Transmit) {
        let (Some(dst), Some(src), Some(ethertype)) =
            (arr::<6>(frame, 0), arr::<6>(frame, 6), be16(frame, 12))
        else {
            return;
        };
        if dst != self.mac && dst != [0xff; 6] {
            return;
        }
        let Some(payload) = frame.get(ETH_HDR..) else {
            return;
        };
        match ethertype {
            ETHERTYPE_ARP => self.arp(src, payload, tx),
            ETHERTYPE_IPV4 => self.ipv4(src, payload, tx),
            _ => {}
        }
    }

    fn arp(&mut self, eth_src: [u8; 6], p: &[u8], tx: &mut dyn Transmit) {
        // Ethernet/IPv4 reply to the probe's request.
        if p.get(0..8) == Some(&[0, 1, 8, 0, 6, 4, 0, 2][..]) {
            self.probe_arp_reply(p, tx);
            return;
        }
        // Ethernet/IPv4 request for our address.
        if p.get(0..8) != Some(&[0, 1, 8, 0, 6, 4, 0, 1][..]) {
            return;
        }
        let (Some(sha), Some(spa), Some(tpa)) = (arr::<6>(p, 8), arr::<4>(p, 14), arr::<4>(p, 24))
        else {
            return;
        };
        if tpa != self.ip {
            return;
        }
        let (mac, ip) = (self.mac, self.ip);
        let sent = tx.send(&mut |f: &mut [u8]| {
            let Some(f) = f.get_mut(..ETH_MIN_FRAME) else {
                return 0;
            };
            f.fill(0);
            put(f, 0, &eth_src);
            put(f, 6, &mac);
            put(f, 12, &ETHERTYPE_ARP.to_be_bytes());
            put(f, 14, &[0, 1, 8, 0, 6, 4, 0, 2]);
            put(f, 22, &mac);
            put(f, 28, &ip);
            put(f, 32, &sha);
            put(f, 38, &spa);
            ETH_MIN_FRAME
        });
        self.count_tx(sent);
    }

    fn ipv4(&mut self, eth_src: [u8; 6], p: &[u8], tx: &mut dyn Transmit) {
        let Some(&vihl) = p.first() else { return };
        let ihl = usize::from(vihl & 0xf) * 4;
        let Some(total) = be16(p, 2).map(usize::from) else {
            return;
        };
        if vihl >> 4 != 4 || ihl < IP_HDR || total < ihl || total > p.len() {
            return;
        }
        let Some(header) = p.get(..ihl) else { return };
        if checksum(header) != 0 {
            return;
        }
        // Fragments (MF set or an offset) are not reassembled.
        if be16(p, 6).is_none_or(|f| f & 0x3fff != 0) {
            return;
        }
        let (Some(&proto), Some(src), Some(dst)) = (p.get(9), arr::<4>(p, 12), arr::<4>(p, 16))
        else {
            return;
        };
        if dst != self.ip {
            return;
        }
        let Some(body) = p.get(ihl..total) else {
            return;
        };
        let peer = Peer {
            mac: eth_src,
            ip: src,
            port: 0,
        };
        match proto {
            PROTO_ICMP => self.icmp(peer, body, tx),
            PROTO_UDP => self.udp(peer, body, tx),
            _ => {}
        }
    }

    fn icmp(&mut self, peer: Peer, msg: &[u8], tx: &mut dyn Transmit) {
        // Echo reply (type 0) to the probe's ping.
        if msg.len() >= 8 && msg.get(0..2) == Some(&[0, 0][..]) && checksum(msg) == 0 {
            self.probe_echo_reply(peer, msg, tx);
            return;
        }
        // Echo request, type 8 code 0, with a valid checksum.
        if msg.len() < 8 || msg.get(0..2) != Some(&[8, 0][..]) || checksum(msg) != 0 {
            return;
        }
        if msg.len() > 1500 - IP_HDR {
            return;
        }
        let sent = self.send_ip(tx, peer, PROTO_ICMP, msg.len(), &mut |out: &mut [u8]| {
            put(out, 0, msg);
            put(out, 0, &[0, 0, 0, 0]);
            let c = checksum(out.get(..msg.len()).unwrap_or(&[]));
            put(out, 2, &c.to_be_bytes());
        });
        if sent {
            self.echo_replies += 1;
        }
    }

    fn udp(&mut self, mut peer: Peer, seg: &[u8], tx: &mut dyn Transmit) {
        let (Some(sport), Some(dport), Some(ulen), Some(csum)) =
            (be16(seg, 0), be16(seg, 2), be16(seg, 4), be16(seg, 6))
        else {
            return;
        };
        let ulen_us = usize::from(ulen);
        if ulen_us < UDP_HDR || ulen_us > seg.len() {
            return;
        }
        let Some(seg) = seg.get(..ulen_us) else {
            return;
        };
        if csum != 0 && fold(sum16(udp_pseudo(peer.ip, self.ip, ulen), seg)) != 0xffff {
            return;
        }
        let Some(data) = seg.get(UDP_HDR..) else {
            return;
        };
        peer.port = sport;
        match dport {
            PORT_ECHO => {
                let sent = self.send_udp(tx, peer, PORT_ECHO, data.len(), &mut |out| {
                    put(out, 0, data)
                });
                if sent {
                    self.echo_replies += 1;
                }
            }
            PORT_DISCARD => self.discarded += 1,
            PORT_STATS => {
                let mut t = TextBuf::<128>::new();
                t.str("boot_id=").hex(self.boot_id, 16);
                t.str(" rx=").dec(self.rx_frames);
                t.str(" tx=").dec(self.tx_frames);
                t.str(" echo=").dec(self.echo_replies);
                if let Some(passes) = self.busy_passes {
                    t.str(" busy=").dec(passes);
                }
                if let Some(up) = self.cpus_up {
                    t.str(" cpus=").dec(u64::from(up()));
                }
                let text = t.as_bytes();
                self.send_udp(tx, peer, PORT_STATS, text.len(), &mut |out| {
                    put(out, 0, text)
                });
            }
            PORT_BLAST => self.blast(peer, data, tx),
            PORT_PROBE => self.probe_start(peer, data, tx),
            PORT_HOLD => self.hold(peer, data, tx),
            PORT_START_AP => self.start_ap(peer, data, tx),
            PORT_BAD_CHAINS => self.bad_chains(peer, data, tx),
            _ => {}
        }
    }

    fn start_ap(&mut self, peer: Peer, request: &[u8], tx: &mut dyn Transmit) {
        let mut words = request
            .split(|&c| c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' || c == 0)
            .filter(|w| !w.is_empty());
        let id = match (words.next(), words.next(), words.next()) {
            (Some(b"start"), Some(id), None) => {
                crate::text::parse_u64(id).and_then(|id| u32::try_from(id).ok())
            }
            _ => None,
        };
        let mut t = TextBuf::<64>::new();
        match (id, self.start_ap) {
            (None, _) => t.str("error: expected start <apic id>"),
            (Some(_), None) => t.str("error: no APs here"),
            (Some(id), Some(start)) => match start(id) {
                Ok(()) => t.str("started ").dec(u64::from(id)),
                Err(why) => t.str("error: cpu ").dec(u64::from(id)).str(" ").str(why),
            },
        };
        let text = t.as_bytes();
        self.send_udp(tx, peer, PORT_START_AP, text.len(), &mut |out| {
            put(out, 0, text)
        });
    }

    fn bad_chains(&mut self, peer: Peer, request: &[u8], tx: &mut dyn Transmit) {
        let mut words = request
            .split(|&c| c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' || c == 0)
            .filter(|w| !w.is_empty())
            .map(crate::text::parse_u64);
        let (Some(Some(ntx)), Some(Some(nrx)), None) = (words.next(), words.next(), words.next())
        else {
            return;
        };
        if ntx > MAX_BAD_CHAINS || nrx > MAX_BAD_CHAINS {
            return;
        }
        self.bad_chains_request = Some((ntx as u16, nrx as u16));
        let mut t = TextBuf::<32>::new();
        t.str("bad ").dec(ntx).str(" ").dec(nrx);
        let text = t.as_bytes();
        self.send_udp(tx, peer, PORT_BAD_CHAINS, text.len(), &mut |out| {
            put(out, 0, text)
        });
    }

    fn hold(&mut self, peer: Peer, request: &[u8], tx: &mut dyn Transmit) {
        let word = request
            .split(|&c| c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' || c == 0)
            .find(|w| !w.is_empty());
        let Some(ticks) = word
            .and_then(crate::text::parse_u64)
            .filter(|t| (1..=MAX_HOLD_TICKS).contains(t))
        else {
            return;
        };
        self.hold_request = Some(ticks as u32);
        let mut t = TextBuf::<32>::new();
        t.str("hold ").dec(ticks);
        let text = t.as_bytes();
        self.send_udp(tx, peer, PORT_HOLD, text.len(), &mut |out| {
            put(out, 0, text)
        });
    }

    fn blast(&mut self, peer: Peer, request: &[u8], tx: &mut dyn Transmit) {
        let mut words = request
            .split(|&c| c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' || c == 0)
            .filter(|w| !w.is_empty());
        let (Some(count), Some(size)) = (
            words.next().and_then(crate::text::parse_u64),
            words.next().and_then(crate::text::parse_u64),
        ) else {
            return;
        };
        let count = count.min(MAX_BLAST_COUNT);
        let (tx_before, waits_before) = (self.tx_frames, tx.waits());
        let size = (size as usize).min(MAX_UDP_PAYLOAD);
        let mut pattern = [0u8; MAX_UDP_PAYLOAD];
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = i as u8;
        }
        let payload = pattern.get(..size).unwrap_or(&[]);
        for seq in 0..count {
            let seq_bytes = (seq as u32).to_be_bytes();
            self.send_udp(tx, peer, PORT_BLAST, size, &mut |out| {
                put(out, 0, payload);
                put(out, 0, seq_bytes.get(..size.min(4)).unwrap_or(&[]));
            });
        }
        tx.flush();
        let mut line = TextBuf::<128>::new();
        line.str("blast to ")
            .ipv4(peer.ip)
            .byte(b':')
            .dec(u64::from(peer.port));
        line.str(" sent=")
            .dec(self.tx_frames - tx_before)
            .str(" of ")
            .dec(count);
        line.str(" size=")
            .dec(size as u64)
            .str(" waits=")
            .dec(tx.waits() - waits_before);
        line.str(" irqs=")
            .dec(crate::intr::DEVICE_IRQS.load(core::sync::atomic::Ordering::Relaxed));
        crate::serial::line(line.as_bytes());
    }

    /// UDP 5002: remembers the request and broadcasts an ARP request for
    /// the target.
    fn probe_start(&mut self, requester: Peer, request: &[u8], tx: &mut dyn Transmit) {
        let word = request
            .split(|&c| c == b' ' || c == b'\n' || c == b'\r' || c == 0)
            .find(|w| !w.is_empty());
        let Some(target) = word.and_then(crate::text::parse_ipv4) else {
            return;
        };
        self.probe = Some(Probe {
            requester,
            target,
            target_mac: None,
            seq: 0,
        });
        let (mac, ip) = (self.mac, self.ip);
        let sent = tx.send(&mut |f: &mut [u8]| {
            let Some(f) = f.get_mut(..ETH_MIN_FRAME) else {
                return 0;
            };
            f.fill(0);
            put(f, 0, &[0xff; 6]);
            put(f, 6, &mac);
            put(f, 12, &ETHERTYPE_ARP.to_be_bytes());
            put(f, 14, &[0, 1, 8, 0, 6, 4, 0, 1]);
            put(f, 22, &mac);
            put(f, 28, &ip);
            put(f, 38, &target);
            ETH_MIN_FRAME
        });
        self.count_tx(sent);
    }

    /// An ARP reply from the probe's target: ping it.
    fn probe_arp_reply(&mut self, p: &[u8], tx: &mut dyn Transmit) {
        let (Some(sha), Some(spa), Some(tpa)) = (arr::<6>(p, 8), arr::<4>(p, 14), arr::<4>(p, 24))
        else {
            return;
        };
        let Some(mut probe) = self.probe else { return };
        if tpa != self.ip || spa != probe.target {
            return;
        }
        probe.target_mac = Some(sha);
        probe.seq = probe.seq.wrapping_add(1);
        self.probe = Some(probe);
        let to = Peer {
            mac: sha,
            ip: spa,
            port: 0,
        };
        let seq = probe.seq;
        self.send_ip(tx, to, PROTO_ICMP, 16, &mut |out: &mut [u8]| {
            let Some(out) = out.get_mut(..16) else { return };
            out.fill(0x5a);
            put(out, 0, &[8, 0, 0, 0]);
            put(out, 4, &PROBE_ICMP_ID.to_be_bytes());
            put(out, 6, &seq.to_be_bytes());
            let c = checksum(out);
            put(out, 2, &c.to_be_bytes());
        });
    }

    /// The target's echo reply: tell the requester.
    fn probe_echo_reply(&mut self, from: Peer, msg: &[u8], tx: &mut dyn Transmit) {
        let Some(probe) = self.probe else { return };
        let (Some(id), Some(seq)) = (be16(msg, 4), be16(msg, 6)) else {
            return;
        };
        if from.ip != probe.target || id != PROBE_ICMP_ID || seq != probe.seq {
            return;
        }
        let Some(mac) = probe.target_mac else { return };
        self.probe = None;
        let mut t = TextBuf::<128>::new();
        t.str("probe ").ipv4(probe.target).str(" ok mac=");
        for (i, b) in mac.iter().enumerate() {
            if i > 0 {
                t.byte(b':');
            }
            t.hex(u64::from(*b), 2);
        }
        let text = t.as_bytes();
        self.send_udp(tx, probe.requester, PORT_PROBE, text.len(), &mut |out| {
            put(out, 0, text)
        });
    }

    fn count_tx(&mut self, sent: bool) {
        if sent {
            self.tx_frames += 1;
        }
    }

    /// A UDP datagram from our `sport` to `peer`; `fill` writes `len` bytes.
    fn send_udp(
        &mut self,
        tx: &mut dyn Transmit,
        peer: Peer,
        sport: u16,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> bool {
        if len > MAX_UDP_PAYLOAD {
            return false;
        }
        let ulen = (UDP_HDR + len) as u16;
        let src_ip = self.ip;
        self.send_ip(
            tx,
            peer,
            PROTO_UDP,
            UDP_HDR + len,
            &mut |seg: &mut [u8]| {
                let Some(seg) = seg.get_mut(..UDP_HDR + len) else {
                    return;
                };
                put(seg, 0, &sport.to_be_bytes());
                put(seg, 2, &peer.port.to_be_bytes());
                put(seg, 4, &ulen.to_be_bytes());
                put(seg, 6, &[0, 0]);
                if let Some(data) = seg.get_mut(UDP_HDR..) {
                    fill(data);
                }
                let mut c = !fold(sum16(udp_pseudo(src_ip, peer.ip, ulen), seg));
                if c == 0 {
                    c = 0xffff;
                }
                put(seg, 6, &c.to_be_bytes());
            },
        )
    }

    /// An IPv4 packet to `peer` whose `len`-byte body `fill` writes.
    fn send_ip(
        &mut self,
        tx: &mut dyn Transmit,
        peer: Peer,
        proto: u8,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> bool {
        let total = IP_HDR + len;
        let Ok(total16) = u16::try_from(total) else {
            return false;
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        let (mac, ip, id) = (self.mac, self.ip, self.ip_id);
        let sent = tx.send(&mut |f: &mut [u8]| {
            let frame_len = (ETH_HDR + total).max(ETH_MIN_FRAME);
            let Some(f) = f.get_mut(..frame_len) else {
                return 0;
            };
            // Every header byte is written below; only padding needs zeros.
            if let Some(pad) = f.get_mut(ETH_HDR + total..) {
                pad.fill(0);
            }
            put(f, 0, &peer.mac);
            put(f, 6, &mac);
            put(f, 12, &ETHERTYPE_IPV4.to_be_bytes());
            let Some(hdr) = f.get_mut(ETH_HDR..ETH_HDR + IP_HDR) else {
                return 0;
            };
            put(hdr, 0, &[0x45, 0]);
            put(hdr, 2, &total16.to_be_bytes());
            put(hdr, 4, &id.to_be_bytes());
            put(hdr, 6, &[0x40, 0, 64, proto]); // DF, TTL 64
            put(hdr, 12, &ip);
            put(hdr, 16, &peer.ip);
            put(hdr, 10, &[0, 0]);
            let c = checksum(hdr);
            put(hdr, 10, &c.to_be_bytes());
            if let Some(body) = f.get_mut(ETH_HDR + IP_HDR..ETH_HDR + total) {
                fill(body);
            }
            frame_len
        });
        self.count_tx(sent);
        sent
    }
}
