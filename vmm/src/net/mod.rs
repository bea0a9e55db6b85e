//! Networking of the VMM: the `--net` option and the client that gets TAP and
//! vhost-net fds from the privileged netd.

pub mod attach;
pub mod config;
pub mod netd_client;
