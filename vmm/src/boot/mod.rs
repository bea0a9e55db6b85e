//! Putting a kernel and its boot data into guest RAM.

pub mod pvh;
