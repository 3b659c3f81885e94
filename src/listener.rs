//! Listening sockets: what the builder asked for, binding it, and the address each one ended up
//! with. Shared by the primary (which accepts, round-robin) and the workers (which accept,
//! shared schedule).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use crate::error::{Call, Result};

/// The address a listener is bound to.
#[derive(Debug, Clone)]
pub enum ListenAddr {
    /// A TCP socket (IPv4 or IPv6).
    Tcp(SocketAddr),
    /// A Unix stream socket.
    Unix(std::os::unix::net::SocketAddr),
}

impl core::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(a) => match a.as_pathname() {
                Some(p) => write!(f, "unix:{}", p.display()),
                None => f.write_str("unix:(unnamed)"),
            },
        }
    }
}

/// The kind of stream a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Tcp,
    Unix,
}

/// A bound, listening socket of the cluster.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) fd: OwnedFd,
    pub(crate) family: Family,
    pub(crate) addr: ListenAddr,
    /// A Unix path this cluster created and removes when the primary is dropped.
    pub(crate) unlink: Option<PathBuf>,
}

/// What the builder was asked to listen on.
pub(crate) enum Spec {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Bound(OwnedFd, Family),
}

impl Spec {
    /// A socket the application bound itself: the family is read from the socket.
    pub(crate) fn bound(fd: OwnedFd) -> Spec {
        let family = match rustix::net::getsockname(&fd).map(|a| a.address_family()) {
            Ok(rustix::net::AddressFamily::UNIX) => Family::Unix,
            _ => Family::Tcp,
        };
        Spec::Bound(fd, family)
    }
}

/// Binds (unless the socket came bound), listens, and reads back the address.
pub(crate) fn bind(spec: Spec, backlog: i32, defer_accept: Option<u32>) -> Result<Listener> {
    let (fd, family, unlink) = match spec {
        Spec::Tcp(addr) => (
            OwnedFd::from(TcpListener::bind(addr).call("bind")?),
            Family::Tcp,
            None,
        ),
        Spec::Unix(path) => (
            OwnedFd::from(UnixListener::bind(&path).call("bind")?),
            Family::Unix,
            Some(path),
        ),
        Spec::Bound(fd, family) => (fd, family, None),
    };
    rustix::net::listen(&fd, backlog).call("listen")?;
    // The listener is nonblocking in every process: the primary accepts until EAGAIN, and in
    // the shared schedule the workers race for each connection.
    rustix::io::ioctl_fionbio(&fd, true).call("ioctl(FIONBIO)")?;
    if let (Some(secs), Family::Tcp) = (defer_accept, family) {
        crate::sys::set_tcp_defer_accept(fd.as_fd(), secs)?;
    }
    let addr = local_addr(fd.as_fd(), family)?;
    Ok(Listener {
        fd,
        family,
        addr,
        unlink,
    })
}

/// Removes the socket files these listeners created.
pub(crate) fn unlink_all(listeners: &[Listener]) {
    for l in listeners {
        if let Some(p) = &l.unlink {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn local_addr(fd: BorrowedFd<'_>, family: Family) -> Result<ListenAddr> {
    let owned = fd.try_clone_to_owned().call("fcntl(F_DUPFD_CLOEXEC)")?;
    Ok(match family {
        Family::Tcp => ListenAddr::Tcp(TcpListener::from(owned).local_addr().call("getsockname")?),
        Family::Unix => {
            ListenAddr::Unix(UnixListener::from(owned).local_addr().call("getsockname")?)
        }
    })
}
