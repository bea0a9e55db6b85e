//! The accept loop and the per-client protocol.
//!
//! The peer is identified first (SO_PEERCRED, then the policy's tenant
//! entry) before a byte is read: a peer with no tenant entry gets one short
//! `UnknownTenant` refusal from the accept loop and is disconnected, holding
//! no slot and no thread. A tenant's connection takes a slot ([`Slots`]: a
//! cap per uid, a reserve per tenant) and a thread, has a read timeout and an
//! overall deadline, and sends no fds (any it sends are closed unread and the
//! connection refused). Every request is checked against the policy and
//! audited before the reply; what a peer can cause to be written beyond
//! grants is rate-limited per uid.
//!
//! The policy is an `Arc` swapped whole by a reload (SIGHUP, handled between
//! accepts); each request looks its peer's tenant up in the policy in force
//! then, so a removed tenant gets nothing more. Slots and TAP counts are
//! keyed by the tenant's `who`, not its position, so they survive a reload.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use common::codec::{self, CodecError};
use common::listener::{ConnLimits, Connection, Listener, PeerCred};
use common::netd::{
    NETD_MAX_FRAME, NETD_PROTOCOL_VERSION, NetdErrorKind, NetdRequest, NetdResponse,
};
use common::notify::Notifier;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::audit::{AuditLog, Peer, bounded, truncate};
use crate::iface::{self, IfaceError};
use crate::policy::{Attach, Cidr, Policy, Tenant, Who, valid_ifname};
use crate::slots::{SlotRefusal, Slots};
use crate::taps::TapLedger;

/// Longest refusal message sent or logged, in bytes.
const MAX_MESSAGE: usize = 320;
/// Bytes of a decoder error quoted back (it may echo client text).
const MAX_DECODE_DETAIL: usize = 120;

pub struct Limits {
    /// Longest wait for the next part of a frame.
    pub read_timeout: Duration,
    /// Longest a connection may stay open at all.
    pub client_deadline: Duration,
    /// Most clients served at once; more are answered `Busy` and closed.
    pub max_clients: usize,
    /// Most clients of one uid served at once, so that one uid cannot
    /// take every slot.
    pub max_clients_per_uid: usize,
    /// Slots kept for each tenant that others cannot take.
    pub tenant_reserve: usize,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    granted: AtomicU64,
    refused: AtomicU64,
}

pub struct Server {
    /// Swapped whole by a reload; a request works on one snapshot.
    policy: RwLock<Arc<Policy>>,
    policy_path: PathBuf,
    audit: AuditLog,
    limits: Limits,
    counters: Counters,
    slots: Mutex<Slots<Who>>,
    taps: TapLedger<Who>,
    /// Open tenant connections, to shut them down when netd stops.
    streams: Mutex<HashMap<u64, Arc<UnixStream>>>,
}

/// What a request earns: a response, the fds that go with it, and the result
/// part of the audit line.
struct Outcome {
    response: NetdResponse,
    fds: Vec<File>,
    audit: String,
}

