//! The unprivileged VMM as a library: the `vmm` binary is a thin front end,
//! and tests and fuzz targets reach the devices directly.

pub mod devices;
pub mod net;
