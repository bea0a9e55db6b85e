//! The vmm as a vhost-user frontend: the datapath runs in a backend process
//! (e.g. `vhost-user-net`) that maps guest RAM by its memfd (SET_MEM_TABLE)
//! and takes the queues' ioeventfds as kick fds and irqfd-side eventfds as
//! call fds, so frames never pass through the vmm. The virtio-mmio
//! registers stay the vmm's; activation, pause and resume become
//! vhost-user messages here.
//!
//! The connection is [`Link`], shared with the device's relay thread,
//! which watches it: when the backend goes away the link goes down, and
//! the relay reconnects (backing off, never giving up) and hands the rings
//! over again, from each ring's used index in guest memory: what the dead
//! backend completed is there; what it had taken but not completed is
//! offered again (a tx frame may go out twice, as after a NIC reset; no rx
//! buffer is lost).
//!
//! Every message waits at most [`REPLY_TIMEOUT`] for its answer
//! (REPLY_ACK for the set-up messages): a stuck backend costs a lost
//! connection, never a stuck vCPU.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::super::GuestMemory;
use super::backend::{
    BackendKind, BackendState, DatapathError, ExternalDatapath, FrameIo, NetBackend,
    RemoteDatapath, VringSetup, memory_table, ring_pairs,
};
use crate::persist::Format10PartVersion;
use common::api::VhostUserStatus;

/// The longest wait for a backend's answer to one message.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest a whole hand-over (negotiation, memory table, rings) may
/// take before the connection is given up: a backend answering each
/// message just in time must not hold the vCPU thread for a dozen of them.
pub const HAND_OVER_BUDGET: Duration = Duration::from_secs(2);

/// The protocol features the frontend uses when the backend has them: one
/// ring set per queue pair (MQ), and an answer to every set-up message
/// (REPLY_ACK), so a refusal is seen where it happens.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
}

const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user backend at {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("vhost-user {op}: {err}")]
    Message { op: &'static str, err: vhost::Error },
    #[error("the backend serves {have} rings, {want} are needed ({pairs} queue pairs)")]
    TooFewQueues { have: u64, want: u64, pairs: u16 },
    #[error("the backend does not offer VIRTIO_F_VERSION_1 and vhost-user protocol features")]
    TooOld,
    #[error("the backend no longer offers features {missing:#x} the driver uses")]
    LostFeatures { missing: u64 },
    #[error("the fd sent as the vhost-user connection is not a connected AF_UNIX stream socket")]
    NotASocket,
    #[error("the backend took longer than {0:?} to take the rings")]
    TooSlow(Duration),
}

fn msg<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|err| VhostUserError::Message { op, err })
}

/// One ring as the driver set it up, kept for reconnections. vhost-user
/// names ring addresses in the frontend's own address space (the backend
/// translates them through the memory table).
struct Ring {
    size: u16,
    max_size: u16,
    desc_va: u64,
    avail_va: u64,
    used_va: u64,
    /// The used ring's guest address, to read its index.
    used: u64,
    kick: Arc<EventFd>,
    call: Arc<EventFd>,
}

/// What `start` handed over, so a new connection gets the same.
struct Rings {
    mem: GuestMemory,
    acked: u64,
    rings: Vec<Ring>,
}

impl Rings {
    /// Ring `i`'s used index in guest memory: where a backend that takes
    /// the ring over goes on from.
    fn used_idx(&self, i: usize) -> u16 {
        let Some(r) = self.rings.get(i) else { return 0 };
        self.mem
            .read_obj::<u16>(GuestAddress(r.used.wrapping_add(2)))
            .unwrap_or(0)
    }
}

struct Conn {
    frontend: Option<Frontend>,
    /// Bumped with every new connection (see `RemoteDatapath::watch`).
    generation: u64,
    /// The features, protocol and ring count were asked on this connection.
    negotiated: bool,
    /// Rings handed over on this connection.
    started: bool,
    /// The backend answers every set-up message (REPLY_ACK).
    reply_ack: bool,
    /// Queue pairs the driver uses: only their rings are enabled.
    active_pairs: u16,
    rings: Option<Rings>,
}

