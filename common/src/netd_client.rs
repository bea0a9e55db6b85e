//! The client side of the netd protocol: connect, Hello, then OpenTap /
//! OpenVhost / Status. Every TAP fd that arrives is checked
//! (`common::tun::check_tap_queue`, the rule a migration target applies
//! too) before the VMM uses it: netd is trusted to decide, not to be
//! bug-free.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::codec::{self, CodecError};
use crate::netd::{
    NETD_MAX_FRAME, NETD_PROTOCOL_VERSION, NetdErrorKind, NetdRequest, NetdResponse,
};
use crate::tun::{ExpectedTap, TapCheckError, check_tap_queue};

use crate::net_config::NetConfig;

/// How long the client waits for netd at each step.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetdClientError {
    #[error("cannot connect to netd at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("netd refused ({kind:?}): {message}")]
    Refused {
        kind: NetdErrorKind,
        message: String,
    },
    #[error("talking to netd: {0}")]
    Codec(#[from] CodecError),
    #[error("netd answered out of protocol: {0}")]
    Protocol(String),
    #[error("fd from netd is not the TAP asked for: {0}")]
    Tap(#[from] TapCheckError),
    #[error("fd from netd is not a vhost-net device: {0}")]
    Verify(String),
    #[error("NIC {0} is a vhost-user NIC: netd has no TAP for it")]
    NotNetd(String),
}

/// The fds of one TAP, checked: one per queue, plus vhost-net fds if asked.
#[derive(Debug)]
pub struct TapFds {
    pub name: String,
    pub vnet_hdr: bool,
    pub taps: Vec<OwnedFd>,
    pub vhost: Vec<OwnedFd>,
}

/// Checks that an fd is a character device (what /dev/vhost-net is).
fn verify_char_device(fd: &OwnedFd) -> Result<(), NetdClientError> {
    let st =
        nix::sys::stat::fstat(fd).map_err(|e| NetdClientError::Verify(format!("fstat: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFCHR {
        return Err(NetdClientError::Verify(
            "vhost fd is not a character device".to_string(),
        ));
    }
    Ok(())
}

/// One connection to netd, past the Hello.
pub struct NetdClient {
    sock: UnixStream,
}

impl NetdClient {
    /// Connects and exchanges Hello; `timeout` bounds each later exchange
    /// too. While netd answers `Busy` (all its client slots taken), retries
    /// with a growing pause for up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, NetdClientError> {
        let connect_err = |source| NetdClientError::Connect {
            path: path.display().to_string(),
            source,
        };
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let sock = UnixStream::connect(path).map_err(connect_err)?;
            sock.set_read_timeout(Some(timeout))
                .and_then(|()| sock.set_write_timeout(Some(timeout)))
                .map_err(connect_err)?;
            match Self::from_stream(sock) {
                Err(NetdClientError::Refused {
                    kind: NetdErrorKind::Busy,
                    message,
                }) if start.elapsed() + pause < timeout => {
                    log::debug!("netd busy ({message}); retrying in {pause:?}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                // netd may close a refused connection before reading Hello.
                Err(NetdClientError::Codec(CodecError::Closed))
                    if start.elapsed() + pause < timeout =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    /// Exchanges Hello over an already connected socket.
    pub fn from_stream(sock: UnixStream) -> Result<Self, NetdClientError> {
        let mut c = NetdClient { sock };
        let (resp, _) = c.exchange(
            &NetdRequest::Hello {
                version: NETD_PROTOCOL_VERSION,
            },
            0,
        )?;
        match resp {
            NetdResponse::Hello { version } if version == NETD_PROTOCOL_VERSION => Ok(c),
            other => Err(NetdClientError::Protocol(format!(
                "Hello answered with {other:?}"
            ))),
        }
    }

    /// Sends a request and receives the response with at most `max_fds`
    /// fds (more are closed and an error). A refusal becomes `Refused`, and
    /// fds that came with it are closed. netd may refuse a connection before
    /// reading anything (a uid without a tenant entry, no free slot) and
    /// close it: a failed send still reads that answer.
    fn exchange(
        &mut self,
        req: &NetdRequest,
        max_fds: usize,
    ) -> Result<(NetdResponse, Vec<OwnedFd>), NetdClientError> {
        let sent = codec::send(&self.sock, req, &[]);
        let received = codec::recv::<_, NetdResponse>(&self.sock, NETD_MAX_FRAME, max_fds);
        let r = match (sent, received) {
            (_, Ok(r)) => r,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e.into()),
        };
        match r.msg {
            NetdResponse::Error { kind, message } => {
                Err(NetdClientError::Refused { kind, message })
            }
            msg => Ok((msg, r.fds)),
        }
    }

    /// Asks for a TAP (and vhost-net fds) and verifies every TAP fd.
    pub fn open_tap(
        &mut self,
        name: &str,
        queues: u16,
        vnet_hdr: bool,
        vhost: bool,
        mac: Option<[u8; 6]>,
    ) -> Result<TapFds, NetdClientError> {
        let want_fds = usize::from(queues) * if vhost { 2 } else { 1 };
        let (resp, mut fds) = self.exchange(
            &NetdRequest::OpenTap {
                name: name.to_string(),
                queues,
                vnet_hdr,
                vhost,
                mac,
            },
            want_fds,
        )?;
        let NetdResponse::Tap {
            name: got_name,
            queues: got_queues,
            vnet_hdr: got_vnet,
            tap_fds,
            vhost_fds,
        } = resp
        else {
            return Err(NetdClientError::Protocol(format!(
                "OpenTap answered with {resp:?}"
            )));
        };
        let want_vhost = if vhost { queues } else { 0 };
        if got_name != name
            || got_queues != queues
            || got_vnet != vnet_hdr
            || tap_fds != queues
            || vhost_fds != want_vhost
        {
            return Err(NetdClientError::Protocol(format!(
                "asked {name:?} queues={queues} vnet_hdr={vnet_hdr} vhost={vhost}, got {got_name:?} queues={got_queues} vnet_hdr={got_vnet} tap_fds={tap_fds} vhost_fds={vhost_fds}"
            )));
        }
        let total = usize::from(tap_fds) + usize::from(vhost_fds);
        if fds.len() != total {
            return Err(CodecError::FdCount {
                expected: total,
                got: fds.len(),
            }
            .into());
        }
        let vhost_fds = fds.split_off(usize::from(tap_fds));
        let want = ExpectedTap {
            name,
            queues,
            vnet_hdr,
        };
        for fd in &fds {
            check_tap_queue(fd, &want)?;
        }
        for fd in &vhost_fds {
            verify_char_device(fd)?;
        }
        Ok(TapFds {
            name: got_name,
            vnet_hdr,
            taps: fds,
            vhost: vhost_fds,
        })
    }

    /// Asks for `queues` vhost-net fds only (e.g. for a migration target).
    pub fn open_vhost(&mut self, queues: u16) -> Result<Vec<OwnedFd>, NetdClientError> {
        let (resp, fds) = self.exchange(&NetdRequest::OpenVhost { queues }, usize::from(queues))?;
        match resp {
            NetdResponse::Vhost { vhost_fds }
                if vhost_fds == queues && fds.len() == usize::from(queues) =>
            {
                for fd in &fds {
                    verify_char_device(fd)?;
                }
                Ok(fds)
            }
            other => Err(NetdClientError::Protocol(format!(
                "OpenVhost({queues}) answered with {other:?} and {} fds",
                fds.len()
            ))),
        }
    }

    /// netd's status counters (the whole response).
    pub fn status(&mut self) -> Result<NetdResponse, NetdClientError> {
        let (resp, _) = self.exchange(&NetdRequest::Status, 0)?;
        match resp {
            NetdResponse::Status { .. } => Ok(resp),
            other => Err(NetdClientError::Protocol(format!(
                "Status answered with {other:?}"
            ))),
        }
    }
}

fn netd_socket(cfg: &NetConfig) -> Result<&std::path::Path, NetdClientError> {
    cfg.netd_socket()
        .ok_or_else(|| NetdClientError::NotNetd(cfg.id.clone()))
}

/// What `--net` asks for at start-up: the TAP with vnet header (virtio-net
/// always uses one) and vhost-net fds when `vhost=on`.
pub fn open_tap_for(cfg: &NetConfig) -> Result<TapFds, NetdClientError> {
    let mut c = NetdClient::connect(netd_socket(cfg)?, DEFAULT_TIMEOUT)?;
    c.open_tap(&cfg.id, cfg.queues, true, cfg.vhost, cfg.mac)
}

/// vhost-net fds alone, for a migration target that takes the TAP from its
/// source (netd touches no TAP for this).
pub fn open_vhost_for(cfg: &NetConfig) -> Result<Vec<OwnedFd>, NetdClientError> {
    let mut c = NetdClient::connect(netd_socket(cfg)?, DEFAULT_TIMEOUT)?;
    c.open_vhost(cfg.queues)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A scripted stand-in for netd: answers Hello, then each later request
    /// with the next (response, fds) of the script.
    fn fake_netd(script: Vec<(NetdResponse, Vec<std::fs::File>)>) -> UnixStream {
        let (client, server) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _: codec::Received<NetdRequest> = codec::recv(&server, NETD_MAX_FRAME, 0).unwrap();
            codec::send(
                &server,
                &NetdResponse::Hello {
                    version: NETD_PROTOCOL_VERSION,
                },
                &[],
            )
            .unwrap();
            for (resp, files) in script {
                if codec::recv::<_, NetdRequest>(&server, NETD_MAX_FRAME, 0).is_err() {
                    return;
                }
                let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
                let _ = codec::send(&server, &resp, &fds);
            }
        });
        client
    }

    fn tap_resp(name: &str, fds: u16) -> NetdResponse {
        NetdResponse::Tap {
            name: name.into(),
            queues: 1,
            vnet_hdr: true,
            tap_fds: fds,
            vhost_fds: 0,
        }
    }

    #[test]
    fn refusal_carries_kind_and_message() {
        let s = fake_netd(vec![(
            NetdResponse::Error {
                kind: NetdErrorKind::NameInUse,
                message: "taken".into(),
            },
            vec![],
        )]);
        let mut c = NetdClient::from_stream(s).unwrap();
        match c.open_tap("vm0", 1, true, false, None) {
            Err(NetdClientError::Refused {
                kind: NetdErrorKind::NameInUse,
                message,
            }) => {
                assert_eq!(message, "taken")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_fd_that_is_not_the_tap_is_rejected() {
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let s = fake_netd(vec![(tap_resp("vm0", 1), vec![devnull])]);
        let mut c = NetdClient::from_stream(s).unwrap();
        let e = c.open_tap("vm0", 1, true, false, None).unwrap_err();
        assert!(matches!(e, NetdClientError::Tap(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "fd from netd is not the TAP asked for: the fd is character device 1:3, not a /dev/net/tun queue"
        );
    }

    #[test]
    fn mismatched_answers_are_protocol_errors() {
        let devnull = || std::fs::File::open("/dev/null").unwrap();
        let s = fake_netd(vec![
            (tap_resp("vm1", 1), vec![devnull()]),
            (tap_resp("vm0", 1), vec![]),
            (NetdResponse::Vhost { vhost_fds: 1 }, vec![]),
        ]);
        let mut c = NetdClient::from_stream(s).unwrap();
        let e = c.open_tap("vm0", 1, true, false, None).unwrap_err();
        assert!(matches!(e, NetdClientError::Protocol(_)), "{e}");
        let e = c.open_tap("vm0", 1, true, false, None).unwrap_err();
        assert!(
            matches!(e, NetdClientError::Codec(CodecError::FdCount { .. })),
            "{e}"
        );
        let e = c.open_tap("vm0", 1, true, false, None).unwrap_err();
        assert!(matches!(e, NetdClientError::Protocol(_)), "{e}");
    }
}