impl Outcome {
    /// A refusal; `iface` is the client's name as sent (bounded here), the
    /// message netd's own text.
    fn refuse(kind: NetdErrorKind, iface: Option<&str>, message: String) -> Self {
        let message = truncate(&message, MAX_MESSAGE).to_string();
        let iface = iface
            .map(|n| format!(" iface={}", bounded(n)))
            .unwrap_or_default();
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

fn peer_of(c: PeerCred) -> Peer {
    Peer {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    }
}

/// A request as the audit log shows it: every client string bounded.
fn describe(req: &NetdRequest) -> String {
    match req {
        NetdRequest::Hello { version } => format!("Hello {{ version: {version} }}"),
        NetdRequest::Status => "Status".to_string(),
        NetdRequest::OpenVhost { queues } => format!("OpenVhost {{ queues: {queues} }}"),
        NetdRequest::OpenTap {
            name,
            queues,
            vnet_hdr,
            vhost,
            mac,
        } => format!(
            "OpenTap {{ name: {}, queues: {queues}, vnet_hdr: {vnet_hdr}, vhost: {vhost}, mac: {mac:?} }}",
            bounded(name)
        ),
    }
}

impl Server {
    pub fn new(policy: Policy, policy_path: PathBuf, audit: AuditLog, limits: Limits) -> Self {
        Server {
            slots: Mutex::new(Slots::new(
                limits.max_clients,
                limits.max_clients_per_uid,
                limits.tenant_reserve,
                policy.tenants.iter().map(|t| t.who),
            )),
            taps: TapLedger::new(),
            policy: RwLock::new(Arc::new(policy)),
            policy_path,
            audit,
            limits,
            counters: Counters::default(),
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn policy(&self) -> Arc<Policy> {
        // Only ever replaced whole, so a poisoned lock still holds a policy.
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Loads the policy file again and puts it in force if it validates;
    /// otherwise the old one stays. Both outcomes are audit lines.
    pub fn reload(&self) {
        let path = self.policy_path.display().to_string();
        let line = match Policy::load(&self.policy_path) {
            Ok(p) => {
                let n = p.tenants.len();
                self.slots().set_tenants(p.tenants.iter().map(|t| t.who));
                *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
                log::info!("policy reloaded from {path}");
                format!("event=reload policy={path:?} result=applied tenants={n}")
            }
            Err(e) => {
                let why = e.to_string().replace('\n', "; ");
                log::warn!("policy reload refused, the old policy stays: {why}");
                format!(
                    "event=reload policy={path:?} result=refused old_policy=kept reason={why:?}"
                )
            }
        };
        if let Err(e) = self.audit.record_event(&line) {
            log::error!("audit log: {e}");
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots<Who>> {
        // Slots stay consistent under every operation done while locked.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<u64, Arc<UnixStream>>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves until `stop` becomes true; reloads the policy whenever
    /// `reload` was set (SIGHUP), between accepts. Tells the service
    /// manager (`notify`) when it is ready, reloading, and stopping.
    pub fn run(
        self: &Arc<Self>,
        listener: Listener,
        stop: &AtomicBool,
        reload: &AtomicBool,
        notify: &Notifier,
    ) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let tell = |state: &str| {
            if let Err(e) = notify.notify(state) {
                log::warn!("{e}");
            }
        };
        tell("READY=1");
        let mut next_id = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if reload.swap(false, Ordering::SeqCst) {
                if let Err(e) = notify.reloading() {
                    log::warn!("{e}");
                }
                self.reload();
                tell("READY=1");
            }
            if let Err(e) = self.audit.flush_summaries() {
                log::error!("audit log: {e}");
            }
            let mut pfd = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::from(200u16)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            let (stream, cred) = match listener.accept() {
                Ok(c) => c,
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
            self.admit(next_id, stream, peer_of(cred));
        }
        tell("STOPPING=1");
        for s in self.streams().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    /// Decides what a new connection gets: strangers a refusal, tenants a
    /// slot and a thread (or `Busy`).
    fn admit(self: &Arc<Self>, id: u64, stream: UnixStream, peer: Peer) {
        let Some(tenant) = self.policy().tenant_for(peer.uid, peer.gid).map(|t| t.who) else {
            let out = Outcome::refuse(
                NetdErrorKind::UnknownTenant,
                None,
                format!(
                    "uid {} / gid {} has no tenant entry in the netd policy; ask the operator to add one",
                    peer.uid, peer.gid
                ),
            );
            self.refuse_at_accept(stream, &peer, out);
            return;
        };
        if let Err(r) = self.slots().take(tenant, peer.uid) {
            let message = match r {
                SlotRefusal::UidCap(n) => format!(
                    "uid {} already has the maximum of {n} connections to netd; retry shortly",
                    peer.uid
                ),
                SlotRefusal::Full(n) => format!(
                    "netd has no free client slot for this tenant (maximum of {n} clients, some kept for other tenants); retry shortly"
                ),
            };
            self.refuse_at_accept(
                stream,
                &peer,
                Outcome::refuse(NetdErrorKind::Busy, None, message),
            );
            return;
        }
        let limits = ConnLimits {
            io_timeout: self.limits.read_timeout,
            lifetime: self.limits.client_deadline,
        };
        let stream = Arc::new(stream);
        let conn = match stream
            .try_clone()
            .and_then(|s| Connection::new(s, cred_of(&peer), limits))
        {
            Ok(c) => c,
            Err(e) => {
                log::warn!("cannot set up a client connection: {e}");
                self.slots().release(tenant, peer.uid);
                return;
            }
        };
        self.streams().insert(id, Arc::clone(&stream));
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("client-{id}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                me.serve_client(&conn, &peer);
                me.streams().remove(&id);
                me.slots().release(tenant, peer.uid);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a client thread: {e}");
            self.streams().remove(&id);
            self.slots().release(tenant, peer.uid);
        }
    }

    /// One refusal from the accept loop, never blocking on the peer, then
    /// the connection closes (with whatever the peer sent, unread).
    fn refuse_at_accept(&self, stream: UnixStream, peer: &Peer, out: Outcome) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::debug!("set_nonblocking: {e}");
            return;
        }
        self.finish(&stream, peer, "<connection>", out);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }

    fn serve_client(&self, conn: &Connection, peer: &Peer) {
        let stream = &conn.stream;
        let mut hello_done = false;
        loop {
            let payload = match conn.recv_frame(NETD_MAX_FRAME, 0) {
                Ok((payload, _no_fds)) => payload,
                Err(CodecError::Closed) => return,
                Err(e @ (CodecError::TooManyFds { .. } | CodecError::FdsTruncated)) => {
                    // Already closed by the codec; say so and hang up.
                    let out = Outcome::refuse(
                        NetdErrorKind::InvalidRequest,
                        None,
                        format!("{e}: requests carry no file descriptors, they were closed unread"),
                    );
                    self.finish(stream, peer, "<frame with fds>", out);
                    return;
                }
                Err(e) => {
                    let reason = match e {
                        CodecError::Timeout => "client too slow (read timeout)".to_string(),
                        CodecError::Deadline => "client too slow (connection deadline)".to_string(),
                        e => e.to_string(),
                    };
                    self.audit_close(peer, &reason);
                    return;
                }
            };
            let req: NetdRequest = match codec::decode(&payload) {
                Ok(r) => r,
                Err(CodecError::Unexpected(detail)) => {
                    let out = Outcome::refuse(
                        NetdErrorKind::InvalidRequest,
                        None,
                        format!(
                            "not a request of netd protocol version {NETD_PROTOCOL_VERSION}: {}",
                            truncate(&detail, MAX_DECODE_DETAIL)
                        ),
                    );
                    let shown = bounded(&String::from_utf8_lossy(&payload));
                    // Before Hello nothing but Hello is acceptable.
                    if !self.finish(stream, peer, &shown, out) || !hello_done {
                        return;
                    }
                    continue;
                }
                Err(CodecError::NotUtf8) => {
                    self.audit_close(peer, "frame is not UTF-8");
                    return;
                }
                Err(e) => {
                    let e = e.to_string();
                    self.audit_close(
                        peer,
                        &format!("malformed frame: {}", truncate(&e, MAX_DECODE_DETAIL)),
                    );
                    return;
                }
            };
            let shown = describe(&req);
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
        if let Err(e) = self.audit.record_limited(
            peer,
            "<malformed>",
            &format!("result=closed reason={reason:?}"),
        ) {
            log::error!("audit log: {e}");
        }
    }

    /// Audits, counts and sends an outcome; netd's copies of the fds close
    /// when `out` drops here. A grant is always audited (or becomes a
    /// refusal); refusals are audited within the peer's budget. Returns
    /// whether the connection is still usable.
    fn finish(&self, stream: &UnixStream, peer: &Peer, request: &str, mut out: Outcome) -> bool {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let audited = if out.granted() {
            self.audit.record(peer, request, &out.audit)
        } else {
            self.audit
                .record_limited(peer, request, &out.audit)
                .map(|_| ())
        };
        if let Err(e) = audited {
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
        // The tenant is looked up in the policy in force now: a tenant a
        // reload removed gets nothing more on a connection it already has.
        let policy = self.policy();
        let Some(tenant) = policy.tenant_for(peer.uid, peer.gid) else {
            return Outcome::refuse(
                NetdErrorKind::UnknownTenant,
                None,
                format!(
                    "uid {} / gid {} no longer has a tenant entry in the netd policy (removed by a reload)",
                    peer.uid, peer.gid
                ),
            );
        };
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
                        clients: self.slots().in_use() as u64,
                    },
                    fds: Vec::new(),
                    audit: "result=granted".to_string(),
                }
            }
            NetdRequest::OpenVhost { queues } => self.open_vhost(*queues, tenant),
            NetdRequest::OpenTap {
                name,
                queues,
                vnet_hdr,
                vhost,
                mac,
            } => self.open_tap(
                TapAsk {
                    name,
                    queues: *queues,
                    vnet_hdr: *vnet_hdr,
                    vhost: *vhost,
                    mac: *mac,
                },
                peer,
                &policy,
                tenant,
            ),
        }
    }

    /// The tenant's checks shared by OpenTap and OpenVhost.
    fn check_queues_vhost(
        t: &Tenant,
        queues: u16,
        vhost: bool,
        iface: Option<&str>,
    ) -> Result<(), Outcome> {
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
        Ok(())
    }

    fn open_vhost(&self, queues: u16, tenant: &Tenant) -> Outcome {
        if let Err(out) = Self::check_queues_vhost(tenant, queues, true, None) {
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

    fn open_tap(&self, ask: TapAsk<'_>, peer: &Peer, policy: &Policy, tenant: &Tenant) -> Outcome {
        let TapAsk {
            name,
            queues,
            vnet_hdr,
            vhost,
            mac,
        } = ask;
        if !valid_ifname(name) {
            return Outcome::refuse(
                NetdErrorKind::InvalidRequest,
                Some(name),
                "the name is not an interface name: use 1..15 characters of [A-Za-z0-9._-]"
                    .to_string(),
            );
        }
        // From here on `name` is 1..15 safe characters.
        let iface_name = Some(name);
        if let Err(out) = Self::check_queues_vhost(tenant, queues, vhost, iface_name) {
            return out;
        }
        if !tenant.names.allows(name) || policy.is_bridge(name) {
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
        let reservation = match self.taps.reserve(tenant.who, tenant.max_taps) {
            Ok(r) => r,
            Err(have) => {
                log::debug!("uid {} is at its TAP limit ({have})", peer.uid);
                return Outcome::refuse(
                    NetdErrorKind::TooManyTaps,
                    iface_name,
                    format!(
                        "this tenant has {have} TAPs, the most its policy allows (max_taps {}); end a VM (close its TAP fds) first",
                        tenant.max_taps
                    ),
                );
            }
        };
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
        match iface::index_of(name) {
            Ok(index) => reservation.commit(index),
            Err(e) => return refuse_iface(e, iface_name),
        }
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

/// The fields of an OpenTap request.
struct TapAsk<'a> {
    name: &'a str,
    queues: u16,
    vnet_hdr: bool,
    vhost: bool,
    mac: Option<[u8; 6]>,
}

fn cred_of(p: &Peer) -> PeerCred {
    PeerCred {
        pid: p.pid,
        uid: p.uid,
        gid: p.gid,
    }
}

fn refuse_iface(e: IfaceError, iface: Option<&str>) -> Outcome {
    let kind = match &e {
        IfaceError::Exists(_) => NetdErrorKind::NameInUse,
        IfaceError::VhostUnavailable(_) => NetdErrorKind::VhostUnavailable,
        IfaceError::Sys { .. } | IfaceError::Vhost(_) | IfaceError::Check { .. } => {
            NetdErrorKind::System
        }
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
