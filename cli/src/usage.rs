//! Parsing with clap, and its errors as one [`UsageError`] each: clap's own
//! rendering is several lines (usage, hints), the binaries print one.

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Command, FromArgMatches};

/// Exit code of every binary on a command line it cannot use.
pub const EXIT_USAGE: u8 = 2;

/// What a command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    Args(T),
    /// `--help` or `--version`: this text goes to stdout, exit 0.
    Print(String),
}

/// Why clap refused a command line, without clap's wording around it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// An option (or a free argument) no definition takes, as given.
    #[error("unknown option '{0}'")]
    Unknown(String),
    /// An option given without its value.
    #[error("option '{0}' needs a value")]
    NeedsValue(String),
    /// An option that may be given once, given again.
    #[error("option '{0}' given twice")]
    GivenTwice(String),
    /// An argument whose bytes are not UTF-8 where text is expected
    /// (non-UTF-8 bytes shown as U+FFFD).
    #[error("argument '{0}' is not valid UTF-8")]
    NotUtf8(String),
    /// Required options (or positionals) left out, as clap names them
    /// (`--kernel`, `COMMAND`).
    #[error("{} is required", .0.join(", "))]
    Missing(Vec<String>),
    /// A value refused by its value parser (`message` is the parser's own
    /// one-line error) or not among the possible values.
    #[error("{message}")]
    Invalid {
        arg: String,
        value: String,
        message: String,
    },
    /// Anything else, in clap's words (first line).
    #[error("{0}")]
    Other(String),
}

/// Parses `args` (without the program name) with `cmd`. `--help` and
/// `--version` come back as [`Parsed::Print`].
pub fn parse<T: FromArgMatches>(
    cmd: Command,
    args: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Parsed<T>, UsageError> {
    let raw: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let argv = std::iter::once(OsString::from(cmd.get_name())).chain(raw.iter().cloned());
    let mut matches = match cmd.try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => return from_clap(&e, &raw),
    };
    T::from_arg_matches_mut(&mut matches)
        .map(Parsed::Args)
        .or_else(|e| from_clap(&e, &raw))
}

fn from_clap<T>(e: &clap::Error, raw: &[OsString]) -> Result<Parsed<T>, UsageError> {
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // "--kernel <FILE>" -> "--kernel"; "[COMMAND]" -> "COMMAND".
    let name = |s: String| {
        s.split_whitespace()
            .next()
            .unwrap_or_default()
            .trim_matches(|c| matches!(c, '<' | '>' | '[' | ']' | '.'))
            .to_string()
    };
    let arg = || text(ContextKind::InvalidArg).map(name).unwrap_or_default();
    let err = match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            return Ok(Parsed::Print(e.render().to_string()));
        }
        ErrorKind::UnknownArgument => {
            let given = text(ContextKind::InvalidArg).unwrap_or_default();
            // clap shows bytes that are not UTF-8 as U+FFFD: say so.
            match raw
                .iter()
                .find(|r| r.to_str().is_none() && r.to_string_lossy().starts_with(&given))
            {
                Some(r) => UsageError::NotUtf8(r.to_string_lossy().into_owned()),
                None => UsageError::Unknown(given),
            }
        }
        ErrorKind::InvalidUtf8 => {
            let bad = raw
                .iter()
                .find(|r| r.to_str().is_none())
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            // `--name=<bytes>`: the value is what is not text.
            let value = match bad.split_once('=') {
                Some((n, v)) if n.starts_with("--") => v.to_string(),
                _ => bad,
            };
            UsageError::NotUtf8(value)
        }
        ErrorKind::InvalidValue => match text(ContextKind::InvalidValue) {
            Some(v) if !v.is_empty() => UsageError::Invalid {
                arg: arg(),
                value: v,
                message: first_line(e),
            },
            _ => UsageError::NeedsValue(arg()),
        },
        ErrorKind::ArgumentConflict
            if text(ContextKind::InvalidArg).is_some()
                && text(ContextKind::InvalidArg) == text(ContextKind::PriorArg) =>
        {
            UsageError::GivenTwice(arg())
        }
        ErrorKind::ValueValidation => UsageError::Invalid {
            arg: arg(),
            value: text(ContextKind::InvalidValue).unwrap_or_default(),
            message: std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| first_line(e)),
        },
        ErrorKind::MissingRequiredArgument => match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::Strings(v)) => {
                UsageError::Missing(v.iter().cloned().map(name).collect())
            }
            _ => UsageError::Other(first_line(e)),
        },
        _ => UsageError::Other(first_line(e)),
    };
    Err(err)
}

/// clap's message without its "error: " and the lines after it.
fn first_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let line = rendered.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}
