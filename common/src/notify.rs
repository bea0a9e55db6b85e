//! Readiness notification, the systemd way (sd_notify(3)): one datagram of
//! `KEY=VALUE` lines to the AF_UNIX socket named by `$NOTIFY_SOCKET` (a path,
//! or an abstract name written with a leading `@`). Without the variable
//! (not started by a manager that listens) every call does nothing.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is not a usable socket address: {1}")]
    Address(String, io::Error),
    #[error("cannot send {state:?} to NOTIFY_SOCKET {socket:?}: {source}")]
    Send {
        state: String,
        socket: String,
        source: io::Error,
    },
}

/// Where notifications go; read from the environment once.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(String, SocketAddr)>,
}

impl Notifier {
    /// The manager's socket from `$NOTIFY_SOCKET`, or a notifier that does
    /// nothing when the variable is unset or empty.
    pub fn from_env() -> Result<Self, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) {
            Some(raw) => Self::for_socket(&raw),
            None => Ok(Notifier { target: None }),
        }
    }

    /// Notifications to `raw`: a path, or `@name` for an abstract socket.
    pub fn for_socket(raw: &std::ffi::OsStr) -> Result<Self, NotifyError> {
        let text = raw.to_string_lossy().into_owned();
        let bytes = raw.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(std::path::Path::new(raw)),
        }
        .map_err(|e| NotifyError::Address(text.clone(), e))?;
        Ok(Notifier {
            target: Some((text, addr)),
        })
    }

    /// A notifier that sends nothing.
    pub fn none() -> Self {
        Notifier { target: None }
    }

    /// Whether a manager listens for notifications.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (e.g. `"READY=1"`, lines joined by `\n`) in one datagram.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some((socket, addr)) = &self.target else {
            return Ok(());
        };
        let send_err = |source: io::Error| NotifyError::Send {
            state: state.to_string(),
            socket: socket.clone(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(send_err)?;
        sock.send_to_addr(state.as_bytes(), addr)
            .map_err(send_err)?;
        Ok(())
    }

    /// `RELOADING=1` with the CLOCK_MONOTONIC time newer managers ask for.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn path_and_abstract_sockets_get_the_datagram() {
        let dir = std::env::temp_dir().join(format!("notify-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let by_path = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::for_socket(path.as_os_str()).unwrap();
        assert!(n.is_active());
        n.notify("READY=1").unwrap();
        assert_eq!(recv(&by_path), "READY=1");
        n.reloading().unwrap();
        let r = recv(&by_path);
        assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
        assert!(r.rsplit('=').next().unwrap().parse::<u64>().unwrap() > 0);

        let name = format!("notify-test-{}", std::process::id());
        let abs = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let by_name = UnixDatagram::bind_addr(&abs).unwrap();
        let n = Notifier::for_socket(format!("@{name}").as_ref()).unwrap();
        n.notify("STOPPING=1").unwrap();
        assert_eq!(recv(&by_name), "STOPPING=1");

        // Nobody listens there: an error for the caller to log. (Not the
        // socket above, dropped: a child another test spawns at that moment
        // holds a copy of its fd until it execs, and it still gets the
        // datagram.)
        drop(by_path);
        let gone = Notifier::for_socket(dir.join("nobody.sock").as_os_str()).unwrap();
        assert!(gone.notify("READY=1").is_err());
        assert!(Notifier::none().notify("READY=1").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
