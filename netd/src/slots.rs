//! Client slots: how many connections netd serves at once, kept per tenant.
//!
//! Only tenants hold slots (a peer with no tenant entry is refused right
//! after accept). Each uid holds at most `per_uid`; each tenant has a
//! reserve of `reserve` slots that other tenants cannot take, so that one
//! tenant filling the shared part never leaves another with nothing.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The uid already holds its maximum.
    UidCap(usize),
    /// Every slot is taken or reserved for other tenants.
    Full(usize),
}

#[derive(Debug)]
pub struct Slots<K> {
    max_total: usize,
    per_uid: usize,
    /// The reserve asked for; `reserve` is what fits for the current tenants.
    wanted_reserve: usize,
    reserve: usize,
    /// The policy's tenants now (a reload changes them).
    tenants: Vec<K>,
    /// Slots held per tenant, also by tenants a reload removed.
    by_tenant: HashMap<K, usize>,
    by_uid: HashMap<u32, usize>,
    total: usize,
}

impl<K: Copy + Eq + Hash> Slots<K> {
    /// `tenants` are the tenant entries of the policy. The reserve shrinks
    /// when the tenants' reserves would not fit in `max_total`.
    pub fn new(
        max_total: usize,
        per_uid: usize,
        reserve: usize,
        tenants: impl IntoIterator<Item = K>,
    ) -> Self {
        let mut s = Slots {
            max_total,
            per_uid,
            wanted_reserve: reserve,
            reserve: 0,
            tenants: Vec::new(),
            by_tenant: HashMap::new(),
            by_uid: HashMap::new(),
            total: 0,
        };
        s.set_tenants(tenants);
        s
    }

    /// Takes a reloaded policy's tenants; slots already held stay held
    /// (and are released as usual) even for tenants no longer listed.
    pub fn set_tenants(&mut self, tenants: impl IntoIterator<Item = K>) {
        self.tenants = tenants.into_iter().collect();
        self.reserve = self
            .wanted_reserve
            .min(self.max_total / self.tenants.len().max(1));
    }

    /// Takes a slot for `uid` of tenant `tenant`, or says why not.
    pub fn take(&mut self, tenant: K, uid: u32) -> Result<(), SlotRefusal> {
        let of_uid = self.by_uid.get(&uid).copied().unwrap_or(0);
        if of_uid >= self.per_uid {
            return Err(SlotRefusal::UidCap(self.per_uid));
        }
        if self.total >= self.max_total {
            return Err(SlotRefusal::Full(self.max_total));
        }
        let mine = self.by_tenant.get(&tenant).copied().unwrap_or(0);
        if mine >= self.reserve {
            // Beyond its reserve a tenant uses the shared part only: what
            // other tenants have not yet used of their reserves stays free.
            let owed: usize = self
                .tenants
                .iter()
                .filter(|&&j| j != tenant)
                .map(|j| {
                    let used = self.by_tenant.get(j).copied().unwrap_or(0);
                    self.reserve.saturating_sub(used)
                })
                .sum();
            if self.max_total - self.total <= owed {
                return Err(SlotRefusal::Full(self.max_total));
            }
        }
        *self.by_tenant.entry(tenant).or_insert(0) += 1;
        *self.by_uid.entry(uid).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`Slots::take`].
    pub fn release(&mut self, tenant: K, uid: u32) {
        if let Some(t) = self.by_tenant.get_mut(&tenant) {
            *t = t.saturating_sub(1);
            if *t == 0 {
                self.by_tenant.remove(&tenant);
            }
        }
        if let Some(n) = self.by_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
        self.total = self.total.saturating_sub(1);
    }

    pub fn in_use(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_uid_cap() {
        let mut s = Slots::new(100, 3, 2, 0..2usize);
        for _ in 0..3 {
            s.take(0, 7).unwrap();
        }
        assert_eq!(s.take(0, 7), Err(SlotRefusal::UidCap(3)));
        // Another uid of the same (gid) tenant still gets one.
        s.take(0, 8).unwrap();
        s.release(0, 7);
        s.take(0, 7).unwrap();
    }

    #[test]
    fn one_tenant_cannot_take_another_tenants_reserve() {
        let mut s = Slots::new(10, 100, 3, 0..3usize);
        // Tenant 0 gets everything but the 3 + 3 reserved for 1 and 2.
        let mut got = 0;
        while s.take(0, 1).is_ok() {
            got += 1;
        }
        assert_eq!(got, 4);
        for _ in 0..3 {
            s.take(1, 2).unwrap();
            s.take(2, 3).unwrap();
        }
        assert_eq!(s.take(1, 2), Err(SlotRefusal::Full(10)));
        assert_eq!(s.in_use(), 10);
        s.release(0, 1);
        assert_eq!(s.in_use(), 9);
        // The freed shared slot goes to whoever asks first.
        s.take(2, 3).unwrap();
    }

    #[test]
    fn reserve_shrinks_to_fit() {
        let mut s = Slots::new(4, 100, 8, 0..2usize);
        s.take(0, 1).unwrap();
        s.take(0, 1).unwrap();
        assert_eq!(s.take(0, 1), Err(SlotRefusal::Full(4)));
        s.take(1, 2).unwrap();
        s.take(1, 2).unwrap();
    }
}
