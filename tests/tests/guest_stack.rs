//! The test guest's network stack (tests/guest/net.rs) compiled for the
//! host: replies are checked field by field with checksums computed here,
//! and a flood of random and mutated frames must never panic it (in the
//! guest a panic is a dead VM).

#[allow(dead_code)]
#[path = "../guest/net.rs"]
mod net;
#[allow(dead_code)]
#[path = "../guest/text.rs"]
mod text;

/// Stand-ins for the guest modules net.rs reports through.
mod serial {
    pub fn line(_msg: &[u8]) {}
}
mod intr {
    pub static DEVICE_IRQS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
}

use net::{Stack, Transmit};
use tests::rng::Rng;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xa1, 0xb2, 0xc3];
const GUEST_IP: [u8; 4] = [10, 0, 1, 2];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const HOST_IP: [u8; 4] = [10, 0, 1, 1];
/// The guest's tx buffer size minus the virtio-net header.
const TX_ROOM: usize = 2048 - 12;

#[derive(Default)]
struct Capture {
    frames: Vec<Vec<u8>>,
}

impl Transmit for Capture {
    fn send(&mut self, build: &mut dyn FnMut(&mut [u8]) -> usize) -> bool {
        let mut buf = vec![0xeeu8; TX_ROOM];
        let n = build(&mut buf);
        assert!(n <= TX_ROOM);
        if n == 0 {
            return false;
        }
        buf.truncate(n);
        self.frames.push(buf);
        true
    }
    fn flush(&mut self) {}
    fn waits(&self) -> u64 {
        0
    }
}

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + body.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn udp_sum(src: [u8; 4], dst: [u8; 4], seg: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(seg);
    csum(&pseudo)
}

fn udp_frame(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&40000u16.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    let c = udp_sum(HOST_IP, GUEST_IP, &seg);
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    eth(GUEST_MAC, 0x0800, &ipv4(17, HOST_IP, GUEST_IP, &seg))
}

/// Checks an IPv4/UDP reply to the host and returns (sport, dport, payload).
fn parse_udp_reply(f: &[u8]) -> (u16, u16, Vec<u8>) {
    assert_eq!(&f[0..6], &HOST_MAC);
    assert_eq!(&f[6..12], &GUEST_MAC);
    assert_eq!(&f[12..14], &[8, 0]);
    let ip = &f[14..];
    assert_eq!(ip[0], 0x45);
    assert_eq!(csum(&ip[..20]), 0, "IP header checksum");
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(ip[9], 17);
    assert_eq!(&ip[12..16], &GUEST_IP);
    assert_eq!(&ip[16..20], &HOST_IP);
    let seg = &ip[20..total];
    let ulen = usize::from(u16::from_be_bytes([seg[4], seg[5]]));
    assert_eq!(ulen, seg.len());
    assert_eq!(udp_sum(GUEST_IP, HOST_IP, seg), 0, "UDP checksum");
    (
        u16::from_be_bytes([seg[0], seg[1]]),
        u16::from_be_bytes([seg[2], seg[3]]),
        seg[8..].to_vec(),
    )
}

fn stack() -> Stack {
    Stack::new(GUEST_MAC, GUEST_IP, 0x0123_4567_89ab_cdef)
}

#[test]
fn answers_arp_for_its_address_only() {
    let mut s = stack();
    let mut tx = Capture::default();
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&HOST_MAC);
    arp.extend_from_slice(&HOST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GUEST_IP);
    s.handle(&eth([0xff; 6], 0x0806, &arp), &mut tx);
    assert_eq!(tx.frames.len(), 1);
    let r = &tx.frames[0];
    assert_eq!(&r[0..6], &HOST_MAC);
    assert_eq!(&r[12..14], &[8, 6]);
    assert_eq!(&r[14..22], &[0, 1, 8, 0, 6, 4, 0, 2]);
    assert_eq!(&r[22..28], &GUEST_MAC);
    assert_eq!(&r[28..32], &GUEST_IP);
    assert_eq!(&r[32..38], &HOST_MAC);
    assert_eq!(&r[38..42], &HOST_IP);

    let mut other = arp.clone();
    other[24..28].copy_from_slice(&[10, 0, 1, 3]);
    s.handle(&eth([0xff; 6], 0x0806, &other), &mut tx);
    assert_eq!(
        tx.frames.len(),
        1,
        "answered ARP for someone else's address"
    );
}

#[test]
fn icmp_echo_reply_is_valid() {
    let mut s = stack();
    let mut tx = Capture::default();
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend((0..56).map(|i| i as u8));
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    s.handle(
        &eth(GUEST_MAC, 0x0800, &ipv4(1, HOST_IP, GUEST_IP, &icmp)),
        &mut tx,
    );
    assert_eq!(tx.frames.len(), 1);
    let ip = &tx.frames[0][14..];
    assert_eq!(csum(&ip[..20]), 0);
    assert_eq!(ip[9], 1);
    let reply = &ip[20..20 + icmp.len()];
    assert_eq!(reply[0], 0, "echo reply type");
    assert_eq!(csum(reply), 0, "ICMP checksum");
    assert_eq!(&reply[4..], &icmp[4..]);
    assert_eq!(s.echo_replies, 1);

    // A corrupted checksum is dropped.
    icmp[10] ^= 0xff;
    s.handle(
        &eth(GUEST_MAC, 0x0800, &ipv4(1, HOST_IP, GUEST_IP, &icmp)),
        &mut tx,
    );
    assert_eq!(tx.frames.len(), 1);
}

