//! The RON policy: which tenant (by uid or primary gid) may open which TAP
//! names, how many queues, whether vhost-net, and how the TAP is attached.
//! Validated completely at load so that a bad policy stops netd at start-up
//! instead of surprising a client later.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::Deserialize;

pub use common::tun::{MAX_IFNAME_LEN, valid_ifname};
/// Upper bound on `max_queues`: a TAP fd and a vhost fd per queue must fit in
/// one frame (`common::codec::MAX_FDS`).
pub const MAX_QUEUES: u16 = 16;
/// `max_taps` when a tenant entry does not say.
pub const DEFAULT_MAX_TAPS: u32 = 64;
/// Upper bound on `max_taps` (a Linux bridge takes at most 1024 ports).
pub const MAX_TAPS_LIMIT: u32 = 1024;

fn default_max_taps() -> u32 {
    DEFAULT_MAX_TAPS
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy {path} is not valid RON: {source}")]
    Parse {
        path: String,
        source: Box<ron::error::SpannedError>,
    },
    /// One problem per line.
    #[error("{}", .0.iter().map(|p| format!("policy: {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Bridges netd creates at start-up when missing.
    #[serde(default)]
    pub bridges: Vec<Bridge>,
    pub tenants: Vec<Tenant>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    pub name: String,
    /// Host address on the bridge, "A.B.C.D/NN".
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub who: Who,
    pub names: NameRule,
    pub max_queues: u16,
    /// Most TAPs of this tenant that exist at once.
    #[serde(default = "default_max_taps")]
    pub max_taps: u32,
    #[serde(default)]
    pub vhost: bool,
    pub attach: Attach,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Who {
    Uid(u32),
    /// Matches the peer's primary gid (SO_PEERCRED carries no supplementary groups).
    Gid(u32),
}

#[derive(Debug, Clone, Deserialize)]
pub enum NameRule {
    /// Any valid name starting with this prefix (and longer than it).
    Prefix(String),
    /// A glob: `*` any run of characters, `?` one character.
    Pattern(String),
}

#[derive(Debug, Clone, Deserialize)]
pub enum Attach {
    /// Enslave the TAP to a bridge declared in `bridges`.
    Bridge(String),
    /// No bridge: put this host-side address ("A.B.C.D/NN") on the TAP.
    Routed(String),
}

/// An IPv4 address with prefix length, parsed from "A.B.C.D/NN".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("address {s:?} lacks a /prefix (e.g. 10.0.1.1/24)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} in {s:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("prefix {p:?} in {s:?} is not 1..=32"))?;
        Ok(Cidr { addr, prefix })
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }

    fn overlaps(&self, other: &Cidr) -> bool {
        let shorter = self.prefix.min(other.prefix);
        let mask = u32::MAX << (32 - u32::from(shorter));
        u32::from(self.addr) & mask == u32::from(other.addr) & mask
    }
}

/// A "A.B.C.D/NN" that can go on a host interface: a unicast address that is
/// neither its subnet's network nor its broadcast address.
fn host_address(s: &str) -> Result<Cidr, String> {
    let c = Cidr::parse(s)?;
    let a = c.addr;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
        return Err(format!(
            "address {s:?} is not a unicast host address (unspecified, loopback, multicast or broadcast)"
        ));
    }
    if c.prefix <= 30 {
        let host = u32::from(a) & !u32::from(c.netmask());
        if host == 0 || host == !u32::from(c.netmask()) {
            return Err(format!(
                "address {s:?} is the network or broadcast address of its subnet"
            ));
        }
    }
    Ok(c)
}

