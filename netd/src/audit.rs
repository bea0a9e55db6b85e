//! The audit log: one line per request, written and flushed before the reply
//! leaves. Every client-controlled string is bounded and escaped exactly once
//! ([`bounded`]: `{:?}` of at most [`SHOWN_CHARS`] characters), so a client
//! can neither forge lines nor make long ones, and every line is capped at
//! [`MAX_LINE`] bytes.
//!
//! Grants are always written. What a peer can cause to be written otherwise
//! (refusals, closed connections, strangers) goes through a token bucket per
//! uid ([`AuditLog::record_limited`]): a flood costs a few lines and one
//! summary line per uid saying how many were suppressed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Characters of a client-controlled string that reach a log line or reply.
pub const SHOWN_CHARS: usize = 32;
/// Longest audit line, newline included.
pub const MAX_LINE: usize = 1024;
/// Lines a uid may cause at once (refusals, closes) before suppression.
const BUCKET_BURST: f64 = 32.0;
/// Lines per second a uid earns back.
const BUCKET_RATE: f64 = 4.0;
/// Uids tracked at once; beyond, suppressed lines are counted together.
const MAX_TRACKED_UIDS: usize = 4096;

/// `s` escaped once with `{:?}`, cut to [`SHOWN_CHARS`] characters, with the
/// full length noted when cut: bounded whatever the client sent.
pub fn bounded(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}...({} bytes)", &s[..cut], s.len()),
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let earned = now.duration_since(self.last).as_secs_f64() * BUCKET_RATE;
        self.tokens = (self.tokens + earned).min(BUCKET_BURST);
        self.last = now;
    }
}

/// Token buckets per uid for [`AuditLog::record_limited`].
#[derive(Debug, Default)]
struct Limiter {
    buckets: HashMap<u32, Bucket>,
    /// Suppressed for uids beyond MAX_TRACKED_UIDS.
    untracked: u64,
}

/// What the limiter decided for one line.
enum Verdict {
    /// Write it, after a summary of `suppressed` earlier lines when non-zero.
    Write {
        suppressed: u64,
    },
    Suppress,
}

impl Limiter {
    fn check(&mut self, uid: u32, now: Instant) -> Verdict {
        if !self.buckets.contains_key(&uid) && self.buckets.len() >= MAX_TRACKED_UIDS {
            // Forget uids that are quiet again (full bucket, nothing owed).
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < BUCKET_BURST || b.suppressed > 0
            });
            if self.buckets.len() >= MAX_TRACKED_UIDS {
                self.untracked += 1;
                return Verdict::Suppress;
            }
        }
        let b = self.buckets.entry(uid).or_insert(Bucket {
            tokens: BUCKET_BURST,
            last: now,
            suppressed: 0,
        });
        b.refill(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Write {
                suppressed: std::mem::take(&mut b.suppressed),
            }
        } else {
            b.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Uids with suppressed lines whose bucket has a token again: their
    /// summaries are due (one token each).
    fn due_summaries(&mut self, now: Instant) -> Vec<(u32, u64)> {
        let mut due = Vec::new();
        for (&uid, b) in self.buckets.iter_mut() {
            b.refill(now);
            if b.suppressed > 0 && b.tokens >= 1.0 {
                b.tokens -= 1.0;
                due.push((uid, std::mem::take(&mut b.suppressed)));
            }
        }
        if self.untracked > 0 {
            due.push((u32::MAX, std::mem::take(&mut self.untracked)));
        }
        due
    }
}

/// Who sent a request, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub struct AuditLog {
    file: Option<Mutex<File>>,
    limiter: Mutex<Limiter>,
}

