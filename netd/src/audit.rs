//! The audit log: one line per request, written and flushed before the reply
//! leaves. Every client-controlled string goes through `{:?}`, which escapes
//! newlines and control characters, so a client cannot forge lines.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Who sent a request, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub struct AuditLog {
    file: Option<Mutex<File>>,
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
        Ok(AuditLog { file })
    }

    /// Writes one line: time, peer, request, result. The caller refuses the
    /// request when this fails (no unaudited grants).
    pub fn record(&self, peer: &Peer, request: &str, result: &str) -> io::Result<()> {
        let line = format!(
            "{} pid={} uid={} gid={} request={} {}\n",
            utc_now(),
            peer.pid,
            peer.uid,
            peer.gid,
            request,
            result
        );
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
