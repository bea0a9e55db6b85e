//! A blind relay between a real migration source and a real target, for
//! the fault tests (tests/tests/migration_ownership.rs): it listens as the
//! vmms' uid (a source trusts only its own uid), connects to the target's
//! `--incoming` socket as root (a target accepts root), and passes each
//! frame and its fds on as it came, counting messages but never decoding
//! them. A scripted [`Fault`] signals the target just before a message of
//! the source reaches it (or with all of it but its last byte passed),
//! holds a message of the source, trickles a reply of the target, or
//! delays every message.
//!
//! Protocol 3 (this build's source): Hello → Ready, then State → Resumed
//! (or Failed). The State is the commit: there is no Loaded and no Commit
//! between a source of this build and its target.

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::codec;
use common::migration::{MIGRATION_MAX_FDS, MIGRATION_MAX_FRAME};

use crate::migration_harness::{SETTLE, VMM_UID, listen_as};

/// Names of the source's messages, in protocol order (protocol 3).
pub const SOURCE_MSGS: [&str; 2] = ["Hello", "State"];
/// Names of the target's replies, in protocol order (protocol 3).
pub const TARGET_MSGS: [&str; 2] = ["Ready", "Resumed"];

/// What the relay does to one migration.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Passes everything.
    Pass,
    /// Sends `sig` to the target and waits until it is dead, just before
    /// the source's message number `msg` (0 Hello, 1 State) is passed on.
    SignalBefore { msg: usize, sig: i32 },
    /// Passes the source's message number `msg` to the target but for its
    /// last byte (the target waits in the middle of the frame: it cannot
    /// have acted on it), then sends `sig` and waits until it is dead.
    SignalDuring { msg: usize, sig: i32 },
    /// Holds the source's message number `msg` for `delay`, then passes it
    /// on (after a source that gave up meanwhile closed its end).
    Hold { msg: usize, delay: Duration },
    /// Passes the target's reply number `msg` (0 Ready, 1 Resumed) to the
    /// source one byte every `gap`.
    Trickle { msg: usize, gap: Duration },
    /// SIGKILLs the target once its reply number `msg` arrived, and drops
    /// that reply (the target died right after sending it).
    KillAndDrop { msg: usize },
    /// Holds every message, both ways, for this long (slows each step).
    Delay(Duration),
}

/// Which way a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    FromSource,
    FromTarget,
}

