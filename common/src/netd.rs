//! The netd protocol: an unprivileged client asks the privileged broker for
//! TAP and vhost-net fds. Who the client is comes from SO_PEERCRED on the
//! server side, never from the messages.
//!
//! The first frame must be [`NetdRequest::Hello`] with [`NETD_PROTOCOL_VERSION`]
//! (anything else, or another version, is refused with `Version` and the
//! connection closed). fds come back beside the response frame, in the order
//! the response lists; a client sends none (a request carrying fds is
//! refused and the fds closed unread). Every refusal is a
//! [`NetdResponse::Error`] with a kind and a message a person can act on,
//! bounded in size: also well-formed RON that is not a request (wrong type,
//! unknown variant, unknown or missing field). A frame that is not RON at
//! all, or over [`NETD_MAX_FRAME`], closes the connection without a reply.
//!
//! netd decides who the peer is before reading anything: a uid/gid with no
//! tenant entry gets one `UnknownTenant` error right after connecting and is
//! disconnected, whatever it sends.

use serde::{Deserialize, Serialize};

pub const NETD_PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side of the netd protocol sends; anything bigger is
/// malformed and closes the connection.
pub const NETD_MAX_FRAME: usize = 4096;

/// Length of the virtio-net header netd sets on a TAP opened with `vnet_hdr`
/// (TUNSETVNETHDRSZ): `virtio_net_hdr_v1`, as virtio 1.0 devices use.
pub const VNET_HDR_LEN: i32 = 12;

/// Unknown fields are refused (`InvalidRequest`), never ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum NetdRequest {
    Hello {
        version: u32,
    },
    /// One TAP fd per queue (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR when asked,
    /// IFF_MULTI_QUEUE when queues > 1), plus one vhost-net fd per queue when
    /// `vhost` is asked for and allowed.
    OpenTap {
        name: String,
        queues: u16,
        vnet_hdr: bool,
        vhost: bool,
        mac: Option<[u8; 6]>,
    },
    /// vhost-net fds only; touches no TAP. For a migration target, which needs
    /// vhost devices owned by its own process.
    OpenVhost {
        queues: u16,
    },
    /// For operators: netd's version and counters.
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetdErrorKind {
    /// The client speaks another protocol version.
    Version,
    /// The request was not understood or is inconsistent (e.g. queues = 0).
    InvalidRequest,
    /// The client's uid/gid has no entry in the policy.
    UnknownTenant,
    /// The interface name is outside what the policy allows the tenant.
    NameNotAllowed,
    /// More queues than the policy allows the tenant.
    TooManyQueues,
    /// vhost asked for but not allowed to the tenant.
    VhostNotAllowed,
    /// vhost allowed but the host has no /dev/vhost-net.
    VhostUnavailable,
    /// An interface of that name already exists.
    NameInUse,
    /// The kernel refused a step (the message says which).
    System,
    /// netd serves its maximum number of clients; try again shortly.
    Busy,
    /// The tenant already has its policy's `max_taps` TAPs; one must go
    /// (its last fd closed) before another is created.
    TooManyTaps,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetdResponse {
    Hello {
        version: u32,
    },
    /// `tap_fds` TAP fds followed by `vhost_fds` vhost-net fds are attached.
    Tap {
        name: String,
        queues: u16,
        vnet_hdr: bool,
        tap_fds: u16,
        vhost_fds: u16,
    },
    /// `vhost_fds` vhost-net fds are attached.
    Vhost {
        vhost_fds: u16,
    },
    Status {
        version: String,
        requests: u64,
        granted: u64,
        refused: u64,
        clients: u64,
    },
    Error {
        kind: NetdErrorKind,
        message: String,
    },
}
