//! `vmm`'s command line. Paths are taken as bytes (`PathBuf` from
//! `OsString`); every other value must be UTF-8.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use clap::builder::{OsStringValueParser, TypedValueParser};

use common::net_config::{NetConfig, NetConfigError};

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 128 << 20;

/// The most vCPUs a VM may have whatever KVM allows: vCPU i has APIC ID i,
/// and the guest finds them as xAPIC IDs (8 bits, 0xff is the broadcast
/// address). More would need x2APIC IDs in CPUID and the tables.
pub const MAX_VCPUS: u8 = 255;

/// The one-line usage the errors end with.
pub const USAGE: &str = "usage: vmm --kernel FILE [--cmdline STR] [--memory SIZE] [--vcpus N] \
[--serial stdout|FILE] [--api-socket PATH] [--net netd=SOCK,id=ID[,...]|vhost-user=PATH,id=ID[,...]] [--initrd FILE] [--incoming PATH] \
[--user UID:GID] [--seccomp kill|log] [--dump-acpi DIR] | --version | --help";

/// Boots a guest under KVM as an unprivileged user, takes one over from
/// another vmm (--incoming), or writes the firmware tables a VM would get
/// (--dump-acpi).
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "vmm",
    version,
    override_usage = "vmm --kernel FILE [OPTIONS]\n       vmm --incoming PATH [OPTIONS]\n       vmm --kernel FILE [--memory SIZE] [--vcpus N] [--net ...] --dump-acpi DIR",
    after_help = "Exit status: 0 when the guest powers off, on `vmctl shutdown` or SIGTERM/SIGINT; \
2 on bad input (options, values, files) with one line on stderr; 1 on anything else \
(one line on stderr)."
)]
pub struct Args {
    /// Guest kernel: an ELF with a PVH entry note. Required unless
    /// --incoming (a migration target loads no kernel)
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "incoming",
        allow_hyphen_values = true
    )]
    pub kernel: Option<PathBuf>,
    /// Guest kernel command line
    #[arg(
        long,
        value_name = "STR",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub cmdline: String,
    /// Guest RAM: bytes, or a number with a K, M, G or T suffix (binary
    /// multiples); a non-zero multiple of 4 KiB
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = memory, allow_hyphen_values = true)]
    pub memory: u64,
    /// vCPUs: 1 to 255, and at most what KVM allows
    #[arg(long, value_name = "N", default_value = "1", value_parser = vcpus, allow_hyphen_values = true)]
    pub vcpus: u8,
    /// Where the guest's serial port writes: stdout, or a regular file,
    /// terminal or character device
    #[arg(
        long,
        value_name = "stdout|FILE",
        default_value = "stdout",
        value_parser = OsStringValueParser::new().map(SerialTarget::from_arg),
        allow_hyphen_values = true
    )]
    pub serial: SerialTarget,
    /// Control socket for vmctl (created 0600, serves this uid and root)
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub api_socket: Option<PathBuf>,
    /// A virtio-net NIC whose TAP comes from netd:
    /// netd=SOCK,id=ID[,mac=MAC][,queues=N][,vhost=on|off][,backend-transfer=on|off]
    /// (id: the TAP's name; queues 1 to 16, default 1; vhost default off;
    /// backend-transfer default on); or one whose datapath is a vhost-user
    /// backend listening on PATH: vhost-user=PATH,id=ID[,mac=MAC][,queues=N]
    /// (reconnected whenever it restarts). May be given several times
    #[arg(
        long,
        value_name = "netd=SOCK,id=ID[,...]|vhost-user=PATH,id=ID[,...]",
        value_parser = net,
        allow_hyphen_values = true
    )]
    pub net: Vec<NetConfig>,
    /// An initrd, loaded into guest RAM and handed over as module 0 of
    /// hvm_start_info (not loaded by a migration target)
    #[arg(long, value_name = "FILE", allow_hyphen_values = true)]
    pub initrd: Option<PathBuf>,
    /// Be a migration target: listen on PATH for one source of this uid
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    pub incoming: Option<PathBuf>,
    /// Write the ACPI tables this VM would get to DIR/<SIGNATURE>.dat and
    /// exit, running no guest (DIR must exist)
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    pub dump_acpi: Option<PathBuf>,
    /// Started as root: drop to this uid and gid before any guest code runs
    /// (without it, vmm refuses to run as root)
    #[arg(long, value_name = "UID:GID", value_parser = user, allow_hyphen_values = true)]
    pub user: Option<(u32, u32)>,
    /// What a syscall outside a thread's seccomp allow-list does: kill the
    /// process, or log it (debugging)
    #[arg(long, value_name = "kill|log", default_value = "kill", value_parser = seccomp, allow_hyphen_values = true)]
    pub seccomp: SeccompMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
}