#[test]
fn udp_services() {
    let mut s = stack();
    let mut tx = Capture::default();
    s.handle(&udp_frame(7, b"hello"), &mut tx);
    let (sport, dport, data) = parse_udp_reply(&tx.frames[0]);
    assert_eq!((sport, dport, data.as_slice()), (7, 40000, &b"hello"[..]));

    s.handle(&udp_frame(9, b"gone"), &mut tx);
    assert_eq!(tx.frames.len(), 1);
    assert_eq!(s.discarded, 1);

    s.rx_frames = 3; // the driver counts frames; the stack only reports them
    s.handle(&udp_frame(5000, b""), &mut tx);
    let (_, _, text) = parse_udp_reply(&tx.frames[1]);
    assert_eq!(
        String::from_utf8(text).unwrap(),
        "boot_id=0123456789abcdef rx=3 tx=1 echo=1"
    );

    s.handle(&udp_frame(5001, b"5 100\n"), &mut tx);
    assert_eq!(tx.frames.len(), 2 + 5);
    for (i, f) in tx.frames[2..].iter().enumerate() {
        let (sport, dport, data) = parse_udp_reply(f);
        assert_eq!((sport, dport, data.len()), (5001, 40000, 100));
        assert_eq!(&data[..4], &(i as u32).to_be_bytes());
        assert!(
            data[4..]
                .iter()
                .enumerate()
                .all(|(j, &b)| b == (j + 4) as u8)
        );
    }

    // Bad UDP checksum: dropped.
    let mut bad = udp_frame(7, b"hello");
    let n = bad.len();
    bad[n - 1] ^= 1;
    s.handle(&bad, &mut tx);
    assert_eq!(tx.frames.len(), 7);
    // Not for our IP or MAC: dropped.
    let mut other = udp_frame(7, b"x");
    other[0] = 0x04;
    s.handle(&other, &mut tx);
    assert_eq!(tx.frames.len(), 7);
}

#[test]
fn oversized_blast_requests_are_clamped() {
    let mut s = stack();
    let mut tx = Capture::default();
    s.handle(&udp_frame(5001, b"2 60000"), &mut tx);
    assert_eq!(tx.frames.len(), 2);
    let (_, _, data) = parse_udp_reply(&tx.frames[0]);
    assert_eq!(data.len(), 1472);
    for junk in [
        &b""[..],
        b"x y",
        b"-1 5",
        b"99999999999999999999999 1",
        b"1",
    ] {
        s.handle(&udp_frame(5001, junk), &mut tx);
    }
    assert_eq!(tx.frames.len(), 2);
}

#[test]
fn garbage_frames_never_panic() {
    let mut s = stack();
    let mut tx = Capture::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let templates = [
        udp_frame(7, b"hello world"),
        udp_frame(5001, b"3 64"),
        udp_frame(5000, b""),
        eth(
            GUEST_MAC,
            0x0800,
            &ipv4(1, HOST_IP, GUEST_IP, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]),
        ),
        eth(
            [0xff; 6],
            0x0806,
            &[
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 1, 1, 0, 0, 0, 0, 0, 0, 10, 0, 1,
                2,
            ],
        ),
    ];
    for round in 0..200_000 {
        let mut f = if round % 4 == 0 {
            (0..rng.index(1600)).map(|_| rng.next() as u8).collect()
        } else {
            templates[rng.index(templates.len())].clone()
        };
        // Mutate a few bytes, biased towards the headers.
        for _ in 0..rng.index(4) {
            if f.is_empty() {
                break;
            }
            let at = if rng.index(2) == 0 {
                rng.index(f.len().min(48))
            } else {
                rng.index(f.len())
            };
            f[at] = rng.next() as u8;
        }
        if rng.index(3) == 0 {
            let keep = rng.index(f.len() + 1);
            f.truncate(keep);
        }
        s.handle(&f, &mut tx);
        // Blast requests can legitimately produce many frames; keep memory flat.
        tx.frames.clear();
    }
}

#[test]
fn bad_chains_requests_are_answered_and_bounded() {
    let mut s = stack();
    let mut tx = Capture::default();
    s.handle(&udp_frame(5005, b"5 3\n"), &mut tx);
    let (sport, _, data) = parse_udp_reply(&tx.frames[0]);
    assert_eq!((sport, data.as_slice()), (5005, &b"bad 5 3"[..]));
    assert_eq!(s.bad_chains_request, Some((5, 3)));
    s.bad_chains_request = None;
    // More than 64 of a kind, a missing or an extra word: ignored.
    for req in [&b"65 0"[..], b"0 65", b"5", b"1 2 3", b"x 1"] {
        s.handle(&udp_frame(5005, req), &mut tx);
        assert_eq!(tx.frames.len(), 1, "{req:?}");
        assert_eq!(s.bad_chains_request, None, "{req:?}");
    }
}
