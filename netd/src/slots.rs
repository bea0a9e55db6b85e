//! Client slots: how many connections netd serves at once, kept per tenant.
//!
//! Only tenants hold slots (a peer with no tenant entry is refused right
//! after accept). Each uid holds at most `per_uid`; each tenant has a
//! reserve of `reserve` slots that other tenants cannot take, so that one
//! tenant filling the shared part never leaves another with nothing.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The uid already holds its maximum.
    UidCap(usize),
    /// Every slot is taken or reserved for other tenants.
    Full(usize),
}

#[derive(Debug)]
pub struct Slots {
    max_total: usize,
    per_uid: usize,
    reserve: usize,
    by_tenant: Vec<usize>,
    by_uid: HashMap<u32, usize>,
    total: usize,
}

impl Slots {
    /// `tenants` is the number of tenant entries in the policy. The reserve
    /// shrinks when the tenants' reserves would not fit in `max_total`.
    pub fn new(max_total: usize, per_uid: usize, reserve: usize, tenants: usize) -> Self {
        let reserve = reserve.min(max_total / tenants.max(1));
        Slots {
            max_total,
            per_uid,
            reserve,
            by_tenant: vec![0; tenants],
            by_uid: HashMap::new(),
            total: 0,
        }
    }

    /// Takes a slot for `uid` of tenant number `tenant`, or says why not.
    pub fn take(&mut self, tenant: usize, uid: u32) -> Result<(), SlotRefusal> {
        let of_uid = self.by_uid.get(&uid).copied().unwrap_or(0);
        if of_uid >= self.per_uid {
            return Err(SlotRefusal::UidCap(self.per_uid));
        }
        if self.total >= self.max_total {
            return Err(SlotRefusal::Full(self.max_total));
        }
        let mine = self.by_tenant.get(tenant).copied().unwrap_or(0);
        if mine >= self.reserve {
            // Beyond its reserve a tenant uses the shared part only: what
            // other tenants have not yet used of their reserves stays free.
            let owed: usize = self
                .by_tenant
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != tenant)
                .map(|(_, &used)| self.reserve.saturating_sub(used))
                .sum();
            if self.max_total - self.total <= owed {
                return Err(SlotRefusal::Full(self.max_total));
            }
        }
        if let Some(t) = self.by_tenant.get_mut(tenant) {
            *t += 1;
        }
        *self.by_uid.entry(uid).or_insert(0) += 1;
        self.total += 1;
        Ok(())
    }

    /// Gives back a slot taken by [`Slots::take`].
    pub fn release(&mut self, tenant: usize, uid: u32) {
        if let Some(t) = self.by_tenant.get_mut(tenant) {
            *t = t.saturating_sub(1);
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
        let mut s = Slots::new(100, 3, 2, 2);
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
        let mut s = Slots::new(10, 100, 3, 3);
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
        let mut s = Slots::new(4, 100, 8, 2);
        s.take(0, 1).unwrap();
        s.take(0, 1).unwrap();
        assert_eq!(s.take(0, 1), Err(SlotRefusal::Full(4)));
        s.take(1, 2).unwrap();
        s.take(1, 2).unwrap();
    }
}
