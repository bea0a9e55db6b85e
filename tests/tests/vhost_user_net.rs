//! vhost-user-net, the datapath in a process of its own, with real
//! processes: netd hands it a TAP in a namespace of the test's own; QEMU
//! 7.2 (microvm, guest RAM in a shared memfd) is its frontend; ping goes
//! from the namespace through the TAP, the backend and the guest's rings.
//! Also: what the backend holds (`/proc/<pid>/fd`), how each of its
//! threads is sandboxed, and frontends that break the protocol or are
//! not who they should be.
//!
//! Without qemu-system-x86_64 the QEMU tests fail where `REQUIRE_QEMU=1`
//! (CI sets it) and are otherwise skipped loudly (`tests::prereq`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tests::net_guest::{guest_ip, ping, qemu_available, wait_ping};
use tests::netd_harness::{NOBODY, Netd, TEST_POLICY};
use tests::vhost_user::{Backend, START_TIMEOUT, start_qemu_frontend};
use tests::vmm_process::VmmProcess;
use tests::{TempDir, bin};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Generous: the CI machine has 2 cores shared with parallel tests.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Boots the guest on QEMU through the backend and pings it 5 times.
fn qemu_pings(netd: &Netd, b: &Backend, n: u8, queues: u16) -> VmmProcess {
    let q = start_qemu_frontend(&b.sock, n, queues, BOOT_TIMEOUT);
    b.wait_log("connected", START_TIMEOUT);
    assert!(
        wait_ping(&netd.ns, guest_ip(n), BOOT_TIMEOUT),
        "no ping answer through the backend\nbackend:\n{}\nqemu:\n{}\n{}",
        b.log(),
        q.output(),
        q.stderr()
    );
    let (sent, got, _) = ping(&netd.ns, guest_ip(n), 5, "0.2", 2);
    assert_eq!(got, sent, "lost pings\nbackend:\n{}", b.log());
    q
}

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
}

/// Every thread: no capability, no_new_privs, a seccomp filter and one of
/// its own kind on top of the inherited one, uid 65534.
fn assert_threads_sandboxed(pid: u32) -> usize {
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| e.ok())
        .collect();
    for t in &tasks {
        let status = std::fs::read_to_string(t.path().join("status")).expect("status");
        let name = status_field(&status, "Name:");
        assert_eq!(
            status_field(&status, "CapEff:"),
            "0000000000000000",
            "{name}"
        );
        assert_eq!(
            status_field(&status, "CapPrm:"),
            "0000000000000000",
            "{name}"
        );
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{name}");
        assert_eq!(status_field(&status, "Seccomp:"), "2", "{name}");
        let filters: u32 = status_field(&status, "Seccomp_filters:").parse().unwrap();
        assert!(
            filters >= 2,
            "thread {name} never narrowed its filter:\n{status}"
        );
        let uid = status_field(&status, "Uid:");
        assert!(
            uid.split_whitespace().all(|u| u == NOBODY.to_string()),
            "{name}: Uid {uid}"
        );
    }
    tasks.len()
}

/// QEMU as the frontend: the guest answers ping through netd's TAP and the
/// backend; the backend holds the TAP and no /dev/kvm, QEMU no TAP; every
/// backend thread is sandboxed.
#[test]
fn qemu_frontend_one_pair() {
    if !qemu_available() {
        return;
    }
    let netd = Netd::start(&bin("netd"), "vu1", TEST_POLICY, &[]);
    let dir = TempDir::new("vu1");
    let b = Backend::start(&netd, dir.path(), "vm0", 1);
    let q = qemu_pings(&netd, &b, 1, 1);
    let fds = b.fd_targets();
    assert_eq!(
        fds.iter().filter(|t| *t == "/dev/net/tun").count(),
        1,
        "backend fds: {fds:?}"
    );
    assert!(
        !fds.iter().any(|t| t.contains("kvm")),
        "backend fds: {fds:?}"
    );
    let qfds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", q.pid()))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !qfds.iter().any(|t| t == "/dev/net/tun"),
        "QEMU holds a TAP: {qfds:?}"
    );
    // main, the frontend's message thread, one worker.
    assert!(assert_threads_sandboxed(b.pid()) >= 3);
}

