//! The unprivileged VMM as a library: the `vmm` binary is a thin front end,
//! and tests and fuzz targets reach the devices directly.

pub mod api;
pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod memory;
pub mod net;
pub mod persist;
pub mod privileges;
pub mod vcpu;
pub mod vm;
