//! A NIC's counters, per queue pair. Each pair's worker owns its
//! [`NetStats`] as plain integers and bumps them on the packet path; once
//! per batch (an epoll wake-up) it copies them into its own
//! cache-line-aligned [`CounterCell`] with Relaxed stores, which the API
//! thread reads on request. No lock, no atomic read-modify-write and no
//! cache line shared between pairs on the packet path. Depends on std and
//! serde only.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// One queue pair's counters since the device was created (a migrated
/// device goes on from its source's). Bytes are Ethernet frame bytes, the
/// vnet header left out, as the TAP counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
/// A field added later defaults to 0 when a state lacks it.
#[serde(default, deny_unknown_fields)]
pub struct NetStats {
    /// Frames delivered to the guest (rx queue).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the guest sent that the TAP took (tx queue).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames read from the TAP that the driver's rx buffers could not
    /// hold (longer than every buffer it may use, or than the one read into).
    pub rx_dropped_no_buffer: u64,
    /// TAP reads that failed (other than "empty") or gave an unusable
    /// frame (shorter than a vnet header, too long to assemble).
    pub rx_tap_errors: u64,
    /// Guest frames the TAP refused (the write failed): dropped.
    pub tx_tap_errors: u64,
    /// Chains the device could not use (wrong direction, outside memory,
    /// too short, too long, a loop) and returned with length 0, per queue.
    pub rx_bad_chains: u64,
    pub tx_bad_chains: u64,
    /// On the pair whose thread serves the control queue (pair 0).
    pub ctrl_bad_chains: u64,
    /// Used-buffer notifications (interrupts) sent to the guest.
    pub interrupts: u64,
    /// Used-buffer notifications not sent because the driver's
    /// `used_event` said it did not need them yet (VIRTIO_F_EVENT_IDX).
    pub interrupts_suppressed: u64,
}

impl NetStats {
    /// A frame of `bytes` (vnet header left out) delivered to the guest.
    #[inline]
    pub fn rx(&mut self, bytes: usize) {
        self.rx_packets += 1;
        self.rx_bytes += bytes as u64;
    }

    /// A frame of `bytes` (vnet header left out) handed to the TAP.
    #[inline]
    pub fn tx(&mut self, bytes: usize) {
        self.tx_packets += 1;
        self.tx_bytes += bytes as u64;
    }

    /// rx frames dropped, whatever the cause.
    pub fn rx_dropped(&self) -> u64 {
        self.rx_dropped_no_buffer + self.rx_tap_errors
    }

    /// Chains returned unused, on every queue.
    pub fn bad_chains(&self) -> u64 {
        self.rx_bad_chains + self.tx_bad_chains + self.ctrl_bad_chains
    }

    /// The sum of two pairs' counters (a NIC's total).
    pub fn plus(self, o: &NetStats) -> NetStats {
        let (a, b) = (self.to_array(), o.to_array());
        NetStats::from_array(std::array::from_fn(|i| a[i] + b[i]))
    }
}

/// Number of counters in a [`NetStats`].
const FIELDS: usize = 12;

impl NetStats {
    fn to_array(self) -> [u64; FIELDS] {
        [
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            self.rx_dropped_no_buffer,
            self.rx_tap_errors,
            self.tx_tap_errors,
            self.rx_bad_chains,
            self.tx_bad_chains,
            self.ctrl_bad_chains,
            self.interrupts,
            self.interrupts_suppressed,
        ]
    }

    fn from_array(a: [u64; FIELDS]) -> Self {
        let [
            rx_packets,
            rx_bytes,
            tx_packets,
            tx_bytes,
            rx_dropped_no_buffer,
            rx_tap_errors,
            tx_tap_errors,
            rx_bad_chains,
            tx_bad_chains,
            ctrl_bad_chains,
            interrupts,
            interrupts_suppressed,
        ] = a;
        Self {
            rx_packets,
            rx_bytes,
            tx_packets,
            tx_bytes,
            rx_dropped_no_buffer,
            rx_tap_errors,
            tx_tap_errors,
            rx_bad_chains,
            tx_bad_chains,
            ctrl_bad_chains,
            interrupts,
            interrupts_suppressed,
        }
    }
}

/// Where one queue pair's worker publishes its counters for readers on
/// other threads. Written by that worker only, so each value only grows;
/// a reader may see one batch's update to some fields and not yet to
/// others (each field is exact as of some batch). Aligned so no two
/// pairs' cells share a cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct CounterCell {
    values: [AtomicU64; FIELDS],
}

impl CounterCell {
    pub fn new(initial: NetStats) -> Self {
        let c = Self::default();
        c.publish(&initial);
        c
    }

    /// Called by the owning worker once per batch.
    #[inline]
    pub fn publish(&self, s: &NetStats) {
        for (cell, v) in self.values.iter().zip(s.to_array()) {
            cell.store(v, Ordering::Relaxed);
        }
    }

    pub fn load(&self) -> NetStats {
        NetStats::from_array(self.values.each_ref().map(|v| v.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NetStats {
        NetStats::from_array(std::array::from_fn(|i| 1 + i as u64 * 10))
    }

    #[test]
    fn the_array_form_keeps_every_field_in_place() {
        let s = sample();
        assert_eq!(NetStats::from_array(s.to_array()), s);
        // Every field distinct: a field dropped or swapped would show.
        let a = s.to_array();
        for (i, v) in a.iter().enumerate() {
            assert!(!a[..i].contains(v));
        }
        assert_eq!(s.rx_packets, 1);
        assert_eq!(s.interrupts_suppressed, 111);
    }

    #[test]
    fn a_cell_gives_back_what_was_published() {
        let c = CounterCell::new(sample());
        assert_eq!(c.load(), sample());
        let mut s = sample();
        s.rx(60);
        s.tx(1500);
        c.publish(&s);
        assert_eq!(c.load(), s);
        assert_eq!((s.rx_packets, s.rx_bytes), (2, 71));
        assert_eq!((s.tx_packets, s.tx_bytes), (22, 1531));
    }

    #[test]
    fn cells_of_two_pairs_share_no_cache_line() {
        assert_eq!(std::mem::align_of::<CounterCell>(), 64);
        let cells = [CounterCell::default(), CounterCell::default()];
        let a = &cells[0] as *const _ as usize;
        let b = &cells[1] as *const _ as usize;
        assert!(b - a >= 64 && a.is_multiple_of(64));
    }

    #[test]
    fn sums_and_totals() {
        let s = sample().plus(&sample());
        assert_eq!(s.to_array(), sample().to_array().map(|v| 2 * v));
        let s = sample();
        assert_eq!(s.rx_dropped(), s.rx_dropped_no_buffer + s.rx_tap_errors);
        assert_eq!(
            s.bad_chains(),
            s.rx_bad_chains + s.tx_bad_chains + s.ctrl_bad_chains
        );
    }

    #[test]
    fn absent_fields_read_as_zero_and_unknown_ones_are_refused() {
        let s: NetStats = ron::from_str("(rx_packets:3)").unwrap();
        assert_eq!(
            s,
            NetStats {
                rx_packets: 3,
                ..NetStats::default()
            }
        );
        assert!(ron::from_str::<NetStats>("(bogus:1)").is_err());
    }
}
