//! One end of a `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`: frames with their fds.
//!
//! `SOCK_SEQPACKET` keeps message boundaries (one [`Frame`] per datagram, so no reassembly and no
//! partial reads), is reliable and ordered, and reports a dead peer as end of file. The fds of a
//! frame travel in the same datagram as an `SCM_RIGHTS` control message, so they can never be
//! paired with the wrong frame.
//!
//! * Send uses `MSG_NOSIGNAL`: a dead peer is [`Error::Closed`], never `SIGPIPE`. A frame of up to
//!   256 bytes is assembled in a stack buffer and sent with one `iovec` (with plain `send` when it
//!   carries no fd, which costs the kernel less than `sendmsg`); a larger one sends the header from
//!   the stack and the payload from the caller's slice. No allocation either way.
//! * Receive uses `MSG_CMSG_CLOEXEC` (every received fd is close-on-exec) into a
//!   [`RecvBuf`] that the caller keeps: one page for data, a fixed array for the control message.
//!   A datagram larger than a frame ([`Error::Truncated`]), a control message with more fds than
//!   a frame may carry ([`Error::ControlTruncated`]), a malformed header ([`Error::Frame`]) and an
//!   fd count that differs from the header ([`Error::FdMismatch`]) are errors; every fd that came
//!   with such a datagram is closed before the call returns.
//! * `EINTR` is retried. Blocking ([`send`](Channel::send), [`recv`](Channel::recv)) and
//!   nonblocking ([`try_send`](Channel::try_send), [`try_recv`](Channel::try_recv)) calls work on
//!   the same channel: the nonblocking ones pass `MSG_DONTWAIT`.
//!
//! # Example
//!
//! ```
//! use forkcluster::channel::{Channel, RecvBuf};
//! use forkcluster::frame::{Frame, Kind};
//! use std::os::fd::AsFd;
//!
//! let (a, b) = Channel::pair()?;
//! let (r, _w) = rustix::pipe::pipe()?;
//! a.send(&Frame::new(Kind::Message, 1, b"hello").with_fds(1), &[r.as_fd()])?;
//! let mut buf = RecvBuf::new();
//! let got = b.recv(&mut buf)?;
//! assert_eq!(got.frame.payload(), b"hello");
//! assert_eq!(got.fds.len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::mem::MaybeUninit;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use arrayvec::ArrayVec;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::error::{Error, Result};
use crate::frame::{Frame, HEADER_LEN, MAX_FDS, MAX_FRAME};

const CMSG_LEN: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));
/// Frames up to this size are sent from one contiguous stack buffer.
const SMALL_FRAME: usize = 256;

/// The receive buffer of a channel: one frame of data and room for [`MAX_FDS`] fds.
///
/// Keep one per receiver and reuse it; a received [`Frame`] borrows from it.
pub struct RecvBuf {
    data: [u8; MAX_FRAME],
    cmsg: [MaybeUninit<u8>; CMSG_LEN],
}

impl RecvBuf {
    /// A zeroed buffer.
    pub const fn new() -> Self {
        RecvBuf {
            data: [0; MAX_FRAME],
            cmsg: [MaybeUninit::uninit(); CMSG_LEN],
        }
    }
}

impl RecvBuf {
    /// The payload of the last frame received into this buffer, `len` bytes long.
    pub(crate) fn payload(&self, len: usize) -> &[u8] {
        &self.data[HEADER_LEN..HEADER_LEN + len.min(MAX_FRAME - HEADER_LEN)]
    }
}

impl Default for RecvBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// A received frame and the fds that came with it (as many as its header announces).
#[derive(Debug)]
pub struct Received<'b> {
    /// The decoded frame, borrowing the [`RecvBuf`].
    pub frame: Frame<'b>,
    /// Its fds, close-on-exec, owned: dropping them closes them.
    pub fds: ArrayVec<OwnedFd, MAX_FDS>,
}

/// What a receiver keeps of a [`Received`] frame once it lets go of the buffer: the kind, the
/// listener index (hand-offs), the payload length (the payload stays in the [`RecvBuf`]) and the
/// fds.
pub(crate) struct Taken {
    pub(crate) kind: crate::frame::Kind,
    pub(crate) listener: Option<u16>,
    pub(crate) len: usize,
    pub(crate) fds: ArrayVec<OwnedFd, MAX_FDS>,
}

impl Received<'_> {
    /// Ends the borrow of the buffer; see [`RecvBuf::payload`] for the payload.
    pub(crate) fn take(self) -> Taken {
        Taken {
            kind: self.frame.kind(),
            listener: self.frame.listener(),
            len: self.frame.payload().len(),
            fds: self.fds,
        }
    }
}