/// Whether some valid interface name (1..=15 bytes) matches both globs
/// (`*` any run, `?` one character, anything else itself): a search over
/// (position in a, position in b, length so far), at most 16^3 states.
fn globs_intersect(a: &[u8], b: &[u8]) -> bool {
    let mut seen = HashSet::new();
    let mut todo = vec![(0usize, 0usize, 0usize)];
    while let Some(st @ (i, j, n)) = todo.pop() {
        if !seen.insert(st) {
            continue;
        }
        if i == a.len() && j == b.len() && n > 0 {
            return true;
        }
        // A star may match nothing.
        if a.get(i) == Some(&b'*') {
            todo.push((i + 1, j, n));
        }
        if b.get(j) == Some(&b'*') {
            todo.push((i, j + 1, n));
        }
        if n == MAX_IFNAME_LEN {
            continue;
        }
        // Both consume one common character; a star stays where it is.
        let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) else {
            continue;
        };
        let compatible = x == y || matches!(x, b'?' | b'*') || matches!(y, b'?' | b'*');
        if compatible {
            let ni = if x == b'*' { i } else { i + 1 };
            let nj = if y == b'*' { j } else { j + 1 };
            todo.push((ni, nj, n + 1));
        }
    }
    false
}

fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    // Iterative matcher with one backtrack point: linear enough for 15 bytes.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl NameRule {
    pub fn allows(&self, name: &str) -> bool {
        if !valid_ifname(name) {
            return false;
        }
        match self {
            NameRule::Prefix(pre) => name.len() > pre.len() && name.starts_with(pre.as_str()),
            NameRule::Pattern(pat) => glob_match(pat.as_bytes(), name.as_bytes()),
        }
    }

    /// The rule as a glob (a prefix means at least one more character).
    fn glob(&self) -> String {
        match self {
            NameRule::Prefix(p) => format!("{p}?*"),
            NameRule::Pattern(p) => p.clone(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            NameRule::Prefix(p) => format!("names starting with {p:?}"),
            NameRule::Pattern(p) => format!("names matching {p:?}"),
        }
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let policy: Policy = ron::from_str(&text).map_err(|source| PolicyError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// Every problem of the policy, or `Ok` when it has none. Used both by
    /// `--check-policy` and by netd before it serves or reloads a policy.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::Invalid(problems))
        }
    }

    /// One readable line per problem, in policy order.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        // Subnets on host interfaces, with who owns them, to find overlaps.
        let mut subnets: Vec<(String, Cidr)> = Vec::new();
        let mut bridges = HashSet::new();
        for b in &self.bridges {
            let ctx = format!("bridge {:?}", b.name);
            if !valid_ifname(&b.name) {
                out.push(format!("{ctx}: not a valid interface name (1..{MAX_IFNAME_LEN} characters of [A-Za-z0-9._-])"));
            }
            if !bridges.insert(b.name.as_str()) {
                out.push(format!("{ctx} is declared twice"));
            }
            if let Some(a) = &b.address {
                match host_address(a) {
                    Ok(c) => subnets.push((ctx, c)),
                    Err(e) => out.push(format!("{ctx}: {e}")),
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let ctx = format!("tenant #{i} ({:?})", t.who);
            if !seen.insert(t.who) {
                out.push(format!("{ctx} appears twice"));
            }
            if t.max_queues == 0 || t.max_queues > MAX_QUEUES {
                out.push(format!(
                    "{ctx}: max_queues {} is out of range 1..={MAX_QUEUES}",
                    t.max_queues
                ));
            }
            if t.max_taps == 0 || t.max_taps > MAX_TAPS_LIMIT {
                out.push(format!(
                    "{ctx}: max_taps {} is out of range 1..={MAX_TAPS_LIMIT}",
                    t.max_taps
                ));
            }
            let names_ok = match &t.names {
                NameRule::Prefix(p) => {
                    let ok = !p.is_empty() && p.len() < MAX_IFNAME_LEN && valid_ifname(p);
                    if !ok {
                        out.push(format!(
                            "{ctx}: prefix {p:?} must be 1..{MAX_IFNAME_LEN} characters of [A-Za-z0-9._-]"
                        ));
                    }
                    ok
                }
                NameRule::Pattern(p) => {
                    let ok = !p.is_empty()
                        && p.bytes().all(|b| {
                            b.is_ascii_alphanumeric()
                                || matches!(b, b'-' | b'_' | b'.' | b'*' | b'?')
                        });
                    if !ok {
                        out.push(format!(
                            "{ctx}: pattern {p:?} may use only [A-Za-z0-9._-] and the wildcards * and ?"
                        ));
                    } else if !globs_intersect(p.as_bytes(), p.as_bytes()) {
                        out.push(format!(
                            "{ctx}: pattern {p:?} matches no name of at most {MAX_IFNAME_LEN} characters"
                        ));
                    }
                    ok
                }
            };
            if names_ok {
                for (j, other) in self.tenants.iter().enumerate().take(i) {
                    if other.who != t.who
                        && globs_intersect(t.names.glob().as_bytes(), other.names.glob().as_bytes())
                    {
                        out.push(format!(
                            "{ctx}: {} overlap tenant #{j} ({:?})'s {}, so one could take the other's interface names",
                            t.names.describe(),
                            other.who,
                            other.names.describe()
                        ));
                    }
                }
            }
            match &t.attach {
                Attach::Bridge(b) => {
                    if !bridges.contains(b.as_str()) {
                        out.push(format!("{ctx}: bridge {b:?} is not declared in `bridges`"));
                    }
                }
                Attach::Routed(a) => match host_address(a) {
                    Ok(c) => subnets.push((ctx.clone(), c)),
                    Err(e) => out.push(format!("{ctx}: {e}")),
                },
            }
        }
        for (i, (who, c)) in subnets.iter().enumerate() {
            for (other, d) in &subnets[..i] {
                if c.overlaps(d) {
                    out.push(format!(
                        "{who}: subnet {}/{} overlaps {other}'s {}/{}",
                        c.addr, c.prefix, d.addr, d.prefix
                    ));
                }
            }
        }
        out
    }

    /// What each tenant may do, one line per tenant, for `--check-policy`.
    pub fn summary(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .bridges
            .iter()
            .map(|b| match &b.address {
                Some(a) => format!("bridge {:?}: created if missing, host address {a}", b.name),
                None => format!("bridge {:?}: created if missing, no host address", b.name),
            })
            .collect();
        for t in &self.tenants {
            let attach = match &t.attach {
                Attach::Bridge(b) => format!("enslaved to bridge {b:?}"),
                Attach::Routed(a) => format!("routed, host address {a} on each TAP"),
            };
            lines.push(format!(
                "{:?}: may open TAPs with {}, up to {} queue(s) each, at most {} at once, vhost-net {}, {attach}",
                t.who,
                t.names.describe(),
                t.max_queues,
                t.max_taps,
                if t.vhost { "allowed" } else { "refused" },
            ));
        }
        if self.tenants.is_empty() {
            lines.push("no tenants: every client is refused".to_string());
        }
        lines
    }

    /// Whether `name` is a bridge this policy declares (never a TAP name,
    /// even when a tenant's name rule would match it).
    pub fn is_bridge(&self, name: &str) -> bool {
        self.bridges.iter().any(|b| b.name == name)
    }

    /// The tenant for a peer: an entry for its uid first, else one for its
    /// primary gid.
    pub fn tenant_for(&self, uid: u32, gid: u32) -> Option<&Tenant> {
        self.tenants
            .iter()
            .find(|t| t.who == Who::Uid(uid))
            .or_else(|| self.tenants.iter().find(|t| t.who == Who::Gid(gid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../policy/netd.ron");

    #[test]
    fn default_policy_loads_and_matches_interfaces_md() {
        let p: Policy = ron::from_str(DEFAULT).unwrap();
        p.validate().unwrap();
        let t = p.tenant_for(65534, 65534).unwrap();
        assert_eq!(t.max_queues, 4);
        assert_eq!(t.max_taps, DEFAULT_MAX_TAPS);
        assert!(t.vhost);
        assert!(t.names.allows("vm0"));
        assert!(!t.names.allows("vm"));
        assert!(!t.names.allows("eth0"));
        assert!(matches!(&t.attach, Attach::Bridge(b) if b == "vmbr0"));
        let b = &p.bridges[0];
        assert_eq!(b.name, "vmbr0");
        assert_eq!(
            Cidr::parse(b.address.as_deref().unwrap()).unwrap(),
            Cidr {
                addr: Ipv4Addr::new(10, 0, 1, 1),
                prefix: 24
            }
        );
        assert!(p.tenant_for(1000, 1000).is_none());
    }

    #[test]
    fn names() {
        assert!(valid_ifname("vm-0.a_b"));
        for bad in [
            "",
            ".",
            "..",
            "vm/0",
            "vm 0",
            "vm\n",
            "0123456789abcdef",
            "vmé",
            "vm%d",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
        let r = NameRule::Pattern("vm*-q?".into());
        assert!(r.allows("vm12-q3"));
        assert!(r.allows("vm-q3"));
        assert!(!r.allows("vm12-q33"));
        assert!(!r.allows("xvm-q1"));
        assert!(NameRule::Pattern("*".into()).allows("anything"));
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.0.1.1/24").unwrap();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            Cidr::parse("10.0.0.1/32").unwrap().netmask(),
            Ipv4Addr::BROADCAST
        );
        for bad in ["10.0.1.1", "10.0.1/24", "10.0.1.1/0", "10.0.1.1/33", "x/8"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    fn check(text: &str) -> Result<(), String> {
        let p: Policy = ron::from_str(text).map_err(|e| e.to_string())?;
        p.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn invalid_policies_are_refused_with_a_reason() {
        let cases = [
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 4, attach: Bridge("nobr"))])"#,
                "not declared",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 0, attach: Routed("10.0.2.1/30"))])"#,
                "max_queues",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 99, attach: Routed("10.0.2.1/30"))])"#,
                "max_queues",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("v m"), max_queues: 1, attach: Routed("10.0.2.1/30"))])"#,
                "prefix",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Pattern("v/*"), max_queues: 1, attach: Routed("10.0.2.1/30"))])"#,
                "pattern",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 1, attach: Routed("10.0.2.1"))])"#,
                "prefix",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("a"), max_queues: 1, attach: Routed("10.0.2.1/30")), (who: Uid(1), names: Prefix("b"), max_queues: 1, attach: Routed("10.0.2.1/30"))])"#,
                "twice",
            ),
            (r#"(tenants: [], extra: 1)"#, "extra"),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 1, max_taps: 0, attach: Routed("10.0.2.1/30"))])"#,
                "max_taps",
            ),
            (
                r#"(tenants: [(who: Uid(1), names: Prefix("vm"), max_queues: 1, max_taps: 5000, attach: Routed("10.0.2.1/30"))])"#,
                "max_taps",
            ),
        ];
        for (text, want) in cases {
            let err = check(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        check(r#"(tenants: [(who: Gid(100), names: Pattern("t*"), max_queues: 2, vhost: false, attach: Routed("10.0.2.1/30"))])"#).unwrap();
    }

    #[test]
    fn glob_intersection() {
        let yes = |a: &str, b: &str| globs_intersect(a.as_bytes(), b.as_bytes());
        assert!(yes("vm?*", "v*"));
        assert!(yes("vm?*", "*0"));
        assert!(yes("a*b", "*c*"));
        assert!(!yes("vm?*", "s?*"));
        assert!(!yes("vm?*", "vm"));
        assert!(!yes("a?", "a??"));
        assert!(yes("???????????????", "*"));
        assert!(!yes("????????????????", "*"), "16 characters never match");
    }

    #[test]
    fn uid_entry_wins_over_gid_entry() {
        let p: Policy = ron::from_str(
            r#"(tenants: [
                (who: Gid(7), names: Prefix("g"), max_queues: 1, attach: Routed("10.0.2.1/30")),
                (who: Uid(5), names: Prefix("u"), max_queues: 1, attach: Routed("10.0.3.1/30")),
            ])"#,
        )
        .unwrap();
        assert!(matches!(&p.tenant_for(5, 7).unwrap().names, NameRule::Prefix(x) if x == "u"));
        assert!(matches!(&p.tenant_for(6, 7).unwrap().names, NameRule::Prefix(x) if x == "g"));
        assert!(p.tenant_for(6, 8).is_none());
    }
}