impl AuditLog {
    /// Appends to `path` (created 0600 when missing); `None` logs nowhere.
    pub fn open(path: Option<&Path>) -> io::Result<Self> {
        let file = match path {
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(p)?;
                Some(Mutex::new(f))
            }
            None => None,
        };
        Ok(AuditLog {
            file,
            limiter: Mutex::new(Limiter::default()),
        })
    }

    /// Writes one line: time, peer, request, result. `request` and `result`
    /// must already be bounded and escaped ([`bounded`]); the line is cut at
    /// [`MAX_LINE`] anyway. The caller refuses the request when this fails
    /// (no unaudited grants).
    pub fn record(&self, peer: &Peer, request: &str, result: &str) -> io::Result<()> {
        let line = format!(
            "{} pid={} uid={} gid={} request={} {}",
            utc_now(),
            peer.pid,
            peer.uid,
            peer.gid,
            request,
            result
        );
        self.write_line(&line)
    }

    /// Writes one line about netd itself (no peer), e.g. a policy reload.
    pub fn record_event(&self, what: &str) -> io::Result<()> {
        self.write_line(&format!("{} {what}", utc_now()))
    }

    /// [`AuditLog::record`] for what a peer can repeat at will (refusals,
    /// closed connections): within the uid's budget it is written, beyond
    /// it counted and summarised later. Returns whether it was written.
    pub fn record_limited(&self, peer: &Peer, request: &str, result: &str) -> io::Result<bool> {
        let verdict = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(peer.uid, Instant::now());
        match verdict {
            Verdict::Suppress => Ok(false),
            Verdict::Write { suppressed } => {
                if suppressed > 0 {
                    self.write_summary(peer.uid, suppressed)?;
                }
                self.record(peer, request, result)?;
                Ok(true)
            }
        }
    }

    /// Writes the summary lines that are due; call now and then (netd's
    /// accept loop does, every poll tick).
    pub fn flush_summaries(&self) -> io::Result<()> {
        let due = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due_summaries(Instant::now());
        for (uid, n) in due {
            self.write_summary(uid, n)?;
        }
        Ok(())
    }

    fn write_summary(&self, uid: u32, n: u64) -> io::Result<()> {
        let who = if uid == u32::MAX {
            "uids beyond the tracked ones".to_string()
        } else {
            format!("uid={uid}")
        };
        self.write_line(&format!(
            "{} {who} suppressed={n} result=rate-limited (lines over {BUCKET_BURST} at once or {BUCKET_RATE}/s per uid)",
            utc_now()
        ))
    }

    fn write_line(&self, line: &str) -> io::Result<()> {
        let mut line = truncate(line, MAX_LINE - 4).to_string();
        if line.len() == MAX_LINE - 4 {
            line.push_str("...");
        }
        line.push('\n');
        log::info!("audit: {}", line.trim_end());
        if let Some(f) = &self.file {
            // A poisoned lock only means another writer panicked mid-line; the
            // file itself is still fine to append to.
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            // One write(2) of the whole line on an O_APPEND file keeps lines whole.
            f.write_all(line.as_bytes())?;
            f.flush()?;
        }
        Ok(())
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn utc_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_utc(d.as_secs(), d.subsec_millis())
}

fn format_utc(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_utc(1_795_636_799, 999), "2026-11-25T19:59:59.999Z");
    }

    #[test]
    fn bounded_cuts_and_escapes_once() {
        assert_eq!(bounded("vm0"), "\"vm0\"");
        let long = "x\n".repeat(2000);
        let b = bounded(&long);
        assert!(b.len() < 100, "{b}");
        assert!(b.ends_with("(4000 bytes)"), "{b}");
        assert!(!b.contains('\n'));
    }

    #[test]
    fn a_flooding_uid_is_summarised_not_written() {
        let path = std::env::temp_dir().join(format!("netd-audit-rl-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(Some(&path)).unwrap();
        let flood = Peer {
            pid: 1,
            uid: 4242,
            gid: 4242,
        };
        let quiet = Peer {
            pid: 2,
            uid: 7,
            gid: 7,
        };
        let mut written = 0;
        for _ in 0..1000 {
            if log.record_limited(&flood, "x", "result=refused").unwrap() {
                written += 1;
            }
        }
        assert!(written <= BUCKET_BURST as usize + 2, "{written}");
        assert!(log.record_limited(&quiet, "y", "result=refused").unwrap());
        // Once the bucket has a token again, the summary is written.
        std::thread::sleep(std::time::Duration::from_millis(300));
        log.flush_summaries().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains("uid=4242 suppressed="), "{text}");
        assert!(text.lines().count() <= written + 2, "{text}");
    }

    #[test]
    fn lines_are_appended_and_escaped() {
        let dir = std::env::temp_dir().join(format!("netd-audit-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let log = AuditLog::open(Some(&dir)).unwrap();
        let peer = Peer {
            pid: 1,
            uid: 2,
            gid: 3,
        };
        log.record(&peer, &format!("{:?}", "evil\nname"), "result=granted")
            .unwrap();
        log.record(&peer, "Status", "result=granted").unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("pid=1 uid=2 gid=3 request=\"evil\\nname\" result=granted"));
    }
}
