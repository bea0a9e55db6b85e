//! Guest RAM: one memfd mapped MAP_SHARED through vm-memory, so a later local
//! migration can hand the same RAM to another process. Nothing is touched up
//! front: pages cost host memory only once the guest writes them.
//!
//! Layout: RAM from 0 to 3 GiB, the MMIO hole 3..4 GiB (virtio-mmio, IOAPIC,
//! LAPIC), the rest of RAM from 4 GiB.

use std::fs::File;
use std::sync::Arc;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use vm_memory::{FileOffset, GuestAddress};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Where the MMIO hole starts: RAM below it, devices inside it.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// RAM continues here when the guest has more than 3 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {size} MiB is larger than this host allows ({limit} MiB of RAM)")]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest RAM memfd to {size} bytes: {err}")]
    Truncate { size: u64, err: std::io::Error },
    #[error("cannot map guest RAM: {0}")]
    Map(String),
    #[error("cannot seal the guest RAM memfd: {0}")]
    Seal(std::io::Error),
    #[error("the guest RAM memfd is not sealed against shrinking and growing")]
    NotSealed,
}

/// What keeps another process holding the memfd (a migration peer) from
/// resizing guest RAM under this one's mapping.
fn ram_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW
}

/// Checks that a guest RAM memfd received from another process carries
/// the seals: without them it could shrink it and kill this process with
/// SIGBUS.
pub fn check_ram_seals(f: &File) -> Result<(), MemoryError> {
    let seals = fcntl(f, FcntlArg::F_GET_SEALS).map_err(|_| MemoryError::NotSealed)?;
    if SealFlag::from_bits_truncate(seals).contains(ram_seals()) {
        Ok(())
    } else {
        Err(MemoryError::NotSealed)
    }
}

/// The (start, length) RAM ranges of a guest with `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(HIGH_RAM_START), size - MMIO_HOLE_START),
        ]
    }
}

/// Host RAM plus swap, from /proc/meminfo: a guest larger than that could
/// never be backed. Unknown (None) when /proc is unreadable.
fn host_memory_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

/// Checks a requested size against the host before anything is allocated.
pub fn check_host_limit(size: u64) -> Result<(), MemoryError> {
    if let Some(limit) = host_memory_limit()
        && size > limit
    {
        return Err(MemoryError::TooLarge {
            size: size >> 20,
            limit: limit >> 20,
        });
    }
    Ok(())
}

/// Guest RAM and the memfd behind it (kept for migration).
pub struct GuestRam {
    pub memfd: Arc<File>,
    pub memory: GuestMemoryMmap,
    pub size: u64,
}

impl GuestRam {
    /// Creates a sparse memfd of `size` bytes and maps it at the layout above.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_host_limit(size)?;
        let fd = nix::sys::memfd::memfd_create(
            c"guest-ram",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| MemoryError::Memfd(e.into()))?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|err| MemoryError::Truncate { size, err })?;
        fcntl(&file, FcntlArg::F_ADD_SEALS(ram_seals()))
            .map_err(|e| MemoryError::Seal(e.into()))?;
        Self::from_memfd(Arc::new(file), size)
    }

    /// Maps an existing memfd (also the path of a migration target).
    pub fn from_memfd(memfd: Arc<File>, size: u64) -> Result<Self, MemoryError> {
        let mut offset = 0u64;
        let mut ranges = Vec::new();
        for (start, len) in ram_ranges(size) {
            let len_usize = usize::try_from(len)
                .map_err(|_| MemoryError::Map("size overflows usize".into()))?;
            ranges.push((
                start,
                len_usize,
                Some(FileOffset::from_arc(memfd.clone(), offset)),
            ));
            offset += len;
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            memfd,
            memory,
            size,
        })
    }

    /// Bytes of RAM below the MMIO hole (where boot data and kernels go).
    pub fn low_ram_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            ram_ranges(6 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 3 << 30)]
        );
    }

    #[test]
    fn ram_is_shared_through_the_memfd() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        // A second mapping of the same memfd (as a migration target would make)
        // sees the write.
        let other = GuestRam::from_memfd(ram.memfd.clone(), 8 << 20).unwrap();
        let v: u32 = other.memory.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        assert_eq!(other.memory.num_regions(), 1);
    }

    #[test]
    fn absurd_size_is_refused() {
        assert!(matches!(
            GuestRam::new(1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
