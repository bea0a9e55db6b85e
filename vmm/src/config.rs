//! Command-line parsing into a [`VmConfig`]. Every mistake is a
//! [`ConfigError`] whose message fits on one line; main maps it to exit code 2.
//! The arguments come as `OsString`s (`std::env::args_os`): paths may be any
//! bytes, every other value must be UTF-8 and is refused, not panicked on.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::inputs::{self, InputError};

use crate::sandbox::SeccompMode;

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 128 << 20;

/// The most vCPUs a VM may have whatever KVM allows: vCPU i has APIC ID i,
/// and the guest finds them as xAPIC IDs (8 bits, 0xff is the broadcast
/// address). More would need x2APIC IDs in CPUID and the tables.
pub const MAX_VCPUS: u8 = 255;

pub const USAGE: &str = "usage: vmm --kernel FILE [--cmdline STR] [--memory SIZE] [--vcpus N] \
[--serial stdout|FILE] [--api-socket PATH] [--net netd=SOCK,id=ID[,...]] [--initrd FILE] [--incoming PATH] \
[--user UID:GID] [--seccomp kill|log] [--dump-acpi DIR] | --version | --help";

/// The `--version` line: this vmm's version, and the machine state format
/// and migration protocol it writes (what a target must read to take its
/// guest).
pub fn version_line() -> String {
    format!(
        "vmm {} (machine state format {}, migration protocol {})",
        env!("CARGO_PKG_VERSION"),
        crate::persist::MACHINE_STATE_FORMAT,
        common::migration::MIGRATION_PROTOCOL_VERSION
    )
}

/// What a command line asks for.
// Built once per process and consumed at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Run(VmConfig),
    /// `--help`: print [`USAGE`].
    Help,
    /// `--version`: print [`version_line`].
    Version,
}