/// Two queue pairs (one worker thread each): two TAP queues in the
/// backend, ping through QEMU (`-netdev vhost-user,queues=2`, `mq=on`).
#[test]
fn qemu_frontend_two_pairs() {
    if !qemu_available() {
        return;
    }
    let netd = Netd::start(&bin("netd"), "vu2", TEST_POLICY, &[]);
    let dir = TempDir::new("vu2");
    let b = Backend::start(&netd, dir.path(), "vm0", 2);
    let _q = qemu_pings(&netd, &b, 1, 2);
    let fds = b.fd_targets();
    assert_eq!(
        fds.iter().filter(|t| *t == "/dev/net/tun").count(),
        2,
        "backend fds: {fds:?}"
    );
    // main, the frontend's message thread, two workers.
    assert!(assert_threads_sandboxed(b.pid()) >= 4);
}

/// A memfd of `len` bytes, sealed against shrinking when `seal` (as QEMU's
/// `memory-backend-memfd` seals guest RAM).
fn memfd(len: u64, seal: bool) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"guest".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    if seal {
        // SAFETY: fcntl with integer arguments on our own fd.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
    }
    fd
}

const UA: u64 = 0x7f00_0000_0000;

fn region(gpa: u64, size: u64, offset: u64, fd: &OwnedFd) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: UA + gpa,
        mmap_offset: offset,
        mmap_handle: fd.as_raw_fd(),
    }
}

/// A frontend past SET_OWNER and SET_FEATURES (with protocol features).
fn frontend(sock: &Path) -> Frontend {
    let mut f = Frontend::connect(sock, 256).expect("connect");
    f.set_owner().unwrap();
    let offered = f.get_features().unwrap();
    assert!(offered & VIRTIO_F_VERSION_1 != 0);
    f.set_features(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf & VhostUserProtocolFeatures::MQ)
        .unwrap();
    f
}

