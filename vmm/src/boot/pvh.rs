//! PVH boot: an ELF with a Xen PHYS32_ENTRY note (the test guest, or a Linux
//! vmlinux built with CONFIG_PVH) is loaded by linux-loader; `hvm_start_info`
//! with the memory map, the command line, the initrd as module 0 and the
//! RSDP's address goes into low RAM with the firmware tables, and the vCPU
//! starts at the note's entry in 32-bit protected mode with EBX pointing at
//! the start info.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{Elf, KernelLoader, elf::PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use super::firmware::{self, ACPI_ADDR, FIRMWARE_END, Firmware, FirmwareError};
use super::initrd::{self, InitrdError};
use crate::memory::{GuestRam, HIGH_RAM_START, MMIO_HOLE_START};

/// The kernel goes at or above 1 MiB; boot data lives below it.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
pub const START_INFO_ADDR: u64 = 0x6000;
/// The module list (the initrd), after the 56-byte start info and before
/// the memory map; clear of the command line and of a guest's AP
/// trampoline at 0x8000.
pub const MODLIST_ADDR: u64 = 0x6800;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// End of conventional memory (EBDA and ROMs above it on a PC).
const LOW_RAM_END: u64 = 0x9_fc00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

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
    #[error("{0}")]
    Initrd(#[from] InitrdError),
    #[error("{0}")]
    Firmware(#[from] FirmwareError),
}

impl BootError {
    /// A mistake in what the user gave (exit 2), not a failure of the
    /// host or of this process (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            BootError::Write(_)
                | BootError::Initrd(InitrdError::Load { .. })
                | BootError::Firmware(FirmwareError::Write(_) | FirmwareError::Cpuid(_))
        )
    }
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

