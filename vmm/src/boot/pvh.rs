//! PVH boot: an ELF with a Xen PHYS32_ENTRY note (the test guest, or a Linux
//! vmlinux built with CONFIG_PVH) is loaded by linux-loader; `hvm_start_info`
//! with the memory map and the command line goes into low RAM, and the vCPU
//! starts at the note's entry in 32-bit protected mode with EBX pointing at
//! the start info.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{Elf, KernelLoader, elf::PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestRam, HIGH_RAM_START, MMIO_HOLE_START};

/// The kernel goes at or above 1 MiB; boot data lives below it.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// End of conventional memory (EBDA and ROMs above it on a PC).
const LOW_RAM_END: u64 = 0x9_fc00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {err}")]
    Open { path: PathBuf, err: std::io::Error },
    #[error("kernel {0} is not an ELF file")]
    NotElf(PathBuf),
    #[error("kernel {0} is not a 64-bit little-endian ELF")]
    NotElf64(PathBuf),
    #[error("kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote(PathBuf),
    #[error(
        "kernel {path} does not fit in guest RAM: it needs memory up to {end:#x}, RAM below the MMIO hole ends at {ram_end:#x}"
    )]
    DoesNotFit {
        path: PathBuf,
        end: u64,
        ram_end: u64,
    },
    #[error("kernel {path} segment at {addr:#x} lies below 1 MiB")]
    TooLow { path: PathBuf, addr: u64 },
    #[error("cannot load kernel {path}: {err}")]
    Load {
        path: PathBuf,
        err: linux_loader::loader::Error,
    },
    #[error("kernel command line is longer than {CMDLINE_MAX} bytes")]
    CmdlineTooLong,
    #[error("cannot write boot data into guest RAM: {0}")]
    Write(String),
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvhEntry {
    pub entry: u64,
    pub start_info: u64,
}

/// Highest guest-physical end of the ELF's PT_LOAD segments, read from the
/// headers so a kernel that does not fit gets a clear error before loading.
fn elf_load_end(path: &Path, f: &mut File) -> Result<(u64, u64), BootError> {
    let io = |err| BootError::Open {
        path: path.to_path_buf(),
        err,
    };
    let mut ehdr = [0u8; 64];
    let n = read_full(f, &mut ehdr).map_err(io)?;
    if n < 16 || ehdr[..4] != *b"\x7fELF" {
        return Err(BootError::NotElf(path.to_path_buf()));
    }
    if n < 64 || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(BootError::NotElf64(path.to_path_buf()));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u16_at(&ehdr, 0x36) as usize;
    let phnum = u16_at(&ehdr, 0x38) as usize;
    if phentsize < 56 {
        return Err(BootError::NotElf64(path.to_path_buf()));
    }
    let mut lowest = u64::MAX;
    let mut end = 0u64;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        let off = phoff.saturating_add((i * phentsize) as u64);
        f.seek(SeekFrom::Start(off)).map_err(io)?;
        if read_full(f, &mut ph).map_err(io)? < ph.len() {
            return Err(BootError::NotElf64(path.to_path_buf()));
        }
        let p_type = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        if p_type != 1 {
            continue; // not PT_LOAD
        }
        let paddr = u64_at(&ph, 24);
        let memsz = u64_at(&ph, 40);
        lowest = lowest.min(paddr);
        end = end.max(paddr.saturating_add(memsz));
    }
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok((lowest, end))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The E820-style map handed to the guest.
pub fn memory_map(ram_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size| hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    };
    let low_end = ram_size.min(MMIO_HOLE_START);
    let mut map = vec![entry(0, LOW_RAM_END.min(low_end))];
    if low_end > KERNEL_MIN_ADDR {
        map.push(entry(KERNEL_MIN_ADDR, low_end - KERNEL_MIN_ADDR));
    }
    if ram_size > MMIO_HOLE_START {
        map.push(entry(HIGH_RAM_START, ram_size - MMIO_HOLE_START));
    }
    map
}

/// Opens `kernel` and checks from its headers that it is a 64-bit ELF that
/// loads between 1 MiB and the end of low RAM of a `ram_size` guest. Cheap:
/// main calls it before building the VM, so bad input fails fast.
pub fn check_kernel(kernel: &Path, ram_size: u64) -> Result<File, BootError> {
    // Never blocks (a FIFO is refused, not waited on).
    let mut f = crate::inputs::open_kernel(kernel).map_err(|err| BootError::Open {
        path: kernel.to_path_buf(),
        err,
    })?;
    let (lowest, end) = elf_load_end(kernel, &mut f)?;
    if lowest < KERNEL_MIN_ADDR {
        return Err(BootError::TooLow {
            path: kernel.to_path_buf(),
            addr: lowest,
        });
    }
    let ram_end = ram_size.min(MMIO_HOLE_START);
    if end > ram_end {
        return Err(BootError::DoesNotFit {
            path: kernel.to_path_buf(),
            end,
            ram_end,
        });
    }
    Ok(f)
}

/// Loads `kernel`, writes start info, memory map and command line.
pub fn load(ram: &GuestRam, kernel: &Path, cmdline: &str) -> Result<PvhEntry, BootError> {
    let mut f = check_kernel(kernel, ram.size)?;
    let loaded = Elf::load(
        &ram.memory,
        None,
        &mut f,
        Some(GuestAddress(KERNEL_MIN_ADDR)),
    )
    .map_err(|err| BootError::Load {
        path: kernel.to_path_buf(),
        err,
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhNote(kernel.to_path_buf()));
    };

    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::CmdlineTooLong);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    ram.memory
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write(e.to_string()))?;

    let map = memory_map(ram.size);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&map, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, &ram.memory)
        .map_err(|e| BootError::Write(e.to_string()))?;
    Ok(PvhEntry {
        entry: entry.0,
        start_info: START_INFO_ADDR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_around_the_hole() {
        let m = memory_map(6 << 30);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].addr, m[0].size), (0, LOW_RAM_END));
        assert_eq!(
            (m[1].addr, m[1].size),
            (KERNEL_MIN_ADDR, MMIO_HOLE_START - KERNEL_MIN_ADDR)
        );
        assert_eq!((m[2].addr, m[2].size), (HIGH_RAM_START, 3 << 30));
        assert_eq!(memory_map(1 << 20).len(), 1);
    }

    #[test]
    fn rejects_non_elf() {
        let dir = std::env::temp_dir().join(format!("pvh-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("not-elf");
        std::fs::write(&p, b"#!/bin/sh\necho hello\n").unwrap();
        let ram = GuestRam::new(4 << 20).unwrap();
        assert!(matches!(load(&ram, &p, ""), Err(BootError::NotElf(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
