//! Raw datagrams into `Channel::try_recv`: the first input byte picks how many fds to attach
//! (0..=10, so sometimes more than a frame may carry), the rest is the datagram, sent with
//! `sendmsg` straight onto a real `SOCK_SEQPACKET` socketpair. The receive never panics, its
//! result agrees with `Frame::decode` and the documented rules, it never leaks an fd, and the
//! channel is empty again afterwards.
//!
//! # Leak check
//!
//! The kernel installs received fds at the lowest free fd numbers (`MSG_CMSG_CLOEXEC` goes
//! through the same allocator as `open`), and at most `MAX_FDS` are installed per datagram. So
//! any fd that the receive path leaks sits in one of the first `MAX_FDS` free slots of the fd
//! table. At the start of every run we note the first 16 free fd numbers (libFuzzer itself
//! opens fds between runs: printing `NEW_FUNC` symbolizes, which opens the binary, so slots
//! noted once at start-up can be taken legitimately later); after the receive, with the
//! `Received` dropped, each of them must still be free (`fcntl(F_GETFD)` fails with `EBADF`).
//! That is a few dozen cheap system calls and no allocation per run, instead of reading
//! `/proc/self/fd`. Nothing but the receive runs in between, so a slot that is taken is a leak.
#![no_main]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use forkcluster::channel::{Channel, RecvBuf};
use forkcluster::frame::{Frame, MAX_FDS, MAX_FRAME};
use forkcluster::Error;
use libfuzzer_sys::fuzz_target;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// At most this many fds are attached.
const MAX_ATTACH: usize = 10;
/// Datagrams are cut to this size (well under the socket buffer, and past `MAX_FRAME`).
const MAX_DATAGRAM: usize = 3 * MAX_FRAME;
/// Free fd slots probed after every run.
const PROBED: usize = 16;

struct State {
    tx: OwnedFd,
    rx: Channel,
    buf: Box<RecvBuf>,
    attach: Vec<OwnedFd>,
    free: [RawFd; PROBED],
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the fd's flags; on a number that is not open it fails with
    // EBADF and touches nothing.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let (tx, rx) = Channel::pair().expect("socketpair");
        let mut attach: Vec<OwnedFd> = Vec::new();
        for _ in 0..MAX_ATTACH / 2 {
            let (r, w) = rustix::pipe::pipe().expect("pipe");
            attach.push(r);
            attach.push(std::fs::File::open("/dev/null").expect("/dev/null").into());
            drop(w);
        }
        let buf = Box::new(RecvBuf::new());
        Mutex::new(State {
            tx: tx.into_fd(),
            rx,
            buf,
            attach,
            free: [0; PROBED],
        })
    })
}

/// The first `PROBED` free fd numbers, now.
fn probe_free(free: &mut [RawFd; PROBED]) {
    let mut n = 0;
    let mut fd = 0;
    while n < PROBED {
        if !is_open(fd) {
            free[n] = fd;
            n += 1;
        }
        fd += 1;
    }
}

fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_ATTACH))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .expect("sendmsg");
    assert_eq!(n, bytes.len());
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let nfds = first as usize % (MAX_ATTACH + 1);
    let bytes = &rest[..rest.len().min(MAX_DATAGRAM)];
    let mut guard = state().lock().unwrap_or_else(|e| e.into_inner());
    let st = &mut *guard;
    probe_free(&mut st.free);
    let fds: Vec<BorrowedFd<'_>> = st.attach[..nfds].iter().map(|f| f.as_fd()).collect();
    send_raw(st.tx.as_fd(), bytes, &fds);
    match st.rx.try_recv(&mut st.buf) {
        Ok(Some(got)) => {
            assert!(nfds <= MAX_FDS && bytes.len() <= MAX_FRAME);
            assert_eq!(Frame::decode(bytes), Ok(got.frame));
            assert_eq!(got.fds.len(), nfds);
            assert_eq!(got.frame.fds() as usize, nfds);
        }
        Ok(None) => panic!("a datagram was sent but none was received"),
        Err(Error::ControlTruncated) => assert!(nfds > MAX_FDS),
        Err(Error::Truncated) => assert!(nfds <= MAX_FDS && bytes.len() > MAX_FRAME),
        Err(Error::Frame(e)) => {
            assert!(nfds <= MAX_FDS && bytes.len() <= MAX_FRAME);
            assert_eq!(Frame::decode(bytes), Err(e));
        }
        Err(Error::FdMismatch { header, received }) => {
            assert!(nfds <= MAX_FDS);
            assert_eq!(received as usize, nfds);
            let frame = Frame::decode(bytes).expect("a mismatch is found after decoding");
            assert_eq!(frame.fds(), header);
            assert_ne!(header as usize, nfds);
        }
        Err(e) => panic!(
            "unexpected error {e:?} for {nfds} fds and {} bytes",
            bytes.len()
        ),
    }
    for &fd in &st.free {
        assert!(
            !is_open(fd),
            "fd {fd} leaked ({nfds} fds attached, {} bytes)",
            bytes.len()
        );
    }
    assert!(
        matches!(st.rx.try_recv(&mut st.buf), Ok(None)),
        "the channel is not empty after one datagram"
    );
});
