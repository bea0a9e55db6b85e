//! The command lines of the shipped binaries (vmm, vmctl, netd,
//! vhost-user-net), from
//! outside: `--help` and `--version` of each; the man pages and shell
//! completions the build wrote to `target/release/assets/`, checked against
//! the clap definitions the binaries parse with (`cli`) and with groff, man
//! and bash; the one-line refusals with exit code 2 (README, "bad input")
//! that the input tests do not already cover; and the README naming every
//! flag.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::CommandFactory;
use tests::bin;

/// A refusal or a help text is immediate; this only bounds a hang.
const TIMEOUT: Duration = Duration::from_secs(15);

/// Each binary with the clap definition it parses with.
fn definitions() -> [(&'static str, clap::Command); 4] {
    [
        ("vmm", cli::vmm::Args::command()),
        ("vmctl", cli::vmctl::Args::command()),
        ("netd", cli::netd::Args::command()),
        ("vhost-user-net", cli::vhost_user_net::Args::command()),
    ]
}

/// Every long option of a definition, `--help` and `--version` included.
fn flags(cmd: &clap::Command) -> Vec<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .chain(["--help".to_string(), "--version".to_string()])
        .collect()
}

fn run(name: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin(name));
    c.args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    tests::output_within(c, TIMEOUT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_and_version_of_each_binary() {
    let version = env!("CARGO_PKG_VERSION");
    for (name, cmd) in definitions() {
        let line = match name {
            "vmm" => vmm::config::version_line(),
            _ => format!("{name} {version}"),
        };
        assert!(line.starts_with(&format!("{name} {version}")), "{line}");
        let flags = flags(&cmd);
        let names: Vec<&str> = flags.iter().map(String::as_str).collect();
        tests::assert_version_and_help(name, &line, &names);
        // The short forms, and nothing on stderr.
        for (short, long) in [("-V", "--version"), ("-h", "--help")] {
            let (s, l) = (run(name, &[short]), run(name, &[long]));
            assert_eq!(s.status.code(), Some(0), "{name} {short}: {s:?}");
            assert!(s.stderr.is_empty() && l.stderr.is_empty(), "{name}: {s:?}");
            if short == "-V" {
                assert_eq!(s.stdout, l.stdout, "{name} -V");
            }
        }
        // Defaults are stated (the help is wrapped to the terminal: compare
        // words).
        let help = text(&run(name, &["--help"]).stdout);
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for a in cmd.get_arguments() {
            for d in a.get_default_values().iter().filter(|d| !d.is_empty()) {
                let shown = format!("[default: {}]", d.to_string_lossy());
                assert!(help.contains(&shown), "{name} --help lacks {shown}: {help}");
            }
        }
    }
}

fn assets() -> PathBuf {
    bin("vmm").parent().expect("target/release").join("assets")
}

/// `--kernel` as roff writes it: `\-\-kernel`.
fn roff(flag: &str) -> String {
    flag.replace('-', "\\-")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn man_pages_and_completions_are_built_from_the_definitions() {
    let assets = assets();
    for (name, cmd) in definitions() {
        let flags = flags(&cmd);
        // Byte for byte what these definitions give: not stale, not hand-made.
        for (rel, want) in cli::assets::files(cmd.clone()).unwrap() {
            let path = assets.join(&rel);
            let got = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (built by `cargo build`)", path.display()));
            assert!(
                got == want,
                "{} differs from its definition",
                path.display()
            );
        }

        let man = assets.join("man").join(format!("{name}.1"));
        let page = std::fs::read_to_string(&man).unwrap();
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!(".TH {name} 1 "))
                    && l.contains(env!("CARGO_PKG_VERSION"))),
            "{}: no .TH header with the version:\n{page}",
            man.display()
        );
        for s in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
            assert!(page.contains(s), "{}: no {s}", man.display());
        }
        for f in &flags {
            assert!(page.contains(&roff(f)), "{}: lacks {f}", man.display());
        }
        // groff parses it without a warning (layout ones aside: a long
        // value name cannot be justified) and man renders every flag.
        if have("groff") {
            let out = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&man)
                .output()
                .unwrap();
            let warnings: Vec<_> = text(&out.stderr)
                .lines()
                .filter(|l| !l.contains("cannot adjust line"))
                .map(String::from)
                .collect();
            assert!(
                out.status.success() && warnings.is_empty(),
                "{}: {warnings:?}",
                man.display()
            );
            let out = Command::new("man")
                .arg("-l")
                .arg(&man)
                .env("MANWIDTH", "250")
                .env("LC_ALL", "C")
                .output()
                .unwrap();
            let shown = text(&out.stdout);
            assert!(out.status.success(), "man -l {}: {out:?}", man.display());
            for f in &flags {
                assert!(
                    shown.contains(f.as_str()),
                    "man {name}: lacks {f}:\n{shown}"
                );
            }
        } else {
            eprintln!("groff is not installed: man {name} checked as text only");
        }

        // bash: the script parses, and completing each flag's prefix
        // offers the flag.
        let bash = assets.join("completions/bash").join(format!("{name}.bash"));
        let st = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
        assert!(st.success(), "bash -n {}", bash.display());
        let mut script = format!("source '{}'\n", bash.display());
        // clap_complete spells a '-' in the name as "__" in the function's.
        let func = format!("_{}", name.replace('-', "__"));
        for f in &flags {
            let prefix = &f[..f.len() - 1];
            script.push_str(&format!(
                "COMP_WORDS=({name} {prefix}); COMP_CWORD=1; COMP_LINE='{name} {prefix}'; \
                 COMP_POINT=${{#COMP_LINE}}; COMPREPLY=(); {func} {name} {prefix} {name}; \
                 printf -- '{prefix} -> %s\\n' \"${{COMPREPLY[@]}}\"\n"
            ));
        }
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let offered = text(&out.stdout);
        assert!(out.status.success(), "{script}: {out:?}");
        for f in &flags {
            let line = format!("{} -> {f}", &f[..f.len() - 1]);
            assert!(
                offered.lines().any(|l| l == line),
                "bash completion of {name}: no {line:?} in\n{offered}"
            );
        }

        // zsh and fish: each names the command and every flag.
        let zsh = std::fs::read_to_string(assets.join("completions/zsh").join(format!("_{name}")))
            .unwrap();
        assert!(zsh.starts_with(&format!("#compdef {name}")), "{zsh}");
        let fish =
            std::fs::read_to_string(assets.join("completions/fish").join(format!("{name}.fish")))
                .unwrap();
        for f in &flags {
            assert!(
                zsh.contains(&format!("{f}=[")) || zsh.contains(&format!("{f}[")),
                "zsh {name}: lacks {f}"
            );
            let long = f.trim_start_matches('-');
            assert!(
                fish.contains(&format!("complete -c {name} "))
                    && fish.contains(&format!("-l {long}")),
                "fish {name}: lacks {f}"
            );
        }
    }

    // vmctl's commands complete too.
    let bash = assets.join("completions/bash/vmctl.bash");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}'; COMP_WORDS=(vmctl --api-socket s mig); COMP_CWORD=3; \
             _vmctl vmctl mig s; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display()
        ))
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "migrate", "{out:?}");
}

