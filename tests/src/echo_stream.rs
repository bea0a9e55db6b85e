//! A paced UDP stream to a guest's echo port (UDP 7) from the bridge's
//! address: every datagram carries a sequence number, and the echoes say
//! which ones went there and back. Counting what is missing by the time a
//! datagram was sent tells the packets lost across an event such as a
//! migration.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::NetNs;
use crate::net_guest::GuestLink;

/// Marks the stream's datagrams (after the 4-byte sequence number).
const TAG: &[u8] = b"echo-stream";

/// How long [`EchoStream::stop`] waits for the echoes of the last datagrams.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct EchoStream {
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    echoed: Arc<Mutex<Vec<bool>>>,
    sender: Option<JoinHandle<Vec<Instant>>>,
    receiver: Option<JoinHandle<()>>,
}

/// What a stopped stream saw.
pub struct StreamResult {
    /// When each sequence number was sent.
    pub sent_at: Vec<Instant>,
    /// Whether each sequence number came back.
    pub echoed: Vec<bool>,
}

impl StreamResult {
    pub fn sent(&self) -> usize {
        self.sent_at.len()
    }

    /// Send times of the datagrams that never came back.
    pub fn lost(&self) -> Vec<Instant> {
        self.sent_at
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.echoed.get(*i).copied().unwrap_or(false))
            .map(|(_, t)| *t)
            .collect()
    }
}

impl EchoStream {
    /// Starts sending `pps` datagrams a second to `ip`:7 from `ns`.
    pub fn start(ns: &NetNs, ip: Ipv4Addr, pps: u32) -> EchoStream {
        let link = GuestLink::new(ns, ip);
        let rx = link.sock.try_clone().expect("clone the stream socket");
        rx.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set timeout");
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(Mutex::new(Vec::new()));

        let (stop, seen) = (stop_receiving.clone(), echoed.clone());
        let from = SocketAddrV4::new(ip, 7);
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                if peer != from.into() || n != 4 + TAG.len() || &buf[4..n] != TAG {
                    continue;
                }
                let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                let mut v = seen.lock().expect("echo set");
                if v.len() <= seq {
                    v.resize(seq + 1, false);
                }
                v[seq] = true;
            }
        });

        let stop = stop_sending.clone();
        let period = Duration::from_secs(1) / pps.max(1);
        let sender = std::thread::spawn(move || {
            let mut sent_at = Vec::new();
            let t0 = Instant::now();
            let mut msg = vec![0u8; 4 + TAG.len()];
            msg[4..].copy_from_slice(TAG);
            while !stop.load(Ordering::Relaxed) {
                // Paced on absolute times: a late wake-up sends the missed
                // datagrams at once, so the rate holds on average.
                let due = t0 + period * sent_at.len() as u32;
                let now = Instant::now();
                if now < due {
                    std::thread::sleep(due - now);
                    continue;
                }
                msg[..4].copy_from_slice(&(sent_at.len() as u32).to_be_bytes());
                if link.sock.send_to(&msg, from).is_ok() {
                    sent_at.push(Instant::now());
                }
            }
            sent_at
        });
        EchoStream {
            stop_sending,
            stop_receiving,
            echoed,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// The number of distinct echoes so far.
    pub fn echoed(&self) -> usize {
        self.echoed
            .lock()
            .expect("echo set")
            .iter()
            .filter(|e| **e)
            .count()
    }

    /// Stops sending, waits up to [`DRAIN_TIMEOUT`] for the last echoes and
    /// returns what was seen.
    pub fn stop(mut self) -> StreamResult {
        self.stop_sending.store(true, Ordering::Relaxed);
        let sent_at = self
            .sender
            .take()
            .map(|h| h.join().expect("stream sender"))
            .unwrap_or_default();
        let t0 = Instant::now();
        while self.echoed() < sent_at.len() && t0.elapsed() < DRAIN_TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop_receiving.store(true, Ordering::Relaxed);
        if let Some(h) = self.receiver.take() {
            let _ = h.join();
        }
        let echoed = std::mem::take(&mut *self.echoed.lock().expect("echo set"));
        StreamResult { sent_at, echoed }
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop_sending.store(true, Ordering::Relaxed);
        self.stop_receiving.store(true, Ordering::Relaxed);
    }
}
