//! The RON policy: which tenant (by uid or primary gid) may open which TAP
//! names, how many queues, whether vhost-net, and how the TAP is attached.
//! Validated completely at load so that a bad policy stops netd at start-up
//! instead of surprising a client later.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::Deserialize;

/// Linux's IFNAMSIZ minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;
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
    #[error("policy: {0}")]
    Invalid(String),
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
}

/// A syntactically valid Linux interface name that is safe to log and to pass
/// to the kernel: 1..=15 bytes of ASCII letters, digits, '-', '_' and '.',
/// and not "." or "..". Excluding '%' matters: the kernel treats "vm%d" in
/// TUNSETIFF as a template and picks a free name itself.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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

    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |m: String| Err(PolicyError::Invalid(m));
        let mut bridges = HashSet::new();
        for b in &self.bridges {
            if !valid_ifname(&b.name) {
                return bad(format!(
                    "bridge name {:?} is not a valid interface name",
                    b.name
                ));
            }
            if !bridges.insert(b.name.as_str()) {
                return bad(format!("bridge {:?} is declared twice", b.name));
            }
            if let Some(a) = &b.address {
                Cidr::parse(a)
                    .map_err(|e| PolicyError::Invalid(format!("bridge {:?}: {e}", b.name)))?;
            }
        }
        let mut seen = HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let ctx = format!("tenant #{i} ({:?})", t.who);
            if !seen.insert(t.who) {
                return bad(format!("{ctx} appears twice"));
            }
            if t.max_queues == 0 || t.max_queues > MAX_QUEUES {
                return bad(format!("{ctx}: max_queues must be 1..={MAX_QUEUES}"));
            }
            if t.max_taps == 0 || t.max_taps > MAX_TAPS_LIMIT {
                return bad(format!("{ctx}: max_taps must be 1..={MAX_TAPS_LIMIT}"));
            }
            match &t.names {
                NameRule::Prefix(p) => {
                    if p.is_empty() || p.len() >= MAX_IFNAME_LEN || !valid_ifname(p) {
                        return bad(format!(
                            "{ctx}: prefix {p:?} must be 1..{MAX_IFNAME_LEN} characters of [A-Za-z0-9._-]"
                        ));
                    }
                }
                NameRule::Pattern(p) => {
                    let ok = !p.is_empty()
                        && p.bytes().all(|b| {
                            b.is_ascii_alphanumeric()
                                || matches!(b, b'-' | b'_' | b'.' | b'*' | b'?')
                        });
                    if !ok {
                        return bad(format!(
                            "{ctx}: pattern {p:?} may use only [A-Za-z0-9._-] and the wildcards * and ?"
                        ));
                    }
                }
            }
            match &t.attach {
                Attach::Bridge(b) => {
                    if !bridges.contains(b.as_str()) {
                        return bad(format!("{ctx}: bridge {b:?} is not declared in `bridges`"));
                    }
                }
                Attach::Routed(a) => {
                    Cidr::parse(a).map_err(|e| PolicyError::Invalid(format!("{ctx}: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// Whether `name` is a bridge this policy declares (never a TAP name,
    /// even when a tenant's name rule would match it).
    pub fn is_bridge(&self, name: &str) -> bool {
        self.bridges.iter().any(|b| b.name == name)
    }

    /// The tenant for a peer: an entry for its uid first, else one for its
    /// primary gid.
    #[cfg(test)]
    pub fn tenant_for(&self, uid: u32, gid: u32) -> Option<&Tenant> {
        self.tenant_index_for(uid, gid).map(|i| &self.tenants[i])
    }

    /// The position in `tenants` of [`Policy::tenant_for`]'s entry.
    pub fn tenant_index_for(&self, uid: u32, gid: u32) -> Option<usize> {
        self.tenants
            .iter()
            .position(|t| t.who == Who::Uid(uid))
            .or_else(|| self.tenants.iter().position(|t| t.who == Who::Gid(gid)))
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
