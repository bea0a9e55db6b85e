//! Who owns a guest during a local migration: one 64-bit word in a small
//! shared page (a sealed memfd the source creates for each migration and
//! sends with Hello). Ownership is a single atomic fact both processes see,
//! not an inference from the messages they did or did not receive: a
//! process runs the guest's vCPUs after a migration started only if it won
//! the word with a compare-and-swap.
//!
//! ```text
//!             source creates the page: Offered{source pid}
//!   ┌──────────────────────────┼───────────────────────────┐
//!   target, after the State:   target, on SIGTERM before   source, on any failure or
//!   take() ──► Target{pid}     owning: decline() ──►       deadline: take_back() ──►
//!   (runs the guest)           Declined{pid}               Source{pid} (runs it again)
//!                              (source may take_back)
//! ```
//!
//! The target takes the guest once it restored the State (protocol 3), or
//! after the Commit of a protocol 2 source (release 0.2.0).
//!
//! `Offered` and `Declined` may be won by the source; only `Offered` by the
//! target. Whoever loses never runs the guest. A process that owns the guest
//! and dies takes it with it: the survivor reads the word, finds the owner
//! gone, and says so.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

/// Size of the page: one word is used.
pub const PAGE_LEN: u64 = 4096;

const STATE_MASK: u64 = 0xff;
const OFFERED: u64 = 1;
const TARGET: u64 = 2;
const SOURCE: u64 = 3;
const DECLINED: u64 = 4;

/// The seals a page must carry: nobody can shrink it under the other's
/// mapping (a SIGBUS) or grow it.
fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW
}

/// What the word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The source paused the guest and offers it; nobody runs it.
    Offered { by: u32 },
    /// The target took it and runs it.
    Target { pid: u32 },
    /// The source took it back and runs it.
    Source { pid: u32 },
    /// The target will never take it (it was stopped before owning).
    Declined { pid: u32 },
    /// Not a value either side writes.
    Invalid(u64),
}

impl Owner {
    fn decode(w: u64) -> Owner {
        let pid = (w >> 32) as u32;
        match w & STATE_MASK {
            OFFERED => Owner::Offered { by: pid },
            TARGET => Owner::Target { pid },
            SOURCE => Owner::Source { pid },
            DECLINED => Owner::Declined { pid },
            _ => Owner::Invalid(w),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Offered { by } => write!(f, "offered by pid {by}"),
            Owner::Target { pid } => write!(f, "taken by the target (pid {pid})"),
            Owner::Source { pid } => write!(f, "taken back by the source (pid {pid})"),
            Owner::Declined { pid } => write!(f, "declined by the target (pid {pid})"),
            Owner::Invalid(w) => write!(f, "an invalid owner word {w:#x}"),
        }
    }
}

fn word(state: u64) -> u64 {
    (u64::from(std::process::id()) << 32) | state
}

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("cannot create the ownership page: {0}")]
    Create(std::io::Error),
    #[error("the ownership page is not a memfd of {PAGE_LEN} bytes")]
    NotAPage,
    #[error("the ownership page is not sealed against shrinking and growing")]
    NotSealed,
    #[error("cannot map the ownership page: {0}")]
    Map(nix::Error),
}

/// The page, mapped shared.
pub struct OwnerPage {
    file: File,
    word: NonNull<AtomicU64>,
}

// SAFETY: the mapping is shared memory accessed only through an AtomicU64;
// the pointer stays valid until drop (munmap), whichever thread holds it.
unsafe impl Send for OwnerPage {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for OwnerPage {}

impl OwnerPage {
    /// A source's page for one migration: sealed, word `Offered{own pid}`.
    pub fn create() -> Result<OwnerPage, OwnershipError> {
        let fd = memfd_create(
            c"vmm-owner",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| OwnershipError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(PAGE_LEN).map_err(OwnershipError::Create)?;
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(required_seals() | SealFlag::F_SEAL_SEAL),
        )
        .map_err(|e| OwnershipError::Create(e.into()))?;
        let page = Self::map(file)?;
        page.atomic().store(word(OFFERED), Ordering::SeqCst);
        Ok(page)
    }

    /// A page received from a peer: it must be a sealed memfd of the
    /// page's size, so the peer cannot pull the mapping away.
    pub fn open(fd: OwnedFd) -> Result<OwnerPage, OwnershipError> {
        let file = File::from(fd);
        let meta = file.metadata().map_err(|_| OwnershipError::NotAPage)?;
        if !meta.file_type().is_file() || meta.len() != PAGE_LEN {
            return Err(OwnershipError::NotAPage);
        }
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS).map_err(|_| OwnershipError::NotSealed)?;
        if !SealFlag::from_bits_truncate(seals).contains(required_seals()) {
            return Err(OwnershipError::NotSealed);
        }
        Self::map(file)
    }