/// Whether the backend closed the connection of `f` (a request fails).
fn closed(f: &Frontend) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < START_TIMEOUT {
        if f.get_features().is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Frontends that break the protocol: each gets one log line and its
/// connection closed (or, for rings the datapath cannot use, the ring
/// stopped), the backend keeps serving the next frontend; at the end a
/// guest on QEMU still pings through it.
#[test]
fn hostile_frontends_are_refused_and_the_backend_keeps_serving() {
    let netd = Netd::start(&bin("netd"), "vu3", TEST_POLICY, &[]);
    let dir = TempDir::new("vu3");
    let b = Backend::start(&netd, dir.path(), "vm0", 1);
    let ended = "connection ended";
    let mut refusals = 0;
    let mut refused = |what: &str, f: Option<Frontend>| {
        if let Some(f) = f {
            assert!(closed(&f), "{what}: connection stays open\n{}", b.log());
        }
        refusals += 1;
        b.wait_log_count(ended, refusals, START_TIMEOUT);
        assert!(b.alive(), "{what}: backend died\n{}", b.log());
    };

    // Garbage instead of a vhost-user header.
    let mut s = UnixStream::connect(&b.sock).unwrap();
    s.write_all(&[0xa5; 100]).unwrap();
    s.set_read_timeout(Some(START_TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    refused("garbage", None);

    let mem = memfd(1 << 20, true);
    // A memfd the frontend could still shrink under the mapping.
    let unsealed = memfd(1 << 20, false);
    let f = frontend(&b.sock);
    let _ = f.set_mem_table(&[region(0, 1 << 20, 0, &unsealed)]);
    refused("unsealed memfd", Some(f));

    // A region larger than the memfd behind it.
    let f = frontend(&b.sock);
    let _ = f.set_mem_table(&[region(0, 16 << 20, 0, &mem)]);
    refused("region past the memfd's end", Some(f));

    // A region starting past the memfd's end.
    let f = frontend(&b.sock);
    let _ = f.set_mem_table(&[region(0, 1 << 20, 2 << 20, &mem)]);
    refused("offset past the memfd's end", Some(f));

    // Overlapping regions.
    let f = frontend(&b.sock);
    let _ = f.set_mem_table(&[
        region(0, 1 << 20, 0, &mem),
        region(0x8_0000, 0x8_0000, 0, &mem),
    ]);
    refused("overlapping regions", Some(f));

    // A queue index beyond the device's queues.
    let f = frontend(&b.sock);
    let _ = f.set_vring_num(200, 256);
    refused("queue index 200", Some(f));

    // Ring addresses in no region.
    let f = frontend(&b.sock);
    f.set_mem_table(&[region(0, 1 << 20, 0, &mem)]).unwrap();
    f.set_vring_num(1, 256).unwrap();
    let outside = UA + (64 << 20);
    let _ = f.set_vring_addr(
        1,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: outside,
            used_ring_addr: outside + 0x1000,
            avail_ring_addr: outside + 0x2000,
            log_addr: None,
        },
    );
    refused("rings outside memory", Some(f));

    // Rings that start in the region and run past its end: the crate
    // takes them; the datapath finds them unusable on the first kick,
    // stops that ring with one line, and the connection goes on.
    let mut f = frontend(&b.sock);
    f.set_mem_table(&[region(0, 1 << 20, 0, &mem)]).unwrap();
    f.set_vring_num(1, 256).unwrap();
    let end = UA + (1 << 20);
    f.set_vring_addr(
        1,
        &VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: UA,
            used_ring_addr: end - 4,
            avail_ring_addr: end - 2,
            log_addr: None,
        },
    )
    .unwrap();
    f.set_vring_base(1, 0).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    f.set_vring_call(1, &call).unwrap();
    f.set_vring_kick(1, &kick).unwrap();
    f.set_vring_enable(1, true).unwrap();
    kick.write(1).unwrap();
    b.wait_log("tx queue", START_TIMEOUT);
    assert_eq!(b.log().matches("tx queue").count(), 1, "{}", b.log());
    assert!(f.get_features().is_ok(), "connection lost\n{}", b.log());
    drop(f);
    b.wait_log_count("disconnected", 1, START_TIMEOUT);

    // Out of order: a ring kicked before any memory table (and before its
    // size and addresses). Nothing to serve yet: ignored, the connection
    // goes on.
    let mut f = Frontend::connect(&b.sock, 256).expect("connect");
    f.set_owner().unwrap();
    f.get_features().unwrap();
    f.set_features(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let kick = EventFd::new(0).unwrap();
    f.set_vring_kick(0, &kick).unwrap();
    f.set_vring_enable(0, true).unwrap();
    kick.write(1).unwrap();
    assert!(f.get_features().is_ok(), "connection lost\n{}", b.log());
    drop(f);
    b.wait_log_count("disconnected", 2, START_TIMEOUT);

    // After all that, a guest still gets its network through the backend.
    if qemu_available() {
        let _q = qemu_pings(&netd, &b, 1, 1);
    }
    assert_eq!(b.log().matches(ended).count(), refusals, "{}", b.log());
    if std::env::var_os("VHOST_USER_NET_SHOW_LOG").is_some() {
        eprintln!("{}", b.log());
    }
}

/// A frontend of another uid is refused (SO_PEERCRED), even when the
/// socket's mode would let it connect; the backend goes on serving.
#[test]
fn frontend_of_another_uid_is_refused() {
    let netd = Netd::start(&bin("netd"), "vu4", TEST_POLICY, &[]);
    let dir = TempDir::new("vu4");
    let b = Backend::start(&netd, dir.path(), "vm0", 1);
    let meta = std::fs::metadata(&b.sock).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), NOBODY, "socket owner");
    // Open it up (as root) so that only the SO_PEERCRED check is left.
    std::fs::set_permissions(&b.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let other = NOBODY - 1;
    // The child connects as `other`, asks for the features, and exits 0
    // when the backend closes the connection without a vhost-user reply
    // to anything past that (2 when it could not connect).
    let path = std::ffi::CString::new(b.sock.to_str().unwrap()).unwrap();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child makes raw system calls only, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: raw system calls on local data; _exit never returns.
        unsafe {
            if libc::setgid(other) != 0 || libc::setuid(other) != 0 {
                libc::_exit(3);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                libc::_exit(2);
            }
            let tv = libc::timeval {
                tv_sec: 20,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            // GET_FEATURES (1), version 1, no payload.
            let hdr: [u32; 3] = [1, 1, 0];
            libc::write(fd, hdr.as_ptr().cast(), 12);
            let mut buf = [0u8; 256];
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n == 0 {
                    libc::_exit(0);
                }
                if n < 0 {
                    libc::_exit(4);
                }
            }
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x} (2: no connect, 4: connection kept open)\n{}",
        b.log()
    );
    b.wait_log(
        &format!("refused frontend pid {pid} uid {other}"),
        START_TIMEOUT,
    );
    assert!(b.alive());
    // The owner is still served.
    let f = frontend(&b.sock);
    assert!(f.get_features().is_ok());
}