impl SerialTarget {
    fn from_arg(v: OsString) -> Self {
        if v == "stdout" {
            SerialTarget::Stdout
        } else {
            SerialTarget::File(PathBuf::from(v))
        }
    }
}

/// `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    Kill,
    Log,
}

/// A value of vmm's refused by its parser; each message names the option.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("invalid memory size '{0}': expected a number with an optional K, M or G suffix")]
    BadSize(String),
    #[error("memory size must be larger than zero")]
    ZeroMemory,
    #[error("memory size {0} is not a multiple of 4 KiB")]
    UnalignedMemory(u64),
    #[error("invalid --vcpus '{0}': expected a number from 1 to {MAX_VCPUS}")]
    BadVcpus(String),
    #[error("--vcpus {0} is too many: at most {MAX_VCPUS} (vCPUs are numbered by 8-bit xAPIC IDs)")]
    TooManyVcpus(String),
    #[error("invalid --user '{0}': expected UID:GID")]
    BadUser(String),
    #[error("invalid --seccomp '{0}': expected kill or log")]
    BadSeccomp(String),
}

/// Parses a size like `4096`, `256M`, `6G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let bad = || ValueError::BadSize(s.to_string());
    let (num, shift) = match s.as_bytes().last().map(|c| c.to_ascii_uppercase()) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        Some(b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `--memory`: a size, non-zero and page-aligned.
pub fn memory(s: &str) -> Result<u64, ValueError> {
    let n = parse_size(s)?;
    if n == 0 {
        return Err(ValueError::ZeroMemory);
    }
    if n % 4096 != 0 {
        return Err(ValueError::UnalignedMemory(n));
    }
    Ok(n)
}

/// `--vcpus`: 1 to [`MAX_VCPUS`] (KVM's own limit is checked once
/// /dev/kvm is open).
pub fn vcpus(s: &str) -> Result<u8, ValueError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::BadVcpus(s.to_string()));
    }
    match s.parse::<u64>() {
        Ok(0) => Err(ValueError::BadVcpus(s.to_string())),
        Ok(n) if n <= u64::from(MAX_VCPUS) => {
            u8::try_from(n).map_err(|_| ValueError::TooManyVcpus(s.to_string()))
        }
        // Digits only, so anything else is a number too large.
        _ => Err(ValueError::TooManyVcpus(s.to_string())),
    }
}

/// `--user UID:GID`.
pub fn user(s: &str) -> Result<(u32, u32), ValueError> {
    let bad = || ValueError::BadUser(s.to_string());
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// `--seccomp kill|log`.
pub fn seccomp(s: &str) -> Result<SeccompMode, ValueError> {
    match s {
        "kill" => Ok(SeccompMode::Kill),
        "log" => Ok(SeccompMode::Log),
        _ => Err(ValueError::BadSeccomp(s.to_string())),
    }
}

/// `--net`: the key=value list ([`NetConfig::parse`]).
pub fn net(s: &str) -> Result<NetConfig, NetConfigError> {
    NetConfig::parse(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("6G"), Ok(6 << 30));
        assert_eq!(parse_size("6g"), Ok(6 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "1 G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(memory("0"), Err(ValueError::ZeroMemory));
        assert_eq!(memory("4097"), Err(ValueError::UnalignedMemory(4097)));
    }

    #[test]
    fn vcpu_counts_users_and_modes() {
        assert_eq!(vcpus("32"), Ok(32));
        assert_eq!(vcpus("255"), Ok(255));
        assert_eq!(vcpus("256"), Err(ValueError::TooManyVcpus("256".into())));
        for bad in ["0", "", "-1", "+2", "two", "1.5", " 4"] {
            assert_eq!(vcpus(bad), Err(ValueError::BadVcpus(bad.into())), "{bad}");
        }
        assert_eq!(
            vcpus("99999999999999999999999"),
            Err(ValueError::TooManyVcpus("99999999999999999999999".into()))
        );
        assert_eq!(user("65534:65534"), Ok((65534, 65534)));
        for bad in ["65534", ":1", "1:", "a:b", "1:2:3"] {
            assert_eq!(user(bad), Err(ValueError::BadUser(bad.into())), "{bad}");
        }
        assert_eq!(seccomp("log"), Ok(SeccompMode::Log));
        assert_eq!(seccomp("off"), Err(ValueError::BadSeccomp("off".into())));
    }

    #[test]
    fn definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