impl Invocation {
    /// The configuration to run, if the command line asks to run a VM.
    pub fn run(self) -> Option<VmConfig> {
        match self {
            Invocation::Run(c) => Some(c),
            Invocation::Help | Invocation::Version => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Empty for a migration target started without `--kernel` (it is
    /// never loaded there).
    pub kernel: PathBuf,
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u8,
    pub serial: SerialTarget,
    pub api_socket: Option<PathBuf>,
    /// `--net` values as given; the net backend parses them.
    pub nets: Vec<String>,
    pub incoming: Option<PathBuf>,
    /// `--initrd`: loaded into guest RAM on a boot (not on a migration
    /// target, whose guest RAM comes from the source).
    pub initrd: Option<PathBuf>,
    /// `--dump-acpi DIR`: write the ACPI tables this VM would get to DIR
    /// and exit, running nothing.
    pub dump_acpi: Option<PathBuf>,
    pub user: Option<(u32, u32)>,
    /// What a forbidden syscall does: kill (default) or log (debugging).
    pub seccomp: SeccompMode,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown option '{0}' ({USAGE})")]
    UnknownOption(String),
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    #[error("option '{0}' given twice")]
    Duplicate(String),
    #[error("--kernel is required ({USAGE})")]
    NoKernel,
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
    #[error("argument '{0}' is not valid UTF-8")]
    NotUtf8(String),
    #[error("{0}")]
    Input(#[from] InputError),
}

/// Parses a size like `4096`, `256M`, `6G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
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

/// `--vcpus`: 1 to [`MAX_VCPUS`] (KVM's own limit is checked once
/// /dev/kvm is open).
fn parse_vcpus(s: &str) -> Result<u8, ConfigError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::BadVcpus(s.to_string()));
    }
    match s.parse::<u64>() {
        Ok(0) => Err(ConfigError::BadVcpus(s.to_string())),
        Ok(n) if n <= u64::from(MAX_VCPUS) => {
            u8::try_from(n).map_err(|_| ConfigError::TooManyVcpus(s.to_string()))
        }
        // Digits only, so anything else is a number too large.
        _ => Err(ConfigError::TooManyVcpus(s.to_string())),
    }
}

fn parse_user(s: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::BadUser(s.to_string());
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

impl VmConfig {
    /// Parses the arguments after the program name (`args_os().skip(1)`).
    /// `--help` and `--version` win over everything before them.
    pub fn parse<I, A>(args: I) -> Result<Invocation, ConfigError>
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        let mut kernel = None;
        let mut cmdline = None;
        let mut memory = None;
        let mut vcpus = None;
        let mut serial = None;
        let mut api_socket = None;
        let mut nets = Vec::new();
        let mut incoming = None;
        let mut initrd = None;
        let mut dump_acpi = None;
        let mut user = None;
        let mut seccomp = None;
        // Non-UTF-8 bytes show as U+FFFD in messages.
        let text = |a: &OsString| a.to_string_lossy().into_owned();
        let mut it = args.into_iter().map(Into::into);
        while let Some(raw) = it.next() {
            // `--name=value`: the value may be a path of any bytes.
            let bytes = raw.as_bytes();
            let (name, inline) = match bytes.iter().position(|&b| b == b'=') {
                Some(i) if bytes.starts_with(b"--") => (
                    bytes.get(..i).unwrap_or_default(),
                    Some(OsStr::from_bytes(bytes.get(i + 1..).unwrap_or_default()).to_os_string()),
                ),
                _ => (bytes, None),
            };
            let name = std::str::from_utf8(name)
                .map_err(|_| ConfigError::NotUtf8(text(&raw)))?
                .to_string();
            let arg = text(&raw);
            if arg == "--help" || arg == "-h" {
                return Ok(Invocation::Help);
            }
            if arg == "--version" || arg == "-V" {
                return Ok(Invocation::Version);
            }
            let known = [
                "--kernel",
                "--cmdline",
                "--memory",
                "--vcpus",
                "--serial",
                "--api-socket",
                "--net",
                "--incoming",
                "--initrd",
                "--dump-acpi",
                "--user",
                "--seccomp",
            ];
            if !known.contains(&name.as_str()) {
                return Err(ConfigError::UnknownOption(arg));
            }
            let raw_value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| ConfigError::MissingValue(name.clone()))?,
            };
            // Paths keep their bytes; everything else must be text.
            let path = PathBuf::from(&raw_value);
            let value = raw_value
                .to_str()
                .map(str::to_string)
                .ok_or_else(|| ConfigError::NotUtf8(text(&raw_value)));
            fn set<T>(slot: &mut Option<T>, v: T, name: &str) -> Result<(), ConfigError> {
                if slot.replace(v).is_some() {
                    return Err(ConfigError::Duplicate(name.to_string()));
                }
                Ok(())
            }
            match name.as_str() {
                "--kernel" => set(&mut kernel, path, &name)?,
                "--api-socket" => set(&mut api_socket, path, &name)?,
                "--incoming" => set(&mut incoming, path, &name)?,
                "--initrd" => set(&mut initrd, path, &name)?,
                "--dump-acpi" => set(&mut dump_acpi, path, &name)?,
                "--serial" => {
                    let t = if raw_value == "stdout" {
                        SerialTarget::Stdout
                    } else {
                        SerialTarget::File(path)
                    };
                    set(&mut serial, t, &name)?
                }
                "--cmdline" => set(&mut cmdline, value?, &name)?,
                "--memory" => set(&mut memory, parse_size(&value?)?, &name)?,
                "--vcpus" => {
                    let value = value?;
                    let n = parse_vcpus(&value)?;
                    set(&mut vcpus, n, &name)?
                }
                "--net" => nets.push(value?),
                "--seccomp" => {
                    let value = value?;
                    let m: SeccompMode = value
                        .parse()
                        .map_err(|_| ConfigError::BadSeccomp(value.clone()))?;
                    set(&mut seccomp, m, &name)?
                }
                _ => set(&mut user, parse_user(&value?)?, &name)?,
            }
        }
        let memory = memory.unwrap_or(DEFAULT_MEMORY);
        if memory == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if memory % 4096 != 0 {
            return Err(ConfigError::UnalignedMemory(memory));
        }
        let vcpus = vcpus.unwrap_or(1);
        // A migration target gets its guest from the source: no kernel.
        let kernel = match (kernel, &incoming) {
            (Some(k), _) => k,
            (None, Some(_)) => PathBuf::new(),
            (None, None) => return Err(ConfigError::NoKernel),
        };
        Ok(Invocation::Run(VmConfig {
            kernel,
            cmdline: cmdline.unwrap_or_default(),
            memory,
            vcpus,
            serial: serial.unwrap_or(SerialTarget::Stdout),
            api_socket,
            nets,
            incoming,
            initrd,
            dump_acpi,
            user,
            seccomp: seccomp.unwrap_or_default(),
        }))
    }

    /// Checks that `--kernel` and `--initrd` name regular files and `--serial FILE` a
    /// regular file or character device, without opening (or blocking on)
    /// either. Run it before the sandbox hides the paths.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let serial = match &self.serial {
            SerialTarget::File(p) => Some(p.as_path()),
            SerialTarget::Stdout => None,
        };
        Ok(inputs::check(&self.kernel, self.initrd.as_deref(), serial)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Result<Option<VmConfig>, ConfigError> {
        VmConfig::parse(a.iter().map(|s| s.to_string())).map(Invocation::run)
    }

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
    }

    #[test]
    fn options() {
        let c = parse(&["--kernel", "k", "--memory=6G", "--user", "65534:65534"])
            .unwrap()
            .unwrap();
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.memory, 6 << 30);
        assert_eq!(c.user, Some((65534, 65534)));
        assert_eq!(c.serial, SerialTarget::Stdout);
        assert_eq!(
            parse(&["--kernel", "k", "--bogus"]),
            Err(ConfigError::UnknownOption("--bogus".into()))
        );
        assert_eq!(parse(&["--memory", "1M"]), Err(ConfigError::NoKernel));
        assert_eq!(
            parse(&["--kernel", "k", "--memory", "0"]),
            Err(ConfigError::ZeroMemory)
        );
        assert_eq!(
            parse(&["--kernel", "k", "--vcpus", "32"])
                .unwrap()
                .unwrap()
                .vcpus,
            32
        );
        assert_eq!(
            parse(&["--kernel", "k", "--vcpus=255"])
                .unwrap()
                .unwrap()
                .vcpus,
            255
        );
        assert_eq!(
            parse(&["--kernel", "k", "--vcpus", "256"]),
            Err(ConfigError::TooManyVcpus("256".into()))
        );
        for bad in ["0", "", "-1", "+2", "two", "1.5", " 4"] {
            assert_eq!(
                parse(&["--kernel", "k", "--vcpus", bad]),
                Err(ConfigError::BadVcpus(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            parse(&["--kernel", "k", "--vcpus", "99999999999999999999999"]),
            Err(ConfigError::TooManyVcpus("99999999999999999999999".into()))
        );
        assert_eq!(
            parse(&["--kernel"]),
            Err(ConfigError::MissingValue("--kernel".into()))
        );
        assert!(parse(&["--kernel", "k", "--user", "65534"]).is_err());
        assert_eq!(parse(&["--help"]), Ok(None));
        let inv = |a: &[&str]| VmConfig::parse(a.iter().map(|s| s.to_string()));
        assert_eq!(inv(&["--help"]), Ok(Invocation::Help));
        assert_eq!(inv(&["--version"]), Ok(Invocation::Version));
        assert_eq!(
            inv(&["--kernel", "k", "--version"]),
            Ok(Invocation::Version)
        );
        assert_eq!(c.seccomp, SeccompMode::Kill);
        assert_eq!((c.initrd.as_ref(), c.dump_acpi.as_ref()), (None, None));
        let c = parse(&["--kernel", "k", "--initrd", "i", "--dump-acpi=d"])
            .unwrap()
            .unwrap();
        assert_eq!(c.initrd, Some(PathBuf::from("i")));
        assert_eq!(c.dump_acpi, Some(PathBuf::from("d")));
        assert_eq!(
            parse(&["--kernel", "k", "--initrd", "i", "--initrd", "j"]),
            Err(ConfigError::Duplicate("--initrd".into()))
        );
        let c = parse(&["--kernel", "k", "--seccomp=log"]).unwrap().unwrap();
        assert_eq!(c.seccomp, SeccompMode::Log);
        assert_eq!(
            parse(&["--kernel", "k", "--seccomp", "off"]),
            Err(ConfigError::BadSeccomp("off".into()))
        );
    }

    #[test]
    fn non_utf8_arguments_are_errors_or_paths() {
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(b"\xff.elf".to_vec());
        let args = |v: Vec<OsString>| VmConfig::parse(v).map(Invocation::run);
        // A path may be any bytes.
        let c = args(vec!["--kernel".into(), bad()]).unwrap().unwrap();
        assert_eq!(c.kernel.as_os_str(), bad().as_os_str());
        let mut inline = OsString::from("--kernel=");
        inline.push(bad());
        let c = args(vec![inline]).unwrap().unwrap();
        assert_eq!(c.kernel.as_os_str(), bad().as_os_str());
        // Other values and option names must be text.
        for v in [
            vec!["--kernel".into(), "k".into(), "--cmdline".into(), bad()],
            vec!["--kernel".into(), "k".into(), "--memory".into(), bad()],
            vec!["--kernel".into(), "k".into(), bad()],
        ] {
            let e = args(v).unwrap_err();
            assert_eq!(e, ConfigError::NotUtf8("\u{fffd}.elf".into()));
            assert_eq!(e.to_string().lines().count(), 1);
        }
    }
}
