//! The test guest's serial lines, parsed: the heartbeat
//! (`testguest: tick <n>`, with several CPUs `testguest: tick <n> cpus
//! <bsp>,<ap>,...`) and the CRC-32 it reports an initrd with.

/// The heartbeat number of one serial line (the first number after
/// `testguest: tick `), whatever follows it.
pub fn tick_number(line: &str) -> Option<u64> {
    line.trim()
        .strip_prefix("testguest: tick ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every CPU's tick count on one heartbeat line: the BSP first, then the
/// APs in the firmware table's order. A one-CPU line gives `[n]`.
pub fn cpu_ticks(line: &str) -> Option<Vec<u64>> {
    let rest = line.trim().strip_prefix("testguest: tick ")?;
    let mut words = rest.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match (words.next(), words.next(), words.next()) {
        (None, _, _) => Some(vec![n]),
        (Some("cpus"), Some(list), None) => list.split(',').map(|c| c.parse().ok()).collect(),
        _ => None,
    }
}

/// The per-CPU counts of every heartbeat line in `text`, in order.
pub fn all_cpu_ticks(text: &str) -> Vec<Vec<u64>> {
    text.lines().filter_map(cpu_ticks).collect()
}

/// Every CPU's ticks over a guest's serial output across its vmms (in
/// migration order): the same CPUs on every line, the BSP's heartbeat
/// counting 1, 2, 3... and no CPU's count ever going back; every CPU ends
/// above where it started (all of them ticked).
pub fn assert_cpu_ticks_continuous(serials: &[String]) {
    let lines = all_cpu_ticks(&serials.concat());
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        panic!("no heartbeat at all");
    };
    for (i, w) in lines.windows(2).enumerate() {
        assert_eq!(
            w[1].len(),
            w[0].len(),
            "CPUs changed at heartbeat #{i}: {:?} then {:?}",
            w[0],
            w[1]
        );
        assert_eq!(w[1][0], w[0][0] + 1, "BSP heartbeat gap at #{i}: {w:?}");
        for (cpu, (a, b)) in w[0].iter().zip(&w[1]).enumerate() {
            assert!(b >= a, "CPU #{cpu}'s ticks went back at #{i}: {w:?}");
        }
    }
    for (cpu, (a, b)) in first.iter().zip(last).enumerate() {
        assert!(b > a, "CPU #{cpu} did not tick: {a} then {b}");
    }
}

/// IEEE CRC-32 (zlib's `crc32`), what the guest reports an initrd with.
pub fn crc32(data: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|i| {
            (0..8).fold(i, |c, _| {
                if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                }
            })
        })
        .collect();
    !data
        .iter()
        .fold(!0u32, |c, &b| table[usize::from((c as u8) ^ b)] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_and_several_cpus() {
        assert_eq!(tick_number("testguest: tick 12"), Some(12));
        assert_eq!(tick_number("testguest: tick 12 cpus 12,11"), Some(12));
        assert_eq!(cpu_ticks("testguest: tick 7"), Some(vec![7]));
        assert_eq!(
            cpu_ticks("testguest: tick 12 cpus 12,12,11,0"),
            Some(vec![12, 12, 11, 0])
        );
        assert_eq!(cpu_ticks("testguest: tick 12 cpus 12,x"), None);
        assert_eq!(cpu_ticks("testguest: up boot_id=00"), None);
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
