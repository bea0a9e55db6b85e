//! `--initrd`: a file copied into guest RAM, page-aligned at the top of
//! low RAM (below the MMIO hole) and above the kernel, where Linux's PVH
//! entry finds it through `hvm_start_info`'s module list (entry 0).
//! It is guest RAM from then on: a migration carries it with the rest, and
//! a migration target never loads it.

use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestRam, MMIO_HOLE_START};

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error("cannot open initrd {path}: {err}")]
    Open { path: PathBuf, err: std::io::Error },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM: {room} bytes free between the kernel's end ({kernel_end:#x}) and the end of low RAM ({ram_end:#x})"
    )]
    TooBig {
        path: PathBuf,
        size: u64,
        room: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("cannot read initrd {path} into guest RAM: {err}")]
    Load { path: PathBuf, err: String },
}

/// Where an initrd lies in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub addr: u64,
    pub size: u64,
}

/// The highest page-aligned address at which `size` bytes end at or
/// below the end of low RAM (`min(ram_size, MMIO hole)`) and start at or
/// above `kernel_end` rounded up to a page; `None` when they do not fit.
pub fn place(size: u64, kernel_end: u64, ram_size: u64) -> Option<Placement> {
    let ram_end = ram_size.min(MMIO_HOLE_START);
    let lowest = kernel_end.checked_next_multiple_of(PAGE)?;
    let addr = ram_end.checked_sub(size)? / PAGE * PAGE;
    (addr >= lowest).then_some(Placement { addr, size })
}

/// Opens `path` without blocking (a regular file only) and places it.
/// Cheap: a boot calls it before building the VM, so a bad initrd fails
/// fast.
pub fn check(
    path: &Path,
    kernel_end: u64,
    ram_size: u64,
) -> Result<(File, Placement), InitrdError> {
    let open = |err| InitrdError::Open {
        path: path.to_path_buf(),
        err,
    };
    let f = crate::inputs::open_initrd(path).map_err(open)?;
    let size = f.metadata().map_err(open)?.len();
    let placement = place(size, kernel_end, ram_size).ok_or_else(|| {
        let ram_end = ram_size.min(MMIO_HOLE_START);
        let lowest = kernel_end.next_multiple_of(PAGE);
        InitrdError::TooBig {
            path: path.to_path_buf(),
            size,
            room: ram_end.saturating_sub(lowest),
            kernel_end,
            ram_end,
        }
    })?;
    Ok((f, placement))
}

/// Copies the initrd into `ram` at its placement (checked again: the
/// file may have changed since [`check`]).
pub fn load(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<Placement, InitrdError> {
    let (mut f, p) = check(path, kernel_end, ram.size)?;
    let count = usize::try_from(p.size).map_err(|_| InitrdError::Load {
        path: path.to_path_buf(),
        err: "too large for this host".into(),
    })?;
    ram.memory
        .read_exact_volatile_from(GuestAddress(p.addr), &mut f, count)
        .map_err(|e| InitrdError::Load {
            path: path.to_path_buf(),
            err: e.to_string(),
        })?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn placement_is_page_aligned_at_the_top_of_low_ram() {
        // 128 MiB guest, 1 MiB kernel ending at 2 MiB.
        let p = place(MIB, 2 * MIB, 128 * MIB).unwrap();
        assert_eq!(
            p,
            Placement {
                addr: 127 * MIB,
                size: MIB
            }
        );
        // Odd sizes round the start down to a page.
        let p = place(4097, 2 * MIB, 128 * MIB).unwrap();
        assert_eq!(p.addr, 128 * MIB - 2 * PAGE);
        assert!(p.addr + p.size <= 128 * MIB);
        // Above the MMIO hole, low RAM ends at the hole.
        let p = place(MIB, 2 * MIB, 6 << 30).unwrap();
        assert_eq!(p.addr + p.size, MMIO_HOLE_START);
    }

    #[test]
    fn placement_stays_above_the_kernel() {
        // Exactly the room between the kernel's (page-rounded) end and RAM's end.
        let kernel_end = 2 * MIB + 1;
        let room = 16 * MIB - (2 * MIB + PAGE);
        assert_eq!(
            place(room, kernel_end, 16 * MIB).unwrap().addr,
            2 * MIB + PAGE
        );
        assert_eq!(place(room + 1, kernel_end, 16 * MIB), None);
        assert_eq!(place(64 * MIB, 2 * MIB, 32 * MIB), None);
        assert_eq!(place(u64::MAX, 0, 32 * MIB), None);
        // An empty initrd sits at the very top.
        assert_eq!(place(0, 2 * MIB, 32 * MIB).unwrap().addr, 32 * MIB);
    }

    #[test]
    fn loads_the_file_into_guest_ram() {
        let dir = std::env::temp_dir().join(format!("initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        let p = dir.join("initrd");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let ram = GuestRam::new(8 * MIB).unwrap();
        let at = load(&ram, &p, 2 * MIB).unwrap();
        assert_eq!(at.addr % PAGE, 0);
        assert_eq!(at.size, data.len() as u64);
        let mut back = vec![0u8; data.len()];
        ram.memory
            .read_slice(&mut back, GuestAddress(at.addr))
            .unwrap();
        assert!(back == data);
        assert!(matches!(
            load(&ram, &p, 8 * MIB - PAGE),
            Err(InitrdError::TooBig { .. })
        ));
        assert!(matches!(load(&ram, &dir, 0), Err(InitrdError::Open { .. })));
    }
}
