//! The crate's error type.
//!
//! Every fallible call returns [`Error`]. It is `Copy`, carries no heap data and names what went
//! wrong: the system call and its `errno`, a malformed frame, a truncated datagram, a file
//! descriptor count that does not match, a peer that is gone, or a setting that cannot work.

use core::fmt;

use crate::frame::FrameError;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in forkcluster.
///
/// # Example
///
/// ```
/// use forkcluster::Error;
///
/// let e = Error::from(std::io::Error::from_raw_os_error(libc::EADDRINUSE));
/// assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
/// assert_eq!(e.to_string(), "system call failed: Address already in use (os error 98)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    Os {
        /// The call, as in its man page (`"sendmsg"`, `"bind"`, ...); `"io"` when unknown.
        call: &'static str,
        /// The error number it returned.
        errno: rustix::io::Errno,
    },
    /// A frame that breaks the wire format (see [`frame`](crate::frame)).
    Frame(FrameError),
    /// The datagram was larger than [`MAX_FRAME`](crate::frame::MAX_FRAME) bytes (`MSG_TRUNC`).
    Truncated,
    /// More file descriptors were attached than a frame may carry (`MSG_CTRUNC`). Every
    /// descriptor that did arrive was closed.
    ControlTruncated,
    /// The number of file descriptors that arrived differs from the frame header's count.
    /// Every descriptor that did arrive was closed.
    FdMismatch {
        /// The count in the header.
        header: u8,
        /// The count that arrived.
        received: u8,
    },
    /// The peer closed its end of the channel (end of file, `EPIPE` or `ECONNRESET`).
    Closed,
    /// A setting or call that cannot work, with the reason.
    Invalid(&'static str),
    /// A fixed-capacity table is full (worker table, pending connections, payload size).
    Capacity(&'static str),
    /// No worker with that id is alive.
    NoSuchWorker(u32),
    /// A file descriptor passed by the service manager (systemd socket activation,
    /// [`systemd::listen_fds`](crate::systemd::listen_fds)) is not what it must be.
    Activation {
        /// The descriptor's number (3 for the first).
        fd: i32,
        /// What is wrong with it (`"is not a socket"`, ...).
        why: &'static str,
    },
}

impl Error {
    /// Wraps an errno from a named system call.
    #[inline]
    pub(crate) const fn os(call: &'static str, errno: rustix::io::Errno) -> Self {
        Error::Os { call, errno }
    }

    /// The OS error number, when this is an OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Os { errno, .. } => Some(errno.raw_os_error()),
            _ => None,
        }
    }

    /// True when the call would have blocked (`EAGAIN`): try again when the fd is ready.
    pub fn is_would_block(&self) -> bool {
        matches!(self, Error::Os { errno, .. } if *errno == rustix::io::Errno::AGAIN)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Os { call: "io", errno } => {
                write!(f, "system call failed: {}", std::io::Error::from(*errno))
            }
            Error::Os { call, errno } => {
                write!(f, "{call} failed: {}", std::io::Error::from(*errno))
            }
            Error::Frame(e) => write!(f, "malformed frame: {e}"),
            Error::Truncated => f.write_str("datagram larger than a frame (MSG_TRUNC)"),
            Error::ControlTruncated => {
                f.write_str("too many file descriptors attached (MSG_CTRUNC)")
            }
            Error::FdMismatch { header, received } => {
                write!(
                    f,
                    "frame header announces {header} fds but {received} arrived"
                )
            }
            Error::Closed => f.write_str("peer closed the channel"),
            Error::Invalid(why) => write!(f, "invalid: {why}"),
            Error::Capacity(what) => write!(f, "capacity exceeded: {what}"),
            Error::NoSuchWorker(id) => write!(f, "no live worker with id {id}"),
            Error::Activation { fd, why } => write!(f, "socket activation: fd {fd} {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Error::Frame(e)
    }
}

impl From<rustix::io::Errno> for Error {
    fn from(errno: rustix::io::Errno) -> Self {
        Error::Os { call: "io", errno }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => Error::Os {
                call: "io",
                errno: rustix::io::Errno::from_raw_os_error(n),
            },
            None => Error::Invalid("I/O error without an OS error number"),
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Os { errno, .. } => errno.into(),
            Error::Closed => std::io::Error::new(std::io::ErrorKind::BrokenPipe, e),
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// Adds the system call's name to a rustix result.
pub(crate) trait Call<T> {
    fn call(self, name: &'static str) -> Result<T>;
}

impl<T> Call<T> for rustix::io::Result<T> {
    #[inline]
    fn call(self, name: &'static str) -> Result<T> {
        self.map_err(|e| Error::os(name, e))
    }
}

impl<T> Call<T> for std::io::Result<T> {
    #[inline]
    fn call(self, name: &'static str) -> Result<T> {
        self.map_err(|e| match Error::from(e) {
            Error::Os { errno, .. } => Error::os(name, errno),
            other => other,
        })
    }
}
