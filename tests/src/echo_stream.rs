//! A paced, numbered UDP stream to a guest's echo port (UDP 7) from the
//! bridge's address, over one or several flows (source ports; several
//! flows spread over a multiqueue TAP's queues). Every echo is recorded in
//! arrival order, so a stopped stream tells what was lost, what came back
//! twice and what came back out of order — across a migration, say.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::NetNs;
use crate::net_guest::{HOST_IP, grow_receive_buffer, in_netns};

/// Marks the stream's datagrams (after the 4-byte sequence number).
const TAG: &[u8] = b"echo-stream";

/// How long [`EchoStream::stop`] waits for the echoes of the last datagrams.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last echo is in, how long a late copy of one is still looked
/// for (a duplicate comes right behind its original).
const DUP_LINGER: Duration = Duration::from_millis(100);

pub struct EchoStream {
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    flows: usize,
    /// Sequence numbers in arrival order (each flow's receiver appends its
    /// own in the order its socket got them).
    arrivals: Arc<Mutex<Vec<u32>>>,
    sent_at: Arc<Mutex<Vec<Instant>>>,
    sender: Option<JoinHandle<()>>,
    receivers: Vec<JoinHandle<()>>,
}

/// What a stopped stream saw.
pub struct StreamResult {
    /// When each sequence number was sent.
    pub sent_at: Vec<Instant>,
    /// Every echo, in arrival order (per flow).
    pub arrivals: Vec<u32>,
    /// Sequence number `s` went out on flow `s % flows`.
    pub flows: usize,
}

impl StreamResult {
    pub fn sent(&self) -> usize {
        self.sent_at.len()
    }

    /// How often each sequence number came back.
    fn copies(&self) -> Vec<u32> {
        let mut n = vec![0u32; self.sent()];
        for &s in &self.arrivals {
            if let Some(c) = n.get_mut(s as usize) {
                *c += 1;
            }
        }
        n
    }

    /// Sequence numbers sent that never came back.
    pub fn missing(&self) -> Vec<u32> {
        (0u32..)
            .zip(self.copies())
            .filter(|(_, c)| *c == 0)
            .map(|(s, _)| s)
            .collect()
    }

    /// Send times of the datagrams that never came back.
    pub fn lost(&self) -> Vec<Instant> {
        self.missing()
            .into_iter()
            .filter_map(|s| self.sent_at.get(s as usize).copied())
            .collect()
    }

    /// One entry per extra copy: a sequence number that came back twice
    /// is listed once.
    pub fn duplicated(&self) -> Vec<u32> {
        let mut seen = vec![false; self.sent()];
        let mut dups = Vec::new();
        for &s in &self.arrivals {
            match seen.get_mut(s as usize) {
                Some(b) if *b => dups.push(s),
                Some(b) => *b = true,
                // Never sent: an echo of nothing is a duplicate too.
                None => dups.push(s),
            }
        }
        dups
    }

    /// First copies that arrived after a higher sequence number of their
    /// flow had arrived (order across flows means nothing: each has its
    /// own socket and receiver).
    pub fn reordered(&self) -> Vec<u32> {
        let flows = self.flows.max(1);
        let mut highest: Vec<Option<u32>> = vec![None; flows];
        let mut seen = vec![false; self.sent()];
        let mut late = Vec::new();
        for &s in &self.arrivals {
            let first = seen
                .get_mut(s as usize)
                .is_some_and(|b| !std::mem::replace(b, true));
            let h = &mut highest[s as usize % flows];
            if first && h.is_some_and(|h| s < h) {
                late.push(s);
            }
            *h = (*h).max(Some(s));
        }
        late
    }
}

