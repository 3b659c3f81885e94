//! What a worker is handed: a [`Connection`] (TCP or Unix [`Stream`]), counted as open in the
//! worker's shared page until it is dropped.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};

/// An accepted stream: TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
}

/// A connection handed to this worker, and the index of the listener that accepted it (in the
/// order the builder's `listen*` calls named them).
///
/// The worker counts it as open until it is dropped, or until the stream is taken out of it
/// ([`into_tcp`](Self::into_tcp), [`into_unix`](Self::into_unix), `OwnedFd::from`): from then
/// on the application owns the socket and the count does not follow it. The count is what
/// [`Schedule::LeastConnections`](crate::Schedule::LeastConnections) and
/// [`WorkerInfo::open_connections`](crate::WorkerInfo::open_connections) read: one relaxed
/// atomic add in shared memory when the connection ends, no system call.
#[derive(Debug)]
pub struct Connection {
    // First, so that it drops first: the count is down before the stream closes, and so
    // before the client can see the end of it.
    pub(super) _open: Tally,
    /// The listener's index.
    pub listener: usize,
    /// The stream.
    pub stream: Stream,
}

/// Counts a connection as closed, in the worker's shared page, when dropped.
#[derive(Debug)]
pub(super) struct Tally(pub(super) Option<&'static AtomicU32>);

impl Drop for Tally {
    #[inline]
    fn drop(&mut self) {
        if let Some(w) = self.0 {
            w.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Connection {
    /// The TCP stream, if this is a TCP connection.
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    /// The TCP stream, if this is a TCP connection.
    pub fn into_tcp(self) -> Option<TcpStream> {
        match self.stream {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    /// The Unix stream, if this is a Unix connection.
    pub fn into_unix(self) -> Option<UnixStream> {
        match self.stream {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) => None,
        }
    }
}

impl From<Connection> for OwnedFd {
    fn from(c: Connection) -> OwnedFd {
        match c.stream {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.stream {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        delegate!(self, s => s.read(buf))
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        delegate!(self, s => s.read_vectored(bufs))
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        delegate!(self, s => s.write(buf))
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        delegate!(self, s => s.write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
