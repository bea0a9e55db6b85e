//! Networking of the VMM: the `--net` option and the client that gets TAP and
//! vhost-net fds from the privileged netd (both in `common`, shared with the
//! vhost-user-net backend), and attaching NICs.

pub mod attach;
pub use common::net_config as config;
pub use common::netd_client;