impl EchoStream {
    /// Starts sending `pps` datagrams a second to `ip`:7 from `ns`, over
    /// `flows` source ports in turn.
    pub fn start(ns: &NetNs, ip: Ipv4Addr, pps: u32, flows: usize) -> EchoStream {
        let flows = flows.max(1);
        let socks: Vec<UdpSocket> = in_netns(ns, move || {
            (0..flows)
                .map(|_| UdpSocket::bind((HOST_IP, 0)).expect("bind on the bridge address"))
                .collect()
        });
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sent_at = Arc::new(Mutex::new(Vec::new()));
        let to = SocketAddrV4::new(ip, 7);

        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for s in socks {
            grow_receive_buffer(&s);
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("set timeout");
            senders.push(s.try_clone().expect("clone the stream socket"));
            let (stop, seen) = (stop_receiving.clone(), arrivals.clone());
            receivers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = s.recv_from(&mut buf) else {
                        continue;
                    };
                    if peer != to.into() || n != 4 + TAG.len() || &buf[4..n] != TAG {
                        continue;
                    }
                    let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    seen.lock().expect("arrivals").push(seq);
                }
            }));
        }

        let (stop, sent) = (stop_sending.clone(), sent_at.clone());
        let period = Duration::from_secs(1) / pps.max(1);
        let sender = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut msg = vec![0u8; 4 + TAG.len()];
            msg[4..].copy_from_slice(TAG);
            let mut seq = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // Paced on absolute times: a late wake-up sends the missed
                // datagrams at once, so the rate holds on average.
                let due = t0 + period * seq;
                let now = Instant::now();
                if now < due {
                    std::thread::sleep(due - now);
                    continue;
                }
                msg[..4].copy_from_slice(&seq.to_be_bytes());
                if senders[seq as usize % senders.len()]
                    .send_to(&msg, to)
                    .is_ok()
                {
                    sent.lock().expect("send times").push(Instant::now());
                    seq += 1;
                }
            }
        });
        EchoStream {
            stop_sending,
            stop_receiving,
            flows,
            arrivals,
            sent_at,
            sender: Some(sender),
            receivers,
        }
    }

    /// The number of echoes so far (copies included).
    pub fn echoed(&self) -> usize {
        self.arrivals.lock().expect("arrivals").len()
    }

    /// Waits until at least `n` more echoes came back than now.
    pub fn wait_more(&self, n: usize, timeout: Duration) -> bool {
        let base = self.echoed();
        crate::wait_for(timeout, || self.echoed() >= base + n)
    }

    fn distinct_echoed(&self) -> usize {
        let mut v = self.arrivals.lock().expect("arrivals").clone();
        v.sort_unstable();
        v.dedup();
        v.len()
    }

    /// Stops sending, waits up to [`DRAIN_TIMEOUT`] for the last echoes
    /// (and a moment more for late copies) and returns what was seen.
    pub fn stop(mut self) -> StreamResult {
        self.stop_sending.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            h.join().expect("stream sender");
        }
        let sent = self.sent_at.lock().expect("send times").len();
        let t0 = Instant::now();
        while self.distinct_echoed() < sent && t0.elapsed() < DRAIN_TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(DUP_LINGER);
        self.stop_receiving.store(true, Ordering::Relaxed);
        for h in self.receivers.drain(..) {
            let _ = h.join();
        }
        StreamResult {
            sent_at: std::mem::take(&mut *self.sent_at.lock().expect("send times")),
            arrivals: std::mem::take(&mut *self.arrivals.lock().expect("arrivals")),
            flows: self.flows,
        }
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop_sending.store(true, Ordering::Relaxed);
        self.stop_receiving.store(true, Ordering::Relaxed);
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
        for h in self.receivers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(sent: usize, flows: usize, arrivals: &[u32]) -> StreamResult {
        let t = Instant::now();
        StreamResult {
            sent_at: vec![t; sent],
            arrivals: arrivals.to_vec(),
            flows,
        }
    }

    #[test]
    fn counts_lost_duplicated_and_reordered() {
        let r = result(6, 1, &[0, 2, 1, 2, 4, 5, 5]);
        assert_eq!(r.missing(), vec![3]);
        assert_eq!(r.duplicated(), vec![2, 5]);
        assert_eq!(r.reordered(), vec![1]);
        let clean = result(4, 1, &[0, 1, 2, 3]);
        assert!(clean.missing().is_empty() && clean.duplicated().is_empty());
        assert!(clean.reordered().is_empty());
    }

    #[test]
    fn order_across_flows_is_not_reordering() {
        // Flow 0 carries even numbers, flow 1 odd ones.
        let r = result(4, 2, &[0, 2, 1, 3]);
        assert!(r.reordered().is_empty());
        let r = result(4, 2, &[2, 0, 1, 3]);
        assert_eq!(r.reordered(), vec![0]);
    }
}
