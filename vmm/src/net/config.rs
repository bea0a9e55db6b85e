//! The `--net` option's value, parsed with the rest of the command line
//! (the `cli` crate): `netd=SOCK,id=ID[,mac=MAC][,queues=N][,vhost=on|off][,backend-transfer=on|off]`.

pub use cli::net::{MAX_NET_QUEUES, NetConfig, NetConfigError, parse_mac};