    fn map(file: File) -> Result<OwnerPage, OwnershipError> {
        // SAFETY: a fresh shared mapping of PAGE_LEN bytes of a file that is
        // at least that long (checked or set by the callers, and sealed
        // against shrinking); the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_LEN as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(OwnershipError::Map(nix::Error::last()));
        }
        let word = NonNull::new(p.cast::<AtomicU64>()).ok_or(OwnershipError::NotAPage)?;
        Ok(OwnerPage { file, word })
    }

    fn atomic(&self) -> &AtomicU64 {
        // SAFETY: `word` points at the start of a live, page-aligned shared
        // mapping (so aligned for u64), unmapped only in drop.
        unsafe { self.word.as_ref() }
    }

    /// What the word says now.
    pub fn owner(&self) -> Owner {
        Owner::decode(self.atomic().load(Ordering::SeqCst))
    }

    /// Replaces the word with `new` if it holds a state in `from`. Returns
    /// what it held when the swap failed.
    fn swap_from(&self, from: &[u64], new: u64) -> Result<(), Owner> {
        let a = self.atomic();
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            if !from.contains(&(cur & STATE_MASK)) {
                return Err(Owner::decode(cur));
            }
            match a.compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Target: takes the guest (only from `Offered`). Run no vCPU unless
    /// this succeeds.
    pub fn take(&self) -> Result<(), Owner> {
        self.swap_from(&[OFFERED], word(TARGET))
    }

    /// Target: promises never to take the guest (only from `Offered`).
    pub fn decline(&self) -> Result<(), Owner> {
        self.swap_from(&[OFFERED], word(DECLINED))
    }

    /// Source: takes the guest back, unless the target took it. A word no
    /// honest peer writes is taken back too: only a target that owns the
    /// guest may keep the source from running it.
    pub fn take_back(&self) -> Result<(), Owner> {
        let a = self.atomic();
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            match Owner::decode(cur) {
                Owner::Target { .. } => return Err(Owner::decode(cur)),
                Owner::Source { pid } if pid == std::process::id() => return Ok(()),
                _ => {}
            }
            match a.compare_exchange(cur, word(SOURCE), Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }
}

impl AsFd for OwnerPage {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for OwnerPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that length, unmapped once;
        // no reference from `atomic()` outlives `&self`.
        unsafe { libc::munmap(self.word.as_ptr().cast(), PAGE_LEN as usize) };
    }
}

/// Whether process `pid` has exited (or never existed). A pidfd is
/// readable once its process has ended, zombie included.
pub fn process_gone(pid: u32) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return true;
    }
    // SAFETY: a fresh fd that this function alone owns.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_takes_an_offered_guest_and_then_the_source_cannot() {
        let src = OwnerPage::create().unwrap();
        let me = std::process::id();
        assert_eq!(src.owner(), Owner::Offered { by: me });
        let tgt = OwnerPage::open(src.as_fd().try_clone_to_owned().unwrap()).unwrap();
        tgt.take().unwrap();
        assert_eq!(src.owner(), Owner::Target { pid: me });
        assert_eq!(src.take_back(), Err(Owner::Target { pid: me }));
        assert!(tgt.take().is_err(), "taken once");
    }

    #[test]
    fn a_source_that_took_back_wins_over_a_late_target() {
        let src = OwnerPage::create().unwrap();
        let tgt = OwnerPage::open(src.as_fd().try_clone_to_owned().unwrap()).unwrap();
        src.take_back().unwrap();
        assert!(matches!(tgt.take(), Err(Owner::Source { .. })));
        assert!(matches!(tgt.decline(), Err(Owner::Source { .. })));
        src.take_back().unwrap();
    }

    #[test]
    fn a_declined_guest_goes_back_to_the_source_only() {
        let src = OwnerPage::create().unwrap();
        let tgt = OwnerPage::open(src.as_fd().try_clone_to_owned().unwrap()).unwrap();
        tgt.decline().unwrap();
        assert!(matches!(tgt.take(), Err(Owner::Declined { .. })));
        src.take_back().unwrap();
        assert!(matches!(src.owner(), Owner::Source { .. }));
    }

    #[test]
    fn garbage_in_the_word_is_taken_back() {
        let src = OwnerPage::create().unwrap();
        src.atomic().store(0xdead_0000_0000_00ff, Ordering::SeqCst);
        assert!(matches!(src.owner(), Owner::Invalid(_)));
        src.take_back().unwrap();
    }

    #[test]
    fn only_a_sealed_memfd_of_one_page_is_accepted() {
        let fd = memfd_create(c"x", MFdFlags::MFD_CLOEXEC).unwrap();
        let f = File::from(fd);
        f.set_len(PAGE_LEN).unwrap();
        assert!(matches!(
            OwnerPage::open(f.into()),
            Err(OwnershipError::NotSealed)
        ));
        let fd = memfd_create(c"x", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        let f = File::from(fd);
        f.set_len(PAGE_LEN * 2).unwrap();
        assert!(matches!(
            OwnerPage::open(f.into()),
            Err(OwnershipError::NotAPage)
        ));
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(OwnerPage::open(r).is_err());
    }

    #[test]
    fn a_sealed_page_cannot_be_truncated_by_a_peer() {
        let src = OwnerPage::create().unwrap();
        let peer = File::from(src.as_fd().try_clone_to_owned().unwrap());
        assert!(peer.set_len(0).is_err());
        assert!(peer.set_len(PAGE_LEN * 2).is_err());
        assert_eq!(
            src.owner(),
            Owner::Offered {
                by: std::process::id()
            }
        );
    }

    #[test]
    fn liveness_of_a_process() {
        assert!(!process_gone(std::process::id()));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        // A zombie counts as gone.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(process_gone(pid));
        c.wait().unwrap();
    }
}
