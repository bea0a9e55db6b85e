//! Putting a kernel and its boot data into guest RAM: the kernel and its
//! start info ([`pvh`]), an initrd ([`initrd`]), and the firmware tables a
//! guest finds its CPUs and devices in ([`firmware`]: [`acpi`] and
//! [`mptable`]; [`dump`] writes the ACPI tables to files instead).

pub mod acpi;
pub mod dump;
pub mod firmware;
pub mod initrd;
pub mod mptable;
pub mod pvh;
