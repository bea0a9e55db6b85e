//! The command line as a [`VmConfig`]. clap reads it (the definition is
//! `cli::vmm::Args`, shared with the man page and completions); every
//! mistake is a [`ConfigError`] whose message fits on one line, which main
//! maps to exit code 2. The arguments come as `OsString`s
//! (`std::env::args_os`): paths may be any bytes, every other value must be
//! UTF-8 and is refused, not panicked on.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::CommandFactory;
use cli::UsageError;

use crate::inputs::{self, InputError};
use crate::net::config::NetConfig;
use crate::sandbox::SeccompMode;

pub use cli::vmm::{DEFAULT_MEMORY, MAX_VCPUS, SerialTarget, USAGE};

/// What `--version` prints after the name: this vmm's version, and the
/// machine state format and migration protocol it writes (what a target
/// must read to take its guest).
fn version() -> String {
    format!(
        "{} (machine state format {}, migration protocol {})",
        env!("CARGO_PKG_VERSION"),
        crate::persist::MACHINE_STATE_FORMAT,
        common::migration::MIGRATION_PROTOCOL_VERSION
    )
}

/// The `--version` line.
pub fn version_line() -> String {
    format!("vmm {}", version())
}

/// What a command line asks for.
// Built once per process and consumed at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Run(VmConfig),
    /// `--help` or `--version`: print this text to stdout, exit 0.
    Print(String),
}

impl Invocation {
    /// The configuration to run, if the command line asks to run a VM.
    pub fn run(self) -> Option<VmConfig> {
        match self {
            Invocation::Run(c) => Some(c),
            Invocation::Print(_) => None,
        }
    }
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
    /// `--net`, parsed and checked.
    pub nets: Vec<NetConfig>,
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
    #[error("argument '{0}' is not valid UTF-8")]
    NotUtf8(String),
    /// A value its parser refused (`--memory`, `--vcpus`, `--net`, ...):
    /// the parser's message names the option.
    #[error("{message}")]
    BadValue { option: String, message: String },
    /// Any other misuse clap finds.
    #[error("{0} ({USAGE})")]
    Usage(String),
    #[error("{0}")]
    Input(#[from] InputError),
}

impl From<UsageError> for ConfigError {
    fn from(e: UsageError) -> Self {
        match e {
            UsageError::Unknown(a) => ConfigError::UnknownOption(a),
            UsageError::NeedsValue(o) => ConfigError::MissingValue(o),
            UsageError::GivenTwice(o) => ConfigError::Duplicate(o),
            UsageError::NotUtf8(a) => ConfigError::NotUtf8(a),
            UsageError::Missing(m) if m.iter().any(|o| o == "--kernel") => ConfigError::NoKernel,
            UsageError::Invalid { arg, message, .. } => ConfigError::BadValue {
                option: arg,
                message,
            },
            e @ (UsageError::Missing(_) | UsageError::Other(_)) => {
                ConfigError::Usage(e.to_string())
            }
        }
    }
}

impl VmConfig {
    /// Parses the arguments after the program name (`args_os().skip(1)`).
    /// `--help` and `--version` win over everything before them.
    pub fn parse<I, A>(args: I) -> Result<Invocation, ConfigError>
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        let cmd = cli::vmm::Args::command().version(version());
        let a: cli::vmm::Args = match cli::parse(cmd, args)? {
            cli::Parsed::Args(a) => a,
            cli::Parsed::Print(text) => return Ok(Invocation::Print(text)),
        };
        Ok(Invocation::Run(VmConfig::from(a)))
    }
}

impl From<cli::vmm::Args> for VmConfig {
    fn from(a: cli::vmm::Args) -> Self {
        VmConfig {
            // A migration target gets its guest from the source: no kernel
            // (clap requires --kernel otherwise).
            kernel: a.kernel.unwrap_or_default(),
            cmdline: a.cmdline,
            memory: a.memory,
            vcpus: a.vcpus,
            serial: a.serial,
            api_socket: a.api_socket,
            nets: a.net,
            incoming: a.incoming,
            initrd: a.initrd,
            dump_acpi: a.dump_acpi,
            user: a.user,
            seccomp: match a.seccomp {
                cli::vmm::SeccompMode::Kill => SeccompMode::Kill,
                cli::vmm::SeccompMode::Log => SeccompMode::Log,
            },
        }
    }
}

impl VmConfig {
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