/// The E820-style map handed to the guest: RAM, and the firmware tables'
/// area (0xE0000..1 MiB) reserved so that no OS takes it for RAM.
pub fn memory_map(ram_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let low_end = ram_size.min(MMIO_HOLE_START);
    let mut map = vec![entry(0, LOW_RAM_END.min(low_end), E820_RAM)];
    if low_end > ACPI_ADDR {
        map.push(entry(
            ACPI_ADDR,
            low_end.min(FIRMWARE_END) - ACPI_ADDR,
            E820_RESERVED,
        ));
    }
    if low_end > KERNEL_MIN_ADDR {
        map.push(entry(KERNEL_MIN_ADDR, low_end - KERNEL_MIN_ADDR, E820_RAM));
    }
    if ram_size > MMIO_HOLE_START {
        map.push(entry(HIGH_RAM_START, ram_size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

/// Opens `kernel` and checks from its headers that it is a 64-bit ELF that
/// loads between 1 MiB and the end of low RAM of a `ram_size` guest. Cheap:
/// main calls it before building the VM, so bad input fails fast.
pub fn check_kernel(kernel: &Path, ram_size: u64) -> Result<File, BootError> {
    Ok(open_kernel(kernel, ram_size)?.0)
}

/// [`check_kernel`], then that the initrd (if any) fits between the
/// kernel's end and the end of low RAM.
pub fn check_inputs(kernel: &Path, initrd: Option<&Path>, ram_size: u64) -> Result<(), BootError> {
    let (_, kernel_end) = open_kernel(kernel, ram_size)?;
    if let Some(i) = initrd {
        initrd::check(i, kernel_end, ram_size)?;
    }
    Ok(())
}

/// The kernel, checked, and the end of its highest segment.
fn open_kernel(kernel: &Path, ram_size: u64) -> Result<(File, u64), BootError> {
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
    Ok((f, end))
}

/// Loads `kernel` and `initrd`, writes the firmware tables, start info,
/// module list, memory map and command line.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    firmware: &Firmware,
) -> Result<PvhEntry, BootError> {
    let (mut f, kernel_end) = open_kernel(kernel, ram.size)?;
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

    let module = match initrd {
        Some(path) => {
            let at = initrd::load(ram, path, kernel_end).map_err(|e| match e {
                InitrdError::Load { .. } => BootError::Write(e.to_string()),
                e => BootError::Initrd(e),
            })?;
            Some(hvm_modlist_entry {
                paddr: at.addr,
                size: at.size,
                ..Default::default()
            })
        }
        None => None,
    };
    let rsdp = firmware::write(ram, &firmware.platform, firmware.cpu).map_err(|e| match e {
        FirmwareError::Write(w) => BootError::Write(w),
        e => BootError::Firmware(e),
    })?;

    let map = memory_map(ram.size);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() { MODLIST_ADDR } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&map, GuestAddress(MEMMAP_ADDR));
    if let Some(m) = &module {
        params.set_modules(std::slice::from_ref(m), GuestAddress(MODLIST_ADDR));
    }
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

    use crate::boot::firmware::{CpuSignature, Platform};
    use vm_memory::ByteValued;

    use crate::inputs::tests::Dir;

    fn firmware(vcpus: u32) -> Firmware {
        Firmware {
            platform: Platform::with_devices(vcpus, 1).unwrap(),
            cpu: CpuSignature {
                signature: 0x806f8,
                features: 0x178bfbff,
            },
        }
    }

    /// A minimal PVH ELF: one PT_LOAD of 8 KiB at 1 MiB, a Xen
    /// PHYS32_ENTRY note pointing at it.
    fn tiny_pvh_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x1010];
        let put = |f: &mut Vec<u8>, o: usize, b: &[u8]| f[o..o + b.len()].copy_from_slice(b);
        put(&mut f, 0, b"\x7fELF\x02\x01\x01");
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86_64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 24, &0x10_0000u64.to_le_bytes());
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 52, &64u16.to_le_bytes());
        put(&mut f, 54, &56u16.to_le_bytes());
        put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
        let ph =
            |f: &mut Vec<u8>, o: usize, ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
                put(f, o, &ty.to_le_bytes());
                put(f, o + 4, &5u32.to_le_bytes());
                put(f, o + 8, &off.to_le_bytes());
                put(f, o + 16, &addr.to_le_bytes());
                put(f, o + 24, &addr.to_le_bytes());
                put(f, o + 32, &filesz.to_le_bytes());
                put(f, o + 40, &memsz.to_le_bytes());
                put(f, o + 48, &4u64.to_le_bytes());
            };
        ph(&mut f, 64, 1, 0x1000, 0x10_0000, 16, 0x2000);
        ph(&mut f, 120, 4, 0x200, 0, 20, 20);
        put(&mut f, 0x200, &4u32.to_le_bytes());
        put(&mut f, 0x204, &4u32.to_le_bytes());
        put(&mut f, 0x208, &18u32.to_le_bytes());
        put(&mut f, 0x20c, b"Xen\0");
        put(&mut f, 0x210, &0x10_0000u32.to_le_bytes());
        f
    }

    #[test]
    fn memory_map_covers_ram_around_the_hole() {
        let m = memory_map(6 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[0].addr, m[0].size, m[0].type_),
            (0, LOW_RAM_END, E820_RAM)
        );
        assert_eq!(
            (m[1].addr, m[1].size, m[1].type_),
            (ACPI_ADDR, FIRMWARE_END - ACPI_ADDR, E820_RESERVED)
        );
        assert_eq!(
            (m[2].addr, m[2].size),
            (KERNEL_MIN_ADDR, MMIO_HOLE_START - KERNEL_MIN_ADDR)
        );
        assert_eq!((m[3].addr, m[3].size), (HIGH_RAM_START, 3 << 30));
        assert_eq!(memory_map(1 << 20).len(), 2);
        // Sorted, and no RAM entry covers the firmware tables.
        assert!(m.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        for e in m.iter().filter(|e| e.type_ == E820_RAM) {
            assert!(e.addr + e.size <= ACPI_ADDR || e.addr >= FIRMWARE_END);
        }
    }

    #[test]
    fn rejects_non_elf() {
        let dir = Dir::new("not-elf");
        let p = dir.0.join("not-elf");
        std::fs::write(&p, b"#!/bin/sh\necho hello\n").unwrap();
        let ram = GuestRam::new(4 << 20).unwrap();
        assert!(matches!(
            load(&ram, &p, None, "", &firmware(1)),
            Err(BootError::NotElf(_))
        ));
    }

    fn read<T: ByteValued>(ram: &GuestRam, addr: u64) -> T {
        ram.memory.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn start_info_names_the_initrd_and_the_rsdp() {
        let dir = Dir::new("start-info");
        let k = dir.0.join("kernel");
        std::fs::write(&k, tiny_pvh_elf()).unwrap();
        let i = dir.0.join("initrd");
        let data: Vec<u8> = (0..1_000_000u32).map(|x| (x % 253) as u8).collect();
        std::fs::write(&i, &data).unwrap();
        let ram = GuestRam::new(16 << 20).unwrap();
        let e = load(&ram, &k, Some(&i), "console=ttyS0", &firmware(4)).unwrap();
        assert_eq!(e.entry, 0x10_0000);
        let si: hvm_start_info = read(&ram, START_INFO_ADDR);
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!((si.nr_modules, si.modlist_paddr), (1, MODLIST_ADDR));
        assert_eq!(si.rsdp_paddr, ACPI_ADDR);
        let m: hvm_modlist_entry = read(&ram, MODLIST_ADDR);
        assert_eq!(m.size, data.len() as u64);
        assert_eq!(m.paddr % 4096, 0);
        assert!(m.paddr >= 0x10_2000, "above the kernel");
        let end = m.paddr + m.size;
        assert!(
            end <= 16 << 20 && (16 << 20) - end < 4096,
            "at the top of RAM"
        );
        let mut back = vec![0u8; data.len()];
        ram.memory
            .read_slice(&mut back, GuestAddress(m.paddr))
            .unwrap();
        assert!(back == data, "initrd bytes in guest RAM");
        // Boot data regions stay apart: start info, module list, memory
        // map, the AP trampoline page (0x8000), the command line.
        let si_end = START_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64;
        assert!(si_end <= MODLIST_ADDR);
        assert!(MODLIST_ADDR + std::mem::size_of::<hvm_modlist_entry>() as u64 <= MEMMAP_ADDR);
        let map_end = MEMMAP_ADDR
            + u64::from(si.memmap_entries) * std::mem::size_of::<hvm_memmap_table_entry>() as u64;
        assert!(map_end <= 0x8000);
        let mut rsdp = [0u8; 8];
        ram.memory
            .read_slice(&mut rsdp, GuestAddress(si.rsdp_paddr))
            .unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");

        // Without an initrd: no module list.
        let ram = GuestRam::new(16 << 20).unwrap();
        load(&ram, &k, None, "", &firmware(1)).unwrap();
        let si: hvm_start_info = read(&ram, START_INFO_ADDR);
        assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
        // Too big for the RAM above the kernel: refused, bad input.
        let ram = GuestRam::new(0x18_0000).unwrap();
        let err = load(&ram, &k, Some(&i), "", &firmware(1)).unwrap_err();
        assert!(
            matches!(err, BootError::Initrd(InitrdError::TooBig { .. })),
            "{err}"
        );
        assert!(err.is_bad_input());
        assert!(check_inputs(&k, Some(&i), 0x18_0000).is_err());
        assert!(check_inputs(&k, Some(&i), 16 << 20).is_ok());
    }
}
