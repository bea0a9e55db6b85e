//! Guest RAM: one memfd mapped MAP_SHARED through vm-memory, so a later local
//! migration can hand the same RAM to another process. Nothing is touched up
//! front: pages cost host memory only once the guest writes them.
//!
//! Layout: RAM from 0 to 3 GiB, the MMIO hole 3..4 GiB (virtio-mmio, IOAPIC,
//! LAPIC), the rest of RAM from 4 GiB.
//!
//! The memfd is sealed once sized (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL):
//! every process that maps it (a migration target too) may truncate it no
//! more, so none can make another's mapping fault with SIGBUS. F_SEAL_SEAL
//! stops a peer from adding seals later (F_SEAL_FUTURE_WRITE would make the
//! next migration's writable mapping fail); nothing here needs another seal.
//! A target checks what it is sent with [`check_ram_seals`].

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
    #[error("cannot seal the guest RAM memfd: {0}")]
    Seal(std::io::Error),
    #[error("cannot read the seals of the guest RAM fd (is it a memfd?): {0}")]
    GetSeals(std::io::Error),
    #[error("the guest RAM memfd is not sealed against shrink/grow (seals {seals:#x})")]
    NotSealed { seals: i32 },
    #[error("cannot map guest RAM: {0}")]
    Map(String),
}

/// The seals guest RAM must carry: no process mapping it may resize it.
const RAM_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_GROW);

/// Checks that a guest RAM memfd (one a migration source sent) can no
/// longer shrink or grow, so mapping it is safe from a later truncation.
pub fn check_ram_seals(f: &File) -> Result<(), MemoryError> {
    let seals = fcntl(f, FcntlArg::F_GET_SEALS).map_err(|e| MemoryError::GetSeals(e.into()))?;
    if SealFlag::from_bits_truncate(seals).contains(RAM_SEALS) {
        Ok(())
    } else {
        Err(MemoryError::NotSealed { seals })
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
    /// Creates a sparse memfd of `size` bytes, seals its size, and maps it
    /// at the layout above.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_host_limit(size)?;
        use nix::sys::memfd::MFdFlags;
        let fd = nix::sys::memfd::memfd_create(
            c"guest-ram",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| MemoryError::Memfd(e.into()))?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|err| MemoryError::Truncate { size, err })?;
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(RAM_SEALS | SealFlag::F_SEAL_SEAL),
        )
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

    fn unsealed_memfd(flags: nix::sys::memfd::MFdFlags) -> File {
        let fd = nix::sys::memfd::memfd_create(c"test-ram", flags).unwrap();
        let f = File::from(fd);
        f.set_len(1 << 20).unwrap();
        f
    }

    #[test]
    fn new_ram_is_sealed_and_cannot_be_resized() {
        let ram = GuestRam::new(8 << 20).unwrap();
        check_ram_seals(&ram.memfd).unwrap();
        for len in [4 << 20, 16 << 20] {
            let e = ram.memfd.set_len(len).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "ftruncate to {len}");
        }
        assert_eq!(ram.memfd.metadata().unwrap().len(), 8 << 20);
        // F_SEAL_SEAL: no peer may add a seal (e.g. one against writes).
        let e = fcntl(
            &*ram.memfd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE),
        )
        .unwrap_err();
        assert_eq!(e, nix::errno::Errno::EPERM);
    }

    #[test]
    fn memfds_without_both_seals_are_refused() {
        use nix::sys::memfd::MFdFlags;
        let plain = unsealed_memfd(MFdFlags::MFD_CLOEXEC);
        let e = check_ram_seals(&plain).unwrap_err();
        assert!(matches!(e, MemoryError::NotSealed { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("the guest RAM memfd is not sealed against shrink/grow"),
            "{e}"
        );
        let sealable = unsealed_memfd(MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING);
        assert!(matches!(
            check_ram_seals(&sealable),
            Err(MemoryError::NotSealed { .. })
        ));
        fcntl(&sealable, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        assert!(matches!(
            check_ram_seals(&sealable),
            Err(MemoryError::NotSealed { .. })
        ));
        fcntl(&sealable, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_GROW)).unwrap();
        check_ram_seals(&sealable).unwrap();
        // A file that is no memfd has no seals to read.
        let e = check_ram_seals(&File::open("/proc/self/stat").unwrap()).unwrap_err();
        assert!(matches!(e, MemoryError::GetSeals(_)), "{e}");
    }

    #[test]
    fn absurd_size_is_refused() {
        assert!(matches!(
            GuestRam::new(1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
