//! Local live migration, both sides. The protocol and its sequence are in
//! `common::migration`; [`source`] sends a running guest (on its own
//! pre-started thread, under the `migration` seccomp list), [`target`] is
//! the receiving state machine of `vmm --incoming`. What both sides agree
//! on, the machine's shape, is here.

pub mod announce;
mod first_touch;
pub mod source;
pub mod target;

use std::time::Duration;

use common::migration::{MachineShape, NetShape, RamRegion};

use crate::machine::Machine;
use crate::memory::ram_ranges;
use crate::net::config::NetConfig;

/// Hello to Ready: the target maps RAM and builds its machine.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// One step of the critical section (State to Resumed; for an older
/// source State to Loaded, Commit to Resumed): a peer that does not answer
/// is given up within seconds.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A connected peer must say Hello within this, or the target forgets it
/// and waits for another.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The RAM layout of a guest of `memory` bytes, as one memfd holds it.
pub fn ram_layout(memory: u64) -> Vec<RamRegion> {
    let mut offset = 0;
    ram_ranges(memory)
        .into_iter()
        .map(|(start, len)| {
            let r = RamRegion {
                guest_addr: start.0,
                len,
                memfd_offset: offset,
            };
            offset += len;
            r
        })
        .collect()
}

/// The shape of a running machine.
pub fn shape_of(m: &Machine) -> MachineShape {
    MachineShape {
        memory_bytes: m.vm.ram.size,
        ram: ram_layout(m.vm.ram.size),
        vcpus: m.vcpus.len() as u8,
        nets: m
            .nets
            .iter()
            .map(|n| {
                let st = n.status();
                NetShape {
                    id: n.config.id.clone(),
                    mac: n.mac,
                    queues: st.queues,
                    vhost: st.vhost,
                    vhost_user: n.config.vhost_user_socket().is_some(),
                }
            })
            .collect(),
    }
}

/// Why a target started with `memory`, `vcpus` and `nets` cannot take a
/// machine of `shape` (sent with `backend_transfer`), or `None`.
pub fn shape_mismatch(
    shape: &MachineShape,
    backend_transfer: bool,
    memory: u64,
    vcpus: u8,
    nets: &[NetConfig],
) -> Option<String> {
    if shape.memory_bytes != memory {
        return Some(format!(
            "memory size differs: source {} MiB, target {} MiB",
            shape.memory_bytes >> 20,
            memory >> 20
        ));
    }
    if shape.ram != ram_layout(memory) {
        return Some("the source's RAM layout is not this vmm's".into());
    }
    if shape.vcpus != vcpus {
        return Some(format!(
            "vCPU count differs: source {}, target {vcpus}",
            shape.vcpus
        ));
    }
    if shape.nets.len() != nets.len() {
        return Some(format!(
            "NIC count differs: source {}, target {}",
            shape.nets.len(),
            nets.len()
        ));
    }
    for (s, c) in shape.nets.iter().zip(nets) {
        let mac = crate::net::attach::format_mac(&s.mac);
        let vhost_user = c.vhost_user_socket().is_some();
        if s.vhost_user != vhost_user {
            return Some(format!(
                "NIC {}: the source's is {}a vhost-user NIC, the target's {}",
                c.id,
                if s.vhost_user { "" } else { "not " },
                if vhost_user { "is" } else { "is not" }
            ));
        }
        // A vhost-user NIC's connection always travels.
        if !vhost_user && c.backend_transfer != backend_transfer {
            return Some(format!(
                "NIC {}: the source {} its TAP, the target's --net has backend-transfer={}",
                c.id,
                if backend_transfer {
                    "sends"
                } else {
                    "does not send"
                },
                if c.backend_transfer { "on" } else { "off" }
            ));
        }
        if (backend_transfer || vhost_user) && s.id != c.id {
            return Some(format!(
                "NIC id differs: source {:?}, target {:?} (backend transfer keeps the TAP, and its name)",
                s.id, c.id
            ));
        }
        if s.queues != c.queues {
            return Some(format!(
                "NIC {}: queue count differs: source {}, target {}",
                c.id, s.queues, c.queues
            ));
        }
        if s.vhost != c.vhost {
            return Some(format!("NIC {}: vhost differs", c.id));
        }
        if c.mac.is_some_and(|m| m != s.mac) {
            return Some(format!(
                "NIC {}: MAC differs: source {mac}, target {}",
                c.id,
                c.mac
                    .map(|m| crate::net::attach::format_mac(&m))
                    .unwrap_or_default()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(id: &str, extra: &str) -> NetConfig {
        NetConfig::parse(&format!("netd=/s,id={id}{extra}")).unwrap()
    }

    fn shape() -> MachineShape {
        MachineShape {
            memory_bytes: 256 << 20,
            ram: ram_layout(256 << 20),
            vcpus: 1,
            nets: vec![NetShape {
                id: "vm0".into(),
                mac: [0x52, 0x54, 0, 1, 2, 3],
                queues: 1,
                vhost: false,
                vhost_user: false,
            }],
        }
    }

    #[test]
    fn layout_of_a_large_guest_is_two_regions_back_to_back_in_the_memfd() {
        let l = ram_layout(6 << 30);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].guest_addr, 4 << 30);
        assert_eq!(l[1].memfd_offset, 3 << 30);
    }

    #[test]
    fn mismatches_are_named() {
        let s = shape();
        let ok = [net("vm0", ",mac=52:54:00:01:02:03")];
        assert_eq!(shape_mismatch(&s, true, 256 << 20, 1, &ok), None);
        assert_eq!(
            shape_mismatch(&s, true, 256 << 20, 1, &[net("vm0", "")]),
            None
        );
        let m = shape_mismatch(&s, true, 128 << 20, 1, &ok).unwrap();
        assert!(m.contains("memory"), "{m}");
        let m = shape_mismatch(&s, true, 256 << 20, 1, &[net("vm0", ",queues=2")]).unwrap();
        assert!(m.contains("queue"), "{m}");
        let m = shape_mismatch(
            &s,
            true,
            256 << 20,
            1,
            &[net("vm0", ",mac=52:54:00:09:09:09")],
        )
        .unwrap();
        assert!(m.contains("MAC"), "{m}");
        let m = shape_mismatch(&s, true, 256 << 20, 1, &[net("vm9", "")]).unwrap();
        assert!(m.contains("id"), "{m}");
        let m = shape_mismatch(&s, false, 256 << 20, 1, &[net("vm9", "")]).unwrap();
        assert!(m.contains("backend-transfer"), "{m}");
        let classic = [net("vm9", ",backend-transfer=off")];
        assert_eq!(shape_mismatch(&s, false, 256 << 20, 1, &classic), None);
        assert!(shape_mismatch(&s, true, 256 << 20, 1, &[]).is_some());
    }
}