/// A relay serving one migration; stops and removes its socket on drop.
pub struct Relay {
    pub path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens at `path` (as the vmms' uid) for one source, to be relayed
    /// to the target of pid `target_pid` listening at `target`.
    pub fn start(path: &Path, target: &Path, target_pid: u32, fault: Fault) -> Self {
        let listener = listen_as(path, VMM_UID);
        listener.set_nonblocking(true).expect("nonblocking");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (l2, s2, c2, target) = (log.clone(), stop.clone(), conns.clone(), target.to_owned());
        let thread = std::thread::spawn(move || {
            let Some(src) = accept(&listener, &s2) else {
                return;
            };
            drop(listener);
            let tgt = match UnixStream::connect(&target) {
                Ok(t) => t,
                Err(e) => {
                    l2.lock()
                        .unwrap()
                        .push(format!("connect to the target: {e}"));
                    return;
                }
            };
            {
                let mut c = c2.lock().unwrap();
                c.push(src.try_clone().expect("clone"));
                c.push(tgt.try_clone().expect("clone"));
            }
            let ctx = Pump {
                fault,
                target_pid,
                log: l2,
            };
            let (a, b) = (
                src.try_clone().expect("clone"),
                tgt.try_clone().expect("clone"),
            );
            let c1 = ctx.clone();
            let up = std::thread::spawn(move || c1.run(Dir::FromSource, &a, &b));
            ctx.run(Dir::FromTarget, &tgt, &src);
            let _ = up.join();
        });
        Relay {
            path: path.to_path_buf(),
            log,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    /// What passed, one line per message or event.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until both directions ended (the relay then holds no fd of
    /// the migration: no RAM, no TAP queue, no owner page).
    pub fn wait_done(&mut self, timeout: Duration) -> bool {
        let t = self.thread.as_ref().expect("relay thread");
        let done = crate::wait_for(timeout, || t.is_finished());
        if done && let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        done
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept(listener: &UnixListener, stop: &AtomicBool) -> Option<UnixStream> {
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < SETTLE {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => return None,
        }
    }
    None
}

#[derive(Clone)]
struct Pump {
    fault: Fault,
    target_pid: u32,
    log: Arc<Mutex<Vec<String>>>,
}

impl Pump {
    fn note(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }

    /// Passes frames from `from` to `to` until either end closes; then
    /// closes both (so each peer sees the other gone, as without a relay).
    fn run(&self, dir: Dir, from: &UnixStream, to: &UnixStream) {
        let names = match dir {
            Dir::FromSource => SOURCE_MSGS,
            Dir::FromTarget => TARGET_MSGS,
        };
        let mut n = 0usize;
        loop {
            let Ok((payload, fds)) =
                codec::recv_frame(from.as_fd(), MIGRATION_MAX_FRAME, MIGRATION_MAX_FDS)
            else {
                self.note(format!("{dir:?}: closed after {n} messages"));
                break;
            };
            let name = names.get(n).copied().unwrap_or("extra");
            self.note(format!(
                "{dir:?} #{n} ({name}): {} bytes, {} fds, says {}",
                payload.len(),
                fds.len(),
                leading_word(&payload)
            ));
            let this = n;
            n += 1;
            match (self.fault, dir) {
                (Fault::SignalBefore { msg, sig }, Dir::FromSource) if msg == this => {
                    self.signal_target(sig);
                }
                (Fault::SignalDuring { msg, sig }, Dir::FromSource) if msg == this => {
                    assert!(fds.is_empty(), "cut a message with fds");
                    let passed = send_all_but_last_byte(to, &payload);
                    self.note(format!("{name}: all but its last byte passed: {passed:?}"));
                    self.signal_target(sig);
                    break;
                }
                (Fault::Hold { msg, delay }, Dir::FromSource) if msg == this => {
                    std::thread::sleep(delay);
                    self.note(format!("{name} held {delay:?}"));
                }
                (Fault::KillAndDrop { msg }, Dir::FromTarget) if msg == this => {
                    self.signal_target(libc::SIGKILL);
                    self.note(format!("{name} dropped"));
                    break;
                }
                (Fault::Trickle { msg, gap }, Dir::FromTarget) if msg == this => {
                    assert!(fds.is_empty(), "a target reply with fds");
                    if !trickle(to, &payload, gap) {
                        self.note(format!("{name}: the source left while it trickled"));
                        break;
                    }
                    self.note(format!("{name} trickled"));
                    continue;
                }
                (Fault::Delay(d), _) => std::thread::sleep(d),
                _ => {}
            }
            // The codec's payloads are text; anything else cannot be a
            // message of either side.
            let Ok(text) = String::from_utf8(payload) else {
                self.note(format!("{dir:?} #{this}: not text"));
                break;
            };
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = codec::send_encoded(to, &text, &borrowed) {
                self.note(format!("{dir:?} #{this} ({name}) not passed: {e}"));
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }

    fn signal_target(&self, sig: i32) {
        // SAFETY: kill(2) on the test's own child (a zombie at worst:
        // the test reaps it later, so the pid is not reused meanwhile).
        unsafe { libc::kill(self.target_pid as i32, sig) };
        let dead = crate::wait_for(SETTLE, || process_exited(self.target_pid));
        self.note(format!(
            "target signalled ({sig}), {}",
            if dead { "dead" } else { "still alive" }
        ));
    }
}

/// The identifier a payload starts with (a RON message's variant name:
/// `Hello`, `Loaded`...), for the log: what passed, not what it said.
fn leading_word(payload: &[u8]) -> String {
    let n = payload
        .iter()
        .take(32)
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    String::from_utf8_lossy(&payload[..n]).into_owned()
}

/// The variant names that passed one way (`FromSource` or `FromTarget`)
/// in a relay's [`Relay::log`], in order.
pub fn said(log: &[String], dir: &str) -> Vec<String> {
    let prefix = format!("{dir} #");
    log.iter()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(", says ").map(|(_, w)| w.to_string()))
        .collect()
}

/// Writes one frame (length prefix, payload) but for its last byte.
fn send_all_but_last_byte(to: &UnixStream, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame.pop();
    (&*to).write_all(&frame)
}

/// Writes one frame (length prefix, payload) one byte every `gap`;
/// false when the reader went away.
fn trickle(to: &UnixStream, payload: &[u8], gap: Duration) -> bool {
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(payload);
    for b in frame {
        if (&*to).write_all(&[b]).is_err() {
            return false;
        }
        std::thread::sleep(gap);
    }
    true
}

/// Whether `pid` has ended (gone, or a zombie its parent has not reaped).
pub fn process_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    matches!(state, Some('Z') | Some('X') | None)
}

/// The sockets in `dir` and whether each accepts a connection (a live
/// listener) or not (a stale file left by a killed process).
pub fn sockets_in(dir: &Path) -> Vec<(PathBuf, bool)> {
    use std::os::unix::fs::FileTypeExt;
    let mut v: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
                .map(|e| {
                    let p = e.path();
                    let live = UnixStream::connect(&p).is_ok();
                    (p, live)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
