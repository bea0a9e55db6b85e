//! The accept loop and the per-client protocol: a thread per client (capped),
//! a read timeout per frame and an overall deadline per connection, every
//! request checked against the policy and audited before the reply.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::codec::{self, CodecError};
use common::netd::{
    NETD_MAX_FRAME, NETD_PROTOCOL_VERSION, NetdErrorKind, NetdRequest, NetdResponse,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::audit::{AuditLog, Peer};
use crate::iface::{self, IfaceError};
use crate::policy::{Attach, Cidr, Policy, valid_ifname};

pub struct Limits {
    /// Longest wait for the next part of a frame.
    pub read_timeout: Duration,
    /// Longest a connection may stay open at all.
    pub client_deadline: Duration,
    /// Most clients served at once; more are answered `Busy` and closed.
    pub max_clients: usize,
    /// Most clients of one uid served at once, so that one tenant cannot
    /// take every slot.
    pub max_clients_per_uid: usize,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    granted: AtomicU64,
    refused: AtomicU64,
}

struct Client {
    uid: u32,
    deadline: Instant,
    stream: Arc<UnixStream>,
}

pub struct Server {
    policy: Policy,
    audit: AuditLog,
    limits: Limits,
    counters: Counters,
    clients: Mutex<HashMap<u64, Client>>,
}

/// What a request earns: a response, the fds that go with it, and the result
/// part of the audit line.
struct Outcome {
    response: NetdResponse,
    fds: Vec<File>,
    audit: String,
}

impl Outcome {
    fn refuse(kind: NetdErrorKind, iface: Option<&str>, message: String) -> Self {
        let iface = iface.map(|n| format!(" iface={n:?}")).unwrap_or_default();
        Outcome {
            audit: format!("result=refused kind={kind:?}{iface} message={message:?}"),
            response: NetdResponse::Error { kind, message },
            fds: Vec::new(),
        }
    }

    fn granted(&self) -> bool {
        !matches!(self.response, NetdResponse::Error { .. })
    }
}

impl Server {
    pub fn new(policy: Policy, audit: AuditLog, limits: Limits) -> Self {
        Server {
            policy,
            audit,
            limits,
            counters: Counters::default(),
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Client>> {
        // The map stays consistent under every operation done while locked.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves until `stop` becomes true.
    pub fn run(self: &Arc<Self>, listener: UnixListener, stop: &AtomicBool) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut next_id = 0u64;
        while !stop.load(Ordering::SeqCst) {
            self.reap_overdue();
            let mut pfd = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::from(200u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    log::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            next_id += 1;
            self.admit(next_id, stream);
        }
        for c in self.clients().values() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    fn admit(self: &Arc<Self>, id: u64, stream: UnixStream) {
        let peer = match peer_of(&stream) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("SO_PEERCRED: {e}; dropping the connection");
                return;
            }
        };
        let stream = Arc::new(stream);
        {
            let mut clients = self.clients();
            let of_uid = clients.values().filter(|c| c.uid == peer.uid).count();
            let full = if clients.len() >= self.limits.max_clients {
                Some(format!(
                    "netd is serving its maximum of {} clients; retry shortly",
                    self.limits.max_clients
                ))
            } else if of_uid >= self.limits.max_clients_per_uid {
                Some(format!(
                    "uid {} already has the maximum of {} connections to netd; retry shortly",
                    peer.uid, self.limits.max_clients_per_uid
                ))
            } else {
                None
            };
            if let Some(message) = full {
                drop(clients);
                let out = Outcome::refuse(NetdErrorKind::Busy, None, message);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                self.finish(&stream, &peer, "<connection>", out);
                return;
            }
            clients.insert(
                id,
                Client {
                    uid: peer.uid,
                    deadline: Instant::now() + self.limits.client_deadline,
                    stream: Arc::clone(&stream),
                },
            );
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("client-{id}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                me.serve_client(&stream, &peer);
                me.clients().remove(&id);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a client thread: {e}");
            self.clients().remove(&id);
        }
    }

    /// Cuts connections that outlived their deadline: their threads then see
    /// EOF and end, however slowly the peer was trickling bytes.
    fn reap_overdue(&self) {
        let now = Instant::now();
        for c in self.clients().values() {
            if c.deadline <= now {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn serve_client(&self, stream: &UnixStream, peer: &Peer) {
        if let Err(e) = stream
            .set_read_timeout(Some(self.limits.read_timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.limits.read_timeout)))
        {
            log::warn!("socket timeouts: {e}");
            return;
        }
        let mut hello_done = false;
        loop {
            let (payload, stray_fds) = match codec::recv_frame(stream.as_fd(), NETD_MAX_FRAME) {
                Ok(f) => f,
                Err(CodecError::Closed) => return,
                Err(e) => {
                    let reason = match e {
                        CodecError::Timeout => "client too slow (read timeout)".to_string(),
                        e => e.to_string(),
                    };
                    self.audit_close(peer, &reason);
                    return;
                }
            };
            // Clients have no reason to send fds; close them unread.
            drop(stray_fds);
            let Ok(text) = std::str::from_utf8(&payload) else {
                self.audit_close(peer, "frame is not UTF-8");
                return;
            };
            let req: NetdRequest = match ron::from_str(text) {
                Ok(r) => r,
                Err(e) if is_unknown_request(&e.code) => {
                    let out = Outcome::refuse(
                        NetdErrorKind::InvalidRequest,
                        None,
                        format!(
                            "unknown or malformed request ({e}); netd speaks protocol version {NETD_PROTOCOL_VERSION}"
                        ),
                    );
                    let shown = format!("{:?}", truncate(text, 200));
                    // Before Hello nothing but Hello is acceptable.
                    if !self.finish(stream, peer, &shown, out) || !hello_done {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    self.audit_close(peer, &format!("malformed frame: {e}"));
                    return;
                }
            };
            let shown = format!("{req:?}");
            let (out, keep_going) = if hello_done {
                (self.handle(&req, peer), true)
            } else {
                match req {
                    NetdRequest::Hello { version } if version == NETD_PROTOCOL_VERSION => {
                        hello_done = true;
                        (
                            Outcome {
                                response: NetdResponse::Hello {
                                    version: NETD_PROTOCOL_VERSION,
                                },
                                fds: Vec::new(),
                                audit: "result=granted".to_string(),
                            },
                            true,
                        )
                    }
                    NetdRequest::Hello { version } => (
                        Outcome::refuse(
                            NetdErrorKind::Version,
                            None,
                            format!(
                                "protocol version {version} is not supported; this netd speaks version {NETD_PROTOCOL_VERSION}: upgrade the client or netd"
                            ),
                        ),
                        false,
                    ),
                    _ => (
                        Outcome::refuse(
                            NetdErrorKind::Version,
                            None,
                            format!(
                                "the first request must be Hello {{ version: {NETD_PROTOCOL_VERSION} }}"
                            ),
                        ),
                        false,
                    ),
                }
            };
            if !self.finish(stream, peer, &shown, out) || !keep_going {
                return;
            }
        }
    }

    fn audit_close(&self, peer: &Peer, reason: &str) {
        log::debug!("closing connection of pid {}: {reason}", peer.pid);
        if let Err(e) = self.audit.record(
            peer,
            "<malformed>",
            &format!("result=closed reason={reason:?}"),
        ) {
            log::error!("audit log: {e}");
        }
    }

    /// Audits, counts and sends an outcome; netd's copies of the fds close
    /// when `out` drops here. Returns whether the connection is still usable.
    fn finish(&self, stream: &UnixStream, peer: &Peer, request: &str, mut out: Outcome) -> bool {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.audit.record(peer, request, &out.audit) {
            // No unaudited grant: refuse instead (the fds close on drop).
            log::error!("audit log: {e}");
            out = Outcome::refuse(
                NetdErrorKind::System,
                None,
                format!("netd cannot write its audit log ({e}); ask the operator"),
            );
        }
        if out.granted() {
            self.counters.granted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
        }
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(|f| f.as_fd()).collect();
        match codec::send(stream, &out.response, &fds) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("reply to pid {}: {e}", peer.pid);
                false
            }
        }
    }

    fn handle(&self, req: &NetdRequest, peer: &Peer) -> Outcome {
        match req {
            NetdRequest::Hello { .. } => Outcome::refuse(
                NetdErrorKind::InvalidRequest,
                None,
                "Hello was already exchanged on this connection".to_string(),
            ),
            NetdRequest::Status => {
                let c = &self.counters;
                Outcome {
                    response: NetdResponse::Status {
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        requests: c.requests.load(Ordering::Relaxed),
                        granted: c.granted.load(Ordering::Relaxed),
                        refused: c.refused.load(Ordering::Relaxed),
                        clients: self.clients().len() as u64,
                    },
                    fds: Vec::new(),
                    audit: "result=granted".to_string(),
                }
            }
            NetdRequest::OpenVhost { queues } => self.open_vhost(*queues, peer),
            NetdRequest::OpenTap {
                name,
                queues,
                vnet_hdr,
                vhost,
                mac,
            } => self.open_tap(name, *queues, *vnet_hdr, *vhost, *mac, peer),
        }
    }

    /// The tenant's checks shared by OpenTap and OpenVhost.
    fn check_queues_vhost(
        &self,
        peer: &Peer,
        queues: u16,
        vhost: bool,
        iface: Option<&str>,
    ) -> Result<&crate::policy::Tenant, Outcome> {
        let Some(t) = self.policy.tenant_for(peer.uid, peer.gid) else {
            return Err(Outcome::refuse(
                NetdErrorKind::UnknownTenant,
                iface,
                format!(
                    "uid {} / gid {} has no tenant entry in the netd policy; ask the operator to add one",
                    peer.uid, peer.gid
                ),
            ));
        };
        if queues == 0 {
            return Err(Outcome::refuse(
                NetdErrorKind::InvalidRequest,
                iface,
                "queues must be at least 1".to_string(),
            ));
        }
        if queues > t.max_queues {
            return Err(Outcome::refuse(
                NetdErrorKind::TooManyQueues,
                iface,
                format!(
                    "{queues} queues asked, the policy allows this tenant at most {}",
                    t.max_queues
                ),
            ));
        }
        if vhost && !t.vhost {
            return Err(Outcome::refuse(
                NetdErrorKind::VhostNotAllowed,
                iface,
                "the policy does not allow this tenant vhost-net; ask with vhost off".to_string(),
            ));
        }
        Ok(t)
    }

    fn open_vhost(&self, queues: u16, peer: &Peer) -> Outcome {
        if let Err(out) = self.check_queues_vhost(peer, queues, true, None) {
            return out;
        }
        match iface::open_vhost(queues) {
            Ok(fds) => Outcome {
                response: NetdResponse::Vhost { vhost_fds: queues },
                audit: format!("result=granted vhost_fds={queues}"),
                fds,
            },
            Err(e) => refuse_iface(e, None),
        }
    }

    fn open_tap(
        &self,
        name: &str,
        queues: u16,
        vnet_hdr: bool,
        vhost: bool,
        mac: Option<[u8; 6]>,
        peer: &Peer,
    ) -> Outcome {
        if !valid_ifname(name) {
            return Outcome::refuse(
                NetdErrorKind::InvalidRequest,
                Some(name),
                format!(
                    "{name:?} is not an interface name: use 1..15 characters of [A-Za-z0-9._-]"
                ),
            );
        }
        let iface_name = Some(name);
        let tenant = match self.check_queues_vhost(peer, queues, vhost, iface_name) {
            Ok(t) => t,
            Err(out) => return out,
        };
        if !tenant.names.allows(name) || self.policy.is_bridge(name) {
            return Outcome::refuse(
                NetdErrorKind::NameNotAllowed,
                iface_name,
                format!(
                    "{name:?} is outside this tenant's policy, which allows {}",
                    tenant.names.describe()
                ),
            );
        }
        if let Some(m) = mac
            && (m[0] & 1 == 1 || m == [0; 6])
        {
            return Outcome::refuse(
                NetdErrorKind::InvalidRequest,
                iface_name,
                "the MAC address must be a unicast, non-zero address".to_string(),
            );
        }
        // vhost first: a refusal then creates no interface at all.
        let vhost_fds = if vhost {
            match iface::open_vhost(queues) {
                Ok(v) => v,
                Err(e) => return refuse_iface(e, iface_name),
            }
        } else {
            Vec::new()
        };
        let taps = match iface::create_tap(name, queues, vnet_hdr) {
            Ok(t) => t,
            Err(e) => return refuse_iface(e, iface_name),
        };
        // On any error below, `taps` drops and the TAP disappears with it.
        let attached = match &tenant.attach {
            Attach::Bridge(b) => iface::bridge_add_port(b, name).map(|()| format!("bridge={b:?}")),
            Attach::Routed(a) => match Cidr::parse(a) {
                Ok(c) => iface::set_address(name, c).map(|()| format!("address={a:?}")),
                Err(e) => {
                    return Outcome::refuse(NetdErrorKind::System, iface_name, e);
                }
            },
        }
        .and_then(|a| iface::link_up(name).map(|()| a));
        let attached = match attached {
            Ok(a) => a,
            Err(e) => return refuse_iface(e, iface_name),
        };
        let n_vhost = vhost_fds.len() as u16;
        let mut fds = taps;
        fds.extend(vhost_fds);
        Outcome {
            response: NetdResponse::Tap {
                name: name.to_string(),
                queues,
                vnet_hdr,
                tap_fds: queues,
                vhost_fds: n_vhost,
            },
            audit: format!(
                "result=granted iface={name:?} queues={queues} vnet_hdr={vnet_hdr} vhost_fds={n_vhost} {attached}"
            ),
            fds,
        }
    }
}

fn refuse_iface(e: IfaceError, iface: Option<&str>) -> Outcome {
    let kind = match &e {
        IfaceError::Exists(_) => NetdErrorKind::NameInUse,
        IfaceError::VhostUnavailable(_) => NetdErrorKind::VhostUnavailable,
        IfaceError::Sys { .. } | IfaceError::Vhost(_) => NetdErrorKind::System,
    };
    let hint = match kind {
        NetdErrorKind::NameInUse => {
            "; choose another name (a TAP disappears when its last fd closes)"
        }
        NetdErrorKind::VhostUnavailable => "; ask with vhost off",
        _ => "",
    };
    Outcome::refuse(kind, iface, format!("{e}{hint}"))
}

/// A decode error of well-formed RON that is not a request this netd knows
/// (a newer client's request, a missing field): worth a refusal rather than a
/// closed connection.
fn is_unknown_request(code: &ron::Error) -> bool {
    matches!(
        code,
        ron::Error::NoSuchEnumVariant { .. }
            | ron::Error::NoSuchStructField { .. }
            | ron::Error::MissingStructField { .. }
            | ron::Error::DuplicateStructField { .. }
            | ron::Error::InvalidValueForType { .. }
            | ron::Error::IntegerOutOfBounds
    )
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn peer_of(stream: &UnixStream) -> nix::Result<Peer> {
    let c = getsockopt(stream, PeerCredentials)?;
    Ok(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}
