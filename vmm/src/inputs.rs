//! The files named on the command line (`--kernel`, `--initrd`, `--serial
//! FILE`): what
//! kind each may be, and opening them without ever blocking.
//!
//! A plain `open` blocks on a FIFO until the other end shows up (forever,
//! for a FIFO nobody opens), so every open here adds `O_NONBLOCK` and then
//! checks the kind of what it got with `fstat`. [`check`] runs first, before
//! the sandbox hides the paths, so that a directory is reported as one and
//! not as Landlock's "Permission denied".

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A file on the command line that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("kernel {0} is {1}, not a regular file")]
    Kernel(PathBuf, &'static str),
    #[error("initrd {0} is {1}, not a regular file")]
    Initrd(PathBuf, &'static str),
    #[error("serial output {0} is {1}, not a regular file, terminal or character device")]
    Serial(PathBuf, &'static str),
}

/// "a directory", "a FIFO", ... for messages.
fn kind_of(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The kernel and the initrd are read whole: regular files only.
fn kernel_ok(m: &Metadata) -> bool {
    m.file_type().is_file()
}

/// Regular files (the log case), terminals and other character devices
/// (`/dev/null`, `/dev/tty`, `/dev/full`) accept writes without a peer.
fn serial_ok(m: &Metadata) -> bool {
    let t = m.file_type();
    t.is_file() || t.is_char_device()
}

/// Checks what the paths name, without opening them. A missing kernel or
/// initrd is left to the open that reports it; a missing serial file is
/// created later.
pub fn check(
    kernel: &Path,
    initrd: Option<&Path>,
    serial: Option<&Path>,
) -> Result<(), InputError> {
    if let Ok(m) = std::fs::metadata(kernel)
        && !kernel_ok(&m)
    {
        return Err(InputError::Kernel(kernel.to_path_buf(), kind_of(&m)));
    }
    if let Some(p) = initrd
        && let Ok(m) = std::fs::metadata(p)
        && !kernel_ok(&m)
    {
        return Err(InputError::Initrd(p.to_path_buf(), kind_of(&m)));
    }
    if let Some(p) = serial
        && let Ok(m) = std::fs::metadata(p)
        && !serial_ok(&m)
    {
        return Err(InputError::Serial(p.to_path_buf(), kind_of(&m)));
    }
    Ok(())
}

/// Clears O_NONBLOCK again once the kind is known (a terminal must not
/// answer EAGAIN to the serial device).
fn set_blocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own, integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn refuse(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Opens the kernel image for reading; anything but a regular file is
/// refused (a directory with EISDIR's message), never waited for.
pub fn open_kernel(path: &Path) -> io::Result<File> {
    open_regular(path)
}

/// Opens the initrd for reading, as [`open_kernel`] does the kernel.
pub fn open_initrd(path: &Path) -> io::Result<File> {
    open_regular(path)
}

fn open_regular(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let m = f.metadata()?;
    if m.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if !kernel_ok(&m) {
        return Err(refuse(format!("{}, not a regular file", kind_of(&m))));
    }
    Ok(f)
}

/// Opens (creating if needed) the serial output file for writing.
/// `truncate`: start it empty (the real open) or keep it (the sandbox's
/// pre-creation, so that Landlock can name the file).
pub fn open_serial(path: &Path, truncate: bool) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // O_WRONLY|O_NONBLOCK on a FIFO without a reader.
            Some(libc::ENXIO) => refuse("a FIFO, not a regular file or terminal".into()),
            _ => e,
        })?;
    let m = f.metadata()?;
    if !serial_ok(&m) {
        return Err(refuse(format!(
            "{}, not a regular file, terminal or character device",
            kind_of(&m)
        )));
    }
    // Truncate only what holds content: a terminal or /dev/null has none.
    if truncate && m.is_file() {
        f.set_len(0)?;
    }
    set_blocking(&f)?;
    Ok(f)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A scratch directory of the unit tests, removed when dropped.
    pub(crate) struct Dir(pub(crate) PathBuf);
    impl Dir {
        pub(crate) fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("vmm-inputs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    }

    #[test]
    fn fifos_and_directories_are_refused_at_once() {
        let d = Dir::new("kinds");
        let fifo = d.0.join("fifo");
        mkfifo(&fifo);
        let t0 = Instant::now();
        assert_eq!(
            check(&fifo, None, None),
            Err(InputError::Kernel(fifo.clone(), "a FIFO"))
        );
        assert_eq!(
            check(&d.0, None, None),
            Err(InputError::Kernel(d.0.clone(), "a directory"))
        );
        let file = d.0.join("k");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            check(&file, None, Some(&fifo)),
            Err(InputError::Serial(fifo.clone(), "a FIFO"))
        );
        assert_eq!(
            check(&file, Some(&fifo), None),
            Err(InputError::Initrd(fifo.clone(), "a FIFO"))
        );
        assert_eq!(
            check(&file, Some(&d.0), None),
            Err(InputError::Initrd(d.0.clone(), "a directory"))
        );
        assert_eq!(check(&file, Some(&file), None), Ok(()));
        assert_eq!(check(&file, None, Some(Path::new("/dev/null"))), Ok(()));
        assert_eq!(check(&file, None, Some(&d.0.join("new"))), Ok(()));
        assert!(open_initrd(&fifo).is_err());
        assert_eq!(
            open_initrd(&d.0).unwrap_err().raw_os_error(),
            Some(libc::EISDIR)
        );

        assert!(open_kernel(&fifo).is_err());
        let e = open_kernel(&d.0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR));
        assert!(open_kernel(&file).is_ok());
        assert!(open_serial(&fifo, true).is_err());
        assert!(open_serial(Path::new("/dev/null"), true).is_ok());
        let out = d.0.join("serial");
        std::fs::write(&out, b"old").unwrap();
        open_serial(&out, false).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        open_serial(&out, true).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"");
        assert!(t0.elapsed() < Duration::from_secs(10), "something blocked");
    }
}
