//! A bounded property test of the codec's fd hygiene: random frames carrying
//! random numbers of fds (0 to 300, split over several sendmsg calls the way
//! the kernel's SCM_MAX_FD forces), received with random allowances. The
//! receiver gets exactly the fds it accepts or an error, and its fd table is
//! back at its baseline after every frame. Alone in its test binary so that
//! no other test opens fds meanwhile.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::codec::{self, CodecError, SCM_MAX_FD};
use common::netd::NetdRequest;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tests::hostile::fd_count;
use tests::rng::Rng;

const SEED: u64 = 0x00c0_dec0_ffd5_2026;
const CASES: usize = 600;

/// Sends `bytes` in `parts` pieces, spreading `fds` copies of `fd` over
/// them (at most SCM_MAX_FD each).
fn send_spread(s: &UnixStream, bytes: &[u8], fd: RawFd, fds: usize, rng: &mut Rng) {
    let min_parts = fds.div_ceil(SCM_MAX_FD).max(1);
    let parts = (min_parts + rng.index(3)).min(bytes.len());
    let per = bytes.len().div_ceil(parts);
    let mut left = fds;
    let chunks: Vec<&[u8]> = bytes.chunks(per).collect();
    let n_chunks = chunks.len();
    for (i, part) in chunks.into_iter().enumerate() {
        // What the remaining chunks can carry decides the least this one takes.
        let later = (n_chunks - i - 1) * SCM_MAX_FD;
        let least = left.saturating_sub(later);
        let most = left.min(SCM_MAX_FD);
        let n = least + rng.index(most - least + 1);
        left -= n;
        let raw = vec![fd; n];
        let iov = [IoSlice::new(part)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if n > 0 { &cmsg } else { &[] };
        sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).expect("sendmsg");
    }
    assert_eq!(left, 0);
}

fn payload(rng: &mut Rng) -> Vec<u8> {
    match rng.below(3) {
        0 => ron::to_string(&NetdRequest::Status).unwrap().into_bytes(),
        1 => format!(
            "OpenTap(name: \"vm{}\", queues: 1, vnet_hdr: true, vhost: false, mac: None)",
            rng.below(100)
        )
        .into_bytes(),
        _ => (0..1 + rng.below(200)).map(|_| rng.next() as u8).collect(),
    }
}

#[test]
fn random_fd_counts_never_leave_an_fd_behind() {
    println!("seed {SEED:#x}, {CASES} cases");
    let mut rng = Rng(SEED);
    let null = std::fs::File::open("/dev/null").unwrap();
    let me = std::process::id();
    let baseline = fd_count(me);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..CASES {
        let sent = rng.index(301);
        let allow = [0usize, 1, 2, 4, 64, 253, 300][rng.index(7)];
        let body = payload(&mut rng);
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        {
            let (a, b) = UnixStream::pair().unwrap();
            b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            send_spread(&a, &frame, null.as_raw_fd(), sent, &mut rng);
            drop(a);
            let decode = rng.below(2) == 0;
            let ctx = format!("case {case} (seed {SEED:#x}): {sent} fds sent, {allow} allowed");
            let got = if decode {
                codec::recv::<_, NetdRequest>(&b, 4096, allow).map(|r| r.fds.len())
            } else {
                codec::recv_frame(b.as_fd(), 4096, allow).map(|(_, fds)| fds.len())
            };
            match got {
                Ok(n) => {
                    assert!(sent <= allow, "{ctx}: accepted");
                    assert_eq!(n, sent, "{ctx}");
                    accepted += 1;
                }
                Err(CodecError::TooManyFds { max, got }) => {
                    assert!(sent > allow, "{ctx}: refused");
                    assert_eq!(max, allow, "{ctx}");
                    assert!(got > allow, "{ctx}");
                    refused += 1;
                }
                Err(CodecError::Decode(_) | CodecError::NotUtf8 | CodecError::Unexpected(_))
                    if decode && sent <= allow => {}
                Err(e) => panic!("{ctx}: {e}"),
            }
        }
        let now = fd_count(me);
        assert_eq!(now, baseline, "case {case} (seed {SEED:#x}): fd table grew");
    }
    println!("{accepted} accepted, {refused} refused");
    assert!(accepted > 50 && refused > 50, "both outcomes exercised");
}
