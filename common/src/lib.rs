//! Shared by netd, vmm, vmctl and vhost-user-net: the frame codec and the
//! three protocols carried over it (netd requests, the control API, and the
//! migration stream), the listener every server socket is created and
//! accepted through (and socket activation and readiness notification for a
//! service manager), the TUN/TAP interface with the one check of a TAP queue
//! fd, the `--net netd=` option and the netd client (the vmm and the
//! vhost-user-net backend ask netd for TAPs alike), and rate-limited
//! warnings for failures a peer or a guest can repeat at will.

pub mod activation;
pub mod api;
pub mod codec;
pub mod listener;
pub mod migration;
pub mod net_config;
pub mod netd;
pub mod netd_client;
pub mod notify;
pub mod ownership;
pub mod ratelimit;
pub mod tun;