/// One end of a frame channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair (`socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`), both blocking.
    #[doc(alias = "socketpair")]
    pub fn pair() -> Result<(Channel, Channel)> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| Error::os("socketpair", e))?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Wraps an fd that is one end of a `SOCK_SEQPACKET` socketpair.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel { fd }
    }

    /// Gives the fd back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends `frame` with `fds`, waiting while the peer's buffer is full.
    ///
    /// `fds.len()` must equal `frame.fds()`. Fails with [`Error::Closed`] when the peer is gone.
    #[doc(alias = "sendmsg")]
    pub fn send(&self, frame: &Frame<'_>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_with(frame, fds, SendFlags::NOSIGNAL)
    }

    /// Like [`send`](Self::send), but fails with an error for which
    /// [`Error::is_would_block`] is true instead of waiting.
    pub fn try_send(&self, frame: &Frame<'_>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_with(frame, fds, SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
    }

    fn send_with(&self, frame: &Frame<'_>, fds: &[BorrowedFd<'_>], flags: SendFlags) -> Result<()> {
        if fds.len() != frame.fds() as usize {
            return Err(Error::Invalid(
                "fds attached differ from the frame's fd count",
            ));
        }
        let header = frame.header()?;
        let len = HEADER_LEN + frame.payload().len();
        // A small frame (every frame the cluster itself sends) goes out of one contiguous stack
        // buffer: one iovec, and without fds plain `send`, which the kernel handles with less
        // work than `sendmsg` (no msghdr or iovec array to copy in). Larger ones send the
        // payload from the caller's slice.
        let mut small = [0u8; SMALL_FRAME];
        let one;
        let two;
        let iov: &[IoSlice<'_>] = if len <= SMALL_FRAME {
            small[..HEADER_LEN].copy_from_slice(&header);
            small[HEADER_LEN..len].copy_from_slice(frame.payload());
            if fds.is_empty() {
                return self.send_plain(&small[..len], flags);
            }
            one = [IoSlice::new(&small[..len])];
            &one
        } else {
            two = [IoSlice::new(&header), IoSlice::new(frame.payload())];
            &two
        };
        let mut space = [MaybeUninit::<u8>::uninit(); CMSG_LEN];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(Error::Capacity("too many fds for one frame"));
        }
        loop {
            match rustix::net::sendmsg(&self.fd, iov, &mut control, flags) {
                Ok(n) if n == len => return Ok(()),
                Ok(_) => return Err(Error::Invalid("short send on a SOCK_SEQPACKET socket")),
                Err(Errno::INTR) => continue,
                Err(Errno::PIPE) | Err(Errno::CONNRESET) => return Err(Error::Closed),
                Err(e) => return Err(Error::os("sendmsg", e)),
            }
        }
    }

    fn send_plain(&self, bytes: &[u8], flags: SendFlags) -> Result<()> {
        loop {
            match rustix::net::send(&self.fd, bytes, flags) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(_) => return Err(Error::Invalid("short send on a SOCK_SEQPACKET socket")),
                Err(Errno::INTR) => continue,
                Err(Errno::PIPE) | Err(Errno::CONNRESET) => return Err(Error::Closed),
                Err(e) => return Err(Error::os("send", e)),
            }
        }
    }

    /// Receives one frame, waiting for it. [`Error::Closed`] at end of file.
    #[doc(alias = "recvmsg")]
    pub fn recv<'b>(&self, buf: &'b mut RecvBuf) -> Result<Received<'b>> {
        match self.recv_with(buf, RecvFlags::empty())? {
            Some(r) => Ok(r),
            None => Err(Error::Invalid("blocking receive on a nonblocking socket")),
        }
    }

    /// Receives one frame if one is queued; `Ok(None)` if none is. [`Error::Closed`] at end of
    /// file.
    pub fn try_recv<'b>(&self, buf: &'b mut RecvBuf) -> Result<Option<Received<'b>>> {
        self.recv_with(buf, RecvFlags::DONTWAIT)
    }

    fn recv_with<'b>(
        &self,
        buf: &'b mut RecvBuf,
        flags: RecvFlags,
    ) -> Result<Option<Received<'b>>> {
        let RecvBuf { data, cmsg } = buf;
        let mut control = RecvAncillaryBuffer::new(cmsg);
        let msg = loop {
            let mut iov = [IoSliceMut::new(&mut data[..])];
            match rustix::net::recvmsg(
                &self.fd,
                &mut iov,
                &mut control,
                flags | RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                Err(Errno::CONNRESET) => return Err(Error::Closed),
                Err(e) => return Err(Error::os("recvmsg", e)),
            }
        };
        // Take ownership of every fd that arrived first, so that each is closed on any error.
        let mut fds = ArrayVec::<OwnedFd, MAX_FDS>::new();
        let mut extra = false;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(iter) = m {
                for fd in iter {
                    // An fd that does not fit is dropped (closed) here.
                    extra |= fds.try_push(fd).is_err();
                }
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) || extra {
            return Err(Error::ControlTruncated);
        }
        if msg.flags.contains(ReturnFlags::TRUNC) {
            return Err(Error::Truncated);
        }
        // A zero-byte read is end of file only if the peer is gone: a live peer can also send
        // an empty datagram, which is a malformed frame (decode says `Short`).
        if msg.bytes == 0 && fds.is_empty() && self.at_eof() {
            return Err(Error::Closed);
        }
        let frame = Frame::decode(&data[..msg.bytes])?;
        if frame.fds() as usize != fds.len() {
            return Err(Error::FdMismatch {
                header: frame.fds(),
                received: fds.len() as u8,
            });
        }
        Ok(Some(Received { frame, fds }))
    }
}

impl Channel {
    /// After a zero-byte read without fds: whether it was end of file rather than an empty
    /// datagram. Only if the peer closed its end or shut down its writing side (`POLLRDHUP`,
    /// `POLLHUP`) and nothing else is queued (`FIONREAD` counts every queued byte on a
    /// `SOCK_SEQPACKET` socket), so frames sent after an empty datagram are still read.
    fn at_eof(&self) -> bool {
        let mut pfd = [PollFd::new(&self.fd, PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let gone = loop {
            match rustix::event::poll(&mut pfd, Some(&now)) {
                Ok(_) => {
                    break pfd[0]
                        .revents()
                        .intersects(PollFlags::RDHUP | PollFlags::HUP)
                }
                Err(Errno::INTR) => continue,
                // Cannot tell: keep reading a zero-byte datagram as end of file.
                Err(_) => return true,
            }
        };
        gone && rustix::io::ioctl_fionread(&self.fd).map_or(true, |n| n == 0)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