    /// The one-line message of a refused command line.
    fn refused(a: &[&str]) -> String {
        let e = parse(a).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{a:?}: {e}");
        e
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
        assert_eq!((c.vcpus, c.cmdline.as_str()), (1, ""));
        assert_eq!(
            parse(&["--kernel", "k"]).unwrap().unwrap().memory,
            DEFAULT_MEMORY
        );
        assert_eq!(
            parse(&["--kernel", "k", "--bogus"]),
            Err(ConfigError::UnknownOption("--bogus".into()))
        );
        assert_eq!(parse(&["--memory", "1M"]), Err(ConfigError::NoKernel));
        assert_eq!(
            refused(&["--kernel", "k", "--memory", "0"]),
            "memory size must be larger than zero"
        );
        assert_eq!(
            refused(&["--kernel", "k", "--memory", "4097"]),
            "memory size 4097 is not a multiple of 4 KiB"
        );
        assert_eq!(
            refused(&["--kernel", "k", "--memory", "lots"]),
            "invalid memory size 'lots': expected a number with an optional K, M or G suffix"
        );
        let vcpus = |v: &str| parse(&["--kernel", "k", "--vcpus", v]).map(|c| c.unwrap().vcpus);
        assert_eq!(vcpus("32"), Ok(32));
        assert_eq!(vcpus("255"), Ok(255));
        assert!(
            refused(&["--kernel", "k", "--vcpus", "256"]).starts_with("--vcpus 256 is too many")
        );
        // A value may start with '-': it is still the option's value.
        for bad in ["0", "", "-1", "+2", "two", "1.5", " 4"] {
            assert_eq!(
                refused(&["--kernel", "k", "--vcpus", bad]),
                format!("invalid --vcpus '{bad}': expected a number from 1 to 255"),
            );
        }
        assert_eq!(
            parse(&["--kernel"]),
            Err(ConfigError::MissingValue("--kernel".into()))
        );
        assert_eq!(
            refused(&["--kernel", "k", "--user", "65534"]),
            "invalid --user '65534': expected UID:GID"
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
            refused(&["--kernel", "k", "--seccomp", "off"]),
            "invalid --seccomp 'off': expected kill or log"
        );
        // A migration target needs no kernel.
        let c = parse(&["--incoming", "/s"]).unwrap().unwrap();
        assert_eq!(c.kernel, PathBuf::new());
    }

    #[test]
    fn nets_are_parsed_with_the_command_line() {
        let c = parse(&[
            "--kernel",
            "k",
            "--net",
            "netd=/s,id=vm0",
            "--net=netd=/s,id=vm1,queues=2",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            c.nets.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            ["vm0", "vm1"]
        );
        assert_eq!(c.nets[1].queues, 2);
        assert_eq!(
            refused(&["--kernel", "k", "--net", "netd=/s,id=vm0,foo=1"]),
            "--net: unknown key \"foo\" (known: netd, vhost-user, id, mac, queues, vhost, backend-transfer)"
        );
        assert!(refused(&["--kernel", "k", "--net", "id=vm0"]).starts_with("--net: missing"));
    }

    #[test]
    fn help_and_version_win() {
        let inv = |a: &[&str]| VmConfig::parse(a.iter().map(|s| s.to_string()));
        let Ok(Invocation::Print(help)) = inv(&["--help"]) else {
            panic!("--help")
        };
        for flag in ["--kernel", "--net", "--memory", "--vcpus", "--version"] {
            assert!(help.contains(flag), "{flag}: {help}");
        }
        assert_eq!(
            inv(&["--kernel", "k", "--version"]),
            Ok(Invocation::Print(format!("{}\n", version_line())))
        );
        assert_eq!(inv(&["-V"]), inv(&["--version"]));
        assert_eq!(parse(&["--help"]), Ok(None));
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
        let c = args(vec![
            "--kernel".into(),
            "k".into(),
            "--serial".into(),
            bad(),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.serial, SerialTarget::File(PathBuf::from(bad())));
        // Other values and option names must be text.
        let mut inline = OsString::from("--cmdline=");
        inline.push(bad());
        for v in [
            vec!["--kernel".into(), "k".into(), "--cmdline".into(), bad()],
            vec!["--kernel".into(), "k".into(), inline],
            vec!["--kernel".into(), "k".into(), "--memory".into(), bad()],
            vec!["--kernel".into(), "k".into(), bad()],
        ] {
            let e = args(v).unwrap_err();
            assert_eq!(e, ConfigError::NotUtf8("\u{fffd}.elf".into()));
            assert_eq!(e.to_string().lines().count(), 1);
        }
    }
}
