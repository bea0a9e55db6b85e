//! A small QMP client (the QEMU Machine Protocol: JSON lines on a UNIX
//! socket) for tests and benchmarks that drive QEMU as a peer: commands and
//! their replies, and events with QEMU's own timestamps.
//!
//! QEMU stamps events with CLOCK_REALTIME (`{seconds, microseconds}`), so
//! events of two QEMU processes on one host can be subtracted.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// A command's reply must come within this.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not complete yet (a read that timed out mid-line).
    partial: Vec<u8>,
    /// Events read while waiting for something else, oldest first.
    events: VecDeque<Value>,
}

/// An event's timestamp in microseconds since the epoch.
pub fn event_time_us(event: &Value) -> Option<i64> {
    let ts = event.get("timestamp")?;
    Some(ts.get("seconds")?.as_i64()? * 1_000_000 + ts.get("microseconds")?.as_i64()?)
}

/// CLOCK_REALTIME in microseconds since the epoch (QEMU's event clock).
pub fn realtime_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket while it
    /// starts), reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() >= timeout => {
                    return Err(format!("cannot connect to QMP {}: {e}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
        };
        let greeting = q
            .read_message(Instant::now() + timeout)?
            .ok_or("no QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// One message, or `None` when `deadline` passes first.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Value>, String> {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match self.reader.read_until(b'\n', &mut self.partial) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) if self.partial.ends_with(b"\n") => {
                let line = std::mem::take(&mut self.partial);
                serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| format!("bad QMP line {:?}: {e}", String::from_utf8_lossy(&line)))
            }
            // EOF in the middle of a line.
            Ok(_) => Err("QMP connection closed mid-line".into()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Runs `command` (with `arguments` unless Null) and returns its
    /// `return` value; an `error` reply is an Err. Events that arrive
    /// meanwhile are kept for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP {command}: {e}"))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            match self.read_message(deadline)? {
                None => {
                    return Err(format!(
                        "QMP {command}: no reply within {COMMAND_TIMEOUT:?}"
                    ));
                }
                Some(v) if v.get("event").is_some() => self.events.push_back(v),
                Some(v) => {
                    if let Some(r) = v.get("return") {
                        return Ok(r.clone());
                    }
                    if let Some(e) = v.get("error") {
                        return Err(format!("QMP {command}: {e}"));
                    }
                }
            }
        }
    }

    /// Forgets the events received so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// The first event named `name` (kept or new), within `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, String> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name)
            && let Some(e) = self.events.remove(i)
        {
            return Ok(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline)? {
                None => return Err(format!("no QMP event {name} within {timeout:?}")),
                Some(v) if v["event"] == name => return Ok(v),
                Some(v) if v.get("event").is_some() => self.events.push_back(v),
                Some(_) => {}
            }
        }
    }
}
