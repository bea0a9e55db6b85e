//! How many TAPs each tenant has at once, for the policy's `max_taps`,
//! without netd keeping any fd: netd notes the ifindex of every TAP it
//! created and forgets those the kernel no longer has (a TAP disappears when
//! its client closes its last fd). ifindexes are not reused while the kernel
//! hands out new ones, so an index that still exists is still that TAP.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use crate::iface;

#[derive(Debug, Default)]
struct TenantTaps {
    ifindexes: Vec<u32>,
    /// Creations under way (reserved, not yet noted or abandoned).
    pending: u32,
}

#[derive(Debug)]
pub struct TapLedger<K> {
    tenants: Mutex<HashMap<K, TenantTaps>>,
}

/// A place for one more TAP of a tenant, held while it is created: noted
/// with [`Reservation::commit`], given back on drop otherwise.
pub struct Reservation<'a, K: Copy + Eq + Hash> {
    ledger: &'a TapLedger<K>,
    tenant: K,
}

impl<K: Copy + Eq + Hash> TapLedger<K> {
    pub fn new() -> Self {
        TapLedger {
            tenants: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, TenantTaps>> {
        // Every operation leaves the vector consistent; a panic elsewhere
        // does not make it unusable.
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a place for one more TAP of `tenant` if it has fewer than
    /// `max` (existing plus under creation); otherwise returns how many it has.
    pub fn reserve(&self, tenant: K, max: u32) -> Result<Reservation<'_, K>, u32> {
        let mut all = self.lock();
        // Keyed by tenant identity, so counts survive a policy reload.
        let t = all.entry(tenant).or_default();
        t.ifindexes.retain(|&i| iface::index_exists(i));
        let have = t.ifindexes.len() as u32 + t.pending;
        if have >= max {
            return Err(have);
        }
        t.pending += 1;
        Ok(Reservation {
            ledger: self,
            tenant,
        })
    }

    /// TAPs of `tenant` that exist now (for tests and status).
    #[cfg(test)]
    fn count(&self, tenant: K) -> usize {
        let mut all = self.lock();
        let t = all.entry(tenant).or_default();
        t.ifindexes.retain(|&i| iface::index_exists(i));
        t.ifindexes.len()
    }
}

impl<K: Copy + Eq + Hash> Reservation<'_, K> {
    /// Notes the TAP created under this reservation.
    pub fn commit(self, ifindex: u32) {
        let mut all = self.ledger.lock();
        if let Some(t) = all.get_mut(&self.tenant) {
            t.ifindexes.push(ifindex);
        }
        // Drop gives the pending place back.
    }
}

impl<K: Copy + Eq + Hash> Drop for Reservation<'_, K> {
    fn drop(&mut self) {
        let mut all = self.ledger.lock();
        if let Some(t) = all.get_mut(&self.tenant) {
            t.pending = t.pending.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_interfaces_are_forgotten_and_pending_ones_count() {
        let ledger = TapLedger::<usize>::new();
        let lo = iface::index_of("lo").unwrap();
        let r = ledger.reserve(0, 2).unwrap();
        r.commit(lo);
        let pending = ledger.reserve(0, 2).unwrap();
        assert_eq!(ledger.reserve(0, 2).err(), Some(2));
        drop(pending);
        // An index no interface has is forgotten at the next reservation.
        ledger.reserve(0, 2).unwrap().commit(u32::MAX - 1);
        assert_eq!(ledger.count(0), 1);
        assert!(ledger.reserve(1, 1).is_ok(), "tenants are apart");
    }
}