/// Command lines each binary refuses before doing anything: exit 2, one
/// line on stderr naming the problem, nothing on stdout. (Unknown options,
/// bad sizes and vCPU counts, a missing --kernel and non-UTF-8 arguments
/// are covered by boot.rs, smp.rs and vmm_input.rs.)
#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("vmm", &["--kernel"], "option '--kernel' needs a value"),
        (
            "vmm",
            &["--kernel", "k", "--initrd", "i", "--initrd", "j"],
            "option '--initrd' given twice",
        ),
        ("vmm", &["--kernel", "k", "-x"], "unknown option '-x'"),
        (
            "vmm",
            &["--kernel", "k", "--user", "65534"],
            "invalid --user '65534': expected UID:GID",
        ),
        (
            "vmm",
            &["--kernel", "k", "--seccomp", "off"],
            "invalid --seccomp 'off'",
        ),
        (
            "vmm",
            &["--kernel", "k", "--memory", "4097"],
            "memory size 4097 is not a multiple of 4 KiB",
        ),
        (
            "vmm",
            &["--kernel", "k", "--net", "netd=/s,id=vm0,foo=1"],
            "--net: unknown key \"foo\"",
        ),
        (
            "vmm",
            &["--kernel", "k", "--net", "id=vm0"],
            "--net: missing `netd=`",
        ),
        (
            "vmm",
            &[
                "--kernel",
                "k",
                "--net",
                "netd=/s,id=vm0,mac=01:00:5e:00:00:01",
            ],
            "must be a unicast, non-zero address",
        ),
        (
            "vmm",
            &["--incoming", "/s", "--net", "netd=/s,id=vm0,queues=17"],
            "--net: queues=\"17\": expected 1..=16",
        ),
        ("vmctl", &[], "--api-socket is required"),
        ("vmctl", &["status"], "--api-socket is required"),
        ("vmctl", &["--api-socket", "s"], "no command given"),
        ("vmctl", &["--api-socket"], "--api-socket needs a path"),
        (
            "vmctl",
            &["--api-socket", "s", "frob"],
            "unexpected argument 'frob'",
        ),
        (
            "vmctl",
            &["--api-socket", "s", "status", "pause"],
            "unexpected argument 'pause'",
        ),
        (
            "vmctl",
            &["--api-socket", "s", "status", "--bogus"],
            "unexpected argument '--bogus'",
        ),
        (
            "vmctl",
            &["--api-socket", "s", "status", "--to", "t"],
            "--to and --downtime-limit-ms are only valid with migrate",
        ),
        (
            "vmctl",
            &["--api-socket", "s", "migrate"],
            "migrate needs --to PATH",
        ),
        (
            "vmctl",
            &[
                "--api-socket",
                "s",
                "migrate",
                "--to",
                "t",
                "--downtime-limit-ms",
                "0",
            ],
            "--downtime-limit-ms: '0' is not a number of ms from 1 to 60000",
        ),
        (
            "vmctl",
            &[
                "--api-socket",
                "s",
                "migrate",
                "--to",
                "t",
                "--downtime-limit-ms",
            ],
            "--downtime-limit-ms needs a number",
        ),
        ("netd", &[], "--policy is required"),
        (
            "netd",
            &["--policy", "p.ron"],
            "--socket is required unless netd is socket-activated",
        ),
        ("netd", &["--socket", "s"], "--policy is required"),
        ("netd", &["--bogus"], "unknown option --bogus"),
        ("netd", &["--socket"], "--socket needs a value"),
        (
            "netd",
            &["--socket", "s", "--policy", "p", "--max-clients", "0"],
            "--max-clients takes a positive number",
        ),
        (
            "netd",
            &[
                "--socket",
                "s",
                "--policy",
                "p",
                "--read-timeout-ms",
                "soon",
            ],
            "--read-timeout-ms takes a positive number",
        ),
        ("vhost-user-net", &[], "--socket, --net is required"),
        (
            "vhost-user-net",
            &["--socket", "s", "--net", "netd=/n,id=vm0,vhost=on"],
            "`vhost=` is not for a vhost-user backend",
        ),
        (
            "vhost-user-net",
            &["--socket", "s", "--net", "netd=/n,id=vm0", "--user", "x"],
            "invalid --user 'x': expected UID:GID",
        ),
    ];
    for (name, args, needle) in cases {
        let out = run(name, args);
        let err = text(&out.stderr);
        let what = format!("{name} {args:?}");
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        assert_eq!(err.lines().count(), 1, "{what}: not one line: {err:?}");
        assert!(err.starts_with(&format!("{name}: ")), "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err:?} lacks {needle:?}");
        assert!(
            out.stdout.is_empty(),
            "{what}: stdout {:?}",
            text(&out.stdout)
        );
    }
}

/// The README's "Command lines" section names every option of each binary.
#[test]
fn readme_names_every_option() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(readme).unwrap();
    let start = readme
        .find("## Command lines")
        .expect("a Command lines section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    for (name, cmd) in definitions() {
        for f in flags(&cmd) {
            assert!(
                section.contains(&f),
                "README's Command lines section lacks {name} {f}"
            );
        }
    }
}
