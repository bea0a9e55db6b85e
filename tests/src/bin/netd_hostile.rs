//! A hostile local client of netd (or of any socket speaking the codec), for
//! the hardening tests and `bench_netd`. Run it as the uid to play (a uid
//! with no tenant entry: a stranger). Prints one JSON line with what it saw.
//!
//! netd_hostile fdflood SOCK CONNS FDS [hello]   frames carrying FDS fds each
//! netd_hostile garbage SOCK CONNS               random bytes, lying lengths
//! netd_hostile longname SOCK CONNS LEN          Hello + OpenTap with a LEN-byte name (<= 3900)
//! netd_hostile trickle SOCK CONNS SECS          half a frame, a byte every 200 ms
//! netd_hostile raw SOCK TEXT...                 a frame of each TEXT, a reply read after each
//! netd_hostile mixed SOCK SECS SEED             all of the above in turn, for SECS

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::codec;
use common::netd::{NETD_PROTOCOL_VERSION, NetdRequest, NetdResponse};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tests::rng::Rng;

/// Most fds one sendmsg may carry (SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;

#[derive(Default)]
struct Tally {
    conns: u64,
    connect_errors: u64,
    replies: u64,
    /// Reply payloads, as text (raw mode only).
    texts: Vec<String>,
    keep_texts: bool,
    closed_without_reply: u64,
    max_reply_bytes: usize,
    kinds: std::collections::BTreeMap<String, u64>,
}