/// A vhost-user backend's connection: one per NIC, shared by the device
/// (start/stop, from whichever thread activates or pauses it) and its
/// relay thread (watching, reconnecting).
pub struct Link {
    id: String,
    path: PathBuf,
    pairs: u16,
    /// The backend's virtio features, from the first connection: what the
    /// guest was offered. A later backend must still have those acked.
    backend_features: AtomicU64,
    conn: Mutex<Conn>,
    up: AtomicBool,
    connections: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A connected stream with every wait bounded.
fn bounded(stream: &UnixStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connect_stream(&self) -> Result<UnixStream, VhostUserError> {
        let err = |err| VhostUserError::Connect {
            path: self.path.display().to_string(),
            err,
        };
        let s = UnixStream::connect(&self.path).map_err(err)?;
        bounded(&s).map_err(err)?;
        Ok(s)
    }

    /// Features, protocol features and ring count on a new connection;
    /// SET_OWNER unless the connection came from a migration source
    /// (which owned it already).
    /// Returns the backend's features and whether it acks set-up messages.
    fn negotiate(
        &self,
        fe: &mut Frontend,
        set_owner: bool,
        deadline: Instant,
    ) -> Result<(u64, bool), VhostUserError> {
        fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        if set_owner {
            msg("SET_OWNER", fe.set_owner())?;
        }
        let features = msg("GET_FEATURES", fe.get_features())?;
        if features & PROTOCOL_FEATURES == 0
            || features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0
        {
            return Err(VhostUserError::TooOld);
        }
        in_budget(deadline)?;
        let theirs = msg("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
        let proto = theirs & wanted_protocol();
        msg("SET_PROTOCOL_FEATURES", fe.set_protocol_features(proto))?;
        let want = 2 * u64::from(self.pairs);
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let have = msg("GET_QUEUE_NUM", fe.get_queue_num())?;
            if have < want {
                return Err(VhostUserError::TooFewQueues {
                    have,
                    want,
                    pairs: self.pairs,
                });
            }
        } else if self.pairs > 1 {
            return Err(VhostUserError::TooFewQueues {
                have: 2,
                want,
                pairs: self.pairs,
            });
        }
        let reply_ack = proto.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        Ok((features, reply_ack))
    }

    /// Hands the rings to the backend: features, memory table, then per
    /// ring its size, addresses, base, call and kick fds, and enable.
    fn hand_over(
        &self,
        fe: &mut Frontend,
        rings: &Rings,
        bases: &[u16],
        reply_ack: bool,
        active_pairs: u16,
        deadline: Instant,
    ) -> Result<(), VhostUserError> {
        msg(
            "SET_FEATURES",
            fe.set_features(rings.acked | PROTOCOL_FEATURES),
        )?;
        let regions = memory_table(&rings.mem);
        in_budget(deadline)?;
        msg("SET_MEM_TABLE", fe.set_mem_table(&regions))?;
        for (i, r) in rings.rings.iter().enumerate() {
            in_budget(deadline)?;
            let cfg = VringConfigData {
                queue_max_size: r.max_size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: r.desc_va,
                used_ring_addr: r.used_va,
                avail_ring_addr: r.avail_va,
                log_addr: None,
            };
            msg("SET_VRING_NUM", fe.set_vring_num(i, r.size))?;
            msg("SET_VRING_ADDR", fe.set_vring_addr(i, &cfg))?;
            let base = bases.get(i).copied().unwrap_or_else(|| rings.used_idx(i));
            log::debug!(
                "net {}: ring {i} to the backend: base {base}, used {}",
                self.id,
                rings.used_idx(i)
            );
            msg("SET_VRING_BASE", fe.set_vring_base(i, base))?;
            msg("SET_VRING_CALL", fe.set_vring_call(i, &r.call))?;
            msg("SET_VRING_KICK", fe.set_vring_kick(i, &r.kick))?;
        }
        // The crate waits for no answer to SET_VRING_ENABLE: ask none, or
        // the next message would read it.
        let flags = if reply_ack {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        in_budget(deadline)?;
        fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        let enabled = enable_rings(fe, rings.rings.len(), active_pairs);
        fe.set_hdr_flags(flags);
        enabled?;
        // SET_VRING_ENABLE has no answer: one round trip makes sure the
        // backend has enabled the rings before the kicks below, which a
        // ring not yet enabled would swallow (seen: a migrated guest's
        // rings never served again).
        msg("GET_FEATURES", fe.get_features())?;
        // Buffers made available while no backend served the rings.
        for r in &rings.rings {
            let _ = r.kick.write(1);
        }
        Ok(())
    }

    fn record_error(&self, e: &VhostUserError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Drops the connection: the link is down until a reconnect.
    fn drop_conn(&self, c: &mut Conn, why: &VhostUserError) {
        if c.frontend.take().is_some() {
            common::warn_rate_limited!("net {}: vhost-user backend lost: {why}", self.id);
        }
        c.started = false;
        c.negotiated = false;
        self.up.store(false, Ordering::SeqCst);
        self.record_error(why);
    }

    /// Negotiates (once per connection) and hands over the rings.
    fn bring_up(&self, c: &mut Conn, set_owner: bool, bases: &[u16]) -> Result<(), VhostUserError> {
        let Some(mut fe) = c.frontend.clone() else {
            return Ok(());
        };
        let deadline = Instant::now() + HAND_OVER_BUDGET;
        if !c.negotiated {
            let (features, reply_ack) = self.negotiate(&mut fe, set_owner, deadline)?;
            c.reply_ack = reply_ack;
            if let Some(r) = &c.rings {
                let missing = r.acked & !features & !NOT_THE_BACKENDS;
                if missing != 0 {
                    return Err(VhostUserError::LostFeatures { missing });
                }
            }
            // A migrated NIC learns them here (its guest was offered the
            // source's, checked just above).
            let _ = self.backend_features.compare_exchange(
                0,
                features,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            c.negotiated = true;
        }
        if let Some(rings) = &c.rings {
            self.hand_over(&mut fe, rings, bases, c.reply_ack, c.active_pairs, deadline)?;
            c.started = true;
            self.up.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Gives up a hand-over that has run past its budget.
fn in_budget(deadline: Instant) -> Result<(), VhostUserError> {
    if Instant::now() > deadline {
        Err(VhostUserError::TooSlow(HAND_OVER_BUDGET))
    } else {
        Ok(())
    }
}

/// Enables the rings of pairs `0..active` and disables the others (pair 0
/// always on). The crate waits for no answer to SET_VRING_ENABLE: the
/// caller clears NEED_REPLY around this, or the next message would read
/// the answer.
fn enable_rings(fe: &mut Frontend, rings: usize, active: u16) -> Result<(), VhostUserError> {
    for i in 0..rings {
        let on = i / 2 < usize::from(active.max(1));
        msg("SET_VRING_ENABLE", fe.set_vring_enable(i, on))?;
    }
    Ok(())
}

/// Feature bits the vmm's own device serves, whatever the backend offers:
/// the MAC and link status in its config space, the control queue.
const NOT_THE_BACKENDS: u64 = (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_STATUS)
    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ);

impl RemoteDatapath for Link {
    fn watch(&self) -> Option<(u64, RawFd)> {
        let c = self.lock();
        c.frontend.as_ref().map(|f| (c.generation, f.as_raw_fd()))
    }

    fn check(&self) -> bool {
        let mut c = self.lock();
        let Some(fe) = &c.frontend else { return false };
        let mut b = [0u8; 1];
        // SAFETY: a valid socket fd and a 1-byte buffer that outlives the
        // call; MSG_PEEK leaves any byte where it is.
        let n = unsafe {
            libc::recv(
                fe.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let why = match n {
            0 => "the backend closed the connection".to_string(),
            n if n > 0 => "the backend sent a message nobody asked for".to_string(),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return true;
                }
                e.to_string()
            }
        };
        self.drop_conn(
            &mut c,
            &VhostUserError::Connect {
                path: self.path.display().to_string(),
                err: std::io::Error::other(why),
            },
        );
        false
    }

    fn set_active_pairs(&self, n: u16) -> bool {
        let mut c = self.lock();
        c.active_pairs = n;
        let (Some(mut fe), true, Some(rings)) = (
            c.frontend.clone(),
            c.started,
            c.rings.as_ref().map(|r| r.rings.len()),
        ) else {
            // Applied at the next hand-over.
            return true;
        };
        let flags = if c.reply_ack {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        let r = enable_rings(&mut fe, rings, n);
        fe.set_hdr_flags(flags);
        if let Err(e) = r {
            // The next connection gets the pairs with the rings.
            self.drop_conn(&mut c, &e);
        }
        true
    }

    fn reconnect(&self) -> bool {
        let stream = match self.connect_stream() {
            Ok(s) => s,
            Err(e) => {
                log::debug!("net {}: {e}", self.id);
                self.record_error(&e);
                return false;
            }
        };
        let mut c = self.lock();
        c.frontend = Some(Frontend::from_stream(stream, 2 * u64::from(self.pairs)));
        c.generation += 1;
        c.negotiated = false;
        match self.bring_up(&mut c, true, &[]) {
            Ok(()) => {
                self.connections.fetch_add(1, Ordering::SeqCst);
                log::warn!("net {}: vhost-user backend reconnected", self.id);
                true
            }
            Err(e) => {
                self.drop_conn(&mut c, &e);
                false
            }
        }
    }
}

/// A NIC whose datapath is a vhost-user backend.
pub struct VhostUserNet {
    link: Arc<Link>,
    /// The connection came from a migration source: it is owned already.
    inherited: bool,
}

impl VhostUserNet {
    /// Connects to the backend at `path` and negotiates: its features are
    /// what the guest will be offered.
    pub fn connect(id: &str, path: &Path, pairs: u16) -> Result<Self, VhostUserError> {
        let me = Self::new(id, path, pairs, false);
        let stream = me.link.connect_stream()?;
        me.adopt(stream, true)?;
        Ok(me)
    }

    /// The connection a migration source handed over (`fd`), still the
    /// source's until this process resumes the guest: nothing is sent on
    /// it before [`ExternalDatapath::start`]. The backend's features are
    /// asked then (the driver's must still be there). Without `fd` (the
    /// backend was away) the link starts down and `start` connects.
    pub fn inherit(
        id: &str,
        path: &Path,
        pairs: u16,
        fd: Option<OwnedFd>,
    ) -> Result<Self, VhostUserError> {
        let Some(fd) = fd else {
            return Ok(Self::new(id, path, pairs, false));
        };
        let me = Self::new(id, path, pairs, true);
        check_connected_unix_stream(&fd)?;
        let stream = UnixStream::from(fd);
        bounded(&stream).map_err(|err| VhostUserError::Connect {
            path: path.display().to_string(),
            err,
        })?;
        let mut c = me.link.lock();
        c.frontend = Some(Frontend::from_stream(stream, 2 * u64::from(pairs)));
        c.generation += 1;
        drop(c);
        me.link.connections.fetch_add(1, Ordering::SeqCst);
        me.link.up.store(true, Ordering::SeqCst);
        Ok(me)
    }

    fn new(id: &str, path: &Path, pairs: u16, inherited: bool) -> Self {
        VhostUserNet {
            link: Arc::new(Link {
                id: id.to_string(),
                path: path.to_path_buf(),
                pairs,
                backend_features: AtomicU64::new(0),
                conn: Mutex::new(Conn {
                    frontend: None,
                    generation: 0,
                    negotiated: false,
                    started: false,
                    reply_ack: false,
                    active_pairs: 1,
                    rings: None,
                }),
                up: AtomicBool::new(false),
                connections: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
            inherited,
        }
    }

    fn adopt(&self, stream: UnixStream, set_owner: bool) -> Result<(), VhostUserError> {
        let mut fe = Frontend::from_stream(stream, 2 * u64::from(self.link.pairs));
        let deadline = Instant::now() + HAND_OVER_BUDGET;
        let (features, reply_ack) = self.link.negotiate(&mut fe, set_owner, deadline)?;
        self.link.backend_features.store(features, Ordering::SeqCst);
        let mut c = self.link.lock();
        c.frontend = Some(fe);
        c.generation += 1;
        c.negotiated = true;
        c.reply_ack = reply_ack;
        drop(c);
        self.link.connections.fetch_add(1, Ordering::SeqCst);
        self.link.up.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The backend's virtio features (saved with the NIC for a target,
    /// which offers the guest nothing new).
    pub fn backend_features(&self) -> u64 {
        self.link.backend_features.load(Ordering::SeqCst)
    }
}

/// A vhost-user connection handed over by a migration source must be a
/// connected AF_UNIX stream socket.
fn check_connected_unix_stream(fd: &OwnedFd) -> Result<(), VhostUserError> {
    use nix::sys::socket::{SockType, getpeername, getsockopt, sockopt};
    let stream = getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    let unix = getpeername::<nix::sys::socket::UnixAddr>(fd.as_raw_fd()).is_ok();
    if stream && unix {
        Ok(())
    } else {
        Err(VhostUserError::NotASocket)
    }
}

impl NetBackend for VhostUserNet {
    fn state(&self) -> BackendState {
        BackendState {
            format_1_0_version: Format10PartVersion,
            kind: BackendKind::VhostUser,
            ifname: String::new(),
            queue_pairs: self.link.pairs,
            vnet_hdr_len: common::netd::VNET_HDR_LEN as u16,
            offloads: 0,
            tap_fds: Vec::new(),
        }
    }

    fn queue_pairs(&self) -> u16 {
        self.link.pairs
    }

    fn frame_io(&self, _pair: usize) -> Option<Arc<dyn FrameIo>> {
        None
    }

    fn filter_features(&self, offered: u64) -> u64 {
        match self.backend_features() {
            // A migration target before it may talk to the backend: the
            // source's driver features are checked against the backend's
            // when the guest resumes here.
            0 => offered,
            theirs => offered & (theirs | NOT_THE_BACKENDS) & !PROTOCOL_FEATURES,
        }
    }

    fn set_offload(&mut self, _acked_features: u64) -> std::io::Result<()> {
        // The backend applies offloads to its TAP on SET_FEATURES.
        Ok(())
    }

    fn external_datapath(&mut self) -> Option<&mut dyn ExternalDatapath> {
        Some(self)
    }

    fn dup_connection(&self) -> Option<std::io::Result<OwnedFd>> {
        let c = self.link.lock();
        let fe = c.frontend.as_ref()?;
        // SAFETY: the frontend owns this fd and cannot close it while the
        // lock is held; the borrow ends with this statement.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fe.as_raw_fd()) };
        Some(fd.try_clone_to_owned())
    }

    fn link_up(&self) -> bool {
        self.link.up.load(Ordering::SeqCst)
    }

    fn connection_status(&self) -> Option<VhostUserStatus> {
        Some(VhostUserStatus {
            socket: self.link.path.display().to_string(),
            connected: self.link.up.load(Ordering::SeqCst),
            connections: self.link.connections.load(Ordering::SeqCst),
            last_error: self
                .link
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        })
    }
}

impl ExternalDatapath for VhostUserNet {
    fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        rings: &[VringSetup<'_>],
    ) -> Result<(), DatapathError> {
        ring_pairs(rings, usize::from(self.link.pairs))?;
        let bases: Vec<u16> = rings.iter().map(|r| r.queue.next_avail()).collect();
        // The transport checked that each ring lies in guest RAM.
        let va = |gpa: u64| {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|e| DatapathError::Rings(format!("ring at {gpa:#x}: {e}")))
        };
        let kept = Rings {
            mem: mem.clone(),
            acked: acked_features & !NOT_THE_BACKENDS,
            rings: rings
                .iter()
                .map(|r| {
                    Ok(Ring {
                        size: r.queue.size(),
                        max_size: r.queue.max_size(),
                        desc_va: va(r.queue.desc_table())?,
                        avail_va: va(r.queue.avail_ring())?,
                        used_va: va(r.queue.used_ring())?,
                        used: r.queue.used_ring(),
                        kick: r.kick.clone(),
                        call: r.call.clone(),
                    })
                })
                .collect::<Result<_, DatapathError>>()?,
        };
        let link = &self.link;
        let mut c = link.lock();
        c.rings = Some(kept);
        let set_owner = !std::mem::take(&mut self.inherited);
        // A backend that is away or refuses is not the driver's fault: the
        // link stays down and the relay thread reconnects.
        if let Err(e) = link.bring_up(&mut c, set_owner, &bases) {
            link.drop_conn(&mut c, &e);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<Vec<u16>, DatapathError> {
        let link = &self.link;
        let mut c = link.lock();
        let Some(rings) = &c.rings else {
            return Ok(Vec::new());
        };
        let n = rings.rings.len();
        let mut bases = Vec::with_capacity(n);
        if c.started
            && let Some(fe) = c.frontend.clone()
        {
            for i in 0..n {
                match fe.get_vring_base(i) {
                    Ok(b) => bases.push(b as u16),
                    Err(err) => {
                        let e = VhostUserError::Message {
                            op: "GET_VRING_BASE",
                            err,
                        };
                        link.drop_conn(&mut c, &e);
                        bases.clear();
                        break;
                    }
                }
            }
        }
        c.started = false;
        if let (true, Some(rings)) = (bases.is_empty(), &c.rings) {
            // No backend to ask: go on from what it completed.
            bases = (0..n).map(|i| rings.used_idx(i)).collect();
        }
        Ok(bases)
    }

    fn remote(&self) -> Option<Arc<dyn RemoteDatapath>> {
        Some(self.link.clone())
    }
}