impl Tally {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "conns": self.conns,
            "connect_errors": self.connect_errors,
            "replies": self.replies,
            "texts": self.texts,
            "closed_without_reply": self.closed_without_reply,
            "max_reply_bytes": self.max_reply_bytes,
            "kinds": self.kinds,
        })
    }

    /// Reads one reply frame (raw, to measure it) and notes its kind.
    fn read_reply(&mut self, s: &UnixStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        match codec::recv_frame(std::os::fd::AsFd::as_fd(s), 1 << 20, codec::MAX_FDS) {
            Ok((payload, _fds)) => {
                self.replies += 1;
                self.max_reply_bytes = self.max_reply_bytes.max(payload.len() + 4);
                if self.keep_texts {
                    self.texts
                        .push(String::from_utf8_lossy(&payload).into_owned());
                }
                let kind = match codec::decode::<NetdResponse>(&payload) {
                    Ok(NetdResponse::Error { kind, .. }) => format!("{kind:?}"),
                    Ok(NetdResponse::Hello { .. }) => "Hello".into(),
                    Ok(other) => format!("{other:?}").chars().take(12).collect(),
                    Err(_) => "undecodable".into(),
                };
                *self.kinds.entry(kind).or_insert(0) += 1;
            }
            Err(_) => self.closed_without_reply += 1,
        }
    }

    fn connect(&mut self, sock: &Path) -> Option<UnixStream> {
        self.conns += 1;
        match UnixStream::connect(sock) {
            Ok(s) => {
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Some(s)
            }
            Err(_) => {
                self.connect_errors += 1;
                None
            }
        }
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn hello_frame() -> Vec<u8> {
    let t = ron::to_string(&NetdRequest::Hello {
        version: NETD_PROTOCOL_VERSION,
    })
    .expect("encode Hello");
    frame(t.as_bytes())
}

/// Sends `bytes` with `fds` copies of `fd` attached, at most SCM_MAX_FD per
/// sendmsg (the bytes are split so that each chunk carries its share).
fn send_with_fds(s: &UnixStream, bytes: &[u8], fd: RawFd, fds: usize) -> nix::Result<()> {
    let chunks = fds.div_ceil(SCM_MAX_FD).max(1);
    let per = bytes.len().div_ceil(chunks).max(1);
    let mut left = fds;
    for part in bytes.chunks(per) {
        let n = left.min(SCM_MAX_FD);
        left -= n;
        let raw = vec![fd; n];
        let iov = [std::io::IoSlice::new(part)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if n > 0 { &cmsg } else { &[] };
        sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    }
    Ok(())
}

fn do_hello(s: &UnixStream, t: &mut Tally) -> bool {
    if (&*s).write_all(&hello_frame()).is_err() {
        return false;
    }
    let before = t.kinds.get("Hello").copied().unwrap_or(0);
    t.read_reply(s);
    t.kinds.get("Hello").copied().unwrap_or(0) > before
}

fn fdflood(sock: &Path, conns: u64, fds: usize, hello: bool, t: &mut Tally) {
    let null = std::fs::File::open("/dev/null").expect("open /dev/null");
    let status = frame(
        ron::to_string(&NetdRequest::Status)
            .expect("encode")
            .as_bytes(),
    );
    for _ in 0..conns {
        let Some(s) = t.connect(sock) else { continue };
        if hello && !do_hello(&s, t) {
            continue;
        }
        let _ = send_with_fds(&s, &status, null.as_raw_fd(), fds);
        t.read_reply(&s);
    }
}

fn garbage(sock: &Path, conns: u64, rng: &mut Rng, t: &mut Tally) {
    for _ in 0..conns {
        let Some(mut s) = t.connect(sock) else {
            continue;
        };
        let mut junk: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 {
            junk = frame(&junk);
        }
        let _ = s.write_all(&junk);
        t.read_reply(&s);
    }
}

fn longname(sock: &Path, conns: u64, len: usize, t: &mut Tally) {
    let req = NetdRequest::OpenTap {
        // Characters that need escaping first, then plain ones: the frame
        // stays under netd's cap for LEN up to about 3900.
        name: format!("\u{1}\"\\\n{}", "x".repeat(len.saturating_sub(4))),
        queues: 1,
        vnet_hdr: true,
        vhost: false,
        mac: None,
    };
    let bytes = frame(ron::to_string(&req).expect("encode").as_bytes());
    for _ in 0..conns {
        let Some(s) = t.connect(sock) else { continue };
        // Whether or not Hello is answered, the request goes out.
        let _ = (&s).write_all(&hello_frame());
        let _ = (&s).write_all(&bytes);
        t.read_reply(&s);
        t.read_reply(&s);
    }
}

/// Holds `conns` connections, each sending half a frame and then a byte
/// every 200 ms, for `secs`. Reports how many netd answered or cut.
fn trickle(sock: &Path, conns: u64, secs: u64, t: &mut Tally) {
    let mut held: Vec<UnixStream> = Vec::new();
    for _ in 0..conns {
        let Some(s) = t.connect(sock) else { continue };
        let _ = (&s).write_all(&1000u32.to_le_bytes());
        let _ = s.set_nonblocking(true);
        held.push(s);
    }
    let t0 = Instant::now();
    let mut open = held.len();
    let mut answered = vec![false; held.len()];
    while t0.elapsed() < Duration::from_secs(secs) && open > 0 {
        std::thread::sleep(Duration::from_millis(200));
        open = 0;
        for (s, answered) in held.iter_mut().zip(answered.iter_mut()) {
            let mut b = [0u8; 512];
            let cut = match s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => {
                    *answered = true;
                    false
                }
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            if !cut && s.write_all(b" ").is_ok() {
                open += 1;
            }
        }
    }
    t.kinds.insert("still_open".into(), open as u64);
    let n = answered.iter().filter(|a| **a).count() as u64;
    *t.kinds.entry("answered".into()).or_insert(0) += n;
}

fn raw(sock: &Path, texts: &[String], t: &mut Tally) {
    t.keep_texts = true;
    let Some(s) = t.connect(sock) else { return };
    for text in texts {
        // Even when the send fails, an answer may be waiting.
        let _ = (&s).write_all(&frame(text.as_bytes()));
        t.read_reply(&s);
    }
}

fn mixed(sock: &Path, secs: u64, seed: u64, t: &mut Tally) {
    let mut rng = Rng(seed | 1);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        match rng.below(4) {
            0 => fdflood(sock, 5, 1 + rng.below(300) as usize, false, t),
            1 => garbage(sock, 5, &mut rng, t),
            2 => longname(sock, 5, 3900, t),
            _ => trickle(sock, 16, 1, t),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).unwrap_or("") };
    let num = |i: usize| -> u64 {
        arg(i)
            .parse()
            .unwrap_or_else(|_| panic!("argument {i} must be a number: {args:?}"))
    };
    let sock = Path::new(arg(2));
    let mut t = Tally::default();
    let t0 = Instant::now();
    match arg(1) {
        "fdflood" => fdflood(sock, num(3), num(4) as usize, arg(5) == "hello", &mut t),
        "garbage" => garbage(sock, num(3), &mut Rng(0x5eed), &mut t),
        "longname" => longname(sock, num(3), num(4) as usize, &mut t),
        "trickle" => trickle(sock, num(3), num(4), &mut t),
        "raw" => raw(sock, args.get(3..).unwrap_or(&[]), &mut t),
        "mixed" => mixed(sock, num(3), num(4), &mut t),
        other => {
            eprintln!("unknown command {other:?}; see the source's header");
            std::process::exit(2);
        }
    }
    let mut v = t.json();
    v["ms"] = serde_json::json!(t0.elapsed().as_millis() as u64);
    println!("{v}");
}
